"""A Recipe: the six stages of one dataset and the facts about it.

A recipe is declaration, not code: which files (download), how they parse
(clean), how they are stored and read (save, load), what happens to a batch
(transform) and how batches are served (wrap), plus the dataset's facts
(classes, dims, normalization statistics). Swap one stage with
``dataclasses.replace(recipe, download=...)`` and the rest stay as they are.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from datapipe.stages.clean import Clean
from datapipe.stages.download import Download
from datapipe.stages.load import ArrowLoad
from datapipe.stages.save import ArrowSave
from datapipe.stages.transform import Transform
from datapipe.stages.wrap import Wrap


@dataclass(frozen=True)
class DatasetInfo:
    """What a model needs to know about the data, and what a data card shows."""

    classes: tuple[str, ...]
    dims: tuple[int, ...]  # C x H x W of one sample as the loader yields it
    mean: tuple[float, ...] | None = None  # per channel, in [0, 1] units; None: computed
    std: tuple[float, ...] | None = None
    description: str = ""
    homepage: str = ""
    license: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)


@dataclass(frozen=True)
class Recipe:
    """How one dataset goes from its source to batches: six stages and its facts."""

    name: str
    version: str
    info: DatasetInfo
    download: Download
    clean: Clean
    save: ArrowSave = field(default_factory=ArrowSave)
    load: ArrowLoad = field(default_factory=ArrowLoad)
    transform: Transform = field(default_factory=Transform)
    wrap: Wrap = field(default_factory=Wrap)

    def stages(self) -> tuple[Any, ...]:
        """The stages in chain order: download, clean, save, load, transform, wrap."""
        return (self.download, self.clean, self.save, self.load, self.transform, self.wrap)

    def splits(self) -> tuple[str, ...]:
        """The source splits the recipe can prepare (e.g. train, test)."""
        return self.clean.splits()

    def config(self) -> dict[str, Any]:
        """Every stage's config, keyed by stage kind."""
        return {stage.kind: stage.config() for stage in self.stages()}

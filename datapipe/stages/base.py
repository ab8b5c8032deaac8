"""What every stage shares: it is a frozen dataclass whose fields are its config."""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar


class Stage:
    """A stage of a recipe. Subclasses are frozen dataclasses; their fields are the config.

    The config is plain JSON (see :meth:`config`) and becomes part of the
    fingerprint of everything the stage shapes, so two stages with equal configs
    must do the same thing. Code changes that alter bytes bump the recipe version.
    """

    kind: ClassVar[str] = "stage"

    def config(self) -> dict[str, Any]:
        """The stage's JSON-serializable config, tagged with its kind and type."""
        fields = ({f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
                  if dataclasses.is_dataclass(self) else {})
        return {"stage": self.kind, "type": type(self).__name__, **_jsonable(fields)}


def _jsonable(value: Any) -> Any:
    """Tuples to lists, keys to str, nested dataclasses to {"type", fields}, recursively."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
        return {"type": type(value).__name__, **_jsonable(fields)}
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value

"""DataModule: what a recipe gives its user, in the shape of Lightning's DataModule.

    dm = MNISTDataModule(batch_size=256)   # or datapipe.load("mnist", batch_size=256)
    dm.prepare_data()                      # once per node; locked, idempotent
    dm.setup("fit")                        # every process: splits and datasets
    for x, y in dm.train_dataloader(): ...

Batches leave the loader as uint8; ``on_after_batch_transfer`` turns them into
normalized float32 on the device (the trainer calls the three transfer hooks; a
plain loop can call ``dm.to_device(batch, device)``). torch is imported only when
a loader is built, so preparing and describing data stays fast.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import os
from collections.abc import Iterable, Mapping
from typing import Any

from datapipe.cache import CACHE_ENV, Cache, check_name
from datapipe.errors import CacheError, ConfigError, NotPreparedError
from datapipe.prepare import PreparedSplit, find_prepared, prepare_split, unverified_hint
from datapipe.recipe import Recipe
from datapipe.remote.store import is_remote
from datapipe.splits import (
    DEFAULT_SPLITS,
    PARTS,
    Folds,
    PerClass,
    SplitPlan,
    SplitSpec,
    Stratified,
    load_or_create_plan,
)
from datapipe.stages.download import FetchOptions, check_mirror

PARTS_OF_STAGE = {
    "fit": ("train", "val"),
    "validate": ("val",),
    "test": ("test",),
    "predict": ("predict",),
    None: PARTS,
}


MAX_SEED = 2**63 - 1  # torch.manual_seed takes no more
CLAIM_ATTEMPTS = 3  # prepares of a split that readers sharing the local cache evict at once
_FLAGS = ("pin_memory", "drop_last", "persistent_workers", "normalize", "quiet")
_PATHS = ("cache_dir", "source")
# Arguments whose None stands for the recipe's value, which hparams records instead.
_RESOLVED = ("batch_size", "num_workers", "shuffle", "pin_memory", "drop_last", "normalize")


def _check_arguments(recipe: Recipe, args: Mapping[str, Any]) -> None:
    """Refuse, in one line each, constructor arguments that would act as something else
    later (``drop_last="no"`` as True, ``batch_size=True`` as 1, a path as a name)."""
    check_name(recipe.name, "recipe name")
    check_name(recipe.version, "recipe version")
    seed = args["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise ConfigError(f"seed must be an integer in 0..{MAX_SEED}, got {seed!r}")
    for key, low in (("batch_size", 1), ("num_workers", 0)):
        value = args[key]
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                  or value < low):
            raise ConfigError(f"{key} must be an integer of at least {low}, got {value!r}")
    for key in _FLAGS:
        if args[key] is not None and not isinstance(args[key], bool):
            raise ConfigError(f"{key} must be True, False or None, got {args[key]!r}")
    if args["shuffle"] is not None and not isinstance(args["shuffle"], bool) \
            and args["shuffle"] != "shards":
        raise ConfigError(f"shuffle must be True, False, 'shards' or None, got "
                          f"{args['shuffle']!r}")
    if not isinstance(args["verify"], bool):
        raise ConfigError(f"verify must be True or False, got {args['verify']!r}")
    for key in _PATHS:
        if args[key] is not None and not isinstance(args[key], (str, os.PathLike)):
            raise ConfigError(f"{key} must be a folder path, got {args[key]!r}")
    mirrors = args["mirrors"]
    if not isinstance(mirrors, tuple):
        raise ConfigError(f"mirrors must be a list of URLs, got {mirrors!r}")
    for mirror in mirrors:
        check_mirror(mirror)


def _val_spec(val_split: Any, stratify: Any, folds: Any, fold: Any) -> Any:
    """The val argument of the split plan that these DataModule arguments ask for."""
    if not isinstance(stratify, bool):
        raise ConfigError(f"stratify must be True or False, not {stratify!r}")
    if folds is not None or fold is not None:
        if folds is None or fold is None:
            raise ConfigError(
                f"give folds=K and fold=I together (got folds={folds!r}, fold={fold!r}); to "
                f"run every fold use datapipe.cross_validate or `datapipe train --folds K`")
        return Folds(folds, fold, stratify)
    if not stratify:
        return val_split
    if isinstance(val_split, (str, PerClass)) or val_split in (None, 0):
        raise ConfigError(
            f"stratify=True carves a count or a fraction of train (val_split=5000 or 0.1) or "
            f"cuts folds (folds=K); it does not apply to val_split={val_split!r}")
    return Stratified(val_split)


_NOT_PLAIN = object()


def _plain(value: Any) -> Any:
    """``value`` as plain data (None, bool, int, float, str, lists and str-keyed dicts of
    them; paths as text), or ``_NOT_PLAIN``: what a checkpoint read weights-only holds."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    if isinstance(value, (list, tuple)):
        items = [_plain(v) for v in value]
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items) else items
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        items = {k: _plain(v) for k, v in value.items()}
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items.values()) else items
    return _NOT_PLAIN


def call_arguments(function: Any, args: tuple, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The plain-data arguments of the call ``function(*args, **kwargs)``, defaults
    included and ``**kwargs`` spread out; arguments that are not plain data are left out."""
    signature = inspect.signature(function)
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError:
        return {}
    bound.apply_defaults()
    found: dict[str, Any] = {}
    for name, value in bound.arguments.items():
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            found.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            found[name] = value
    return {k: p for k, v in found.items() if (p := _plain(v)) is not _NOT_PLAIN}


class DataModule:
    """Splits, datasets and DataLoaders of one recipe, with Lightning's hook names.

    ``train_split``/``test_split``/``predict_split`` are split specs such as
    ``"train"``, ``"train[:90%]"`` or ``"train+test"`` (``predict_split=None``
    means the test split). ``val_split`` is a count or a fraction carved from the
    train split with ``seed`` (lightning-bolts semantics and default, 0.2), or a spec,
    which is then removed from train; 0 or None means no validation split.
    ``stratify=True`` carves that count or fraction so every class keeps its share.
    The defaults are :class:`~datapipe.splits.SplitSpec`'s; ``self.splits`` holds them.

    ``normalize`` (default False, as in lightning-bolts) maps images to
    ``(x - mean) / std`` on the device; otherwise they are only scaled to [0, 1].

    ``shuffle`` (train only) is True (a global shuffle, the default), False, or
    ``"shards"``: the shard-aware order of :mod:`datapipe.shard_order`, in which each
    rank reads a part of the split's shards (docs/object-storage.md).

    lightning-bolts' attributes are here too: ``data_dir``, ``val_split``,
    ``num_workers``, ``normalize``, ``shuffle``, ``pin_memory``, ``drop_last``,
    ``dataset_train``/``dataset_val``/``dataset_test``, ``num_samples``, ``dims``,
    ``num_classes``; and ``train_transforms``/``val_transforms``/``test_transforms``
    (constructor arguments or attributes): a per-sample torchvision-style transform
    replaces that split's batch pipeline with the slower per-sample one of
    :mod:`datapipe.sample_transform`.

    ``resident=True`` (or a device name) copies each split's uint8 images once onto
    the training device (CUDA when present): a batch is then an ``index_select``
    there plus the whole-batch augmentation, and normalization in
    ``on_after_batch_transfer`` as always, with no per-batch copy from the host.

    ``folds=K, fold=I``: K-fold cross-validation. The train split is cut into K seeded
    folds (stratified with ``stratify=True``); fold I is val and the other K-1 are
    train, so ``val_split`` is not used. The K-fold plan is computed once and shared by
    every fold and process; each fold has its own split id (checkpoints record it).
    """

    prepare_data_per_node = True  # Lightning's flag: prepare once per node, not globally

    def __new__(cls, *args: Any, **kwargs: Any) -> DataModule:
        self = super().__new__(cls)
        # What the module was made from, for ``hparams`` (datapipe.load records its own call).
        self._made_by = (functools.partial(cls.__init__, self), args, kwargs)
        return self

    @property
    def hparams(self) -> dict[str, Any]:
        """The arguments this module was made with, defaults included, as plain data,
        with the recipe's ``name``: ``datapipe.load(name, **rest)`` makes it again.

        Lightning saves these in its checkpoints (``as_lightning_datamodule``).
        """
        function, args, kwargs = self._made_by
        found = call_arguments(function, args, kwargs)
        for key in _RESOLVED:  # None means "the recipe's": say what that is
            if key in found and found[key] is None:
                found[key] = getattr(self, key)
        return {"name": self.name, **found}

    def __init__(
        self,
        recipe: Recipe,
        *,
        cache_dir: str | os.PathLike | None = None,
        batch_size: int | None = None,
        num_workers: int | None = None,
        seed: int = DEFAULT_SPLITS.seed,
        shuffle: bool | str | None = None,
        pin_memory: bool | None = None,
        drop_last: bool | None = None,
        persistent_workers: bool | None = None,
        normalize: bool | None = None,
        train_split: str | None = DEFAULT_SPLITS.train,
        val_split: int | float | str | None = DEFAULT_SPLITS.val,
        test_split: str | None = DEFAULT_SPLITS.test,
        predict_split: str | None = DEFAULT_SPLITS.predict,
        mirrors: Iterable[str] = (),
        source: str | os.PathLike | None = None,
        verify: bool = True,
        quiet: bool | None = None,
        data_dir: str | os.PathLike | None = None,
        resident: bool | str = False,
        stratify: bool = False,
        folds: int | None = None,
        fold: int | None = None,
        train_transforms: Any = None,
        val_transforms: Any = None,
        test_transforms: Any = None,
        predict_transforms: Any = None,
        local_cache: str | os.PathLike | None = None,
        local_cache_limit: int | str | None = None,
        storage_options: Mapping[str, Any] | None = None,
    ) -> None:
        if cache_dir is None:
            cache_dir = data_dir  # lightning-bolts spells it data_dir
        if isinstance(mirrors, str):
            mirrors = (mirrors,)
        elif isinstance(mirrors, Iterable) and not isinstance(mirrors, bytes):
            mirrors = tuple(mirrors)
        _check_arguments(recipe, locals())
        wrap_overrides = {
            key: value
            for key, value in dict(
                batch_size=batch_size,
                num_workers=num_workers,
                shuffle=shuffle,
                pin_memory=pin_memory,
                drop_last=drop_last,
                persistent_workers=persistent_workers,
            ).items()
            if value is not None
        }
        transform = recipe.transform
        if normalize is not None:
            transform = dataclasses.replace(transform, normalize=normalize)
        self.recipe = dataclasses.replace(
            recipe, wrap=dataclasses.replace(recipe.wrap, **wrap_overrides), transform=transform
        )
        if not isinstance(resident, (bool, str)):
            raise ConfigError(f"resident must be True, False or a device name such as "
                              f"'cuda:0', got {resident!r}")
        self.resident = resident
        self.remote = None  # an object-store cache root, read through the local cache
        if is_remote(os.environ.get(CACHE_ENV) if cache_dir is None else cache_dir):
            cache_dir = cache_dir or os.environ[CACHE_ENV]
            from datapipe.remote.sync import open_remote

            self.remote = open_remote(cache_dir, local_cache, local_cache_limit,
                                      storage_options)
            self.cache = self.remote.local
        elif (local_cache, local_cache_limit, storage_options) != (None, None, None):
            raise ConfigError("local_cache, local_cache_limit and storage_options are for a "
                              "cache_dir on object storage (s3://bucket/prefix); for a local "
                              "cache give cache_dir only")
        else:
            self.cache = Cache.at(cache_dir)
        self.data_dir = os.fspath(self.cache.root)  # lightning-bolts' name of where data lives
        self.fetch_options = FetchOptions(
            mirrors=tuple(mirrors),
            source=os.fspath(source) if source is not None else None,
            verify=verify,
            quiet=quiet,
        )
        self._val_split = val_split
        self.splits = SplitSpec(train=train_split, val=_val_spec(val_split, stratify, folds, fold),
                                test=test_split, predict=predict_split, seed=seed)
        self.plan: SplitPlan | None = None
        self._plan_specs: SplitSpec | None = None  # the specs self.plan was made from
        self.prepared: dict[str, PreparedSplit] = {}
        self.datasets: dict[str, Any] = {}
        self._sample_transforms: dict[str, Any] = {}
        for part, given in zip(PARTS, (train_transforms, val_transforms, test_transforms,
                                       predict_transforms), strict=True):
            self._set_sample_transform(part, given)
        self._train_loader: Any = None
        self._pending_loader_state: Mapping[str, int] | None = None

    # ------------------------------------------------------------------ facts

    @property
    def name(self) -> str:
        return self.recipe.name

    @property
    def classes(self) -> list[str]:
        return list(self.recipe.info.classes)

    @property
    def num_classes(self) -> int:
        return self.recipe.info.num_classes

    @property
    def dims(self) -> tuple[int, ...]:
        return tuple(self.recipe.info.dims)

    @property
    def transform(self):
        return self.recipe.transform

    @property
    def split_specs(self) -> dict[str, Any]:
        """The four part specs (train, val, test, predict) of ``self.splits``."""
        return self.splits.parts()

    @property
    def seed(self) -> int:
        return self.splits.seed

    @property
    def val_split(self) -> Any:
        """The ``val_split`` this module was given (lightning-bolts' attribute)."""
        return self._val_split

    def _set_wrap(self, **changes: Any) -> None:
        self.recipe = dataclasses.replace(
            self.recipe, wrap=dataclasses.replace(self.recipe.wrap, **changes))

    @property
    def normalize(self) -> bool:
        return self.recipe.transform.normalize

    @normalize.setter
    def normalize(self, value: bool) -> None:
        if not isinstance(value, bool):
            raise ConfigError(f"normalize must be True or False, got {value!r}")
        self.recipe = dataclasses.replace(self.recipe, transform=dataclasses.replace(
            self.recipe.transform, normalize=value))

    # The loader settings, readable and settable as lightning-bolts' plain attributes are.
    batch_size = property(lambda self: self.recipe.wrap.batch_size,
                          lambda self, v: self._set_wrap(batch_size=v))
    num_workers = property(lambda self: self.recipe.wrap.num_workers,
                           lambda self, v: self._set_wrap(num_workers=v))
    shuffle = property(lambda self: self.recipe.wrap.shuffle,
                       lambda self, v: self._set_wrap(shuffle=v))
    pin_memory = property(lambda self: self.recipe.wrap.pin_memory,
                          lambda self, v: self._set_wrap(pin_memory=v))
    drop_last = property(lambda self: self.recipe.wrap.drop_last,
                         lambda self, v: self._set_wrap(drop_last=v))

    def _built(self, part: str) -> Any:
        if part not in self.datasets:
            stage = {"train": "fit", "val": "fit"}.get(part, part)
            raise AttributeError(f"{type(self).__name__} has no {part} dataset yet; call "
                                 f"setup({stage!r}) first")
        return self.datasets[part]

    # lightning-bolts' names of the datasets setup() builds.
    dataset_train = property(lambda self: self._built("train"))
    dataset_val = property(lambda self: self._built("val"))
    dataset_test = property(lambda self: self._built("test"))
    dataset_predict = property(lambda self: self._built("predict"))

    def _set_sample_transform(self, part: str, transform: Any) -> None:
        if transform is not None and not callable(transform):
            raise ConfigError(f"{part}_transforms must be a callable taking a PIL image "
                              f"(a torchvision transform), got {transform!r}")
        if self._sample_transforms.get(part) is not transform:
            self.datasets.pop(part, None)  # built again, with the transform, when next used
            if part == "train":
                self._train_loader = None
        if transform is None:
            self._sample_transforms.pop(part, None)
        else:
            self._sample_transforms[part] = transform

    # Per-sample transforms (lightning-bolts' attributes); see datapipe.sample_transform.
    train_transforms = property(lambda self: self._sample_transforms.get("train"),
                                lambda self, t: self._set_sample_transform("train", t))
    val_transforms = property(lambda self: self._sample_transforms.get("val"),
                              lambda self, t: self._set_sample_transform("val", t))
    test_transforms = property(lambda self: self._sample_transforms.get("test"),
                               lambda self, t: self._set_sample_transform("test", t))
    predict_transforms = property(lambda self: self._sample_transforms.get("predict"),
                                  lambda self, t: self._set_sample_transform("predict", t))

    @property
    def num_samples(self) -> int:
        """The number of training samples (lightning-bolts' attribute): the train part's
        size once its source split is prepared, else what the declared size gives."""
        if self.splits.train is None:
            return 0
        try:
            return self.plan_splits("fit").sizes()["train"]
        except NotPreparedError:
            declared = self._declared_train_samples()
            if declared is None:
                raise
            return declared

    def _declared_train_samples(self) -> int | None:
        """The train part's size from the dataset's declared size, before any data exists
        (None: the recipe declares none)."""
        return None

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, batch_size={self.batch_size}, "
                f"splits={self.split_specs}, cache={str(self.cache.root)!r})")

    # ------------------------------------------------------------------ prepare

    def source_splits(self) -> list[str]:
        """The recipe's source splits that this module's split specs use."""
        named = self.splits.sources()
        return [s for s in self.recipe.splits() if s in named] + sorted(
            named - set(self.recipe.splits())
        )

    def prepare_data(
        self, splits: Iterable[str] | None = None, force: bool = False
    ) -> dict[str, PreparedSplit]:
        """Download, clean and save the source splits (default: those this module uses).

        Locked and idempotent: many processes may call it at once; each file is
        downloaded once and each split prepared once.
        """
        wanted = list(splits) if splits is not None else self.source_splits()
        for split in wanted:
            self.prepared[split] = self._prepare(split, force)
        return {split: self.prepared[split] for split in wanted}

    def _prepare(self, split: str, force: bool) -> PreparedSplit:
        """Prepare ``split``; with an object-store root, fetch it from there when it is
        published, else prepare it locally and publish it (racing publishers are harmless)."""
        if self.remote is None:
            return prepare_split(self.recipe, split, self.cache, self.fetch_options,
                                 force=force)[0]
        from datapipe.remote.sync import fetch_split, publish_split

        fetched = None if force else fetch_split(self.remote, self.recipe, split,
                                                 self.fetch_options)
        if fetched is not None:
            return fetched
        prepared = prepare_split(self.recipe, split, self.cache, self.fetch_options,
                                 force=force)[0]
        # Claimed before the upload (which takes a while): no evictor takes it meanwhile.
        attempts = 1
        while not self.remote.claim(prepared):
            # Evicted by a reader sharing the local cache between the prepare and the
            # claim: prepared again (the downloads are still there), a bounded number of times.
            if attempts == CLAIM_ATTEMPTS:
                raise CacheError(f"{split} of {self.name} was evicted from the local cache "
                                 f"{self.cache.root} as soon as it was prepared, {attempts} "
                                 f"times: raise local_cache_limit")
            prepared = prepare_split(self.recipe, split, self.cache, self.fetch_options)[0]
            attempts += 1
        publish_split(self.remote, prepared, force=force)
        return prepared

    def _lookup(self, split: str) -> PreparedSplit | None:
        """The prepared entry of ``split``, if the cache holds one this module may use."""
        prepared = self.prepared.get(split) or find_prepared(
            self.recipe, split, self.cache, self.fetch_options
        )
        if prepared is not None and self.remote is not None and \
                not self.remote.claim(prepared):
            prepared = None  # a reader sharing the local cache evicted it: fetch it again
        if prepared is None and self.remote is not None:
            from datapipe.remote.sync import fetch_split

            prepared = fetch_split(self.remote, self.recipe, split, self.fetch_options)
        if prepared is not None:
            self.prepared[split] = prepared
        return prepared

    def _find(self, split: str) -> PreparedSplit:
        prepared = self._lookup(split)
        if prepared is None:
            raise NotPreparedError(
                f"split {split!r} of {self.name} is not prepared in "
                f"{self.remote.store.url if self.remote else self.cache.root}; "
                f"call prepare_data() or run `datapipe prepare {self.name} --split {split}`"
                + unverified_hint(self.recipe, split, self.cache, self.fetch_options)
            )
        return prepared

    # ------------------------------------------------------------------ setup

    def plan_splits(self, stage: str | None = None) -> SplitPlan:
        """The seeded split plan over the prepared data (computed once, then cached).

        With a ``stage``, the source splits that stage reads are enough: when others
        are not prepared (``datapipe prepare mnist --split test``), the plan covers
        only that stage's parts, with the rows the whole plan gives them.
        """
        if stage not in PARTS_OF_STAGE:
            raise ConfigError(f"unknown stage {stage!r}; use fit, validate, test or predict")
        if self.plan is not None and (self._plan_specs == self.splits or (
                stage is not None
                and self._plan_specs == self.splits.for_parts(PARTS_OF_STAGE[stage]))):
            return self.plan
        specs = self.splits
        missing = self.missing_splits()
        if missing and stage is not None:
            specs = self.splits.for_parts(PARTS_OF_STAGE[stage])
            needed = specs.sources()
            missing = [s for s in missing if s in needed]
        if missing:
            self._find(missing[0])  # raises, naming what to prepare
        return self._make_plan(specs)

    def available_plan(self) -> SplitPlan:
        """The plan of every part whose source splits are prepared (all: the whole plan)."""
        if not self.missing_splits():
            return self.plan_splits()
        ready = [part for part in PARTS
                 if all(self._lookup(s) is not None
                        for s in self.splits.for_parts([part]).sources())]
        specs = self.splits.for_parts(ready)
        if not specs.sources():
            self._find(self.missing_splits()[0])  # nothing at all is prepared: say what to do
        return self._make_plan(specs)

    def missing_splits(self) -> list[str]:
        """The source splits this module uses that are not prepared (none: all are)."""
        return [s for s in self.source_splits() if self._lookup(s) is None]

    def _make_plan(self, specs: SplitSpec) -> SplitPlan:
        """Load or compute the plan of ``specs`` over their prepared source splits."""
        sources = {s: (self._find(s).fingerprint, self._find(s).rows)
                   for s in sorted(specs.sources())}

        def labels() -> dict[str, Any]:  # read only when a stratified plan is computed
            return {s: self._labels(s) for s in sources}

        self.plan = load_or_create_plan(self.cache, self.name, sources, specs, labels=labels)
        self._plan_specs = specs
        return self.plan

    def _labels(self, split: str) -> Any:
        """Every label of a prepared source split, in row order (for stratified splits)."""
        prepared, load = self._find(split), self.recipe.load
        if hasattr(load, "labels"):  # a load stage that keeps labels apart (JPEG shards)
            return load.labels(prepared)
        labels = load(prepared.data_file).get("label")
        if labels is None:
            raise ConfigError(f"split {split!r} of {self.name} has no labels; stratified "
                              f"splits and folds need them (use stratify=False)")
        return labels

    def normalization(self) -> dict[str, Any]:
        """The mean/std used on the device and where they come from."""
        transform, info = self.recipe.transform, self.recipe.info
        if transform.mean is not None:
            return {"mean": list(transform.mean), "std": list(transform.std), "from": "transform"}
        if info.mean is not None:
            return {"mean": list(info.mean), "std": list(info.std), "from": "recipe"}
        for split in ["train", *self.source_splits()]:
            prepared = self.prepared.get(split) or find_prepared(
                self.recipe, split, self.cache, self.fetch_options)
            stats = prepared.manifest.get("statistics", {}) if prepared else {}
            if "mean" in stats:
                # A constant channel has std 0; dividing by one gray level keeps it finite.
                std = [max(s, 1.0 / 255.0) for s in stats["std"]]
                return {"mean": stats["mean"], "std": std,
                        "from": f"computed on {split} at prepare"}
        return {"mean": None, "std": None, "from": "not prepared"}

    def setup(self, stage: str | None = None) -> None:
        """Resolve splits and build the datasets of ``stage`` (fit/validate/test/predict)."""
        plan = self.plan_splits(stage)
        if self.recipe.transform.normalize and self.recipe.transform.mean is None:
            norm = self.normalization()
            if norm["mean"] is not None:
                self.recipe = dataclasses.replace(self.recipe, transform=dataclasses.replace(
                    self.recipe.transform, mean=tuple(norm["mean"]), std=tuple(norm["std"])))
        for part in PARTS_OF_STAGE[stage]:
            if part in plan.parts and part not in self.datasets:
                self.datasets[part] = self._make_dataset(part, plan)

    def _make_dataset(self, part: str, plan: SplitPlan) -> Any:
        """The dataset of ``part``: the batch pipeline, or the per-sample one when the
        part has a user's transform (which then replaces every crop, flip and scaling)."""
        sources = {s: self.prepared[s] for s, _ in plan.parts[part]}
        user = self._sample_transforms.get(part)
        dataset = self.recipe.load.dataset(sources, plan.parts[part],
                                           train=part == "train" and user is None,
                                           transform=self.recipe.transform)
        if user is not None:
            if self.resident:
                raise ConfigError(f"{part}_transforms run per sample on the host; use "
                                  f"resident=False with them")
            from datapipe.sample_transform import SampleTransformed

            return SampleTransformed(dataset, user)
        return self._made_resident(dataset) if self.resident else dataset

    def resident_device(self) -> Any:
        """The device a ``resident`` module keeps its splits on (True: CUDA if present)."""
        import torch

        if self.resident is True:
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        try:
            return torch.device(self.resident)
        except RuntimeError:
            raise ConfigError(f"resident={self.resident!r} is not a device; use True or a "
                              f"name such as 'cuda:0' or 'cpu'") from None

    def _made_resident(self, dataset: Any) -> Any:
        """``dataset`` copied once onto the resident device (in-memory recipes only)."""
        if not hasattr(dataset, "resident"):
            raise ConfigError(f"{self.name} cannot be device-resident: its batches are "
                              f"decoded per sample; use resident=False")
        return dataset.resident(self.resident_device())

    def teardown(self, stage: str | None = None) -> None:
        """Drop the datasets of ``stage`` (their memory maps close with them)."""
        for part in PARTS_OF_STAGE.get(stage, PARTS):
            self.datasets.pop(part, None)
        if stage in (None, "fit"):
            self._train_loader = None

    # ------------------------------------------------------------------ loaders

    def _dataset(self, part: str) -> Any:
        if part not in self.datasets:
            stage = {"train": "fit", "val": "validate"}.get(part, part)
            self.setup(stage)
        return self.datasets.get(part)

    def _loader(self, part: str) -> Any:
        dataset = self._dataset(part)
        if dataset is None:
            return []  # no such split configured (e.g. val_split=0): Lightning skips it
        return self.recipe.wrap.build(dataset, train=part == "train", seed=self.seed)

    def train_dataloader(self):
        loader = self._loader("train")
        if self._pending_loader_state is not None and loader != []:
            loader.load_state_dict(self._pending_loader_state)
            self._pending_loader_state = None
        self._train_loader = loader
        return loader

    def val_dataloader(self):
        return self._loader("val")

    def test_dataloader(self):
        return self._loader("test")

    def predict_dataloader(self):
        return self._loader("predict")

    # ------------------------------------------------------------------ batches

    def transfer_batch_to_device(self, batch: Any, device: Any, dataloader_idx: int = 0) -> Any:
        """Move every tensor of the batch to ``device`` (non-blocking from pinned memory)."""
        if hasattr(batch, "to"):
            return batch.to(device, non_blocking=True)
        if isinstance(batch, (list, tuple)):
            return type(batch)(self.transfer_batch_to_device(b, device) for b in batch)
        if isinstance(batch, dict):
            return {k: self.transfer_batch_to_device(v, device) for k, v in batch.items()}
        return batch

    def on_before_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        return batch

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int = 0) -> Any:
        """uint8 images -> float32, scaled and normalized, on the device they reached."""
        images, *rest = batch
        return (self.recipe.transform.on_device(images), *rest)

    def to_device(self, batch: Any, device: Any = "cpu") -> Any:
        """The three transfer hooks in order: what a trainer does to each batch."""
        batch = self.on_before_batch_transfer(batch)
        batch = self.transfer_batch_to_device(batch, device)
        return self.on_after_batch_transfer(batch)

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        """The train loader's position (seed, epoch, batches served) and the split id."""
        if self._train_loader not in (None, []):
            loader_state = self._train_loader.state_dict()
        else:
            loader_state = self._pending_loader_state
        return {"train_loader": loader_state, "split_id": self.plan.id if self.plan else None}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved position; the next train loader resumes mid-epoch."""
        loader_state = state.get("train_loader")
        if loader_state is None:
            return
        if self._train_loader not in (None, []):
            self._train_loader.load_state_dict(loader_state)
        else:
            self._pending_loader_state = dict(loader_state)

    # ------------------------------------------------------------------ interop

    def to_hf(self, split: str = "train") -> Any:
        """``split`` as a Hugging Face ``datasets.Dataset`` over the prepared files, no copy.

        The prepared Arrow file is memory-mapped by ``Dataset.from_file``; a split that
        takes some rows of it (train minus val) is ``.select(indices)`` of it. See
        ``datapipe.integrations.hf_export.to_hf``.
        """
        from datapipe.integrations.hf_export import to_hf

        return to_hf(self, split)

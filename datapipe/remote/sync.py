"""A recipe's splits between an object-store cache root and the local cache.

``open_remote`` turns ``cache_dir="s3://..."`` (with ``local_cache=DIR``) into a
``RemoteCache``; ``fetch_split`` finds the store's entry of a split as a local lookup
would (``prepare.find_prepared``) and fetches it into the local cache; ``publish_split``
puts a split prepared locally into the store. The DataModule and ``datapipe prepare``
call these three; nothing else here knows about recipes.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from datapipe import layout
from datapipe.cache import CACHE_ENV, Cache
from datapipe.manifest import PreparedSplit
from datapipe.prepare import expected_fingerprints, split_fingerprint
from datapipe.remote.publish import publish
from datapipe.remote.reader import RemoteCache, parse_size
from datapipe.remote.store import LazyStore, is_remote

if TYPE_CHECKING:
    from datapipe.recipe import Recipe
    from datapipe.stages.download import FetchOptions

log = logging.getLogger("datapipe")


def open_remote(cache_dir: str, local_cache: str | os.PathLike | None = None,
                local_cache_limit: int | str | None = None,
                storage_options: Mapping[str, Any] | None = None) -> RemoteCache:
    """The store at ``cache_dir`` read through the local cache ``local_cache`` (default:
    $DATAPIPE_CACHE unless that is a store URL, else ./cache) of at most
    ``local_cache_limit`` bytes; the store is opened when a split is not in the local
    cache."""
    limit = parse_size(local_cache_limit)
    if local_cache is None and is_remote(os.environ.get(CACHE_ENV)):
        local_cache = "cache"  # $DATAPIPE_CACHE names the store itself: ./cache is local
    return RemoteCache(LazyStore(cache_dir, storage_options), Cache.at(local_cache), limit)


def _made_by(recipe: Recipe, split: str, manifest: Mapping[str, Any], fp: str) -> bool:
    """True if the manifest's entry is what this recipe's stages make of its sources."""
    sources = sorted([s["filename"], s["algorithm"], s["checksum"]]
                     for s in manifest.get("sources", []))
    return split_fingerprint(recipe, split, sources) == fp


def find_split(remote: RemoteCache, recipe: Recipe, split: str,
               options: FetchOptions) -> layout.Parts | None:
    """The store's entry of ``split`` that a local lookup would take; None if none.

    With verification on: only the entry made from the recipe's declared files. Without:
    that one or one made from the files at hand, else the newest entry this recipe's
    stages made of any files (as ``find_prepared`` takes the newest unverified entry).
    """
    known = expected_fingerprints(recipe, remote.local)
    for fp in sorted(known):
        parts = layout.entry(recipe.name, recipe.version, fp)
        manifest = remote.manifest(parts)
        if manifest is None or manifest.get("split") != split:
            continue
        verified = all(s.get("verified") is True for s in manifest.get("sources", []))
        if verified or not options.verify:
            return parts
    if options.verify:
        return None
    newest: tuple[str, layout.Parts] | None = None
    for fp in remote.fingerprints(recipe.name, recipe.version):
        if fp in known:
            continue
        parts = layout.entry(recipe.name, recipe.version, fp)
        manifest = remote.manifest(parts)
        if manifest is None or manifest.get("split") != split or \
                not _made_by(recipe, split, manifest, fp):
            continue
        stamp = str(manifest.get("created_at", ""))
        if newest is None or stamp > newest[0]:
            newest = (stamp, parts)
    return newest[1] if newest else None


def fetch_split(remote: RemoteCache, recipe: Recipe, split: str,
                options: FetchOptions) -> PreparedSplit | None:
    """The local copy of the store's entry of ``split``, fetched if needed; None if the
    store has none."""
    parts = find_split(remote, recipe, split, options)
    return remote.fetch(parts) if parts is not None else None


def publish_split(remote: RemoteCache, prepared: PreparedSplit, force: bool = False) -> str:
    """Put the locally prepared ``prepared`` into the store; what happened, in words."""
    return publish(remote.store, prepared, force=force)

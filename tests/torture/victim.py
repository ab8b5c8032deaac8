"""Run the datapipe CLI, stopping at a named point so the torture suite can SIGKILL it there.

    python victim.py POINT[:N] -- --recipes DIR prepare torture-mnist --cache-dir C ...

The POINT is reached the Nth time (default 1) the code gets there; the process then
prints ``TORTURE-POINT <POINT> <N>`` on stdout and sleeps until it is killed. Nothing in
datapipe knows about this: the hooks wrap datapipe's functions from the outside, in
this process only, so the library carries no fault-injection code at all. A run that
never reaches the point exits normally and prints ``TORTURE-MISSED``.

Points, in the order a prepare reaches them:

    download-lock     the download lock of a file is held, nothing fetched yet
    partial-rename    a .partial is complete and verified, not yet renamed into place
    before-sidecar    the file is in place, its sidecar (what makes it trusted) not written
    sidecar-rename    the sidecar is written to its temporary, not yet renamed
    prepare-lock      the prepare lock of a split is held, nothing written yet
    parse             the source files are being parsed (the clean stage)
    save-half         half of the Arrow file is written into the temporary entry
    publish-rename    the temporary entry is whole and fsynced, not yet renamed into place
    before-manifest   the entry is in place, its manifest not yet written
    manifest-rename   the manifest is written to its temporary, not yet renamed
    after-manifest    the entry is complete and trusted, the lock still held
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

POINTS = ("download-lock", "partial-rename", "before-sidecar", "sidecar-rename",
          "prepare-lock", "parse", "save-half", "publish-rename", "before-manifest",
          "manifest-rename", "after-manifest")


class Trap:
    def __init__(self, point: str, nth: int):
        self.point, self.nth, self.seen = point, nth, 0

    def reach(self, point: str) -> None:
        if point != self.point:
            return
        self.seen += 1
        if self.seen == self.nth:
            print(f"TORTURE-POINT {point} {self.nth}", flush=True)
            while True:  # until SIGKILL
                time.sleep(60)


class _OS:
    """The os module, with replace() reporting the renames the points name."""

    def __init__(self, trap: Trap):
        self._trap = trap

    def __getattr__(self, name):
        return getattr(os, name)

    def replace(self, src, dst, *args, **kwargs):
        s, d = Path(src).name, Path(dst).name
        if s.endswith(".partial"):
            self._trap.reach("partial-rename")
        elif s.startswith(".tmp-") and d.endswith(".gz.json"):
            self._trap.reach("sidecar-rename")
        elif s.startswith(".tmp-") and d == "manifest.json":
            self._trap.reach("manifest-rename")
        elif s.startswith(".tmp-") and Path(src).is_dir():
            self._trap.reach("publish-rename")
        return os.replace(src, dst, *args, **kwargs)


def install(trap: Trap) -> None:
    import datapipe.cache as cache
    import datapipe.manifest as manifest
    import datapipe.prepare as prepare
    import datapipe.stages.clean as clean
    import datapipe.stages.download as download
    import datapipe.stages.save as save

    proxy = _OS(trap)
    cache.os = proxy
    download.os = proxy

    def before(module, name, point):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            trap.reach(point)
            return real(*args, **kwargs)

        setattr(module, name, wrapper)

    before(download, "remove_stale_temporaries", "download-lock")
    before(download, "write_json_atomic", "before-sidecar")
    before(prepare, "remove_stale_temporaries", "prepare-lock")

    real_write = manifest.write_json_atomic  # the module writes nothing but manifests

    def manifest_write(*args, **kwargs):
        trap.reach("before-manifest")
        real_write(*args, **kwargs)
        trap.reach("after-manifest")

    manifest.write_json_atomic = manifest_write

    real_clean = clean.IDXClean.__call__

    def parse(self, *args, **kwargs):
        trap.reach("parse")
        return real_clean(self, *args, **kwargs)

    clean.IDXClean.__call__ = parse

    real_save = save.ArrowSave.__call__

    def save_half(self, columns, folder, split):
        path = real_save(self, columns, folder, split)
        if trap.point == "save-half" and trap.seen + 1 == trap.nth:
            data = Path(path).read_bytes()
            with open(path, "r+b") as f:
                f.truncate(len(data) // 2)
            trap.reach("save-half")
        else:
            trap.reach("save-half")
        return path

    save.ArrowSave.__call__ = save_half


def main() -> int:
    spec, sep, *argv = sys.argv[1:]
    assert sep == "--", "usage: victim.py POINT[:N] -- datapipe arguments"
    point, _, nth = spec.partition(":")
    if point not in POINTS:
        raise SystemExit(f"unknown point {point!r}; known: {', '.join(POINTS)}")
    trap = Trap(point, int(nth or 1))
    install(trap)
    from datapipe.cli import main as cli

    code = cli(argv)
    print("TORTURE-MISSED", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())

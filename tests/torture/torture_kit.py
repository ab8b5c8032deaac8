"""Shared pieces of the torture suite: data, recipes, mirrors, runs, audits, figures.

Imported by the test modules of this folder (pytest puts the folder on sys.path; the
``tests/`` folder is there too, for ``loopback``). No conftest.py here on purpose:
tests/test_learning.py imports ``conftest`` by name, and a second conftest.py would
shadow tests/conftest.py. So each module binds the two fixtures it needs itself::

    world, figures = kit.world, kit.figures
"""

from __future__ import annotations

import contextlib
import dataclasses
import gzip
import hashlib
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from loopback import MirrorServer, _Handler, _Server

from datapipe.formats.idx import encode_idx

REPO = Path(__file__).resolve().parents[2]
VICTIM = Path(__file__).with_name("victim.py")
TRAIN = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz")
TEST = ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")
FILES = TRAIN + TEST
RECIPE = "torture-mnist"  # MNIST's stages, declaring the fake files' checksums and sizes
TWIN = "torture-twin"  # another recipe declaring the very same files
TMP_PREFIX = ".tmp-"


# ------------------------------------------------------------------ data and recipes


def make_files(n_train: int = 600, n_test: int = 100, seed: int = 7) -> dict[str, bytes]:
    """The four MNIST files (gzipped IDX) with random images and labels."""
    rng = np.random.default_rng(seed)
    arrays = {
        TRAIN[0]: rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        TRAIN[1]: rng.integers(0, 10, n_train).astype(np.uint8),
        TEST[0]: rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        TEST[1]: rng.integers(0, 10, n_test).astype(np.uint8),
    }
    return {name: gzip.compress(encode_idx(a), compresslevel=1, mtime=0)
            for name, a in arrays.items()}


RECIPE_FILE = '''\
"""Torture-suite recipes: MNIST's stages over the suite's own files (written by the suite)."""
import dataclasses

import datapipe
from datapipe import DataModule, Download, Resource
from datapipe.datamodules.mnist import RECIPE as MNIST

RESOURCES = tuple(Resource(**r) for r in {resources!r})
BASE = dataclasses.replace(MNIST, name={recipe!r},
                           download=Download(resources=RESOURCES, mirrors=()))
TWIN = dataclasses.replace(BASE, name={twin!r})


@datapipe.register({recipe!r})
def base(**overrides):
    return DataModule(BASE, **{{"val_split": 0, **overrides}})


@datapipe.register({twin!r})
def twin(**overrides):
    return DataModule(TWIN, **{{"val_split": 0, **overrides}})
'''


def resources(files: dict[str, bytes]) -> list[dict[str, Any]]:
    return [{"filename": name, "md5": hashlib.md5(data).hexdigest(),
             "sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
            for name, data in files.items()]


def write_recipes(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "torture_recipes.py").write_text(
        RECIPE_FILE.format(resources=resources(files), recipe=RECIPE, twin=TWIN))
    return folder


@dataclasses.dataclass
class World:
    """What every torture test shares: the files, a folder holding them, the recipes."""

    root: Path
    files: dict[str, bytes]
    source: Path  # a folder with the four files, for --source
    recipes: Path  # a folder with torture_recipes.py, for --recipes
    reference: dict[str, str]  # split -> sha256 of the Arrow file of a clean run

    def sha256(self, name: str) -> str:
        return hashlib.sha256(self.files[name]).hexdigest()

    def download_key(self, name: str) -> str:
        return f"sha256-{self.sha256(name)}"


_WORLD: World | None = None


@pytest.fixture(scope="session")
def world(tmp_path_factory) -> World:
    """The shared World, made once per session (each module binds this fixture)."""
    global _WORLD
    if _WORLD is None:
        _WORLD = _make_world(tmp_path_factory)
    return _WORLD


def _make_world(tmp_path_factory) -> World:
    root = tmp_path_factory.mktemp("torture")
    files = make_files()
    source = root / "source"
    source.mkdir()
    for name, data in files.items():
        (source / name).write_bytes(data)
    recipes = write_recipes(root / "recipes", files)
    cache = root / "reference-cache"
    done = run_cli(["--recipes", str(recipes), "prepare", RECIPE, "--source", str(source),
                    "--cache-dir", str(cache), "--quiet"], env=cli_env())
    assert done.returncode == 0, done.stderr
    reference = data_hashes(cache, RECIPE)
    assert sorted(reference) == ["test", "train"]
    return World(root, files, source, recipes, reference)


# ------------------------------------------------------------------ mirrors


class _TrickleWriter:
    """A wfile that sends large writes in pieces, pausing between them."""

    def __init__(self, raw, mirror: TortureMirror):
        self.raw, self.mirror = raw, mirror

    def write(self, data: bytes) -> int:
        m = self.mirror
        if data.startswith(b"HTTP/") or (m.piece is None and not m.stall):
            return self.raw.write(data)  # the status line and headers go out whole
        if m.stall:  # half the body, then silence until the client gives up
            self.raw.write(data[:len(data) // 2])
            self.raw.flush()
            m._stopped.wait(60)
            raise ConnectionAbortedError("stalled on purpose")
        for start in range(0, len(data), m.piece):
            self.raw.write(data[start:start + m.piece])
            self.raw.flush()
            m.bytes_sent.add_bytes(len(data[start:start + m.piece]))
            time.sleep(m.pause)
        return len(data)

    def flush(self) -> None:
        self.raw.flush()

    def __getattr__(self, name):
        return getattr(self.raw, name)


class _ByteCounter:
    def __init__(self) -> None:
        self.total = 0
        self._lock = threading.Lock()

    def add_bytes(self, n: int) -> None:
        with self._lock:
            self.total += n


class _TortureHandler(_Handler):
    def setup(self) -> None:
        super().setup()
        self.wfile = _TrickleWriter(self.wfile, self.server.mirror)


class TortureMirror(MirrorServer):
    """A loopback MirrorServer that can also trickle bodies or stall mid-body.

    ``piece``/``pause``: send bodies in pieces of ``piece`` bytes, sleeping ``pause``
    seconds between them (a slow link: long enough to be killed mid-download).
    ``stall``: send half the body and then nothing (a mirror that hangs mid-transfer).
    """

    def __init__(self, files, *, piece: int | None = None, pause: float = 0.0,
                 stall: bool = False, **kwargs):
        super().__init__(files, **kwargs)
        self.piece, self.pause, self.stall = piece, pause, stall
        self.bytes_sent = _ByteCounter()
        self._stopped = threading.Event()

    def start(self) -> TortureMirror:
        self._server = _Server(("127.0.0.1", 0), _TortureHandler)
        self._server.mirror = self
        self._port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopped.set()
        super().stop()


_hanging: socket.socket | None = None


def hanging_url() -> str:
    """``http://127.0.0.1:PORT/`` that accepts connections and never answers a byte.

    The socket listens but never accepts: the kernel completes the handshake for the
    backlog, the request goes out, and no response ever comes.
    """
    global _hanging
    if _hanging is None:
        _hanging = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        _hanging.bind(("127.0.0.1", 0))
        _hanging.listen(64)
    return f"http://127.0.0.1:{_hanging.getsockname()[1]}/"


# ------------------------------------------------------------------ running the CLI


def cli_env(lock: str = "flock", **extra: str) -> dict[str, str]:
    """The environment of a datapipe subprocess: no user settings, short timeouts."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DATAPIPE_")}
    env["DATAPIPE_LOCK_TIMEOUT"] = "60"  # a lock that is never freed fails a test, not CI
    env["DATAPIPE_TIMEOUT"] = "5"
    if lock == "soft":
        env["DATAPIPE_LOCK"] = "soft"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


def datapipe_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "datapipe", *args]


def run_cli(args: list[str], env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(datapipe_argv(*args), capture_output=True, text=True,
                          env=env or cli_env(), timeout=timeout, cwd=REPO)


def prepare_args(world: World, cache: Path, *extra: str, recipe: str = RECIPE) -> list[str]:
    return ["--recipes", str(world.recipes), "prepare", recipe, "--cache-dir", str(cache),
            "--quiet", *extra]


def error_lines(stderr: str) -> list[str]:
    """stderr without argparse's usage line and without warnings."""
    return [ln for ln in stderr.splitlines()
            if ln.strip() and not ln.startswith(("usage:", "datapipe: warning:"))]


# ------------------------------------------------------------------ audits


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@dataclasses.dataclass
class Audit:
    """What a reader of the cache would trust, and whether it is right."""

    trusted_prepared: int
    trusted_downloads: int
    corruptions: list[str]  # trusted entries whose bytes are not what they claim
    leftovers: list[Path]  # temporaries and .partial files (never trusted)


def audit(cache: Path) -> Audit:
    """Re-check, independently of datapipe's code, every entry a reader would trust.

    Prepared: a folder with a readable manifest whose files have the recorded sizes (what
    datapipe's readers accept) must hold files with the recorded sha256. Downloads: a
    file whose sidecar is readable and records its size must have the recorded checksum,
    and in a verified ``<algo>-<hex>`` folder that checksum must be the folder's.
    """
    trusted_prepared = trusted_downloads = 0
    corruptions: list[str] = []
    for manifest_path in sorted((cache / "prepared").glob("*/*/*/manifest.json")):
        entry = manifest_path.parent
        if entry.name.startswith("."):
            continue
        try:
            manifest = json.loads(manifest_path.read_text())
            files = manifest["files"]
            if manifest.get("fingerprint") != entry.name or any(
                    (entry / n).stat().st_size != r["bytes"] for n, r in files.items()):
                continue  # not trusted by a reader
        except (OSError, ValueError, KeyError, TypeError):
            continue
        trusted_prepared += 1
        for name, record in files.items():
            if _sha256(entry / name) != record["sha256"]:
                corruptions.append(f"prepared {entry}: {name} does not match its manifest")
    for sidecar in sorted((cache / "downloads").glob("*/*.json")):
        if sidecar.parent.name.startswith(".") or sidecar.name.startswith("."):
            continue
        path = sidecar.with_name(sidecar.name[:-len(".json")])
        try:
            meta = json.loads(sidecar.read_text())
            if path.stat().st_size != meta["size"]:
                continue
            algorithm, checksum = meta["algorithm"], meta["checksum"]
        except (OSError, ValueError, KeyError, TypeError):
            continue
        trusted_downloads += 1
        actual = hashlib.new(algorithm, path.read_bytes()).hexdigest()
        folder = sidecar.parent.name
        if actual != checksum:
            corruptions.append(f"download {path}: bytes do not match the sidecar")
        elif (folder.startswith(f"{algorithm}-") and not folder.endswith(".unverified")
              and folder != f"{algorithm}-{actual}"):
            corruptions.append(f"download {path}: bytes are not the ones its folder names")
    return Audit(trusted_prepared, trusted_downloads, corruptions, leftovers(cache))


def leftovers(cache: Path) -> list[Path]:
    """Temporaries and partial downloads anywhere under ``cache``."""
    found = []
    for dirpath, dirnames, filenames in os.walk(cache):
        for name in (*dirnames, *filenames):
            if name.startswith(TMP_PREFIX) or name.endswith(".partial"):
                found.append(Path(dirpath) / name)
    return sorted(found)


def data_hashes(cache: Path, recipe: str) -> dict[str, str]:
    """split -> sha256 of the Arrow file of each entry of ``recipe`` a reader trusts."""
    out = {}
    for manifest_path in sorted((Path(cache) / "prepared" / recipe).glob("*/*/manifest.json")):
        manifest = json.loads(manifest_path.read_text())
        out[manifest["split"]] = _sha256(manifest_path.parent / manifest["data_file"])
    return out


def fingerprints(stdout: str) -> tuple[str, ...]:
    return tuple(ln.split("fingerprint ")[1].split(",")[0] for ln in stdout.splitlines()
                 if "fingerprint " in ln)


# ------------------------------------------------------------------ figures


class Figures:
    """What the suite did, counted as it goes (see README.md for what each figure means)."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self.kill_points: Counter[str] = Counter()
        self.phases: Counter[str] = Counter()
        self.faults: Counter[str] = Counter()
        self.disk_full: Counter[str] = Counter()  # where a real full disk stopped a prepare
        self.corruptions: list[str] = []
        # The hostile-input corpus: attacks tried per class, and what any of them achieved.
        self.attacks: Counter[str] = Counter()
        self.breaches: Counter[str] = Counter()  # escape, code execution, hang, bad bytes served

    def fault(self, kind: str, n: int = 1) -> None:
        self.faults[kind] += n

    def attack(self, kind: str, breach: str | None = None) -> None:
        """Count one hostile input of class ``kind``; ``breach`` names what it achieved.

        The tests assert there is none; an attack that gets through fails its test after
        being counted, so the figures of a red run show it too.
        """
        self.attacks[kind] += 1
        if breach is not None:
            self.breaches[breach] += 1

    def check(self, result: Audit) -> None:
        self.counts["audits"] += 1
        self.corruptions.extend(result.corruptions)

    def as_json(self) -> dict[str, Any]:
        return {"counts": dict(self.counts), "kill_points": dict(self.kill_points),
                "phases": dict(self.phases), "faults": dict(self.faults),
                "disk_full": dict(self.disk_full), "faults_total": sum(self.faults.values()),
                "corruptions_found": len(self.corruptions), "corruptions": self.corruptions,
                "attacks": dict(self.attacks), "attacks_total": sum(self.attacks.values()),
                "breaches": dict(self.breaches)}

    def lines(self) -> list[str]:
        c = self.counts
        points = ", ".join(f"{k} {v}" for k, v in sorted(self.kill_points.items()))
        phases = ", ".join(f"{k} {v}" for k, v in sorted(self.phases.items()))
        return [
            f"kill -9 trials: {c['kill_trials']} ({c['kill_trials_at_points']} at named points, "
            f"{c['kill_trials_random']} at random moments)",
            f"  named points hit: {len(self.kill_points)} distinct ({points})",
            f"  state found after random kills: {phases}",
            f"concurrent preparers: {c['concurrent_processes']} processes in "
            f"{c['concurrent_runs']} runs; downloads: {c['downloads_counted']} counted, "
            f"{c['downloads_expected']} expected",
            f"full disk (real tmpfs): "
            f"{', '.join(f'{k} {v}' for k, v in sorted(self.disk_full.items())) or 'skipped'}",
            f"faults injected: {sum(self.faults.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.faults.items()))})",
            f"cache audits: {c['audits']}; corruptions found: {len(self.corruptions)}",
            f"hostile inputs: {sum(self.attacks.values())} "
            f"({', '.join(f'{k} {v}' for k, v in sorted(self.attacks.items()))}); "
            f"escapes {self.breaches['escape']}, code executions {self.breaches['code']}, "
            f"hangs {self.breaches['hang']}, damaged bytes served {self.breaches['served']}",
        ]


FIGURES = Figures()


class _Reporter:
    def pytest_terminal_summary(self, terminalreporter) -> None:
        if not FIGURES.counts and not FIGURES.faults and not FIGURES.attacks:
            return
        terminalreporter.section("datapipe torture figures")
        for line in FIGURES.lines():
            terminalreporter.write_line(line)
        out = os.environ.get("DATAPIPE_TORTURE_REPORT")
        if out:
            Path(out).write_text(json.dumps(FIGURES.as_json(), indent=2) + "\n")


@pytest.fixture(scope="session")
def figures(request) -> Figures:
    manager = request.config.pluginmanager
    if manager.get_plugin("datapipe-torture-figures") is None:
        manager.register(_Reporter(), "datapipe-torture-figures")
    return FIGURES


@contextlib.contextmanager
def mounted_tmpfs(path: Path, size: str):
    """A tmpfs of ``size`` at ``path``; skips the test where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs",
                               str(path)], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs here ({e})")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({done.stderr.strip() or done.returncode})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(fs: Path, leave: int) -> Path:
    """Fill the filesystem at ``fs`` with a file, leaving ``leave`` bytes free."""
    st = os.statvfs(fs)
    free = st.f_bavail * st.f_frsize
    filler = fs / "filler"
    with open(filler, "wb") as f:
        f.write(b"\0" * max(0, free - leave))
    return filler

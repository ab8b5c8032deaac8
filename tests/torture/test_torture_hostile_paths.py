"""Hostile paths: names that are paths, manifests that name paths, links that lead out.

Each attack aims at a folder *outside* the cache (``outside/``, next to it, holding a
look-alike of a cache entry with its own ``manifest.json``) and must leave that folder
byte-for-byte as it was: same files, same bytes, same links. The CLI runs in this
process; every refusal is one line and exit status 2, and the API raises a
DatapipeError. Each attack is counted with ``figures.attack("paths", breach)``, breach
``"escape"`` when the outside folder changed.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torture_kit as kit
from torture_kit import RECIPE, audit, error_lines

import datapipe
from datapipe import cache_admin
from datapipe.cache import Cache
from datapipe.cli import main
from datapipe.errors import DatapipeError
from datapipe.verify import verify

world, figures = kit.world, kit.figures  # the suite's shared fixtures


def snapshot(folder: Path) -> dict[str, tuple[str, bytes]]:
    """Every entry under ``folder`` (links not followed): kind and bytes or target."""
    found = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in (*dirnames, *filenames):
            path = Path(dirpath) / name
            rel = str(path.relative_to(folder))
            if path.is_symlink():
                found[rel] = ("link", os.readlink(path).encode())
            elif path.is_dir():
                found[rel] = ("dir", b"")
            else:
                found[rel] = ("file", path.read_bytes())
    return found


@pytest.fixture
def site(world, capsys, tmp_path):
    """A prepared cache and, next to it, an outside folder that looks like cache content."""
    cache = tmp_path / "cache"
    code = main(["--recipes", str(world.recipes), "prepare", RECIPE, "--source",
                 str(world.source), "--cache-dir", str(cache), "--quiet"])
    assert code == 0, capsys.readouterr().err
    capsys.readouterr()
    outside = tmp_path / "outside"
    [entry, *_] = sorted((cache / "prepared" / RECIPE / "1").iterdir())
    # A copy of a real entry, in the layout a verify or rm of a name would walk.
    shutil.copytree(entry, outside / "1" / entry.name)
    (outside / "precious.txt").write_text("not the cache's\n")
    (outside / "sub").mkdir()
    (outside / "sub" / "manifest.json").write_text('{"keep": true}\n')
    return cache, outside


def attempt(figures, outside: Path, action):
    """Run ``action``; count it; fail if it changed anything outside the cache."""
    before = snapshot(outside)
    result = action()
    breach = None if snapshot(outside) == before else "escape"
    figures.attack("paths", breach)
    assert breach is None, f"{outside} was changed"
    return result


def cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def one_line(code: int, err: str) -> str:
    assert code == 2, err
    assert "Traceback" not in err, err
    lines = error_lines(err)
    assert len(lines) == 1, err
    assert lines[0].startswith("datapipe") and "error:" in lines[0], lines[0]
    return lines[0]


def with_recipes(world, *argv):
    return ["--recipes", str(world.recipes), *argv]


# ------------------------------------------------------------------ names that are paths

# Each becomes the NAME of every command that takes one; "{outside}" is the outside folder.
NAMES = ["{outside}", "{outside}/1", "../../outside", "../..", "..", ".", "a/b",
         "torture-mnist/../torture-mnist", "torture-mnist/", "./torture-mnist",
         "torture-mnist\x00", "TORTURE-MNIST", "Torture-mnist", "torture-mn\u0456st",
         "torture-mnist ", ".hidden", "~", "", "-", "torture-mnist\n"]
COMMANDS = {
    "cache rm": lambda n: ["cache", "rm", n, "--all"],
    "cache rm --version": lambda n: ["cache", "rm", RECIPE, "--version", n],
    "cache ls": lambda n: ["cache", "ls", n],
    "verify": lambda n: ["verify", n],
    "prepare": lambda n: ["prepare", n],
    "info": lambda n: ["info", n],
    "train": lambda n: ["train", "--data", n, "--model", "mlp"],
    "test": lambda n: ["test", "--data", n, "--ckpt", "nothing.ckpt"],
}


@pytest.mark.parametrize("command", list(COMMANDS))
def test_a_name_that_is_a_path_is_refused(command, world, site, figures, capsys):
    cache, outside = site
    before = snapshot(cache)
    for pattern in NAMES:
        name = pattern.format(outside=outside)
        argv = with_recipes(world, *COMMANDS[command](name), "--cache-dir", cache)
        code, _, err = attempt(figures, outside, lambda argv=argv: cli(capsys, *argv))
        line = one_line(code, err)
        assert "not a plain name" in line, (name, line)
    assert snapshot(cache) == before  # nothing in the cache changed either


def test_the_api_refuses_names_that_are_paths(world, site, figures):
    cache, outside = site
    c = Cache.at(cache)
    for pattern in ("{outside}", "../../outside", "torture-mnist/../x", "X", "a\x00b"):
        name = pattern.format(outside=outside)
        for action in (lambda name=name: datapipe.load(name, cache_dir=cache),
                       lambda name=name: cache_admin.remove(c, name, downloads=True),
                       lambda name=name: cache_admin.list_entries(c, name),
                       lambda name=name: verify(c, name),
                       lambda name=name: datapipe.register(name)(lambda **kw: None)):
            def refused(action=action):
                with pytest.raises(DatapipeError, match="not a plain name"):
                    action()
            attempt(figures, outside, refused)


def test_a_recipe_whose_name_or_version_is_a_path_is_refused(site, figures):
    import dataclasses

    from datapipe.datamodules.mnist import RECIPE as MNIST

    cache, outside = site
    for field, value in (("name", str(outside)), ("name", "../../outside"),
                         ("version", "../../../outside"), ("version", str(outside))):
        recipe = dataclasses.replace(MNIST, **{field: value})

        def refused(recipe=recipe):
            with pytest.raises(DatapipeError, match="not a plain name"):
                datapipe.DataModule(recipe, cache_dir=cache)
        attempt(figures, outside, refused)


# ------------------------------------------------------------------ manifests naming paths


def _manifest_paths(cache: Path) -> list[Path]:
    return sorted((cache / "prepared" / RECIPE / "1").glob("*/manifest.json"))


@pytest.mark.parametrize("source", [
    {"algorithm": "../../../outside", "expected": "0" * 64},
    {"algorithm": "{outside}/1", "expected": "0" * 64},
    {"algorithm": "sha256", "expected": "../../outside"},
    {"algorithm": "sha256", "expected": "{outside}"},
    {"algorithm": "md5/../..", "expected": "../outside"},
    {"algorithm": ["sha256"], "expected": {"x": 1}},
], ids=["algorithm relative", "algorithm absolute", "expected relative", "expected absolute",
        "both", "not strings"])
def test_a_manifest_naming_a_path_makes_rm_all_touch_nothing_outside(
        source, world, site, figures, capsys):
    cache, outside = site
    for path in _manifest_paths(cache):
        manifest = json.loads(path.read_text())
        manifest["sources"].append({k: (v.format(outside=outside) if isinstance(v, str) else v)
                                    for k, v in source.items()})
        path.write_text(json.dumps(manifest))
    code, out, err = attempt(figures, outside, lambda: cli(
        capsys, *with_recipes(world, "cache", "rm", RECIPE, "--all", "--cache-dir", cache)))
    assert code == 0, err
    assert "Traceback" not in err and "is corrupt" in err
    assert not (cache / "prepared" / RECIPE).exists()
    assert not list((cache / "downloads").glob("sha256-*"))  # its real downloads went
    assert outside.is_dir()


def test_a_sidecar_naming_a_path_is_never_followed(world, site, figures, capsys):
    cache, outside = site
    for sidecar in (cache / "downloads").glob("*/*.json"):
        meta = json.loads(sidecar.read_text())
        meta.update(algorithm=f"../../{outside.name}", checksum=str(outside))
        sidecar.write_text(json.dumps(meta))
    for argv in (["verify", RECIPE], ["cache", "ls"], ["cache", "rm", RECIPE, "--all"]):
        code, _, err = attempt(figures, outside, lambda argv=argv: cli(
            capsys, *with_recipes(world, *argv, "--cache-dir", cache)))
        assert "Traceback" not in err and code in (0, 2), err


# ------------------------------------------------------------------ links leading out


def _entry(cache: Path) -> Path:
    return sorted((cache / "prepared" / RECIPE / "1").iterdir())[0]


def _link_out(link: Path, target: Path) -> None:
    """Make ``link`` (a cache folder) a symbolic link to ``target``, outside the cache."""
    if link.is_dir():
        shutil.rmtree(link)
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)


def _rm_removes_the_link_only(world, cache, outside, link, figures, capsys) -> None:
    code, out, err = attempt(figures, outside, lambda: cli(
        capsys, *with_recipes(world, "cache", "rm", RECIPE, "--all", "--cache-dir", cache)))
    assert code == 0 and "Traceback" not in err, err
    assert not os.path.lexists(link) and "symbolic link" in err
    assert audit(cache).corruptions == []


def _link_is_reported(world, cache, outside, link, figures, capsys) -> None:
    """verify (all, and of the recipe) and cache ls (all, of the recipe, --json) report
    the link, without following it: a problem line and exit status 2 from verify."""
    for name in ([], [RECIPE]):
        code, out, err = attempt(figures, outside, lambda name=name: cli(
            capsys, *with_recipes(world, "verify", *name, "--cache-dir", cache)))
        assert "symbolic link" in one_line(code, err)
        [line] = [ln for ln in out.splitlines() if ln.startswith("LINK")]
        assert str(link.relative_to(cache)) in line and "remove it by hand" in line, out
        code, out, err = attempt(figures, outside, lambda name=name: cli(
            capsys, *with_recipes(world, "cache", "ls", *name, "--cache-dir", cache)))
        assert code == 0 and f"  {link}\n" in out and "symbolic links" in out, err
        code, out, err = attempt(figures, outside, lambda name=name: cli(
            capsys, *with_recipes(world, "cache", "ls", *name, "--json", "--cache-dir", cache)))
        assert code == 0 and json.loads(out)["links"] == [str(link)], err


def test_a_prepared_entry_linked_outside_is_refused_and_never_followed(
        world, site, figures, capsys):
    cache, outside = site
    entry = _entry(cache)
    _link_out(entry, outside / "1" / entry.name)  # the look-alike: a reader would trust it
    for argv in (["prepare", RECIPE, "--source", world.source], ["verify", RECIPE],
                 ["info", RECIPE]):
        code, _, err = attempt(figures, outside, lambda argv=argv: cli(
            capsys, *with_recipes(world, *argv, "--cache-dir", cache, *(
                ["--quiet"] if argv[0] == "prepare" else []))))
        assert "symbolic link" in one_line(code, err)  # verify: reported, not walked
    assert (outside / "1" / entry.name / "manifest.json").is_file()  # not renamed by verify
    _link_is_reported(world, cache, outside, entry, figures, capsys)

    def api():
        dm = datapipe.load(RECIPE, cache_dir=cache, source=world.source)
        with pytest.raises(DatapipeError, match="symbolic link"):
            dm.prepare_data()
    attempt(figures, outside, api)
    _rm_removes_the_link_only(world, cache, outside, entry, figures, capsys)


@pytest.mark.parametrize("where", ["prepared/NAME", "prepared/NAME/1", "splits/NAME",
                                   "downloads/KEY"])
def test_a_cache_folder_linked_outside_is_never_followed(where, world, site, figures, capsys):
    cache, outside = site
    key = world.download_key(kit.TRAIN[0])  # the first file a prepare fetches
    link = cache / where.replace("NAME", RECIPE).replace("KEY", key)
    if where == "splits/NAME":
        (outside / "0123456789abcdef.json").write_text("{}\n")  # a plan file look-alike
    _link_out(link, outside)
    argv = ["prepare", RECIPE, "--mirror", "http://127.0.0.1:9/", "--force"] \
        if where == "downloads/KEY" else ["prepare", RECIPE, "--source", world.source]
    if where != "splits/NAME":
        code, _, err = attempt(figures, outside, lambda: cli(
            capsys, *with_recipes(world, *argv, "--cache-dir", cache, "--quiet")))
        assert "symbolic link" in one_line(code, err)
    else:  # the API: the split plan is refused before anything is read or written
        def plan():
            dm = datapipe.load(RECIPE, cache_dir=cache, source=world.source, val_split=10)
            with pytest.raises(DatapipeError, match="symbolic link"):
                dm.setup("fit")
        attempt(figures, outside, plan)
    _link_is_reported(world, cache, outside, link, figures, capsys)
    _rm_removes_the_link_only(world, cache, outside, link, figures, capsys)


def test_a_cache_root_reached_through_a_link_still_works(world, site, capsys, tmp_path):
    """The root itself may be a link (a cache on a scratch disk): only links inside it
    are refused."""
    cache, _ = site
    alias = tmp_path / "alias"
    alias.symlink_to(cache, target_is_directory=True)
    code, out, err = cli(capsys, *with_recipes(world, "prepare", RECIPE, "--source",
                                               world.source, "--cache-dir", alias, "--quiet"))
    assert code == 0 and "already prepared" in out, err
    code, _, err = cli(capsys, *with_recipes(world, "cache", "rm", RECIPE, "--cache-dir",
                                             alias))
    assert code == 0 and not (cache / "prepared" / RECIPE).exists(), err


# ------------------------------------------------------------------ rm against a prepare


def test_rm_waits_for_a_real_prepare_holding_its_lock(world, figures, capsys, monkeypatch,
                                                      tmp_path):
    """A prepare stopped while parsing (its lock held, its entry not yet on disk): `cache rm
    --all` waits for that lock, and after the bounded timeout ends in one line, having
    removed nothing the prepare reads; once the prepare is gone, rm goes through."""
    import select
    import signal
    import subprocess
    import sys

    cache = tmp_path / "cache"
    with kit.TortureMirror(world.files) as mirror:
        args = [*kit.prepare_args(world, cache), "--mirror", mirror.url]
        victim = subprocess.Popen([sys.executable, str(kit.VICTIM), "parse:1", "--", *args],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=kit.cli_env())
        try:
            ready, _, _ = select.select([victim.stdout], [], [], 60)
            assert ready and victim.stdout.readline().startswith("TORTURE-POINT parse"), \
                victim.stderr.read() if victim.poll() is not None else "no marker"
            downloads = snapshot(cache / "downloads")
            assert downloads and not list((cache / "prepared").rglob("manifest.json"))
            figures.fault("cache rm during a prepare")
            with monkeypatch.context() as patched:
                patched.setenv("DATAPIPE_LOCK_TIMEOUT", "1")
                code, _, err = cli(capsys, *with_recipes(world, "cache", "rm", RECIPE, "--all",
                                                         "--cache-dir", cache))
            line = one_line(code, err)
            assert "timed out after 1s waiting for the lock on removal of torture-mnist 1" \
                in line, line
            assert f"held by pid {victim.pid}" in line, line
            assert snapshot(cache / "downloads") == downloads  # what the prepare reads stays
        finally:
            victim.send_signal(signal.SIGKILL)
            victim.wait(timeout=30)
    code, out, err = cli(capsys, *with_recipes(world, "cache", "rm", RECIPE, "--all",
                                               "--cache-dir", cache))
    assert code == 0 and "download(s)" in out, err
    assert not list((cache / "downloads").glob("sha256-*")) and audit(cache).leftovers == []

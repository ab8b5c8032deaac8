"""Fair timing for the benchmarks: equal warm-up, interleaved rounds, paired ratios.

Every contestant is a function that returns one epoch's batches. Each gets the same
number of untimed warm-up epochs, then the same number of timed rounds; in each
round every contestant runs one epoch, in an order that rotates from round to round,
so a burst of load from elsewhere on the machine falls on all of them alike. A ratio
between two contestants is the median over rounds of the ratio of their epoch times
in the same round (robust to load that changes between rounds); each row also shows
min / median / max of its epoch times. The machine line and `uptime`'s load before
and after go with every table.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Contestant:
    """A named epoch maker; ``check(x, y)`` vets the first batch of every epoch."""

    name: str
    epoch: Callable[[], Iterable]
    samples: int
    note: str = ""
    check: Callable | None = None
    times: list[float] = field(default_factory=list)
    # Where the epoch is clocked inside (a trainer's epoch loop), a function that runs
    # one epoch and returns its seconds; ``epoch`` is then unused.
    timed: Callable[[], float] | None = None
    # CPU seconds of this process per timed epoch: robust to other load on the machine
    # where a contestant works in this process alone (not for worker processes).
    cpu: list[float] = field(default_factory=list)

    def run(self) -> float:
        if self.timed is not None:
            return self.timed()
        t0 = time.perf_counter()
        n = 0
        for i, (x, y) in enumerate(self.epoch()):
            if i == 0 and self.check is not None:
                self.check(x, y)
            n += len(y)
        elapsed = time.perf_counter() - t0
        if n != self.samples:
            raise AssertionError(f"{self.name}: an epoch gave {n} samples, expected "
                                 f"{self.samples}")
        return elapsed

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    @property
    def rate(self) -> float:
        return self.samples / self.median


def run_rounds(contestants: Sequence[Contestant], rounds: int, warmup: int = 1,
               log: Callable[[str], None] = print) -> None:
    """``warmup`` untimed epochs each, then ``rounds`` interleaved timed epochs each."""
    for c in contestants:
        for _ in range(warmup):
            c.run()
    k = len(contestants)
    for r in range(rounds):
        for c in contestants[r % k:] + contestants[:r % k]:
            cpu = time.process_time()
            c.times.append(c.run())
            c.cpu.append(time.process_time() - cpu)
        log(f"  round {r + 1}/{rounds}: " + ", ".join(
            f"{c.name} {c.times[-1]:.3f}s" for c in contestants))


def paired_ratio(fast: Contestant, slow: Contestant, cpu: bool = False) -> float:
    """Median over rounds of slow's epoch time / fast's (how many times faster).

    ``cpu=True`` pairs the CPU seconds of this process instead of wall time.
    """
    a, b = (fast.cpu, slow.cpu) if cpu else (fast.times, slow.times)
    return statistics.median(s / f for f, s in zip(a, b, strict=True))


def ratio_range(fast: Contestant, slow: Contestant) -> tuple[float, float]:
    ratios = [s / f for f, s in zip(fast.times, slow.times, strict=True)]
    return min(ratios), max(ratios)


def table(contestants: Sequence[Contestant], references: Sequence[Contestant]) -> str:
    """Markdown: per contestant, epoch min/median/max, samples/s and paired ratios."""
    head = ("| contestant | samples/s (median) | epoch s min / median / max | CPU s median | "
            + " | ".join(f"vs {r.name}" for r in references) + " |")
    rows = [head, "|---|---:|---:|---:|" + "---:|" * len(references)]
    for c in contestants:
        ratios = " | ".join(f"{paired_ratio(c, r):.2f}x" for r in references)
        cpu = f"{statistics.median(c.cpu):.3f}" if c.cpu else "-"
        rows.append(f"| {c.name} | {c.rate:,.0f} | {min(c.times):.3f} / {c.median:.3f} / "
                    f"{max(c.times):.3f} | {cpu} | {ratios} |")
    return "\n".join(rows)


def machine_line() -> str:
    """CPU model, cores, Python, torch and (if installed) torchvision versions."""
    import torch

    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        import torchvision

        vision = f", torchvision {torchvision.__version__}"
    except ImportError:
        vision = ""
    device = (f", {torch.cuda.get_device_name(0)}" if torch.cuda.is_available()
              else ", no accelerator")
    return (f"{model}, {cores} cores, Python {platform.python_version()}, torch "
            f"{torch.__version__} ({torch.get_num_threads()} threads){vision}{device}")


def load_line() -> str:
    """What `uptime` says: other work on the machine skews every number."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True,
                              timeout=5).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        load = os.getloadavg()
        return f"load average: {load[0]:.2f}, {load[1]:.2f}, {load[2]:.2f}"


def report(title: str, command: str, contestants: Sequence[Contestant],
           references: Sequence[Contestant], *, machine: str, load_before: str,
           rounds: int, warmup: int, notes: Sequence[str] = (), checks: Sequence[str] = (),
           results: Path | None = None) -> str:
    """The markdown report of one benchmark run; written to ``results`` if given."""
    lines = [f"# {title}", "", f"`{command}`", "", f"Machine: {machine}", "",
             f"Load before: `{load_before}`", "", f"Load after: `{load_line()}`", "",
             f"Each contestant: {warmup} untimed warm-up epoch(s), then {rounds} timed "
             f"epochs in interleaved rounds; ratios are medians of per-round paired ratios "
             f"of wall time (row vs column, >1 means the row is faster). \"CPU s\" is this "
             f"process's CPU time per epoch (worker processes not included): where the "
             f"machine is shared it is the steadier measure of work done in-process.", "",
             table(contestants, references), ""]
    lines += [f"- {c}" for c in checks]
    if checks:
        lines.append("")
    lines += [f"- {c.name}: {c.note}" for c in contestants if c.note]
    lines += list(notes)
    text = "\n".join(lines).rstrip() + "\n"
    print("\n" + text)
    if results is not None:
        results.parent.mkdir(parents=True, exist_ok=True)
        results.write_text(text)
        print(f"written to {results}")
    return text


def target(label: str, value: float, goal: float, cpu: float | None = None) -> str:
    """One line: a measured ratio (wall, and CPU time where given) against its goal."""
    met = "MET" if value >= goal else "NOT MET"
    line = f"{label}: {value:.2f}x wall (goal >= {goal:g}x): {met}"
    if cpu is not None:
        line += f"; {cpu:.2f}x in CPU time ({'MET' if cpu >= goal else 'NOT MET'})"
    return line


# ---------------------------------------------------------------------- datapipe side


def prepare_cli(name: str, source: Path, cache_dir: Path, repo: Path) -> float:
    """`datapipe prepare NAME` in its own process, as a user prepares data once.

    The benchmark's process then only finds the entry in the cache, inheriting nothing
    the preparation imported or mapped. Returns the seconds it took.
    """
    import sys

    t0 = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "datapipe", "prepare", name, "--cache-dir", str(cache_dir),
         "--source", str(source), "--no-verify", "--quiet"],
        cwd=repo, capture_output=True, text=True,
    )
    if done.returncode != 0:  # its warnings (random files have no official md5) only then
        raise SystemExit(f"datapipe prepare {name} failed ({done.returncode}):\n{done.stderr}")
    return time.perf_counter() - t0


def datamodule(module_class: type, source: Path, cache_dir: Path, **kwargs):
    """A prebuilt DataModule over the benchmark's files, set up for fitting (untimed)."""
    import warnings

    from datapipe.errors import UnverifiedDataWarning

    # The generated files cannot match the official md5s; verify=False says so per file.
    warnings.simplefilter("ignore", UnverifiedDataWarning)
    dm = module_class(cache_dir=cache_dir, source=source, verify=False, val_split=0,
                      normalize=True, quiet=True, **kwargs)
    dm.prepare_data()
    dm.setup("fit")
    return dm


def datapipe_epoch(dm, device: str = "cpu") -> Callable[[], Iterable]:
    """One epoch as a trainer runs it: the train loader, each batch through the hooks."""
    loader = dm.train_dataloader()  # one loader for every epoch, as a trainer keeps it

    def epoch():
        for batch in loader:
            yield dm.to_device(batch, device)

    return epoch


def batch_check(shape: tuple[int, ...]) -> Callable:
    """A Contestant check: float32 images of ``shape`` per sample, int64 labels."""
    def check(x, y) -> None:
        import torch

        if not (x.dtype == torch.float32 and tuple(x.shape[1:]) == shape
                and y.dtype == torch.int64):
            raise AssertionError(f"unexpected batch: {x.dtype} {tuple(x.shape)}, "
                                 f"labels {y.dtype}")
    return check

"""One epoch of training on MNIST-shaped data: a plain PyTorch loop vs datapipe.Trainer
vs lightning.Trainer, on the same loader, for a tiny model and LeNet.

    .venv/bin/python benchmarks/bench_trainer.py [--quick] [--workdir DIR] [--profile]

Data: 60,000 seeded random 28x28 uint8 images and labels (10 classes) in MNIST's
gzipped IDX files, made as in bench_mnist_loading.py and prepared once by
`datapipe prepare mnist --no-verify` in its own process. Every contestant reads them
through the same loader, MNISTDataModule(val_split=0, normalize=True, batch_size=256,
num_workers=0), each batch normalized by on_after_batch_transfer (dm.to_device in the
plain loop, the Trainer's transfer hooks otherwise).

Models: "tiny" (Flatten + Linear(784, 10), SGD lr 0.1) and "lenet"
(datapipe.models.create_model("lenet", 10, 1, 28), Adam lr 1e-3). Per model, one
net is made with a fixed seed and every run trains a deepcopy of it, so all
contestants start from the same weights and see the same batches in the same
order; the script checks that they end with the same weights.

Contestants, per model:

* plain loop: for batch in dm.train_dataloader(): x, y = dm.to_device(batch);
  loss = F.cross_entropy(model(x), y); opt.zero_grad(set_to_none=True);
  loss.backward(); opt.step();
* datapipe.Trainer(max_epochs=1, enable_checkpointing=False) with its progress bar
  and its default CSV logger, and with progress bar and logger off too;
* lightning.Trainer(max_epochs=1, accelerator="cpu", devices=1) with its defaults
  (progress bar, TensorBoard logger -- CSV without tensorboard --, ModelSummary,
  a checkpoint at the end of the epoch), the datamodule through
  datapipe.integrations.lightning.as_lightning_datamodule(dm).

The Modules' training_step is the loss above plus self.log("train_loss", loss,
prog_bar=True). Each contestant first runs an untimed 20-batch warm-up epoch; then
rounds of one full epoch per contestant (the order rotates each round), 5 of them
(--repeats), give each row's min / median / max; every ratio is the median over rounds
of the per-round paired ratio (robust to load that changes between rounds). The
per-step time is the epoch loop's (the trainers' time from
on_train_epoch_start to on_train_epoch_end, seen by a callback placed before their
own; the plain loop's `for` loop) over the 235 batches; the whole run's time
(trainer construction and fit(), or the plain loop's prepare_data + setup + epoch)
is reported next to it. --profile adds a cProfile of one datapipe.Trainer epoch
(progress bar + CSV logger) of the tiny model. The table goes to
benchmarks/results/trainer.md.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import io
import math
import os
import pstats
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for path in (REPO, HERE):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

# The data files, their preparation and the load line are the loading benchmark's.
from bench_mnist_loading import (  # noqa: E402
    BATCH,
    N_TRAIN,
    load_line,
    make_files,
    prepare_datapipe,
)

STEPS = math.ceil(N_TRAIN / BATCH)  # 235 batches an epoch (the last one of 96)
WARMUP_BATCHES = 20
TARGET_OVERHEAD = 5.0  # percent per step over the plain loop, tiny model
MODELS = ("tiny", "lenet")
PLAIN, DP_DEFAULTS, DP_OFF, LIGHTNING = (
    "plain loop", "datapipe.Trainer (bar + CSV logger)", "datapipe.Trainer (all off)",
    "lightning.Trainer (defaults)")
CONTESTANTS = (PLAIN, DP_DEFAULTS, DP_OFF, LIGHTNING)


# ---------------------------------------------------------------------- models


def make_net(model: str):
    import torch
    from torch import nn

    torch.manual_seed(0)
    if model == "tiny":
        return nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 10))
    from datapipe.models import create_model

    return create_model("lenet", 10, 1, 28)


def make_optimizer(model: str, params):
    import torch

    if model == "tiny":
        return torch.optim.SGD(params, lr=0.1)
    return torch.optim.Adam(params, lr=1e-3)


def classifier(base: type, net, model: str):
    """The same classifier on either base class (datapipe.Module or LightningModule)."""
    import torch.nn.functional as F

    class Net(base):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            loss = F.cross_entropy(self.net(x), y)
            self.log("train_loss", loss, prog_bar=True)
            return loss

        def configure_optimizers(self):
            return make_optimizer(model, self.parameters())

    return Net()


def datapipe_module(net, model: str):
    import datapipe

    return classifier(datapipe.Module, net, model)


def lightning_module(net, model: str):
    import lightning as L

    return classifier(L.LightningModule, net, model)


# ---------------------------------------------------------------------- timing


def epoch_timer(base: type) -> type:
    """A callback class (on ``base``) that clocks the epoch loop and counts its batches."""

    class EpochTimer(base):
        def __init__(self) -> None:
            self.start = self.end = math.nan
            self.batches = 0
            self.marks: list[float] = []  # the epoch's start, then each batch's end

        def on_train_epoch_start(self, trainer, module) -> None:
            self.batches = 0
            self.start = time.perf_counter()
            self.marks = [self.start]

        def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
            self.batches += 1
            self.marks.append(time.perf_counter())

        def on_train_epoch_end(self, trainer, module) -> None:
            self.end = time.perf_counter()

    return EpochTimer


class CpuWatch:
    """How much CPU the rest of the machine used while we ran, from /proc/stat.

    torch runs its 2 intra-op threads on the 2 cores: while another process computes,
    a step can take 10-30x longer (seen here: LeNet steps of 14 ms took 150-440 ms
    while a test suite ran beside). So each run waits for a quiet machine first, and a
    run during which other processes used the CPU is done again.
    """

    def __init__(self, max_wait: float) -> None:
        self.tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.available = Path("/proc/stat").is_file()
        self.wait_left = max_wait  # seconds of waiting allowed in the whole benchmark
        self.waited = 0.0

    def snap(self) -> tuple[float, float, float]:
        """(wall clock, CPU seconds of all processes, CPU seconds of this one)."""
        busy = 0.0
        if self.available:
            with open("/proc/stat") as file:
                values = [int(v) for v in file.readline().split()[1:9]]
            # user nice system idle iowait irq softirq steal: all but idle and iowait
            busy = (sum(values) - values[3] - values[4]) / self.tick
        own = os.times()
        return time.perf_counter(), busy, own.user + own.system

    @staticmethod
    def others(a: tuple[float, float, float], b: tuple[float, float, float]) -> float:
        """CPU seconds other processes used between two snaps."""
        return max(0.0, (b[1] - a[1]) - (b[2] - a[2]))

    def busy(self, a: tuple[float, float, float], b: tuple[float, float, float]) -> bool:
        """Whether others used enough CPU between two snaps to skew a timing: 2% of a
        core is enough to stall torch's threads now and then (plus an allowance for tick
        accounting, which blurs short intervals; quiet runs here show 0.00-0.04 s)."""
        return self.available and self.others(a, b) > 0.05 + 0.02 * (b[0] - a[0])

    def wait_quiet(self, window: float = 0.5) -> None:
        """Return once others used < 0.1 core over ``window`` s, or when waiting is spent."""
        while self.available and self.wait_left > 0:
            a = self.snap()
            time.sleep(window)
            b = self.snap()
            if self.others(a, b) < 0.1 * (b[0] - a[0]):
                return
            self.wait_left -= b[0] - a[0]
            self.waited += b[0] - a[0]


@dataclass
class Run:
    epoch: float  # seconds of the epoch loop
    whole: float  # seconds of everything a user waits for (set-up, fit, its end)
    batches: int
    state: dict
    marks: list[float] = field(default_factory=list)  # epoch start, then each batch end
    others: float = 0.0  # CPU seconds other processes used during the run
    busy: bool = False   # enough of them to skew it

    @property
    def steps(self) -> list[float]:
        """Seconds between consecutive batch ends: everything the loop does per batch."""
        return [b - a for a, b in zip(self.marks, self.marks[1:], strict=False)]


@dataclass
class Result:
    model: str
    name: str
    runs: list[Run] = field(default_factory=list)
    warmup: float = math.nan
    what: str = ""
    redone: int = 0  # runs thrown away because other processes used the CPU

    @property
    def epochs(self) -> list[float]:
        return [r.epoch for r in self.runs]

    @property
    def median_epoch(self) -> float:
        return statistics.median(self.epochs)

    @property
    def step_ms(self) -> float:
        return 1000 * self.median_epoch / self.runs[0].batches

    @property
    def rate(self) -> float:
        return N_TRAIN / self.median_epoch

    @property
    def median_ms(self) -> float:
        """The median step over all timed epochs: blind to bursts of outside noise (and
        to costs paid once every many steps, which the epoch time includes)."""
        return 1000 * statistics.median(s for run in self.runs for s in run.steps)

    @property
    def whole(self) -> float:
        return statistics.median(r.whole for r in self.runs)


def paired(fast: Result, slow: Result) -> float:
    """Median over rounds of slow's epoch / fast's in the same round (runs are appended
    round by round, so index i of both lists is round i)."""
    return statistics.median(s / f for f, s in zip(fast.epochs, slow.epochs, strict=True))


class Bench:
    """Builds and runs each contestant's epoch for one model."""

    def __init__(self, dm, ldm, root: Path, model: str, watch: CpuWatch) -> None:
        self.dm, self.ldm, self.root, self.model, self.watch = dm, ldm, root, model, watch
        self.net = make_net(model)
        self.described: dict[str, str] = {}

    def fresh_net(self):
        import torch

        torch.manual_seed(1)  # nothing here draws from it; for any module that would
        return copy.deepcopy(self.net)

    def plain(self, limit: int | None) -> Run:
        import torch.nn.functional as F

        dm = self.dm
        net = self.fresh_net()
        t0 = time.perf_counter()
        # As a user's script starts: the trainers set up (and tear down) in every fit.
        dm.teardown("fit")
        dm.prepare_data()
        dm.setup("fit")
        opt = make_optimizer(self.model, net.parameters())
        loader = dm.train_dataloader()
        net.train()
        n = 0
        t1 = time.perf_counter()
        marks = [t1]
        for batch in loader:
            x, y = dm.to_device(batch)
            loss = F.cross_entropy(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            n += 1
            marks.append(time.perf_counter())
            if limit is not None and n >= limit:
                break
        t2 = time.perf_counter()
        self.described[PLAIN] = "the loop of the brief, after prepare_data() + setup('fit')"
        return Run(t2 - t1, t2 - t0, n, net.state_dict(), marks)

    def datapipe(self, limit: int | None, *, defaults: bool, profile: bool = False) -> Run:
        import datapipe

        net = self.fresh_net()
        module = datapipe_module(net, self.model)
        timer = epoch_timer(datapipe.Callback)()
        profiler = cProfile.Profile() if profile else None
        t0 = time.perf_counter()
        trainer = datapipe.Trainer(
            max_epochs=1, accelerator="cpu", devices=1, enable_checkpointing=False,
            logger=defaults, enable_progress_bar=defaults, limit_train_batches=limit,
            default_root_dir=self.root / "datapipe", callbacks=[timer])
        if profiler is not None:
            profiler.enable()
        trainer.fit(module, datamodule=self.dm)
        if profiler is not None:
            profiler.disable()
        t1 = time.perf_counter()
        name = DP_DEFAULTS if defaults else DP_OFF
        self.described[name] = describe_datapipe(trainer)
        run = Run(timer.end - timer.start, t1 - t0, timer.batches, net.state_dict(), timer.marks)
        run.profiler = profiler  # type: ignore[attr-defined]
        return run

    def lightning(self, limit: int | None) -> Run:
        import lightning as L

        net = self.fresh_net()
        module = lightning_module(net, self.model)
        timer = epoch_timer(L.Callback)()
        t0 = time.perf_counter()
        trainer = L.Trainer(max_epochs=1, accelerator="cpu", devices=1,
                            limit_train_batches=limit, default_root_dir=self.root / "lightning",
                            callbacks=[timer])
        trainer.fit(module, datamodule=self.ldm)
        t1 = time.perf_counter()
        self.described[LIGHTNING] = describe_lightning(trainer)
        return Run(timer.end - timer.start, t1 - t0, timer.batches, net.state_dict(), timer.marks)

    def run(self, name: str, limit: int | None = None) -> Run:
        """One epoch of ``name`` on a quiet machine, noting what else used the CPU."""
        self.watch.wait_quiet()
        before = self.watch.snap()
        if name == PLAIN:
            run = self.plain(limit)
        elif name == DP_DEFAULTS:
            run = self.datapipe(limit, defaults=True)
        elif name == DP_OFF:
            run = self.datapipe(limit, defaults=False)
        else:
            run = self.lightning(limit)
        after = self.watch.snap()
        run.others, run.busy = self.watch.others(before, after), self.watch.busy(before, after)
        return run


def describe_datapipe(trainer) -> str:
    parts = [type(c).__name__ for c in trainer.callbacks if type(c).__name__ != "EpochTimer"]
    parts += [f"{type(lg).__name__}" for lg in trainer.loggers]
    return ", ".join(parts) or "no callbacks, no logger"


def describe_lightning(trainer) -> str:
    parts = [type(c).__name__ for c in trainer.callbacks if type(c).__name__ != "EpochTimer"]
    parts += [type(lg).__name__ for lg in trainer.loggers]
    return ", ".join(parts)


def max_diff(a: dict, b: dict) -> float:
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


# ---------------------------------------------------------------------- report


def machine_line() -> str:
    """The suite's machine line, with Lightning's version (a contestant here)."""
    import lightning
    from harness import machine_line as suite_machine_line

    return f"{suite_machine_line()}, lightning {lightning.__version__}"


def table(results: dict[str, dict[str, Result]]) -> str:
    rows = [
        "| model | contestant | ms / step | samples/s | overhead vs plain loop "
        "| Lightning's step / this step | median step (ms) | overhead, median steps "
        "| whole run (s) | epoch loop s min / median / max |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for model, by_name in results.items():
        plain, light = by_name[PLAIN], by_name[LIGHTNING]
        for name in CONTESTANTS:
            r = by_name[name]
            over = "-" if name == PLAIN else f"{100 * (paired(plain, r) - 1):+.1f}%"
            ratio = f"{paired(r, light):.2f}x"
            median_over = ("-" if name == PLAIN
                           else f"{100 * (r.median_ms / plain.median_ms - 1):+.1f}%")
            busy = "*" if any(run.busy for run in r.runs) else ""
            epochs = (f"{min(r.epochs):.3f} / {r.median_epoch:.3f} / "
                      f"{max(r.epochs):.3f}{busy}")
            rows.append(f"| {model} | {name} | {r.step_ms:.3f} | {r.rate:,.0f} | {over} "
                        f"| {ratio} | {r.median_ms:.3f} | {median_over} | {r.whole:.3f} "
                        f"| {epochs} |")
    return "\n".join(rows)


def checks(results: dict[str, dict[str, Result]]) -> list[str]:
    lines = []
    tiny = results.get("tiny")
    if tiny is not None:
        for name in (DP_DEFAULTS, DP_OFF):
            over = 100 * (paired(tiny[PLAIN], tiny[name]) - 1)
            lines.append(f"tiny, {name}: per-step overhead vs plain loop {over:+.1f}% "
                         f"(target <= {TARGET_OVERHEAD:g}%): "
                         f"{'PASS' if over <= TARGET_OVERHEAD else 'FAIL'}")
    for model, by_name in results.items():
        for name in (DP_DEFAULTS, DP_OFF):
            ratio = paired(by_name[name], by_name[LIGHTNING])
            lines.append(f"{model}, {name} vs lightning.Trainer (defaults): {ratio:.2f}x "
                         f"faster per step (target > 1x): {'PASS' if ratio > 1 else 'FAIL'}")
    return lines


def profile_report(run: Run, plain: Result, top: int = 25) -> str:
    stream = io.StringIO()
    stats = pstats.Stats(run.profiler, stream=stream)  # type: ignore[attr-defined]
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    head = (f"cProfile of one datapipe.Trainer (bar + CSV logger) epoch, tiny model: "
            f"{run.batches} batches, epoch loop {run.epoch:.3f} s under the profiler "
            f"(plain loop unprofiled, median: {plain.median_epoch:.3f} s)\n")
    return head + stream.getvalue()


# ---------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    global N_TRAIN, STEPS, WARMUP_BATCHES  # the epoch's size, set once before any run
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 timed epoch per contestant")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the MNIST files and datapipe's cache go (default: a temp dir)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed rounds, one epoch per contestant each (default 5, 1 with "
                             "--quick)")
    parser.add_argument("--models", default=",".join(MODELS),
                        help=f"comma-separated, from {', '.join(MODELS)}")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random images")
    parser.add_argument("--train-size", type=int, default=60_000,
                        help="images per epoch (default 60,000; small for a smoke run)")
    parser.add_argument("--retries", type=int, default=3,
                        help="times a run during which other processes used the CPU is "
                             "done again (default 3)")
    parser.add_argument("--max-wait", type=float, default=60.0,
                        help="seconds the whole benchmark may wait for a quiet machine "
                             "before runs (default 60)")
    parser.add_argument("--profile", action="store_true",
                        help="also cProfile one datapipe.Trainer epoch of the tiny model")
    parser.add_argument("--results", type=Path,
                        default=REPO / "benchmarks" / "results" / "trainer.md",
                        help="markdown file the table is written to ('-' for none)")
    args = parser.parse_args(argv)
    N_TRAIN = args.train_size
    STEPS = math.ceil(N_TRAIN / BATCH)
    WARMUP_BATCHES = min(WARMUP_BATCHES, STEPS)
    repeats = max(1, args.repeats) if args.repeats else (1 if args.quick else 5)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    if not models or any(m not in MODELS for m in models):
        parser.error(f"--models takes names from {', '.join(MODELS)}")

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench-trainer-") as tmp:
        workdir = args.workdir or Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        gz_dir, _ = make_files(workdir, args.seed, N_TRAIN, max(1, N_TRAIN // 6))
        print(f"MNIST-format files in {workdir} ({time.perf_counter() - t0:.1f} s)", flush=True)
        cache_dir = workdir / "datapipe-cache"
        prepare_s = prepare_datapipe(gz_dir, cache_dir)
        print(f"datapipe prepare (CLI, own process): {prepare_s:.2f} s", flush=True)

        t0 = time.perf_counter()
        import lightning  # noqa: F401  (imported here so that no row pays for it)
        import torch  # noqa: F401

        import datapipe
        import datapipe.trainer  # noqa: F401
        from datapipe.datamodules.mnist import MNISTDataModule
        from datapipe.errors import UnverifiedDataWarning
        from datapipe.integrations.lightning import as_lightning_datamodule
        print(f"imported torch, lightning, datapipe.trainer ({time.perf_counter() - t0:.1f} s)",
              flush=True)
        machine = machine_line()
        print(machine, flush=True)
        load_before = load_line()
        print(f"before: {load_before}", flush=True)

        # Expected noise: random files are not MNIST's (verify=False says so), and
        # Lightning's advice about loader workers and logging intervals.
        warnings.simplefilter("ignore", UnverifiedDataWarning)
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        warnings.filterwarnings("ignore", message=".*smaller than the logging interval.*")

        dm = MNISTDataModule(cache_dir=cache_dir, source=gz_dir, verify=False, val_split=0,
                             batch_size=BATCH, normalize=True, num_workers=0, quiet=True)
        dm.prepare_data()
        dm.setup("fit")
        ldm = as_lightning_datamodule(dm)
        root = workdir / "runs"
        watch = CpuWatch(args.max_wait)

        results: dict[str, dict[str, Result]] = {}
        notes: list[str] = []
        profile_text = ""
        for model in models:
            bench = Bench(dm, ldm, root, model, watch)
            by_name = {name: Result(model, name) for name in CONTESTANTS}
            print(f"\n== {model}: warm-up ({WARMUP_BATCHES} batches each)", flush=True)
            for name in CONTESTANTS:
                run = bench.run(name, limit=WARMUP_BATCHES)
                by_name[name].warmup = run.epoch
                if run.batches != WARMUP_BATCHES:
                    raise AssertionError(f"{model}/{name}: warm-up ran {run.batches} batches")
            for r in range(repeats):
                order = CONTESTANTS[r % len(CONTESTANTS):] + CONTESTANTS[:r % len(CONTESTANTS)]
                for name in order:
                    for attempt in range(args.retries + 1):
                        run = bench.run(name)
                        if run.batches != STEPS:
                            raise AssertionError(f"{model}/{name}: an epoch ran "
                                                 f"{run.batches} batches, expected {STEPS}")
                        flag = (" -- other processes used the CPU, again" if run.busy
                                and attempt < args.retries else " -- busy, kept"
                                if run.busy else "")
                        print(f"  round {r + 1}  {name:38s} epoch loop {run.epoch:.3f} s "
                              f"({1000 * run.epoch / run.batches:.3f} ms/step), whole run "
                              f"{run.whole:.3f} s, others' CPU {run.others:.2f} s{flag}",
                              flush=True)
                        if not run.busy:
                            break
                        if attempt < args.retries:
                            by_name[name].redone += 1
                    by_name[name].runs.append(run)
            reference = by_name[PLAIN].runs[0].state
            for name in CONTESTANTS:
                by_name[name].what = bench.described.get(name, "")
                diffs = [max_diff(run.state, reference) for run in by_name[name].runs]
                if max(diffs) > 1e-4:
                    raise AssertionError(f"{model}/{name} ended with other weights than the "
                                         f"plain loop (max |diff| {max(diffs):.3g})")
                if name != PLAIN:
                    notes.append(f"{model}, {name}: final weights max |diff| vs plain loop "
                                 f"{max(diffs):.1e}")
                for run in by_name[name].runs:
                    run.state = {}
            results[model] = by_name
            if args.profile and model == "tiny":
                watch.wait_quiet()
                run = bench.datapipe(None, defaults=True, profile=True)
                profile_text = profile_report(run, by_name[PLAIN])

    load_after = load_line()
    total = time.perf_counter() - started
    every = [r for by_name in results.values() for r in by_name.values()]
    redone = sum(r.redone for r in every)
    busy_kept = sum(run.busy for r in every for run in r.runs)
    text = table(results)
    check_lines = checks(results)
    some = next(iter(results.values()))
    setups = "\n".join(f"- {name}: {some[name].what}" for name in CONTESTANTS[1:])
    method = (
        f"One epoch = {N_TRAIN:,} random 28x28 uint8 images (10 classes) in {STEPS} batches of "
        f"{BATCH} from `MNISTDataModule(val_split=0, normalize=True, batch_size={BATCH}, "
        f"num_workers=0)`, normalized in `on_after_batch_transfer`, on CPU. tiny = Flatten + "
        f"Linear(784, 10), SGD lr 0.1; lenet = `create_model(\"lenet\", 10, 1, 28)`, Adam lr "
        f"1e-3. Every run trains a copy of the same initial weights on the same batch order "
        f"(all contestants end with the same weights: checked). Per contestant: a "
        f"{WARMUP_BATCHES}-batch warm-up, then {repeats} timed full epoch"
        f"{'s' if repeats > 1 else ''}, in rounds of one epoch per contestant (order rotating). "
        f"ms / step and samples/s: the epoch loop only (the trainers: on_train_epoch_start to "
        f"on_train_epoch_end, by a callback placed before theirs; the plain loop: its `for` "
        f"loop), median epoch / {STEPS}. Overheads and Lightning's ratio: the median over "
        f"rounds of the per-round paired ratio of epoch loops. Median step: the median time "
        f"between consecutive batch ends over all timed epochs, which bursts of outside "
        f"noise do not move (nor costs paid once every many steps: the epoch time has "
        f"those). Whole run: Trainer construction + fit() (set-up, epoch, the end of the "
        f"run: Lightning's checkpoint, loggers' files), or for the plain loop "
        f"prepare_data() + setup() + the epoch; the median of the rounds. Not timed: "
        f"making the files and "
        f"`datapipe prepare mnist` ({prepare_s:.2f} s, own process). Every run waits for a "
        f"quiet machine (other processes under 0.1 core for 0.5 s; {watch.waited:.0f} s "
        f"waited in all) and is done again (up to {args.retries} times) if other processes "
        f"used the CPU during it: {redone} run{'s' if redone != 1 else ''} redone"
        f"{'; * marks runs kept although the machine was busy' if busy_kept else ''}. "
        f"Benchmark total {total:.0f} s."
        + (" (--quick run: single short epochs are noisy; judge the targets on a full run)"
           if repeats == 1 else "")
    )
    print()
    print(text)
    print()
    for line in check_lines:
        print(line)
    for line in notes:
        print(line)
    print(f"\nmachine: {machine}\nbefore the run: {load_before}; after: {load_after}\n"
          f"{method}\nWhat was on:\n{setups}")
    if profile_text:
        print("\n" + profile_text)

    if str(args.results) != "-":
        command = ("`.venv/bin/python benchmarks/bench_trainer.py"
                   + (" --quick" if args.quick else "")
                   + (f" --repeats {args.repeats}" if args.repeats else "")
                   + (f" --models {args.models}" if args.models != ",".join(MODELS) else "")
                   + (" --profile" if args.profile else "")
                   + "`")
        args.results.parent.mkdir(parents=True, exist_ok=True)
        args.results.write_text(
            "# Trainer overhead: one epoch of MNIST-shaped data on CPU\n\n"
            f"{command}\n\n"
            f"Machine: {machine}\n\nLoad: before the run {load_before}; after {load_after}.\n\n"
            f"{text}\n\n" + "\n".join(f"- {c}" for c in check_lines) + "\n\n"
            f"{method}\n\nWhat was on:\n\n{setups}\n"
        )
        print(f"written to {args.results}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

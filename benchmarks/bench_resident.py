"""Device-resident training: an airbench94-style network through datapipe.Trainer vs a plain loop.

    .venv/bin/python benchmarks/bench_resident.py [--quick] [--images N] [--device cuda]

Both contestants train the same network (airbench94's layout: a 2x2 whitening-sized
conv, three conv-pool-BN-GELU blocks, max-pool, a linear head scaled by 1/9; widths
set by --widths), from the same initial weights, with the same optimizer (SGD,
Nesterov momentum 0.9, label smoothing 0.2), on the same synthetic CIFAR-10-format
data held once as a uint8 tensor on the device, with the same batch work: a
shuffled ``index_select``, CIFAR's crop + flip (datapipe's whole-batch ops, drawn
from each batch's generator), normalize, forward, backward, step.

* datapipe.Trainer: ``CIFAR10DataModule(resident=True, normalize=True, augment=True)`` fitted by
  ``datapipe.Trainer(max_epochs=1, logger=False, enable_progress_bar=False,
  enable_checkpointing=False)``, the epoch clocked by a callback;
* plain loop: the same tensor, order, ops and step written out by hand.

Each round is one epoch of each (interleaved, after one warm-up epoch each); the
ratio is the median of paired rounds. The goal is the trainer within 1.1x of the
plain loop. Without a GPU the script runs on the CPU at a small size (--images,
--widths) and the device rows say "not measured". The report goes to
benchmarks/results/resident.md.
"""

from __future__ import annotations

import argparse
import copy
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import harness  # noqa: E402
from bench_cifar import make_files  # noqa: E402
from harness import Contestant  # noqa: E402

GOAL = 1.1  # the trainer's epoch at most this many times the plain loop's


def airbench_net(widths: tuple[int, int, int]):
    """airbench94's network layout at the given block widths."""
    import torch
    from torch import nn

    def conv(cin, cout):
        return nn.Conv2d(cin, cout, 3, padding="same", bias=False)

    def block(cin, cout):
        return nn.Sequential(conv(cin, cout), nn.MaxPool2d(2), nn.BatchNorm2d(cout), nn.GELU(),
                             conv(cout, cout), nn.BatchNorm2d(cout), nn.GELU())

    class Scale(nn.Module):
        def forward(self, x):
            return x * (1 / 9)

    w0, w1, w2 = widths
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 24, 2, bias=True), nn.GELU(), block(24, w0),
                         block(w0, w1), block(w1, w2), nn.MaxPool2d(3), nn.Flatten(),
                         nn.Linear(w2, 10, bias=False), Scale())


def optimizer(params):
    import torch

    return torch.optim.SGD(params, lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)


def loss_of(logits, y):
    import torch.nn.functional as F

    return F.cross_entropy(logits, y, label_smoothing=0.2)


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def trainer_contestant(dm, net, device, root: Path) -> Contestant:
    import datapipe

    class Classifier(datapipe.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = net

        def forward(self, x):
            return self.net(x)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return loss_of(self.net(x), y)

        def configure_optimizers(self):
            return optimizer(self.parameters())

    class Clock(datapipe.Callback):
        start = end = 0.0

        def on_train_epoch_start(self, trainer, module) -> None:
            sync(device)
            self.start = time.perf_counter()

        def on_train_epoch_end(self, trainer, module) -> None:
            sync(device)
            self.end = time.perf_counter()

    module = Classifier()

    def timed() -> float:
        clock = Clock()
        trainer = datapipe.Trainer(max_epochs=1, accelerator=device.type, devices=1,
                                   logger=False, enable_progress_bar=False,
                                   enable_checkpointing=False, default_root_dir=root,
                                   callbacks=[clock])
        trainer.fit(module, datamodule=dm)
        return clock.end - clock.start

    return Contestant("datapipe.Trainer (resident=True)", None, len(dm.datasets["train"]),
                      timed=timed)


def plain_contestant(dm, net, device) -> Contestant:
    """The same work by hand: the resident tensor, the sampler's order, the same ops."""
    from datapipe.loader import Batch

    dataset = dm.datasets["train"]
    images, labels = dataset.image_tensor, dataset.label_tensor
    transform, seed, batch = dm.transform, dm.seed, dm.batch_size
    opt = optimizer(net.parameters())
    sampler = dm.train_dataloader().batch_sampler
    epoch = [0]

    def timed() -> float:
        import torch

        order = torch.from_numpy(sampler.order(epoch[0])).to(device)
        sync(device)
        t0 = time.perf_counter()
        net.train()
        for position, start in enumerate(range(0, len(order), batch)):
            idx = order[start:start + batch]
            x = transform.augment(images.index_select(0, idx),
                                  Batch(idx, seed, epoch[0], position).generator())
            x, y = transform.on_device(x), labels.index_select(0, idx)
            loss = loss_of(net(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync(device)
        epoch[0] += 1
        return time.perf_counter() - t0

    return Contestant("plain loop (same resident data and ops)", None, len(images), timed=timed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 4)")
    parser.add_argument("--images", type=int, default=None,
                        help="training images (default 50,000 on a GPU, 1,280 on the CPU)")
    parser.add_argument("--widths", default=None,
                        help="block widths (default 64,256,256 on a GPU, 8,16,16 on the CPU)")
    parser.add_argument("--batch-size", type=int, default=None,
                        help="default 1024 on a GPU, 256 on the CPU")
    parser.add_argument("--device", default=None, help="default: cuda if present, else cpu")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--results", type=Path,
                        default=REPO / "benchmarks" / "results" / "resident.md",
                        help="markdown file the report is written to ('-' for none)")
    args = parser.parse_args(argv)
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    on_gpu = device.type == "cuda"
    images = args.images or (50_000 if on_gpu else 1_280)
    widths = tuple(int(w) for w in (args.widths or ("64,256,256" if on_gpu else "8,16,16"))
                   .split(","))
    batch = args.batch_size or (1024 if on_gpu else 256)
    rounds = args.rounds or (2 if args.quick else 4)
    from datapipe.datamodules.cifar import CIFAR10DataModule

    with tempfile.TemporaryDirectory(prefix="bench-resident-") as tmp:
        workdir = args.workdir or Path(tmp)
        source, _, _ = make_files(workdir, 0, max(1, images // 5))
        machine, load_before = harness.machine_line(), harness.load_line()
        print(f"{machine}\nbefore: {load_before}", flush=True)
        harness.prepare_cli("cifar10", source, workdir / "cache", REPO)
        dm = harness.datamodule(CIFAR10DataModule, source, workdir / "cache",
                                batch_size=batch, resident=str(device), augment=True)
        if not dm.transform.train:
            raise AssertionError("the resident train split is not augmented (crop + flip)")
        net = airbench_net(widths).to(device)
        contestants = [trainer_contestant(dm, net, device, workdir / "runs"),
                       plain_contestant(dm, copy.deepcopy(net), device)]
        harness.run_rounds(contestants, rounds, warmup=1)
    trainer, plain = contestants
    slower = 1 / harness.paired_ratio(trainer, plain)
    checks = [f"datapipe.Trainer epoch / plain loop epoch: {slower:.3f}x (goal <= {GOAL}x): "
              f"{'MET' if slower <= GOAL else 'NOT MET'}"]
    notes = [f"- network widths {widths}, {images:,} images, batch {batch}, on {device}"]
    if not on_gpu:
        notes += [
            "- on a GPU: airbench94-size network (64, 256, 256) on 50,000 images through "
            "datapipe.Trainer vs the plain loop: not measured (no device lent)",
            "- on a GPU: MNIST and CIFAR epoch throughput with resident=True vs the same loop "
            "written by hand: not measured (no device lent)",
        ]
    harness.report(f"Device-resident training on {device}", "benchmarks/bench_resident.py"
                   + (" --quick" if args.quick else ""), contestants, [plain],
                   machine=machine, load_before=load_before, rounds=rounds, warmup=1,
                   checks=checks, notes=notes,
                   results=None if str(args.results) == "-" else args.results)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

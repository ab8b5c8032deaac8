"""Two CPU processes under torchrun (gloo): sharded data, synced weights, one preparer."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import torch
    from datapipe.datamodules import MNISTDataModule
    from datapipe.models import ImageClassifier
    from datapipe.trainer import ModelCheckpoint, Trainer

    source, cache, root, out = sys.argv[1:5]
    rank = int(os.environ["RANK"])
    dm = MNISTDataModule(cache_dir=cache, source=source, verify=False, val_split=100,
                         batch_size=50)
    calls = []
    prepare = dm.prepare_data
    dm.prepare_data = lambda *a, **k: calls.append(rank) or prepare(*a, **k)
    torch.manual_seed(0)
    model = ImageClassifier.from_datamodule(dm, "mlp")
    saver = ModelCheckpoint(dirpath=os.path.join(root, "ckpt"))
    trainer = Trainer(max_epochs=2, default_root_dir=root, callbacks=[saver],
                      enable_progress_bar=False, seed=0)
    trainer.fit(model, dm)
    loader = dm.train_dataloader()
    weights = b"".join(p.detach().numpy().tobytes() for p in model.parameters())
    with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
        json.dump({
            "prepare_calls": len(calls),
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "shard": [int(i) for i in loader.batch_sampler.order(0)],
            "train_rows": [int(r) for r in dm.datasets["train"].rows],
            "weights": hashlib.sha256(weights).hexdigest(),
            "val_loss": float(trainer.callback_metrics["val_loss"]),
            "broadcast": trainer.broadcast(f"rank{rank}"),
        }, f)
""")


def torchrun(script, *args, timeout=240):
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(script), *map(str, args)],
        capture_output=True, text=True, timeout=timeout,
    )


@pytest.mark.slow
def test_two_processes_share_the_work_and_agree(fake_mnist, tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    done = torchrun(script, fake_mnist.folder, tmp_path / "cache", tmp_path / "root", out)
    assert done.returncode == 0, done.stderr[-3000:]
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1))

    assert (r0["world_size"], r1["world_size"]) == (2, 2)
    assert (r0["prepare_calls"], r1["prepare_calls"]) == (1, 0)  # once per node
    # Each rank trains on its own half of the 500 training rows: 5 batches of 50 an epoch.
    assert set(r0["shard"]).isdisjoint(r1["shard"])
    assert sorted(r0["shard"] + r1["shard"]) == list(range(500))
    assert r0["train_rows"] == r1["train_rows"]
    assert r0["global_step"] == r1["global_step"] == 10
    # Gradients are averaged, so both ranks end with the same weights...
    assert r0["weights"] == r1["weights"]
    # ...and epoch metrics are reduced across ranks.
    assert r0["val_loss"] == pytest.approx(r1["val_loss"])
    # trainer.broadcast gives every rank rank 0's value (ModelCheckpoint agrees on paths so).
    assert r0["broadcast"] == r1["broadcast"] == "rank0"
    # Only rank 0 writes checkpoints.
    assert [p.name for p in (tmp_path / "root" / "ckpt").iterdir()] == ["epoch=1-step=10.ckpt"]


@pytest.mark.slow
def test_a_failing_prepare_stops_every_rank(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    out = tmp_path / "out"
    out.mkdir()
    missing = tmp_path / "no-such-folder"
    done = torchrun(script, missing, tmp_path / "cache", tmp_path / "root", out, timeout=180)
    assert done.returncode != 0
    assert "prepare_data failed on rank 0" in done.stderr
    assert not list(out.iterdir())


DIVERGING = textwrap.dedent("""
    import math, os, sys
    from datapipe.datamodules import MNISTDataModule
    from datapipe.errors import NonFiniteLossError
    from datapipe.models import ImageClassifier
    from datapipe.trainer import Trainer

    source, cache, root = sys.argv[1:4]
    rank = int(os.environ["RANK"])

    class Diverging(ImageClassifier):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss * math.nan if rank == 1 and batch_idx == 2 else loss

    dm = MNISTDataModule(cache_dir=cache, source=source, verify=False, val_split=0,
                         batch_size=50)
    trainer = Trainer(max_epochs=2, default_root_dir=root, enable_progress_bar=False,
                      logger=False, enable_checkpointing=False, log_every_n_steps=2)
    try:
        trainer.fit(Diverging.from_datamodule(dm, "mlp"), dm)
    except NonFiniteLossError as e:
        print(f"rank {rank}: {e}", file=sys.stderr)
        sys.exit(3)
""")


@pytest.mark.slow
def test_a_nan_loss_in_one_process_stops_every_rank(fake_mnist, tmp_path):
    script = tmp_path / "diverge.py"
    script.write_text(DIVERGING)
    done = torchrun(script, fake_mnist.folder, tmp_path / "cache", tmp_path / "root",
                    timeout=180)
    assert done.returncode != 0
    # Each rank names the first non-finite loss it saw: rank 0's own turns NaN one step
    # later, from the averaged NaN gradients (torchrun may end it before it says so).
    assert "rank 1: the training loss is nan at step 2 (epoch 0, batch 2)" in done.stderr
    assert "[rank0]: Traceback" not in done.stderr and "[rank1]: Traceback" not in done.stderr

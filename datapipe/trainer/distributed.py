"""Devices and processes: which device this process trains on, and torch.distributed.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and MASTER_ADDR/PORT;
``DistEnv.from_environment`` reads them, ``select_device`` picks this process's device
(``cuda:LOCAL_RANK`` for CUDA), ``init`` starts the process group (nccl on CUDA, gloo
on CPU). The collectives here are no-ops in a single process.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from datapipe.errors import ConfigError, DatapipeError


@dataclass(frozen=True)
class DistEnv:
    """Where this process stands among the processes of one run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1

    @classmethod
    def from_environment(cls) -> DistEnv:
        env = os.environ
        if "RANK" not in env or "WORLD_SIZE" not in env:
            return cls()
        world = int(env["WORLD_SIZE"])
        return cls(
            rank=int(env["RANK"]),
            world_size=world,
            local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
            local_world_size=int(env.get("LOCAL_WORLD_SIZE", world)),
        )

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_global_zero(self) -> bool:
        return self.rank == 0

    def init(self, device: torch.device) -> None:
        """Start the process group for ``device`` (once per process)."""
        if not self.distributed or dist.is_initialized():
            return
        backend = "nccl" if device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=self.rank, world_size=self.world_size)
        # Left to the interpreter's finalization, the group's store and worker threads
        # are destroyed while still joinable, and now and then a process aborts at exit
        # ("terminate called without an active exception", SIGABRT on rank 0).
        atexit.register(destroy_group)

    def barrier(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.barrier()


def destroy_group() -> None:
    """End this process's process group, if one was started (run at exit).

    The ranks meet first, so that none tears down its end (rank 0 hosts the store)
    while another still talks to it; a rank that died instead makes torchrun stop the
    others, and the group's timeout bounds the wait in any case.
    """
    if dist.is_available() and dist.is_initialized():
        try:
            dist.barrier()
        finally:
            dist.destroy_process_group()


def select_device(accelerator: str, devices: int | str, env: DistEnv) -> torch.device:
    """This process's device for ``accelerator=`` and ``devices=``; ConfigError when the
    devices are not there or torchrun started another number of processes."""
    accelerator = {"gpu": "cuda"}.get(accelerator, accelerator)
    if accelerator == "auto":
        if torch.cuda.is_available():
            accelerator = "cuda"
        elif getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            accelerator = "mps"
        else:
            accelerator = "cpu"
    if accelerator not in ("cuda", "mps", "cpu"):
        raise ConfigError(f"accelerator={accelerator!r} is not one of auto, cuda, mps, cpu")
    if accelerator == "cuda" and not torch.cuda.is_available():
        raise ConfigError("accelerator='cuda' but torch sees no CUDA device; use 'cpu' or 'auto'")
    if accelerator == "mps" and not torch.backends.mps.is_available():
        raise ConfigError("accelerator='mps' but MPS is not available; use 'cpu' or 'auto'")
    available = {"cuda": torch.cuda.device_count() if accelerator == "cuda" else 0,
                 "mps": 1, "cpu": os.cpu_count() or 1}[accelerator]
    wanted = env.world_size if devices in ("auto", None) else devices
    if not isinstance(wanted, int) or isinstance(wanted, bool) or wanted < 1:
        raise ConfigError(f"devices must be a positive integer or 'auto', got {devices!r}")
    if wanted > available:
        raise ConfigError(f"devices={wanted} but only {available} {accelerator} device(s) exist")
    if wanted != env.world_size:
        if env.world_size == 1:
            raise ConfigError(f"devices={wanted} needs {wanted} processes: launch with "
                              f"`torchrun --nproc_per_node {wanted} ...` (`datapipe train "
                              f"--devices {wanted}` does it for you)")
        raise ConfigError(f"devices={wanted} but torchrun started {env.world_size} processes")
    if accelerator == "cuda":
        torch.cuda.set_device(env.local_rank)
        return torch.device("cuda", env.local_rank)
    return torch.device(accelerator)


def all_ok_or_raise(env: DistEnv, error: BaseException | None, what: str) -> None:
    """Every rank reports how ``what`` went; if any failed, every rank raises.

    This is the barrier after ``prepare_data``: a rank whose preparation failed makes
    the others fail with its message instead of leaving them waiting forever.
    """
    if not (env.distributed and dist.is_initialized()):
        if error is not None:
            raise error
        return
    message = None if error is None else f"{type(error).__name__}: {error}"
    reports: list[Any] = [None] * env.world_size
    dist.all_gather_object(reports, message)
    failed = [(rank, m) for rank, m in enumerate(reports) if m is not None]
    if error is not None:
        raise error
    if failed:
        rank, first = failed[0]
        raise DatapipeError(f"{what} failed on rank {rank}: {first}")


def broadcast(obj: Any, env: DistEnv, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` (picklable) on every rank; ``obj`` itself in one process."""
    if not (env.distributed and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def reduce_mean(values: torch.Tensor, weights: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The weighted mean over all ranks of per-rank weighted sums ``values``."""
    if env.distributed and dist.is_initialized():
        packed = torch.stack([values, weights])
        dist.all_reduce(packed)
        values, weights = packed[0], packed[1]
    return values / weights.clamp_min(1e-12)


def any_rank(flag: bool, env: DistEnv, device: torch.device) -> bool:
    """True on every rank when ``flag`` is true on any rank."""
    if not (env.distributed and dist.is_initialized()):
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())

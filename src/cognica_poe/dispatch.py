"""
Process-group plumbing for running parts of one model in several processes: torch.distributed with gloo, so it
works on CPU processes on one host or across hosts (torchrun), one thread per process.

Rank 0 drives; every other rank serves a part and talks only to rank 0, with point-to-point messages (a
collective would stall every rank on the slowest and could not say which one failed). Each exchange names its
peer: a peer that crashed, exited or stopped answering (the group's timeout) raises RankFailed with one line
naming the rank, instead of a hang or a gloo trace. A worker waiting for its next command is idle, not hung,
so that one wait has no timeout; it still ends at once when rank 0 goes away.
"""

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

IDLE = datetime.timedelta(days=365)  # a worker may wait this long for rank 0's next command


class RankFailed(RuntimeError):
    """A peer process failed, exited or stopped answering within the group's timeout."""


def join_group(timeout_s: float = 300.0, rank: int | None = None, world_size: int | None = None,
               init_method: str | None = None, backend: str = "gloo") -> bool:
    """
    Join the default process group (gloo unless backend says "nccl") unless this process is already in one. Without
    arguments it reads torchrun's environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT); rank, world_size and
    init_method (e.g. "tcp://host:port" or "file:///shared/path") set it up explicitly. timeout_s bounds every
    exchange. With nccl, this rank's current CUDA device becomes cuda:LOCAL_RANK (NCCL's communicators use it).
    Returns True when this call created the group (the caller then leaves it with leave_group).
    """
    if backend == "gloo" and (not dist.is_available() or not dist.is_gloo_available()):
        raise ValueError("this torch build has no torch.distributed with gloo: install a build that has it")
    if dist.is_initialized():
        return False
    if rank is None and "RANK" not in os.environ:
        raise ValueError("no process group to join: run under torchrun (it sets RANK, WORLD_SIZE, MASTER_ADDR and "
                         "MASTER_PORT), or pass rank=, world_size= and init_method=")
    if timeout_s <= 0:
        raise ValueError(f"timeout_s must be positive, got {timeout_s}")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend, init_method=init_method, rank=-1 if rank is None else rank,
                            world_size=-1 if world_size is None else world_size,
                            timeout=datetime.timedelta(seconds=timeout_s))
    return True


def leave_group() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


@dataclass
class Peer:
    """One other rank, and what it serves (for messages)."""

    rank: int
    name: str

    def __str__(self) -> str:
        return f"rank {self.rank} ({self.name})"

    def failed(self, error: BaseException) -> RankFailed:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return RankFailed(f"{self} failed, exited or stopped answering: {first}")

    def send(self, *tensors: torch.Tensor) -> "list[dist.Work]":
        """Start sending CPU tensors to this peer; wait on the returned works (the data must stay untouched)."""
        try:
            return [dist.isend(t, dst=self.rank) for t in tensors]
        except RuntimeError as e:
            raise self.failed(e) from e

    def recv(self, *tensors: torch.Tensor) -> "list[dist.Work]":
        """Start receiving into preallocated CPU tensors from this peer; wait on the returned works."""
        try:
            return [dist.irecv(t, src=self.rank) for t in tensors]
        except RuntimeError as e:
            raise self.failed(e) from e

    def wait(self, works: "list[dist.Work]", timeout: datetime.timedelta | None = None) -> None:
        """Finish works started with this peer (timeout None: the group's)."""
        try:
            for work in works:
                work.wait() if timeout is None else work.wait(timeout)
        except RuntimeError as e:
            raise self.failed(e) from e

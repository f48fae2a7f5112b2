"""
Training on several processes (torchrun): plain data parallelism by hand, or FSDP2 with --fsdp.

Data parallel: gradients are all-reduced (SUM / world, one flat buffer) by hand after all of a step's backward
passes, instead of wrapping the model in DDP: flat mode calls backward K+1 times per micro-batch on pieces of one
model, which DDP's reducer (one backward per forward) does not expect. Every rank holds the full model and
optimizer state (no ZeRO); rank 0 evaluates, logs and saves.

--fsdp (FSDP2, for models whose optimizer state does not fit one device): `shard_model` applies fully_shard to
every block, wte, lm_head and value embedding, each called as a module, so FSDP gathers a unit's weights for its
forward and again for its backward, and reduce-scatters (averages) its gradient after each backward that used it:
the stage-wise backward (K+1 backward calls per micro-batch) needs nothing special, and lm_head, used by every
stage, accumulates its sharded gradient over them. The lambdas and the smear gate (read directly, not through a
module call) stay replicated and are averaged by hand. Muon steps the shards through optim.ShardedMuon
(full-matrix Newton-Schulz). Every rank evaluates (the forward needs all of them); rank 0 logs. Checkpoints and the
HF export hold full tensors gathered from the shards (full_model_state): the same files as a one-process run, so
any world size (with or without --fsdp) resumes from them. The full model is built on each rank before it is
sharded, so its weights (not its optimizer state) must fit one device.
"""

import os

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..model import GPT
from ..quantize import check_trainable


def init_distributed(device_type: str) -> tuple[int, int]:
    """(rank, world_size); joins the process group torchrun describes (gloo on CPU, nccl on CUDA) if any."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def allreduce_mean_(tensors: list[torch.Tensor], group: dist.ProcessGroup | None = None,
                    n_averaged: int | None = None) -> None:
    """
    Average tensors across the ranks of `group` (default: all) in place, through one flat buffer (gloo has no AVG
    op, so SUM / n). n_averaged: divide by this instead of the group's size (a pipeline sums its shared gradients
    over the pipeline ranks and averages them over the data ranks: SUM over all / data ranks).
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat /= n_averaged or dist.get_world_size(group)
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def shard_model(gpt: GPT, device: torch.device) -> list[torch.nn.Parameter]:
    """
    FSDP2 over all ranks: each block, wte, lm_head and value embedding is one fully_shard unit, gpt the root. The
    parameters outside those units (lambdas, smear gate) are left replicated; returns them (their gradients must be
    averaged by hand).
    """
    from torch.distributed.fsdp import fully_shard

    check_trainable(gpt)  # int8/int4 buffers cannot be sharded or trained
    units = [*gpt.transformer.h, gpt.transformer.wte, gpt.lm_head, *gpt.value_embeds.values()]
    in_units = {id(p) for unit in units for p in unit.parameters()}
    replicated = [p for p in gpt.parameters() if id(p) not in in_units]  # a list: the same order on every rank
    for unit in units:
        fully_shard(unit)
    fully_shard(gpt, ignored_params=set(replicated))
    with torch.no_grad():  # FSDP's root is the first module to run forward: make it gpt (training calls units)
        gpt(torch.zeros(1, 1, dtype=torch.long, device=device))
    return replicated


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float, split: frozenset[int] = frozenset(),
                    group: dist.ProcessGroup | None = None) -> float:
    """
    torch.nn.utils.clip_grad_norm_ for a mix of gradients split over the ranks of `group` (FSDP shards; in a
    pipeline, the parameters one pipeline rank owns, ids in `split`: their squares summed over the group) and
    replicas (counted once).
    """
    params = [p for p in params if p.grad is not None]
    grads = [p.grad for p in params]
    parts = [p.grad for p in params if isinstance(p.grad, DTensor) or id(p) in split]
    rest = [p.grad for p in params if not (isinstance(p.grad, DTensor) or id(p) in split)]
    split_sq = sum(((g.to_local() if isinstance(g, DTensor) else g).float().pow(2).sum() for g in parts),
                   torch.zeros((), device=grads[0].device))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(split_sq, op=dist.ReduceOp.SUM, group=group)
    total = float(sum((g.float().pow(2).sum() for g in rest), split_sq).sqrt())
    coef = min(1.0, max_norm / (total + 1e-6))
    for g in grads:
        g.mul_(coef)
    return total


def full_model_state(gpt: GPT) -> dict[str, torch.Tensor]:
    """gpt's state dict as full CPU tensors on rank 0 (FSDP shards gathered: every rank must call it); {} elsewhere."""
    keep = not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0
    out = {}
    for k, v in gpt.state_dict().items():
        v = v.full_tensor() if isinstance(v, DTensor) else v
        if keep:
            out[k] = v.detach().contiguous().cpu()
    return out


def mean_over_ranks(vec: torch.Tensor, device: torch.device, n_averaged: int | None = None) -> torch.Tensor:
    """vec averaged over all ranks (float64, back on the CPU): every rank sees the same numbers. n_averaged: divide
    the sum by this instead (a pipeline's loss vector: each pipeline rank fills its own stages' entries)."""
    v = vec.to(device=device, dtype=torch.float64)
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return (v / (n_averaged or dist.get_world_size())).cpu()

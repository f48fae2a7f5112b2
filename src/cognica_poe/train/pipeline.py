"""
Stage-pipelined flat-PoE training under torchrun (`cognica-poe train --pipeline-parallel P`).

Flat PoE detaches the residual stream at every stage boundary, so a stage needs the stream that enters it and
never a gradient from the stages after it. The processes form a 2-D mesh, pipeline P x data D (D = world / P;
process rank = p * D + d): pipeline rank p owns a contiguous range of the model's stages (as even as the count
allows) and, for every micro-batch, receives the stream, runs its stages' forwards, losses and backwards one stage
at a time (losses.flat_stage_range_backward), and sends the stream on. Each rank steps its own optimizer.

What crosses ranks, exactly:
- forward only, pipeline rank p -> p + 1 (same data rank), once per micro-batch: the detached stream leaving p's
  last stage (B, T, n_embd), and, once the backout layer has run, the detached backout stream (B, T, n_embd) that
  the last stage's loss subtracts. Nothing is sent back: no activation gradient ever crosses a rank.
- x0 (the embedding after smear) does not cross: it is NOT detached in flat PoE (every stage's loss reaches wte
  and the smear gate through it), so every rank reads the same batch (the data loader of its data rank) and
  recomputes x0 from the tokens with its own copy of wte and the smear gate.
- after a step's micro-batches, parameter gradients. The parameters every stage touches (wte, smear_gate,
  smear_lambda, lm_head: every exit's head, backout_lambda, and resid_lambdas / x0_lambdas: one tensor each
  holding every layer's scalar, each rank writing its own layers' entries) get gradients on every pipeline rank:
  they are SUMMED over the pipeline ranks (as pipelined LMs do for tied embeddings) and averaged over the data
  ranks, in one all-reduce over all processes; so every rank steps them identically and their copies stay equal.
  The blocks and value embeddings belong to one pipeline rank: averaged over its data ranks only. The loss vector
  (one entry per stage) crosses like the shared gradients; with --grad-clip, one squared norm is summed over the
  pipeline ranks.
- at evaluations and checkpoints, rank 0 gathers the weights (and at checkpoints the optimizer state) that the
  other pipeline ranks own (torch's gather_object, which pickles: the processes of one launch trust each other),
  so checkpoints are in the single-process format and any layout resumes from any other (one process, data
  parallel, FSDP, another pipeline).

Every rank holds the whole model and a MuonAdamW over all of it (simple; the weights are not split across ranks):
it steps only what it owns and the shared tensors (torch's optimizers skip a parameter without a gradient), and
keeps optimizer state only for those (other ranks' state, read from a checkpoint or gathered into one, is
dropped); its copies of other ranks' blocks go stale until rank 0 gathers them.

Schedule: per micro-batch, receive -> forward + backward of this rank's stages -> isend (waited for only at the
step's end), so rank p works on micro-batch m while rank p + 1 works on m - 1: a forward-only pipeline, P - 1
micro-batches of fill and drain per optimizer step (nothing like 1F1B is needed: there is no backward traffic to
interleave). Gradient accumulation (--total-batch-size) gives the pipeline micro-batches to overlap.

Why not torch.distributed.pipelining: its schedules (GPipe, 1F1B, ...) run one loss at the last stage and send
activation gradients back across ranks; here each rank has its own losses, the head is used on every rank, and
nothing flows back, so one send/recv per micro-batch is the whole schedule.

A process that dies makes the others' next send, receive or all-reduce fail (a dropped connection): this is raised
as one ConnectionError naming this process and the peer(s) it lost (unless torchrun, which names the dead rank in
its summary, stops this process first); the run continues from its last checkpoint with --resume. A process that
hangs without dying holds the others until the process group's timeout (torch's default).
"""

import contextlib
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from ..model import GPT
from .distributed import allreduce_mean_, clip_grad_norm_, mean_over_ranks
from .losses import flat_stage_range_backward, poe_loss_scale
from .optim import MuonAdamW


def split_stages(n_stages: int, n_pipe: int) -> list[range]:
    """Contiguous stage ranges, one per pipeline rank, sizes differing by at most one (later ranks get more)."""
    bounds = [p * n_stages // n_pipe for p in range(n_pipe + 1)]
    return [range(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


@dataclass
class Pipeline:
    """This process's place in the pipeline x data mesh and what it trains."""
    n_pipe: int
    n_data: int
    pipe_rank: int
    data_rank: int
    stages: range  # the model's stages this pipeline rank runs
    pipe_group: dist.ProcessGroup  # the pipeline ranks of this data rank
    data_group: dist.ProcessGroup  # the data ranks of this pipeline rank
    owner: dict[str, int]  # parameter name -> owning pipeline rank (blocks, value embeddings); absent: shared
    params: list[torch.nn.Parameter]  # what this rank trains: its own parameters and the shared ones
    owned_ids: frozenset[int]  # ids of its own parameters (the rest of `params` is shared)

    @property
    def rank(self) -> int:
        return self.pipe_rank * self.n_data + self.data_rank

    def process(self, pipe_rank: int) -> int:
        """The process rank of pipeline rank `pipe_rank` in this data rank's pipeline."""
        return pipe_rank * self.n_data + self.data_rank

    @contextlib.contextmanager
    def comm(self, what: str, group: dist.ProcessGroup | None = None, peer: int | None = None):
        """Turn a failed send / receive / collective (a lost peer) into one ConnectionError naming the processes."""
        try:
            yield
        except RuntimeError as e:  # gloo and nccl report a dropped peer as a RuntimeError (DistBackendError is one)
            peers = [peer] if peer is not None else [r for r in dist.get_process_group_ranks(group or dist.group.WORLD)
                                                     if r != self.rank]
            why = re.sub(r"^\[[^\]]*\]\s*", "", str(e).strip().splitlines()[0])  # drop gloo's [source:line] prefix
            why = why.split(". ")[0]  # and its advice after the first sentence
            who = "process " + " or ".join(map(str, peers))
            raise ConnectionError(f"process {self.rank} (pipeline rank {self.pipe_rank}, data rank {self.data_rank}) "
                                  f"lost {who} while {what}: {why}; the run stopped: continue it from its last "
                                  "checkpoint with --resume") from e


def setup_pipeline(gpt: GPT, n_pipe: int, rank: int, world: int, device_type: str) -> Pipeline:
    """Build the pipeline x data mesh (torch DeviceMesh) and this rank's share of the stages and parameters."""
    cfg = gpt.config
    if world % n_pipe or not 1 <= n_pipe <= cfg.poe_n_stages:  # the trainer says why first (loop._check_pipeline)
        raise ValueError(f"{n_pipe} pipeline ranks do not fit {world} processes and {cfg.poe_n_stages} stages")
    from torch.distributed.device_mesh import init_device_mesh

    n_data = world // n_pipe
    mesh = init_device_mesh(device_type, (n_pipe, n_data), mesh_dim_names=("pipe", "data"))  # rank = p * D + d
    pipe_rank, data_rank = rank // n_data, rank % n_data
    ranges = split_stages(cfg.poe_n_stages, n_pipe)
    layer_owner = {i: p for p, r in enumerate(ranges) for k in r for i in cfg.stage_layers()[k]}
    owner = {}
    for name, _ in gpt.named_parameters():
        parts = name.split(".")
        if name.startswith("transformer.h."):
            owner[name] = layer_owner[int(parts[2])]
        elif name.startswith("value_embeds."):
            owner[name] = layer_owner[int(parts[1])]
    params = [p for n, p in gpt.named_parameters() if owner.get(n, pipe_rank) == pipe_rank]
    owned = frozenset(id(p) for n, p in gpt.named_parameters() if owner.get(n) == pipe_rank)
    return Pipeline(n_pipe, n_data, pipe_rank, data_rank, ranges[pipe_rank], mesh.get_group("pipe"),
                    mesh.get_group("data"), owner, params, owned)


def pipeline_backward(gpt: GPT, pipe: Pipeline, idx: torch.Tensor, targets: torch.Tensor, alpha: float,
                      grad_scale: float, sends: list) -> list[float]:
    """
    One micro-batch on this pipeline rank: receive the streams from the rank before (unless first), forward and
    backward this rank's stages, isend the streams to the rank after (unless last; the handles go to `sends`, to
    be waited for by finish_step). Returns one loss per stage of the model, 0.0 at the stages of other ranks.
    """
    cfg = gpt.config
    first_layer = cfg.stage_layers()[pipe.stages[0]][0]
    x = x_backout = None
    if pipe.pipe_rank > 0:
        src = pipe.process(pipe.pipe_rank - 1)
        x = torch.empty(*idx.shape, cfg.n_embd, dtype=gpt.dtype, device=idx.device)
        x_backout = torch.empty_like(x) if cfg.backout_layer < first_layer else None  # the sender has it then
        with pipe.comm("receiving a micro-batch's stream", peer=src):
            for tag, t in enumerate(t for t in (x, x_backout) if t is not None):
                dist.recv(t, src=src, tag=tag)
    scale = grad_scale * poe_loss_scale(cfg.poe_n_stages, alpha)
    own, x, x_backout = flat_stage_range_backward(gpt, idx, targets, scale, pipe.stages, x, x_backout)
    if pipe.pipe_rank < pipe.n_pipe - 1:
        dst = pipe.process(pipe.pipe_rank + 1)
        with pipe.comm("sending a micro-batch's stream", peer=dst):
            for tag, t in enumerate(t for t in (x, x_backout) if t is not None):
                sends.append(dist.isend(t.to(gpt.dtype).contiguous(), dst=dst, tag=tag))
    losses = [0.0] * cfg.poe_n_stages
    losses[pipe.stages.start:pipe.stages.stop] = own
    return losses


def finish_step(pipe: Pipeline, sends: list, loss_vec: torch.Tensor, device: torch.device) -> torch.Tensor:
    """
    After a step's micro-batches: wait for the sends, sum the shared gradients over the pipeline ranks and average
    everything over the data ranks (every trained parameter must have a gradient); returns the whole loss vector.
    """
    if sends:
        with pipe.comm("sending a micro-batch's stream", peer=pipe.process(pipe.pipe_rank + 1)):
            for handle in sends:
                handle.wait()
        sends.clear()
    shared = [p.grad for p in pipe.params if id(p) not in pipe.owned_ids]
    with pipe.comm("summing the shared gradients and the losses over all processes"):
        allreduce_mean_(shared, n_averaged=pipe.n_data)
        loss_vec = mean_over_ranks(loss_vec, device, n_averaged=pipe.n_data)
    if pipe.n_data > 1:
        with pipe.comm("averaging gradients over the data ranks", pipe.data_group):
            allreduce_mean_([p.grad for p in pipe.params if id(p) in pipe.owned_ids], group=pipe.data_group)
    return loss_vec


def pipeline_clip_grad_norm_(pipe: Pipeline, max_norm: float) -> float:
    """The whole model's gradient norm (each rank's own parameters counted on it, the shared ones once), clipped."""
    with pipe.comm("summing the gradient norm over the pipeline ranks", pipe.pipe_group):
        return clip_grad_norm_(pipe.params, max_norm, pipe.owned_ids, pipe.pipe_group)


def gather_to_first(gpt: GPT, pipe: Pipeline, optimizer: MuonAdamW | None = None) -> None:
    """
    Copy the parameters other pipeline ranks own (and with `optimizer`, their optimizer state) into rank 0's model,
    so rank 0 holds the whole current model (to evaluate, save in the single-process format, export). Every rank
    calls it; data ranks other than 0 hold copies of the same and sit it out.
    """
    if pipe.data_rank != 0:
        return
    mine = {}
    if pipe.pipe_rank > 0:
        for name, p in gpt.named_parameters():
            if pipe.owner.get(name) == pipe.pipe_rank:
                states = [{k: v.cpu() if torch.is_tensor(v) else v for k, v in opt.state[p].items()}
                          if p in opt.state else None for opt in optimizer.optimizers] if optimizer else []
                mine[name] = (p.detach().cpu(), states)
    parts = [None] * pipe.n_pipe if pipe.pipe_rank == 0 else None
    with pipe.comm("gathering the model on process 0", pipe.pipe_group):
        dist.gather_object(mine, parts, dst=pipe.process(0), group=pipe.pipe_group)
    if pipe.pipe_rank != 0:
        return
    params = dict(gpt.named_parameters())
    with torch.no_grad():
        for part in parts[1:]:
            for name, (weight, states) in part.items():
                p = params[name]
                p.copy_(weight)
                for opt, state in zip(optimizer.optimizers if optimizer else [], states):
                    if state is not None:  # tensors shaped like the parameter go to its device (a step count stays)
                        opt.state[p] = {k: v.to(p.device) if torch.is_tensor(v) and v.shape == p.shape else v
                                        for k, v in state.items()}


def drop_others_state(gpt: GPT, pipe: Pipeline, optimizer: MuonAdamW) -> None:
    """Forget the optimizer state of parameters other pipeline ranks own (read from a checkpoint, or gathered for
    one): this rank never steps them, and their owners hold the current state."""
    for name, p in gpt.named_parameters():
        if pipe.owner.get(name, pipe.pipe_rank) != pipe.pipe_rank:
            for opt in optimizer.optimizers:
                opt.state.pop(p, None)

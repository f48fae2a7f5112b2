"""
nanochat's optimizer recipe on stock PyTorch optimizers: torch.optim.Muon for the block matrices, AdamW for the
rest, with nanochat's groups, learning rates and schedules.

Groups (lrs before the schedule multiplier; dmodel = (n_embd/768)^-0.5, batch = sqrt(batch_tokens/2^19)):
  Muon   every 2-D matrix in transformer.h (ve_gate included)  matrix_lr * batch, one group per shape
  AdamW  lm_head             unembedding_lr * dmodel * batch  betas (0.8, 0.96)   wd 0.01
         wte                 embedding_lr * dmodel * batch    betas (0.8, 0.995)  wd 0.001
         value_embeds        0.5 * embedding_lr * dmodel * batch (0.8, 0.995)     wd 0.01
         resid_lambdas       0.01 * scalar_lr * batch         betas (0.8, 0.95)   wd 0.05
         x0_lambdas          scalar_lr * batch                betas (0.96, 0.95)  wd 0
         smear_gate, smear_lambda, backout_lambda  0.2 fixed  betas (0.8, 0.95)   wd 0
  eps 1e-10 everywhere. As in nanochat, dmodel scales only the embedding/unembedding groups, the batch factor
  scales everything but the fixed 0.2 group, and `batch_lr_scale` may override the batch factor.

Schedules (`apply_schedule`): lr multiplier = linear warmup, constant, linear warmdown over the last
warmdown_ratio of the steps to final_lr_frac; Muon momentum 0.85 -> 0.97 over the first 400 steps (the ramp
wins in short runs, as in nanochat), then 0.97, then 0.97 -> 0.90 over the warmdown; Muon weight decay =
weight_decay * 0.5 * (1 + cos(pi * step / num_steps)).

Where torch.optim.Muon differs from nanochat's Muon (so this is NOT bit-for-bit nanochat's optimizer):
- orthogonalization: Newton-Schulz with Keller Jordan's fixed quintic coefficients (3.4445, -4.775, 2.0315),
  5 steps, in bf16, after dividing by the Frobenius norm; nanochat uses the Polar Express per-iteration
  coefficients, with MuonEq row equilibration before and a Muon+ rescale to Frobenius norm sqrt(min(m, n)) after.
- no NorMuon variance reduction (nanochat's second-moment buffer per row/column).
- plain decoupled weight decay p *= 1 - lr * wd on every entry; nanochat's is cautious (only where the update
  and the parameter agree in sign). We give each shape group wd * sqrt(max(1, rows/cols)) so the decay
  strength equals nanochat's, which multiplies decay by the shape-adjusted lr.
- lr adjustment: we pass adjust_lr_fn="original", i.e. lr * sqrt(max(1, rows/cols)): the same factor as
  nanochat (x2 for c_fc at 4x width), chosen explicitly rather than relying on the default (None means the same
  today). "match_rms_adamw" (0.2 * sqrt(max(rows, cols))) would need AdamW-scale lrs and is not nanochat's.
- momentum: the same Nesterov form (buf = lerp(buf, g, 1-mu); g = lerp(g, buf, mu)).
AdamW is torch.optim.AdamW (fp32 math, decoupled decay, bias correction): the same update as nanochat's.

Distributed: with plain data parallelism every rank holds every parameter and the loop averages the gradients
before `step()`. With FSDP2 (`fully_shard`) the parameters, gradients and optimizer state are DTensor shards
(rows split across ranks). AdamW is elementwise, so torch.optim.AdamW steps the shards as they are. Muon is not:
it orthogonalizes the whole matrix, so ShardedMuon keeps the momentum buffer sharded, gathers the momentum
update of one matrix at a time (full_tensor, in bf16, which is where Newton-Schulz starts anyway), runs the same
Newton-Schulz as torch.optim.Muon on it, and applies only this rank's rows. Every rank orthogonalizes every matrix
(simple; each step costs one extra bf16 all-gather of the block matrices and a redundant Newton-Schulz).
State dicts: `state_dict()` returns full tensors (a collective under FSDP: every rank must call it), so an FSDP
checkpoint has the same format as a single-process one; `load_state_dict()` shards full tensors back.
"""

import math

import torch
from torch.distributed.tensor import DTensor, distribute_tensor

from ..model import GPT
from ..quantize import check_trainable

B_REF = 2**19  # nanochat's reference batch size in tokens


def lr_multiplier(step: int, num_steps: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                  final_lr_frac: float = 0.05) -> float:
    """nanochat's schedule: (step+1)/warmup during warmup, 1.0, then linear down to final_lr_frac at num_steps."""
    warmdown = round(warmdown_ratio * num_steps)
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if step <= num_steps - warmdown:
        return 1.0
    p = (num_steps - step) / warmdown
    return p + (1 - p) * final_lr_frac


def muon_momentum(step: int, num_steps: int, warmdown_ratio: float = 0.65) -> float:
    """0.85 -> 0.97 over the first 400 steps, 0.97, then 0.97 -> 0.90 over the warmdown (the ramp-up wins)."""
    warmdown = round(warmdown_ratio * num_steps)
    if step < 400:
        return 0.85 + (0.97 - 0.85) * step / 400
    if warmdown > 0 and step >= num_steps - warmdown:
        p = min(1.0, (step - (num_steps - warmdown)) / warmdown)
        return 0.97 + (0.90 - 0.97) * p
    return 0.97


def muon_weight_decay(step: int, num_steps: int, weight_decay: float) -> float:
    """Cosine from weight_decay to 0 over the run."""
    return weight_decay * 0.5 * (1 + math.cos(math.pi * step / max(num_steps, 1)))


class ShardedMuon(torch.optim.Muon):
    """
    torch.optim.Muon whose parameters may be FSDP2 DTensor shards: the same update (Nesterov momentum, Newton-
    Schulz on the full matrix, decoupled weight decay, lr * sqrt(max(1, rows/cols))) computed from the gathered
    momentum update, of which each rank applies its own rows. Plain tensors take the same path without a gather.
    """

    @torch.no_grad()
    def step(self, closure=None):
        # torch.optim.Muon's own helpers, so the math is its math (tests check bit equality); imported here so a
        # torch that moves them breaks only FSDP training
        from torch.optim._muon import _adjust_lr, _zeropower_via_newtonschulz

        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad, memory_format=torch.preserve_format)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)  # elementwise: stays sharded
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                sharded = isinstance(update, DTensor)
                full = update.bfloat16().full_tensor() if sharded else update  # NS casts to bf16 first anyway
                ortho = _zeropower_via_newtonschulz(full, group["ns_coefficients"], group["ns_steps"], group["eps"])
                if sharded:  # this rank's rows of the full result, no communication
                    ortho = distribute_tensor(ortho, update.device_mesh, update.placements, src_data_rank=None)
                p.mul_(1 - lr * wd)
                p.add_(ortho, alpha=-_adjust_lr(lr, group["adjust_lr_fn"], p.shape))  # p.shape: the full shape
        return loss


def _gather_state(state: dict) -> dict:
    """An optimizer state_dict with every DTensor gathered to a full tensor (a collective: all ranks call it)."""
    gathered = {i: {k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in s.items()}
                for i, s in state["state"].items()}
    return dict(state, state=gathered)


def _shard_state(opt: torch.optim.Optimizer, state: dict) -> dict:
    """The inverse of _gather_state for `opt`: full tensors of DTensor parameters become shards laid out alike."""
    params = [p for g in opt.param_groups for p in g["params"]]
    sharded = {}
    for i, s in state["state"].items():
        p = params[int(i)]
        if isinstance(p, DTensor):
            s = {k: distribute_tensor(v.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
                 if torch.is_tensor(v) and v.shape == p.shape else v for k, v in s.items()}
        sharded[i] = s
    return dict(state, state=sharded)


class MuonAdamW:
    """Two stock optimizers behind one interface: step(), zero_grad(), apply_schedule(), state_dict()."""

    def __init__(self, gpt: GPT, batch_tokens: int, matrix_lr: float = 0.02, embedding_lr: float = 0.3,
                 unembedding_lr: float = 0.008, scalar_lr: float = 0.5, weight_decay: float = 0.28,
                 batch_lr_scale: float | None = None):
        check_trainable(gpt)  # quantized weights have nothing to update: refused in one line
        self.weight_decay = weight_decay
        batch = batch_lr_scale if batch_lr_scale is not None else (batch_tokens / B_REF) ** 0.5
        dmodel = (gpt.config.n_embd / 768) ** -0.5
        by_shape: dict[tuple[int, ...], list[torch.nn.Parameter]] = {}
        for p in gpt.transformer.h.parameters():
            if p.ndim != 2:
                raise ValueError(f"unexpected non-matrix parameter of shape {tuple(p.shape)} in transformer.h")
            by_shape.setdefault(tuple(p.shape), []).append(p)
        muon_groups = [dict(params=ps, lr=matrix_lr * batch, wd_scale=max(1.0, s[0] / s[1]) ** 0.5)
                       for s, ps in sorted(by_shape.items())]
        fsdp = any(isinstance(p, DTensor) for p in gpt.parameters())
        muon_cls = ShardedMuon if fsdp else torch.optim.Muon
        self.muon = muon_cls(muon_groups, lr=matrix_lr * batch, weight_decay=0.0, momentum=0.85, nesterov=True,
                             adjust_lr_fn="original")
        emb = embedding_lr * dmodel * batch
        adam_groups = [
            dict(params=[gpt.lm_head.weight], lr=unembedding_lr * dmodel * batch, betas=(0.8, 0.96), weight_decay=0.01),
            dict(params=[gpt.transformer.wte.weight], lr=emb, betas=(0.8, 0.995), weight_decay=0.001),
            dict(params=list(gpt.value_embeds.parameters()), lr=0.5 * emb, betas=(0.8, 0.995), weight_decay=0.01),
            dict(params=[gpt.resid_lambdas], lr=0.01 * scalar_lr * batch, betas=(0.8, 0.95), weight_decay=0.05),
            dict(params=[gpt.x0_lambdas], lr=scalar_lr * batch, betas=(0.96, 0.95), weight_decay=0.0),
            dict(params=[gpt.smear_gate.weight, gpt.smear_lambda, gpt.backout_lambda], lr=0.2, betas=(0.8, 0.95),
                 weight_decay=0.0),
        ]
        adam_groups = [g for g in adam_groups if g["params"]]  # value_embeds may be empty in odd shapes
        self.adamw = torch.optim.AdamW(adam_groups, lr=0.0, eps=1e-10)
        for opt in (self.muon, self.adamw):
            for g in opt.param_groups:
                g["initial_lr"] = g["lr"]
        covered = {id(p) for opt in (self.muon, self.adamw) for g in opt.param_groups for p in g["params"]}
        missing = [n for n, p in gpt.named_parameters() if id(p) not in covered]
        if missing:
            raise ValueError(f"parameters without an optimizer group: {missing}")

    @property
    def optimizers(self) -> list[torch.optim.Optimizer]:
        return [self.muon, self.adamw]

    def apply_schedule(self, step: int, num_steps: int, warmup_steps: int = 40, warmdown_ratio: float = 0.65,
                       final_lr_frac: float = 0.05) -> dict[str, float]:
        """Set this step's lrs, Muon momentum and Muon weight decay; returns them for logging."""
        lrm = lr_multiplier(step, num_steps, warmup_steps, warmdown_ratio, final_lr_frac)
        mom = muon_momentum(step, num_steps, warmdown_ratio)
        wd = muon_weight_decay(step, num_steps, self.weight_decay)
        for opt in self.optimizers:
            for g in opt.param_groups:
                g["lr"] = g["initial_lr"] * lrm
        for g in self.muon.param_groups:
            g["momentum"] = mom
            g["weight_decay"] = wd * g["wd_scale"]
        return dict(lrm=lrm, momentum=mom, weight_decay=wd)

    def step(self) -> None:
        for opt in self.optimizers:
            opt.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for opt in self.optimizers:
            opt.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        """Full (unsharded) tensors, the same under FSDP as in one process; under FSDP every rank must call it."""
        return dict(muon=_gather_state(self.muon.state_dict()), adamw=_gather_state(self.adamw.state_dict()))

    def load_state_dict(self, state: dict) -> None:
        """Load a full state dict (from any world size); under FSDP each rank keeps its shards."""
        self.muon.load_state_dict(_shard_state(self.muon, state["muon"]))
        self.adamw.load_state_dict(_shard_state(self.adamw, state["adamw"]))

"""
Training from scratch: PoE stage losses (flat / hier / none), the step loop, checkpoints, resume.

Why flat PoE is trained stage by stage: in flat mode the residual stream entering each stage is detached, so no
gradient crosses a stage boundary except through x0 (embedding + smear, NOT detached: wte, smear and lm_head
learn from every stage). Stage k's backward can therefore run right after its forward, freeing its activations
before stage k+1 runs (activation memory ~1/K of backprop). x0 enters every stage as one leaf tensor whose
.grad accumulates the stages' contributions; one final x0.backward(x0_leaf.grad) sends it into wte/smear.
The gradients equal those of one graph holding all stages with the same detaches (tests/test_train.py).

The last stage's loss is the served forward: CE(softcap(lm_head(norm(h_last - backout_lambda *
x_backout.detach())))), so backout_lambda learns from the last stage only (SPEC §3). Intermediate exits have
no backout. Total loss = sum_k loss_k / K^(1 - poe_alpha). "hier" = the same losses in one graph without any
detach (deep supervision); "none" = the standard forward's single loss (the backprop baseline).

Multi-process (torchrun): gradients are all-reduced (SUM / world, one flat buffer) by hand after all of a step's
backward passes, instead of wrapping the model in DDP: flat mode calls backward K+1 times per micro-batch on
pieces of one model, which DDP's reducer (one backward per forward) does not expect. Every rank holds the full
model and optimizer state (no ZeRO); rank 0 evaluates, logs and saves.

--fsdp (FSDP2, for models whose optimizer state does not fit one device): `shard_model` applies fully_shard to
every block, wte, lm_head and value embedding, each called as a module, so FSDP gathers a unit's weights for its
forward and again for its backward, and reduce-scatters (averages) its gradient after each backward that used it:
the stage-wise backward (K+1 backward calls per micro-batch) needs nothing special, and lm_head, used by every
stage, accumulates its sharded gradient over them. The lambdas and the smear gate (a few hundred floats, read
directly, not through a module call) stay replicated and are averaged by hand. Muon steps the shards through
optim.ShardedMuon (full-matrix Newton-Schulz). Every rank evaluates (the forward needs all of them); rank 0 logs.
Checkpoints and the HF export hold full tensors gathered from the shards: the same files as a one-process run,
so any world size (with or without --fsdp) resumes from them. The full model is built on each rank before it is
sharded, so its weights (not its optimizer state) must fit one device.

Checkpoints: <out_dir>/checkpoints/step_NNNNNN/ holds model.safetensors, optim.pt and state.pt (step, loader
position, RNG states, configs, loop state); it is written to a temporary folder and renamed (atomic.py), then the
`latest` pointer file is replaced atomically, so a crash or a NaN stop never leaves a half-written or overwritten
checkpoint. A non-finite loss or gradient stops the run before the optimizer step, and non-finite weights stop it
before they are saved, so the checkpoint the error names is good. Resume restores everything, so on CPU in fp32 the
loss curve is bitwise that of an unbroken run; if the latest checkpoint cannot be read (truncated on disk), it
resumes from the newest earlier one still kept, with a warning. A folder that holds another run (checkpoints/ or
metrics.jsonl) is only ever continued (--resume), never overwritten or mixed with a new run.
"""

import dataclasses
import json
import math
import os
import random
import re
import shutil
import time
import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from ..atomic import atomic_folder, check_replaceable, write_text
from ..bpb import stage_bpb
from ..config import CognicaPoEConfig
from ..model import GPT
from .config import TrainConfig
from .data import Corpus, PackedLoader, iter_tokenizer_texts, token_stream
from .optim import MuonAdamW


class NonFiniteLossError(ValueError):
    """A loss, gradient or weight became NaN or inf; the run stopped before stepping on it or saving it. A
    ValueError, so the CLI prints it as one line (a diverged run is a property of its settings and data)."""


# -----------------------------------------------------------------------------
# PoE losses

def poe_loss_scale(n_stages: int, alpha: float) -> float:
    """Total = sum_k loss_k / K^(1 - alpha): alpha 0 -> mean, 1 -> sum."""
    return 1.0 / n_stages ** (1.0 - alpha)


def _ce(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)


def _exit_loss(gpt: GPT, h: torch.Tensor, last: int, x_backout: torch.Tensor | None,
               targets: torch.Tensor) -> torch.Tensor:
    if gpt.applies_backout(last):
        h = h - gpt.backout_lambda.to(h.dtype) * x_backout
    return _ce(gpt.exit_logits(h), targets)


def joint_stage_losses(gpt: GPT, idx: torch.Tensor, targets: torch.Tensor, detach: bool) -> list[torch.Tensor]:
    """
    Every stage's loss from one graph. detach=True: flat PoE (stream detached entering stages 1.., x_backout
    detached in the last loss, x0 attached); detach=False: hier (plain deep supervision).
    """
    x0, step = gpt.prepare(idx)
    x, x_backout, losses = x0, None, []
    for k, layers in enumerate(gpt.config.stage_layers()):
        last = layers[-1]
        if detach and k > 0:
            x = x.detach()
        for i in layers:
            x = gpt.run_layer(i, x, x0, idx, step)
            if i == gpt.config.backout_layer:
                x_backout = x.detach() if detach else x
        losses.append(_exit_loss(gpt, x, last, x_backout, targets))
    return losses


def flat_stagewise_backward(gpt: GPT, idx: torch.Tensor, targets: torch.Tensor, scale: float) -> list[float]:
    """
    Flat PoE, one stage at a time: forward stage k, backward (scale * loss_k) at once (freeing its activations),
    pass h_k.detach() on. x0 is a leaf shared by all stages; its gradient goes into wte/smear at the end.
    Returns the per-stage losses. Gradients equal joint_stage_losses(detach=True) summed times scale.
    """
    x0, step = gpt.prepare(idx)  # (B, T, C), graph through wte and smear kept
    x0_leaf = x0.detach().requires_grad_()
    x, x_backout, losses = x0_leaf, None, []
    for layers in gpt.config.stage_layers():
        last = layers[-1]
        for i in layers:
            x = gpt.run_layer(i, x, x0_leaf, idx, step)
            if i == gpt.config.backout_layer:
                x_backout = x.detach()
        loss = _exit_loss(gpt, x, last, x_backout, targets)
        (loss * scale).backward()  # frees this stage's graph
        losses.append(loss.detach())
        x = x.detach()
    if x0_leaf.grad is not None:
        x0.backward(x0_leaf.grad)
    return [float(v) for v in losses]


def backward_step(gpt: GPT, idx: torch.Tensor, targets: torch.Tensor, mode: str, alpha: float,
                  grad_scale: float = 1.0) -> list[float]:
    """Forward + backward of one micro-batch in `mode`; returns the unscaled per-stage (or single) losses."""
    if mode == "flat":
        return flat_stagewise_backward(gpt, idx, targets, grad_scale * poe_loss_scale(gpt.config.poe_n_stages, alpha))
    if mode == "hier":
        losses = joint_stage_losses(gpt, idx, targets, detach=False)
        (sum(losses) * poe_loss_scale(len(losses), alpha) * grad_scale).backward()
        return [float(v.detach()) for v in losses]
    if mode == "none":
        loss = gpt(idx, targets)
        (loss * grad_scale).backward()
        return [float(loss.detach())]
    raise ValueError(f"poe_mode must be flat, hier or none, got {mode!r}")


# -----------------------------------------------------------------------------
# distributed helpers

def init_distributed(device_type: str) -> tuple[int, int]:
    """(rank, world_size); joins the process group torchrun describes (gloo on CPU, nccl on CUDA) if any."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group(backend="nccl" if device_type == "cuda" else "gloo")
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def allreduce_mean_(tensors: list[torch.Tensor]) -> None:
    """Average tensors across ranks in place, through one flat buffer (gloo has no AVG op, so SUM / world)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= dist.get_world_size()
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

    units = [*gpt.transformer.h, gpt.transformer.wte, gpt.lm_head, *gpt.value_embeds.values()]
    in_units = {id(p) for unit in units for p in unit.parameters()}
    replicated = [p for p in gpt.parameters() if id(p) not in in_units]  # a list: the same order on every rank
    for unit in units:
        fully_shard(unit)
    fully_shard(gpt, ignored_params=set(replicated))
    with torch.no_grad():  # FSDP's root is the first module to run forward: make it gpt (training calls units)
        gpt(torch.zeros(1, 1, dtype=torch.long, device=device))
    return replicated


def clip_grad_norm_(params: list[torch.nn.Parameter], max_norm: float) -> float:
    """torch.nn.utils.clip_grad_norm_ for a mix of FSDP shards (their squares summed over ranks) and replicas."""
    grads = [p.grad for p in params if p.grad is not None]
    sharded = sum((g.to_local().float().pow(2).sum() for g in grads if isinstance(g, DTensor)),
                  torch.zeros((), device=grads[0].device))
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(sharded, op=dist.ReduceOp.SUM)
    total = float(sum((g.float().pow(2).sum() for g in grads if not isinstance(g, DTensor)), sharded).sqrt())
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


# -----------------------------------------------------------------------------
# checkpoints

def _rng_state() -> dict:
    state = dict(python=random.getstate(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state  # numpy's RNG is not used anywhere in training, so it is not saved


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_FILES = ("model.safetensors", "optim.pt", "state.pt")
STEP_DIR = re.compile(r"step_(\d{6,})")


def _is_checkpoint(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in CHECKPOINT_FILES)


def _step_dirs(ckpt_root: str) -> list[str]:
    """The step_NNNNNN folder names in ckpt_root, oldest first."""
    names = os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []
    return sorted((d for d in names if STEP_DIR.fullmatch(d)), key=lambda d: int(d[5:]))


def save_checkpoint(ckpt_root: str, step: int, gpt: GPT, optimizer: MuonAdamW, state: dict, keep: int = 2) -> str:
    """
    Write step_NNNNNN/ atomically (a re-saved step replaces the old folder only once the new one is whole), then
    flip the `latest` pointer. Returns the folder. Under FSDP every rank calls it (the shards are gathered) and
    only rank 0 writes.
    """
    tensors, optim_state = full_model_state(gpt), optimizer.state_dict()
    name = f"step_{step:06d}"
    final = os.path.join(ckpt_root, name)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return final
    os.makedirs(ckpt_root, exist_ok=True)
    with atomic_folder(final, overwrite=True, owned=_is_checkpoint) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        torch.save(optim_state, os.path.join(tmp, "optim.pt"))
        torch.save(state, os.path.join(tmp, "state.pt"))
    write_text(os.path.join(ckpt_root, "latest"), name + "\n")
    old = [d for d in _step_dirs(ckpt_root) if d != name]
    for d in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: str) -> str | None:
    pointer = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(ckpt_root, f.read().strip())


def read_checkpoint(folder: str, with_optimizer: bool = True) -> dict:
    """A checkpoint's files, all read (so a truncated one fails here, before any of it is used)."""
    return dict(model=load_file(os.path.join(folder, "model.safetensors")),
                optim=torch.load(os.path.join(folder, "optim.pt"), weights_only=True) if with_optimizer else None,
                state=torch.load(os.path.join(folder, "state.pt"), weights_only=True), folder=folder)


def apply_checkpoint(ckpt: dict, gpt: GPT, optimizer: MuonAdamW | None = None) -> None:
    """Copy read_checkpoint's weights into gpt's own (aligned) tensors and restore the optimizer. Under FSDP each
    rank holds the full tensors and keeps its shard."""
    tensors, own = ckpt["model"], gpt.state_dict()
    wrong = [k for k, v in own.items() if k not in tensors or tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{ckpt['folder']}/model.safetensors does not fit this model: {len(wrong)} tensor(s) "
                         f"missing or of another shape, e.g. {wrong[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            src = tensors[k]
            if isinstance(v, DTensor):
                src = distribute_tensor(src.to(v.device), v.device_mesh, v.placements, src_data_rank=None)
            v.copy_(src)
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optim"])


def load_checkpoint(folder: str, gpt: GPT, optimizer: MuonAdamW | None = None) -> dict:
    """Load a checkpoint into gpt (and the optimizer); returns state.pt's dict."""
    ckpt = read_checkpoint(folder, optimizer is not None)
    apply_checkpoint(ckpt, gpt, optimizer)
    return ckpt["state"]


def resume_checkpoint(ckpt_root: str) -> dict:
    """
    Read the `latest` checkpoint; if it cannot be read (truncated on disk by a crash or a full disk), the newest
    earlier one still kept, with a warning. Returns read_checkpoint's dict.
    """
    latest = latest_checkpoint(ckpt_root)
    newest = int(os.path.basename(latest)[5:]) if latest and STEP_DIR.fullmatch(os.path.basename(latest)) else None
    earlier = [os.path.join(ckpt_root, d) for d in reversed(_step_dirs(ckpt_root))
               if newest is None or int(d[5:]) < newest]
    candidates = ([latest] if latest else []) + earlier
    if not candidates:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_root}")
    unreadable = []
    for folder in candidates:
        try:
            ckpt = read_checkpoint(folder)
        except Exception as e:  # safetensors, torch.load and a missing file each raise their own kind
            unreadable.append((folder, f"{type(e).__name__}: {e}".splitlines()[0]))
            continue
        if unreadable:
            warnings.warn(f"{', '.join(f for f, _ in unreadable)} could not be read; resuming from {folder} "
                          f"({'; '.join(why for _, why in unreadable)})", stacklevel=2)
        return ckpt
    raise ValueError(f"--resume: no checkpoint in {ckpt_root} can be read: "
                     + "; ".join(f"{f} ({why})" for f, why in unreadable))


# -----------------------------------------------------------------------------
# the loop

def _resolve_device(name: str) -> torch.device:
    """"auto" = cuda if any, else cpu; under torchrun a bare "cuda" means this process's GPU (LOCAL_RANK)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.index is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def _get_tokenizer(cfg: TrainConfig, rank: int, vocab_size: int):
    from ..tokenizer import CognicaPoETokenizer

    if cfg.tokenizer:
        return CognicaPoETokenizer.from_pretrained(cfg.tokenizer)
    folder = os.path.join(cfg.out_dir, "tokenizer")
    if rank == 0 and not os.path.isfile(os.path.join(folder, "tokenizer_config.json")):
        from ..tokenizer_train import train_bpe

        tok = train_bpe(iter_tokenizer_texts(cfg.data), vocab_size)
        with atomic_folder(folder, overwrite=True) as tmp:  # an empty folder may be replaced, nothing else
            tok.save_pretrained(tmp)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    return CognicaPoETokenizer.from_pretrained(folder)


def _nonfinite(tensors: list[torch.Tensor], device: torch.device) -> bool:
    """Whether any tensor holds a NaN or inf, on any rank (FSDP shards are checked where they live)."""
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors if t is not None]
    bad = (~torch.stack([torch.isfinite(t).all() for t in local]).all()).to(device=device, dtype=torch.float32)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(bad, op=dist.ReduceOp.MAX)
    return bool(bad)


def check_out_dir(cfg: TrainConfig) -> None:
    """A folder that holds another run is only continued (--resume), never overwritten or mixed with a new run."""
    holds_run = os.path.isdir(os.path.join(cfg.out_dir, "checkpoints")) or \
        os.path.isfile(os.path.join(cfg.out_dir, "metrics.jsonl"))
    if holds_run and not cfg.resume:
        raise FileExistsError(f"--out-dir {cfg.out_dir} holds another run (checkpoints/ or metrics.jsonl): pass "
                              "--resume to continue it, or choose a new --out-dir")


def _read_metrics(path: str, upto_step: int) -> list[str]:
    if not os.path.isfile(path):
        return []
    with open(path) as f:
        return [line for line in f if line.strip() and json.loads(line)["step"] <= upto_step]


def train(cfg: TrainConfig) -> dict:
    """Train (or resume) a model as `cfg` says; returns a summary dict (losses, per-stage BPB, timings, paths)."""
    device = _resolve_device(cfg.device)
    rank, world = init_distributed(device.type)
    if cfg.fsdp and world == 1:
        raise ValueError("--fsdp shards the model over the processes of a torchrun launch (e.g. torchrun "
                         "--nproc_per_node=8 -m cognica_poe.cli train --fsdp ...); this is a single process")
    master = rank == 0
    check_out_dir(cfg)  # on every rank, before any rank writes (the first barrier is in _get_tokenizer)
    if cfg.export:  # the export at the end may replace only an earlier export: know it now, not after training
        from ..checkpoint import is_model_folder

        check_replaceable(os.path.join(cfg.out_dir, "hf"), True, is_model_folder, (cfg.data, cfg.tokenizer))
    os.makedirs(cfg.out_dir, exist_ok=True)
    ckpt_root = os.path.join(cfg.out_dir, "checkpoints")
    metrics_path = os.path.join(cfg.out_dir, "metrics.jsonl")

    overrides = cfg.model_overrides()
    tok = _get_tokenizer(cfg, rank, overrides["vocab_size"])
    overrides["vocab_size"] = len(tok)
    mcfg = CognicaPoEConfig(**overrides, bos_token_id=tok.bos_token_id, pad_token_id=tok.bos_token_id)
    gpt = GPT.from_config(mcfg, device=device, dtype=torch.float32, seed=cfg.seed)
    T, B = mcfg.sequence_len, cfg.device_batch_size
    total = cfg.total_batch_size if cfg.total_batch_size > 0 else B * T * world
    if total % (B * T * world):
        raise ValueError(f"total_batch_size {total} is not a multiple of device_batch_size * sequence_len * world "
                         f"= {B * T * world}")
    grad_accum = total // (B * T * world)
    replicated = shard_model(gpt, device) if cfg.fsdp else list(gpt.parameters())  # FSDP averages the rest
    optimizer = MuonAdamW(gpt, total, cfg.matrix_lr, cfg.embedding_lr, cfg.unembedding_lr, cfg.scalar_lr,
                          cfg.weight_decay, cfg.batch_lr_scale)
    corpus = Corpus(cfg.data)
    loader = PackedLoader(corpus, tok, B, T, "train", cfg.seed, rank, world, cfg.shuffle_block, device)
    evaluates = master or cfg.fsdp  # an FSDP forward needs every rank
    val_stream = token_stream(corpus, tok, "val", cfg.eval_tokens) if evaluates else None
    token_bytes = tok.token_bytes()
    if cfg.compile:
        for block in gpt.transformer.h:
            block.compile(dynamic=False)

    step, elapsed, smooth = 0, 0.0, 0.0
    if world > 1:  # rank 0 may still be writing the checkpoint to resume from (a previous train() in this group)
        dist.barrier()
    last_ckpt = None
    if cfg.resume:
        ckpt = resume_checkpoint(ckpt_root)
        last_ckpt, state = ckpt["folder"], ckpt["state"]
        if state["model_config"] != overrides:
            raise ValueError(f"the checkpoint's model {state['model_config']} differs from this run's {overrides}")
        apply_checkpoint(ckpt, gpt, optimizer)
        del ckpt
        loader.load_state_dict(state["loader"])
        _set_rng_state(state["rng"])
        step, elapsed, smooth = state["step"], state["elapsed"], state["smooth_loss"]
    if master:
        write_text(metrics_path, "".join(_read_metrics(metrics_path, step) if last_ckpt else []))

    def log(record: dict) -> None:
        if master:
            with open(metrics_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def evaluate() -> list[float]:
        gpt.eval()
        bpb = stage_bpb(gpt, val_stream, token_bytes, T, cfg.eval_batch_size)
        gpt.train()
        log(dict(type="eval", step=step, bpb=bpb))
        return bpb

    def save() -> str | None:
        if not (master or cfg.fsdp):  # under FSDP every rank takes part in gathering the shards
            return None
        state = dict(step=step, loader=loader.state_dict(), rng=_rng_state(), train_config=dataclasses.asdict(cfg),
                     model_config=overrides, elapsed=elapsed, smooth_loss=smooth)
        return save_checkpoint(ckpt_root, step, gpt, optimizer, state, cfg.keep_checkpoints)

    bpb = evaluate() if (evaluates and step == 0) else []
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else _NullContext()
    bar = None
    if cfg.progress and master:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.num_steps, initial=step, desc=f"train {cfg.poe_mode}", dynamic_ncols=True)
    losses: list[float] = []

    def stop(why: str) -> NonFiniteLossError:
        if bar is not None:
            bar.close()
        return NonFiniteLossError(f"{why}; last good checkpoint: {last_ckpt or 'none saved yet'}")

    gpt.train()
    while step < cfg.num_steps:
        t0 = time.perf_counter()
        sched = optimizer.apply_schedule(step, cfg.num_steps, cfg.warmup_steps, cfg.warmdown_ratio, cfg.final_lr_frac)
        sums = None
        for _ in range(grad_accum):
            x, y = loader.next_batch()
            with autocast:
                micro = backward_step(gpt, x, y, cfg.poe_mode, cfg.poe_alpha, 1.0 / grad_accum)
            sums = micro if sums is None else [a + b for a, b in zip(sums, micro)]
        loss_vec = torch.tensor(sums, dtype=torch.float64) / grad_accum
        for p in gpt.parameters():  # every rank must reduce the same tensors
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if world > 1:
            allreduce_mean_([p.grad for p in replicated])
            loss_vec = _allreduced(loss_vec, device)  # a NaN on any rank stops every rank
        bad = [k for k, v in enumerate(loss_vec.tolist()) if not math.isfinite(v)]
        if bad:
            where = f"stage {bad[0]}" if cfg.poe_mode != "none" else "the final exit"
            raise stop(f"non-finite loss at step {step + 1} ({where}: {loss_vec.tolist()[bad[0]]}); stopped before "
                       "the optimizer step")
        if _nonfinite([p.grad for p in gpt.parameters()], device):  # e.g. a bf16 overflow under a finite loss
            raise stop(f"non-finite gradient at step {step + 1}; stopped before the optimizer step")
        if cfg.grad_clip > 0 and cfg.fsdp:
            clip_grad_norm_(list(gpt.parameters()), cfg.grad_clip)
        elif cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(gpt.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        elapsed += dt
        step += 1
        losses = loss_vec.tolist()
        mean_loss = sum(losses) / len(losses)
        smooth = 0.9 * smooth + 0.1 * mean_loss
        tok_s = total / dt
        log(dict(type="train", step=step, losses=losses, loss=mean_loss, lrm=sched["lrm"],
                 momentum=sched["momentum"], weight_decay=sched["weight_decay"], tok_per_s=tok_s, dt=dt))
        if bar is not None:
            bar.update(1)
            bar.set_postfix_str(f"{tok_s:,.0f} tok/s loss " + " ".join(f"{v:.3f}" for v in losses))
        if evaluates and (step % cfg.eval_every == 0 or step == cfg.num_steps):
            bpb = evaluate()
            if bar is not None:
                bar.write(f"step {step}: val bpb per stage " + " ".join(f"{v:.4f}" for v in bpb))
        stopping = cfg.stop_after is not None and step >= cfg.stop_after
        if (cfg.save_every > 0 and step % cfg.save_every == 0) or step == cfg.num_steps or stopping:
            if _nonfinite(list(gpt.parameters()), device):  # every rank: the check is collective
                raise stop(f"non-finite weights after step {step}; not saved")
            last_ckpt = save() or last_ckpt
        if stopping:
            break
    if bar is not None:
        bar.close()

    plot = None
    if master:
        from .plot import plot_metrics

        plot = plot_metrics(metrics_path, os.path.join(cfg.out_dir, "curves.png"),
                            f"{cfg.poe_mode} PoE, {mcfg.n_layer} layers, {mcfg.poe_n_stages} stages")
    hf_dir = None
    if cfg.export and step == cfg.num_steps and cfg.fsdp:  # gather the shards into a plain model on rank 0
        full = full_model_state(gpt)
        if master:
            plain = GPT.from_config(mcfg, device="meta")
            plain.load_state_dict(full, assign=True)
            hf_dir = export_hf(plain, tok, os.path.join(cfg.out_dir, "hf"), cfg.export_dtype, (cfg.data, cfg.tokenizer))
    elif master and cfg.export and step == cfg.num_steps:
        hf_dir = export_hf(gpt, tok, os.path.join(cfg.out_dir, "hf"), cfg.export_dtype, (cfg.data, cfg.tokenizer))
    debias = 1 - 0.9 ** max(step, 1)
    return dict(step=step, num_steps=cfg.num_steps, poe_mode=cfg.poe_mode, n_stages=mcfg.poe_n_stages,
                final_losses=losses, smooth_loss=smooth / debias, stage_bpb=bpb, train_time_s=elapsed,
                tokens=step * total, tok_per_s=step * total / max(elapsed, 1e-9), out_dir=cfg.out_dir,
                checkpoint=last_ckpt, hf_dir=hf_dir, plot=plot, rank=rank, world_size=world,
                n_params=gpt.num_params(), model_config=overrides)


def _allreduced(vec: torch.Tensor, device: torch.device) -> torch.Tensor:
    v = vec.to(device=device, dtype=torch.float64)
    dist.all_reduce(v, op=dist.ReduceOp.SUM)
    return (v / dist.get_world_size()).cpu()


class _NullContext:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def export_hf(gpt: GPT, tokenizer, out_dir: str, dtype: str = "bfloat16", sources: tuple = ()) -> str:
    """An HF folder (config, weights, tokenizer, remote code) for the trained gpt, via checkpoint.export_hf_folder;
    it replaces only an earlier export, never one of the sources (the data, the tokenizer folder)."""
    from ..checkpoint import export_hf_folder
    from ..hf import CognicaPoEForCausalLM

    with torch.device("meta"):
        model = CognicaPoEForCausalLM(gpt.config)
    model.gpt = gpt
    return export_hf_folder(model, tokenizer, out_dir, dtype=dtype, overwrite=True, sources=sources)

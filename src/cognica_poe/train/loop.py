"""
Training from scratch: the step loop (gradient accumulation, clipping, schedules, evaluation, logging), resume,
the non-finite stop, the curves and the HF export at the end. The losses are in losses.py, multi-process
training in distributed.py (data parallel, FSDP) and pipeline.py (stage-pipelined), checkpoints in checkpoints.py.

A non-finite loss or gradient stops the run before the optimizer step, and non-finite weights stop it before they
are saved, so the checkpoint the error names is good. A folder that holds another run (checkpoints/ or
metrics.jsonl) is only ever continued (--resume), never overwritten or mixed with a new run.
"""

import contextlib
import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from ..atomic import atomic_folder, check_replaceable, write_text
from ..bpb import stage_bpb
from ..config import CognicaPoEConfig
from ..model import GPT
from .checkpoints import apply_checkpoint, resume_checkpoint, rng_state, save_checkpoint, set_rng_state
from .config import AUTOCAST_CHOICES, TrainConfig
from .data import Corpus, PackedLoader, iter_tokenizer_texts, token_stream
from .distributed import (
    allreduce_mean_,
    clip_grad_norm_,
    full_model_state,
    init_distributed,
    mean_over_ranks,
    shard_model,
)
from .losses import NonFiniteLossError, backward_step
from .optim import MuonAdamW
from .pipeline import (
    drop_others_state,
    finish_step,
    gather_to_first,
    pipeline_backward,
    pipeline_clip_grad_norm_,
    setup_pipeline,
)

# what autocast "auto" means on CPU: bench/train.py measures bf16 autocast against fp32 (speed, per-stage losses);
# "bf16" here makes it the CPU default
CPU_AUTOCAST = "none"


def _resolve_device(name: str) -> torch.device:
    """"auto" = cuda if any, else cpu; under torchrun a bare "cuda" means this process's GPU (LOCAL_RANK)."""
    device = torch.device(("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name)
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    if device.index is not None and device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def autocast_context(mode: str, device: torch.device):
    """
    The context of every training forward and backward: bf16 autocast ("bf16"), none ("none"), or "auto": bf16 on
    CUDA, CPU_AUTOCAST on CPU. Autocast keeps fp32 master weights and optimizer state; matrix products run in bf16.
    """
    if mode not in AUTOCAST_CHOICES:
        raise ValueError(f"autocast {mode!r} is not one of {', '.join(AUTOCAST_CHOICES)}")
    if mode == "auto":
        mode = "bf16" if device.type == "cuda" else CPU_AUTOCAST
    if mode == "none":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


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
    autocast = autocast_context(cfg.autocast, device)
    rank, world = init_distributed(device.type)
    if cfg.pipeline_parallel != 1:
        _check_pipeline(cfg, world)
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
    pipe = setup_pipeline(gpt, cfg.pipeline_parallel, rank, world, device.type) if cfg.pipeline_parallel > 1 else None
    data_rank, n_data = (pipe.data_rank, pipe.n_data) if pipe else (rank, world)  # pipeline ranks share batches
    T, B = mcfg.sequence_len, cfg.device_batch_size
    total = cfg.total_batch_size if cfg.total_batch_size > 0 else B * T * n_data
    if total % (B * T * n_data):
        raise ValueError(f"total_batch_size {total} is not a multiple of device_batch_size * sequence_len * "
                         f"data-parallel processes = {B * T * n_data}")
    grad_accum = total // (B * T * n_data)
    replicated = shard_model(gpt, device) if cfg.fsdp else list(gpt.parameters())  # FSDP averages the rest
    optimizer = MuonAdamW(gpt, total, cfg.matrix_lr, cfg.embedding_lr, cfg.unembedding_lr, cfg.scalar_lr,
                          cfg.weight_decay, cfg.batch_lr_scale)
    corpus = Corpus(cfg.data)
    loader = PackedLoader(corpus, tok, B, T, "train", cfg.seed, data_rank, n_data, cfg.shuffle_block, device)
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
        if pipe:
            drop_others_state(gpt, pipe, optimizer)
        del ckpt
        loader.load_state_dict(state["loader"])
        set_rng_state(state["rng"])
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
        if pipe:  # rank 0 takes in the weights and optimizer state the other pipeline ranks own
            gather_to_first(gpt, pipe, optimizer)
        if not (master or cfg.fsdp):  # under FSDP every rank takes part in gathering the shards
            return None
        state = dict(step=step, loader=loader.state_dict(), rng=rng_state(), train_config=dataclasses.asdict(cfg),
                     model_config=overrides, elapsed=elapsed, smooth_loss=smooth)
        folder = save_checkpoint(ckpt_root, step, gpt, optimizer, state, cfg.keep_checkpoints)
        if pipe:
            drop_others_state(gpt, pipe, optimizer)
        return folder

    bpb = evaluate() if (evaluates and step == 0) else []
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
        sums, sends = None, []
        for _ in range(grad_accum):
            x, y = loader.next_batch()
            with autocast:
                if pipe:
                    micro = pipeline_backward(gpt, pipe, x, y, cfg.poe_alpha, 1.0 / grad_accum, sends)
                else:
                    micro = backward_step(gpt, x, y, cfg.poe_mode, cfg.poe_alpha, 1.0 / grad_accum)
            sums = micro if sums is None else [a + b for a, b in zip(sums, micro)]
        loss_vec = torch.tensor(sums, dtype=torch.float64) / grad_accum
        for p in pipe.params if pipe else gpt.parameters():  # every rank must reduce the same tensors
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        if pipe:  # a pipeline rank steps only what it trains (other ranks' blocks keep no gradient)
            loss_vec = finish_step(pipe, sends, loss_vec, device)
        elif world > 1:
            allreduce_mean_([p.grad for p in replicated])
            loss_vec = mean_over_ranks(loss_vec, device)  # a NaN on any rank stops every rank
        bad = [k for k, v in enumerate(loss_vec.tolist()) if not math.isfinite(v)]
        if bad:
            where = f"stage {bad[0]}" if cfg.poe_mode != "none" else "the final exit"
            raise stop(f"non-finite loss at step {step + 1} ({where}: {loss_vec.tolist()[bad[0]]}); stopped before "
                       "the optimizer step")
        if _nonfinite([p.grad for p in gpt.parameters()], device):  # e.g. a bf16 overflow under a finite loss
            raise stop(f"non-finite gradient at step {step + 1}; stopped before the optimizer step")
        if cfg.grad_clip > 0 and pipe:
            pipeline_clip_grad_norm_(pipe, cfg.grad_clip)
        elif cfg.grad_clip > 0 and cfg.fsdp:
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
        eval_due = step % cfg.eval_every == 0 or step == cfg.num_steps
        if pipe and eval_due:  # rank 0 evaluates the whole current model
            gather_to_first(gpt, pipe)
        if evaluates and eval_due:
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


def _check_pipeline(cfg: TrainConfig, world: int) -> None:
    """--pipeline-parallel needs flat PoE (only its stages exchange no gradient), at least as many stages as
    pipeline ranks, and a torchrun launch whose process count it divides; checked before anything is written."""
    if cfg.pipeline_parallel < 1:
        raise ValueError(f"--pipeline-parallel must be 1 or more, got {cfg.pipeline_parallel}")
    if cfg.poe_mode != "flat":
        raise ValueError(f"--pipeline-parallel needs --poe-mode flat: with {cfg.poe_mode!r} gradients cross the "
                         "stages, so a pipeline rank could not train its stages alone")
    if cfg.fsdp:
        raise ValueError("--pipeline-parallel and --fsdp do not combine: pick one")
    n_stages = CognicaPoEConfig(**cfg.model_overrides()).poe_n_stages
    if cfg.pipeline_parallel > n_stages:
        raise ValueError(f"--pipeline-parallel {cfg.pipeline_parallel} is more than the model's {n_stages} stages: "
                         f"use at most {n_stages} (or a smaller --poe-every)")
    if world == 1:
        raise ValueError("--pipeline-parallel splits the stages over the processes of a torchrun launch (e.g. "
                         "torchrun --nproc-per-node=2 -m cognica_poe.cli train --pipeline-parallel 2 ...); this is "
                         "a single process")
    if world % cfg.pipeline_parallel:
        raise ValueError(f"--pipeline-parallel {cfg.pipeline_parallel} does not divide the {world} processes of this "
                         "launch: use a divisor of the process count (the processes it leaves are data parallel)")


def export_hf(gpt: GPT, tokenizer, out_dir: str, dtype: str = "bfloat16", sources: tuple = ()) -> str:
    """An HF folder (config, weights, tokenizer, remote code) for the trained gpt, via checkpoint.export_hf_folder;
    it replaces only an earlier export, never one of the sources (the data, the tokenizer folder)."""
    from ..checkpoint import export_hf_folder
    from ..hf import CognicaPoEForCausalLM

    with torch.device("meta"):
        model = CognicaPoEForCausalLM(gpt.config)
    model.gpt = gpt
    return export_hf_folder(model, tokenizer, out_dir, dtype=dtype, overwrite=True, sources=sources)

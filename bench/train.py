"""
Training benchmark: flat PoE (stage-wise backward) vs backprop (poe_mode none) on the same shape, and flat PoE with
bf16 autocast vs fp32.

Each variant runs in its own subprocess (so peak memory is its own): random-token batches, the full optimizer
step (torch Muon + AdamW), the trainer's default precision (--autocast auto: fp32 on CPU, bf16 on CUDA). Reported
per variant: tokens/s (median step time over --steps timed steps after one warm-up step) and activation memory =
peak RSS minus RSS after model, gradients and optimizer state exist (CUDA: peak allocated minus allocated after
setup), measured with a fixed glibc mmap threshold so that RSS tracks live tensors (and, for comparison, with
glibc's defaults). Also printed: the analytic FLOP ratio R = PoE / BP per token, where PoE adds (K-1) extra lm_head
passes, forward and backward (6 * n_embd * vocab FLOPs each): R = 1 + (K-1) * 6 C V / F_bp, with F_bp = 6 * (matmul
params) + attention.

Autocast (the trainer's --autocast): flat PoE trained --autocast-steps steps with bf16 autocast and in fp32, from
the same seed on the same batches (the bundled corpus's bytes as token ids, so the losses mean something) with the
trainer's optimizer settings and learning-rate schedule: tokens/s (median step after the first) and each stage's
loss at the end (mean of the last 5 steps), side by side. The trainer's CPU default (CPU_AUTOCAST in train/loop.py)
should be bf16 only where it is clearly faster and trains equally: "autocast" in the JSON gives the speedup, the
per-stage loss differences, and whether that rule (BF16_MIN_SPEEDUP, BF16_LOSS_TOLERANCE) holds.

    python bench/train.py      # n_layer 16, n_embd 512, vocab 4096, poe_every 4, T 512: ~8 minutes on 2 CPU cores
    python bench/train.py --n-layer 8 --n-embd 256 --seq 256  # quicker
    python bench/train.py --n-layer 4 --n-embd 128 --seq 128 --poe-every 1 --autocast-steps 30 --skip-memory
                               # a check that the comparison runs: ~2 minutes on 2 busy CPU cores

The last line printed is one JSON object with every figure and the machine.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch

from cognica_poe.cpu import set_threads
from cognica_poe.eval.speed import machine

HERE = os.path.dirname(os.path.abspath(__file__))
CORPUS = os.path.join(HERE, "..", "src", "cognica_poe", "data", "tinyshakespeare.txt")
# bf16 is worth the trainer's CPU default when it is at least this much faster and every stage's final loss is
# within this relative distance of fp32's
BF16_MIN_SPEEDUP, BF16_LOSS_TOLERANCE = 1.10, 0.01


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def flop_ratio(cfg) -> dict:
    """Analytic training FLOPs per token (fwd + bwd = 3x fwd) of BP and of flat PoE, and their ratio."""
    C, V, K = cfg.n_embd, cfg.vocab_size, cfg.poe_n_stages
    kv = cfg.n_kv_head * cfg.head_dim
    per_layer = C * C * 2 + C * kv * 2 + 8 * C * C  # q, proj, k, v, mlp (4x up + down)
    T = cfg.sequence_len
    attn = 0.0
    for w in cfg.window_sizes():  # causal, sliding: mean keys per query
        attn += sum(min(t + 1, w + 1) for t in range(T)) / T * 2 * 2 * cfg.n_head * cfg.head_dim  # QK^T + AV
    head = 2 * C * V  # forward FLOPs of one lm_head pass per token
    f_bp = 3 * (2 * cfg.n_layer * per_layer + attn + head)  # forward FLOPs x 3 (backward = 2x forward)
    f_poe = f_bp + (K - 1) * 3 * head
    return dict(flops_per_token_bp=f_bp, flops_per_token_poe=f_poe, R=f_poe / f_bp, n_stages=K)


def text_batches(batch: int, seq: int, steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """`steps` consecutive (x, y) batches of the bundled corpus's bytes (ids < 256), the same for every variant."""
    with open(CORPUS, "rb") as f:
        data = torch.frombuffer(bytearray(f.read()), dtype=torch.uint8).long()
    rows = data[: len(data) // (seq + 1) * (seq + 1)].view(-1, seq + 1)
    if steps * batch > len(rows):
        raise SystemExit(f"--autocast-steps {steps} x --batch {batch} rows of {seq + 1} bytes exceed the corpus")
    return [(rows[i * batch:(i + 1) * batch, :-1], rows[i * batch:(i + 1) * batch, 1:]) for i in range(steps)]


def worker(args) -> dict:
    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    from cognica_poe.config import CognicaPoEConfig
    from cognica_poe.model import GPT
    from cognica_poe.train.config import TrainConfig
    from cognica_poe.train.loop import autocast_context
    from cognica_poe.train.losses import backward_step
    from cognica_poe.train.optim import MuonAdamW

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CognicaPoEConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_embd // args.head_dim,
                           n_kv_head=args.n_embd // args.head_dim, vocab_size=args.vocab, sequence_len=args.seq,
                           poe_every=args.poe_every, poe_mode=args.worker)
    gpt = GPT.from_config(cfg, device=device, seed=0)
    tc = TrainConfig()  # the trainer's optimizer settings, and (on text) its learning-rate schedule
    opt = MuonAdamW(gpt, args.batch * args.seq, tc.matrix_lr, tc.embedding_lr, tc.unembedding_lr, tc.scalar_lr,
                    tc.weight_decay, tc.batch_lr_scale)
    for p in gpt.parameters():  # gradients and optimizer state exist before the baseline is taken
        p.grad = torch.zeros_like(p)
    opt.step()
    if args.text:  # a new batch of text each step: the losses at the end say how well the variant trains
        batches = [(x.to(device), y.to(device)) for x, y in text_batches(args.batch, args.seq, args.steps + 1)]
    else:  # one random batch: speed and memory only
        batches = [(torch.randint(0, args.vocab, (args.batch, args.seq), device=device),
                    torch.randint(0, args.vocab, (args.batch, args.seq), device=device))] * (args.steps + 1)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = rss_bytes()
    autocast = autocast_context(args.autocast, device)  # as the trainer: "auto" is bf16 on CUDA, its CPU default
    times, losses = [], []
    for i, (x, y) in enumerate(batches):
        t0 = time.perf_counter()
        if args.text:
            opt.apply_schedule(i, len(batches), min(tc.warmup_steps, len(batches) // 4), tc.warmdown_ratio,
                               tc.final_lr_frac)
        with autocast:
            losses.append(backward_step(gpt, x, y, args.worker, 0.0))
        opt.step()
        opt.zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    out = dict(mode=args.worker, step_s=step_s, tok_per_s=args.batch * args.seq / step_s,
               rss_after_setup_mb=base_rss / 2**20, peak_rss_mb=peak_rss_bytes() / 2**20,
               activation_mb=(peak_rss_bytes() - base_rss) / 2**20, n_params=gpt.num_params(),
               autocast=args.autocast, final_losses=[statistics.mean(s) for s in zip(*losses[-5:])],
               mean_losses=[statistics.mean(s) for s in zip(*losses)])
    if device.type == "cuda":
        out["activation_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


def run_worker(args, shape: dict, mode: str, steps: int, *flags: str, env: dict | None = None) -> dict:
    """One variant in its own process (its peak memory is its own); its JSON line."""
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode, f"--threads={args.threads}", *flags] + [
        f"--{k.replace('_', '-')}={v}" for k, v in {**shape, "steps": steps}.items()]
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if proc.returncode != 0:
        raise SystemExit(f"{mode} {' '.join(flags)} worker failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare_autocast(args, shape: dict) -> dict:
    """Flat PoE with bf16 autocast and in fp32: the same seed and text batches; speed and per-stage final losses."""
    runs = {name: run_worker(args, shape, "flat", args.autocast_steps, "--text", f"--autocast={name}")
            for name in ("none", "bf16")}
    fp32, bf16 = runs["none"], runs["bf16"]
    diffs = [abs(b - a) / a for a, b in zip(fp32["final_losses"], bf16["final_losses"])]
    mean_diffs = [abs(b - a) / a for a, b in zip(fp32["mean_losses"], bf16["mean_losses"])]  # the whole curve
    speedup = bf16["tok_per_s"] / fp32["tok_per_s"]
    out = dict(steps=args.autocast_steps, data="bundled corpus bytes as token ids, the same batches for both",
               fp32=fp32, bf16=bf16, bf16_speedup=speedup, stage_loss_rel_diff=diffs,
               stage_mean_loss_rel_diff=mean_diffs,
               rule=f"bf16 as the CPU default when bf16_speedup >= {BF16_MIN_SPEEDUP} and every stage_loss_rel_diff "
                    f"<= {BF16_LOSS_TOLERANCE} (train/loop.py CPU_AUTOCAST)",
               bf16_default_ok=speedup >= BF16_MIN_SPEEDUP and max(diffs) <= BF16_LOSS_TOLERANCE)
    print(f"autocast, {args.autocast_steps} steps of flat PoE on text: bf16 {bf16['tok_per_s']:,.0f} tok/s vs fp32 "
          f"{fp32['tok_per_s']:,.0f} ({speedup:.2f}x); final loss per stage fp32 "
          f"{[round(x, 4) for x in fp32['final_losses']]}, bf16 {[round(x, 4) for x in bf16['final_losses']]} "
          f"(max relative difference {max(diffs):.4f}); bf16 as the CPU default: "
          f"{'yes' if out['bf16_default_ok'] else 'no'}", flush=True)
    return out


def memory_and_speed(args, cfg, shape: dict) -> dict:
    """Flat PoE vs backprop on one random batch: tokens/s, activation memory, the analytic FLOP ratio."""
    results = {}
    # Each variant runs twice: with glibc's default allocator settings (speed, and RSS as a user sees it) and with
    # a fixed mmap threshold, so every buffer over 128 KiB is returned to the OS when freed and peak RSS tracks live
    # tensors. Under the default, glibc's dynamic threshold moves large buffers onto the heap, whose high-water mark
    # keeps freed activations: flat PoE's RSS then grows with depth although its live tensors do not.
    for mode in ("flat", "none"):
        for alloc, env in (("default", {}), ("fixed_mmap", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
            r = run_worker(args, shape, mode, args.steps, env=env)
            if alloc == "default":
                results[mode] = r
            else:
                results[mode]["activation_mb_live"] = r["activation_mb"]
                results[mode]["tok_per_s_fixed_mmap"] = r["tok_per_s"]
        r = results[mode]
        print(f"{mode:>5}: {r['tok_per_s']:,.0f} tok/s ({r['step_s']:.2f} s/step), activations "
              f"{r['activation_mb_live']:.0f} MiB live ({r['activation_mb']:.0f} MiB of RSS with glibc defaults; "
              f"peak RSS {r['peak_rss_mb']:.0f} MiB)", flush=True)
    flops = flop_ratio(cfg)
    flat, bp = results["flat"], results["none"]
    summary = dict(flat=flat, bp=bp, flops=flops,
                   speed_ratio_flat_over_bp=flat["tok_per_s"] / bp["tok_per_s"],
                   activation_ratio_flat_over_bp=flat["activation_mb_live"] / max(bp["activation_mb_live"], 1e-9),
                   activation_ratio_glibc_default=flat["activation_mb"] / max(bp["activation_mb"], 1e-9),
                   activation_target=1 / cfg.poe_n_stages + 0.15, step_time_target=1.05 * flops["R"])
    print(f"analytic FLOP ratio R (PoE / BP) = {flops['R']:.4f}; measured step-time ratio PoE/BP = "
          f"{bp['tok_per_s'] / flat['tok_per_s']:.3f} (target <= 1.05 R = {summary['step_time_target']:.3f}); "
          f"activation ratio PoE/BP = {summary['activation_ratio_flat_over_bp']:.3f} live (target <= 1/K + 0.15 = "
          f"{summary['activation_target']:.3f}), {summary['activation_ratio_glibc_default']:.3f} with glibc defaults")
    return summary


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n-layer", type=int, default=16)
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--poe-every", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--steps", type=int, default=3, help="timed steps per variant (after one warm-up step)")
    p.add_argument("--autocast-steps", type=int, default=30,
                   help="training steps of the bf16-autocast vs fp32 comparison (0: skip it)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the physical cores)")
    p.add_argument("--skip-memory", action="store_true", help="skip the flat PoE vs backprop speed and memory runs")
    p.add_argument("--worker", choices=["flat", "none"], help=argparse.SUPPRESS)
    p.add_argument("--autocast", choices=["auto", "bf16", "none"], default="auto", help=argparse.SUPPRESS)
    p.add_argument("--text", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.threads = set_threads(args.threads)
    if args.worker:
        print(json.dumps(worker(args)))
        return
    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    from cognica_poe.config import CognicaPoEConfig

    cfg = CognicaPoEConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_embd // args.head_dim,
                           n_kv_head=args.n_embd // args.head_dim, vocab_size=args.vocab, sequence_len=args.seq,
                           poe_every=args.poe_every)
    shape = {k: getattr(args, k) for k in ("n_layer", "n_embd", "head_dim", "vocab", "poe_every", "seq", "batch")}
    print(f"shape {shape}, {cfg.poe_n_stages} stages ending at layers {cfg.poe_stage_boundary_layers}", flush=True)
    if args.autocast_steps and args.vocab < 256:
        raise SystemExit("--vocab must be >= 256: the autocast comparison trains on bytes")
    summary = dict(shape=shape, n_stages=cfg.poe_n_stages)
    if not args.skip_memory:
        summary.update(memory_and_speed(args, cfg, shape))
    if args.autocast_steps:
        summary["autocast"] = compare_autocast(args, shape)
    summary["machine"] = machine()
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

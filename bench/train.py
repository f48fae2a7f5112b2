"""
Training benchmark: flat PoE (stage-wise backward) vs backprop (poe_mode none) on the same shape.

Each variant runs in its own subprocess (so peak memory is its own): random-token batches, the full optimizer
step (torch Muon + AdamW), fp32 on CPU (bf16 autocast on CUDA). Reported per variant: tokens/s (median step
time over --steps timed steps after one warm-up step) and activation memory = peak RSS minus RSS after model,
gradients and optimizer state exist (CUDA: peak allocated minus allocated after setup), measured with a fixed
glibc mmap threshold so that RSS tracks live tensors (and, for comparison, with glibc's defaults). Also printed: the
analytic FLOP ratio R = PoE / BP per token, where PoE adds (K-1) extra lm_head passes, forward and backward
(6 * n_embd * vocab FLOPs each): R = 1 + (K-1) * 6 C V / F_bp, with F_bp = 6 * (matmul params) + attention.

    python bench/train.py                                   # n_layer 16, n_embd 512, vocab 4096, poe_every 4, T 512
    python bench/train.py --n-layer 8 --n-embd 256 --seq 256  # quicker

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

from cognica_poe.eval.speed import machine

HERE = os.path.dirname(os.path.abspath(__file__))


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


def worker(args) -> dict:
    sys.path.insert(0, os.path.join(HERE, "..", "src"))
    from cognica_poe.config import CognicaPoEConfig
    from cognica_poe.model import GPT
    from cognica_poe.train.losses import backward_step
    from cognica_poe.train.optim import MuonAdamW

    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    cfg = CognicaPoEConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_embd // args.head_dim,
                           n_kv_head=args.n_embd // args.head_dim, vocab_size=args.vocab, sequence_len=args.seq,
                           poe_every=args.poe_every, poe_mode=args.worker)
    gpt = GPT.from_config(cfg, device=device, seed=0)
    opt = MuonAdamW(gpt, batch_tokens=args.batch * args.seq)
    for p in gpt.parameters():  # gradients and optimizer state exist before the baseline is taken
        p.grad = torch.zeros_like(p)
    opt.step()
    x = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    y = torch.randint(0, args.vocab, (args.batch, args.seq), device=device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = rss_bytes()
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    times = []
    for i in range(args.steps + 1):
        t0 = time.perf_counter()
        with autocast:
            backward_step(gpt, x, y, args.worker, 0.0)
        opt.step()
        opt.zero_grad(set_to_none=False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i > 0:
            times.append(time.perf_counter() - t0)
    step_s = statistics.median(times)
    out = dict(mode=args.worker, step_s=step_s, tok_per_s=args.batch * args.seq / step_s,
               rss_after_setup_mb=base_rss / 2**20, peak_rss_mb=peak_rss_bytes() / 2**20,
               activation_mb=(peak_rss_bytes() - base_rss) / 2**20, n_params=gpt.num_params())
    if device.type == "cuda":
        out["activation_mb"] = (torch.cuda.max_memory_allocated() - base) / 2**20
    return out


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
    p.add_argument("--worker", choices=["flat", "none"], help=argparse.SUPPRESS)
    args = p.parse_args()
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
    results = {}
    # Each variant runs twice: with glibc's default allocator settings (speed, and RSS as a user sees it) and with
    # a fixed mmap threshold, so every buffer over 128 KiB is returned to the OS when freed and peak RSS tracks live
    # tensors. Under the default, glibc's dynamic threshold moves large buffers onto the heap, whose high-water mark
    # keeps freed activations: flat PoE's RSS then grows with depth although its live tensors do not.
    for mode in ("flat", "none"):
        for alloc, env in (("default", {}), ("fixed_mmap", {"MALLOC_MMAP_THRESHOLD_": "131072"})):
            cmd = [sys.executable, os.path.abspath(__file__), "--worker", mode] + [
                f"--{k.replace('_', '-')}={v}" for k, v in {**shape, "steps": args.steps}.items()]
            proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **env})
            if proc.returncode != 0:
                raise SystemExit(f"{mode} worker failed:\n{proc.stderr[-3000:]}")
            r = json.loads(proc.stdout.strip().splitlines()[-1])
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
    summary = dict(shape=shape, n_stages=cfg.poe_n_stages, flat=flat, bp=bp, flops=flops,
                   speed_ratio_flat_over_bp=flat["tok_per_s"] / bp["tok_per_s"],
                   activation_ratio_flat_over_bp=flat["activation_mb_live"] / max(bp["activation_mb_live"], 1e-9),
                   activation_ratio_glibc_default=flat["activation_mb"] / max(bp["activation_mb"], 1e-9),
                   activation_target=1 / cfg.poe_n_stages + 0.15, step_time_target=1.05 * flops["R"],
                   machine=machine())
    print(f"analytic FLOP ratio R (PoE / BP) = {flops['R']:.4f}; measured step-time ratio PoE/BP = "
          f"{bp['tok_per_s'] / flat['tok_per_s']:.3f} (target <= 1.05 R = {summary['step_time_target']:.3f}); "
          f"activation ratio PoE/BP = {summary['activation_ratio_flat_over_bp']:.3f} live (target <= 1/K + 0.15 = "
          f"{summary['activation_target']:.3f}), {summary['activation_ratio_glibc_default']:.3f} with glibc defaults")
    print(json.dumps(summary))


if __name__ == "__main__":
    main()

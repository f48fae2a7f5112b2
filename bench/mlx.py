"""
MLX decode speed: stage 0 (prefix pruning) against full depth under MLX, and MLX against PyTorch on the same folder,
side by side, on whatever device MLX has (the GPU of an Apple silicon Mac; the CPU on Linux, through mlx[cpu]).

The model card's Apple silicon figure is for the released d24 base on an M1 Ultra: "Stage 1 only: 2.9x vs full
stack (8.5 ms vs 24.7 ms)" (its stage 1 is stage 0 here: 6 of 24 layers). The reference checkpoint
poe-d8-classics has the same proportion (stage 0 is 2 of 8 layers), so it is the default model when
COGNICA_POE_SHARED points at the reference files; otherwise, or with --shape, a preset shape with random weights
(speed does not depend on the values).

Per model and backend: greedy cached decode of --new-tokens tokens after a --prompt-tokens prompt, at stage 0 and
at full depth; a decode step's time is the time from the first streamed token to the last over the steps between
(prefill is left out), the median of --runs runs after a warm-up. PyTorch runs as the CLI does (its --threads
default, and prepacked weights where cpu.py's probe finds them faster: "torch_weight_layout" says which ran).
The last line printed is one JSON document, also saved under bench/results/ (named after the device).

    python bench/mlx.py                                  # the d8 reference (or the `small` shape), fp32
    python bench/mlx.py --shape d24 --dtype bfloat16     # the card's model shape (on a Mac)
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# this file is bench/mlx.py: drop its folder from the path so `import mlx` finds the MLX package, not this file
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != HERE]

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import mlx.core as mx  # noqa: E402
import torch  # noqa: E402

import cognica_poe.mlx as poe_mlx  # noqa: E402
from cognica_poe.checkpoint import export_hf_folder, load_model  # noqa: E402
from cognica_poe.cpu import set_threads  # noqa: E402
from cognica_poe.eval.speed import machine  # noqa: E402
from cognica_poe.nanochat import convert_nanochat  # noqa: E402
from cognica_poe.packed import count_packed  # noqa: E402


def model_folder(shape: str | None, dtype: str) -> tuple[str, str]:
    """(HF folder, description): the d8 reference converted, or a preset shape with random weights."""
    shared = os.environ.get("COGNICA_POE_SHARED")
    out = os.path.join(tempfile.mkdtemp(prefix="bench-mlx-"), "hf")
    if shape is None and shared and os.path.isdir(os.path.join(shared, "models", "poe-d8-classics")):
        convert_nanochat(os.path.join(shared, "models", "poe-d8-classics"), out, dtype=dtype, allow_pickle=True)
        return out, "poe-d8-classics (8 layers, 256 wide, 4 exits; stage 0 = layers 0-1)"
    shape = shape or "small"
    model = load_model(shape, dtype=dtype)
    model.config.bos_token_id = 0
    export_hf_folder(model, None, out, dtype=dtype)
    cfg = model.config
    return out, (f"preset {shape}, random weights ({cfg.n_layer} layers, {cfg.n_embd} wide, {cfg.poe_n_stages} exits; "
                 f"stage 0 = layers 0-{cfg.poe_stage_boundary_layers[0]})")


def decode_ms(generate, new_tokens: int, runs: int) -> float:
    """ms per decode step: the time between the first and the last of new_tokens + 1 streamed tokens, divided by
    new_tokens (prefill, which ends with the first token, is left out); median of `runs` after a warm-up."""
    def once() -> float:
        stamps = []
        generate(new_tokens + 1, lambda row, token: stamps.append(time.perf_counter()))
        return (stamps[-1] - stamps[0]) / new_tokens

    once()
    return 1000 * statistics.median(once() for _ in range(runs))


def measure(folder: str, dtype: str, prompt_tokens: int, new_tokens: int, runs: int) -> dict:
    mlx_model = poe_mlx.load(folder, dtype=dtype)
    torch_model = load_model(folder, dtype=dtype, pack="auto")
    vocab = mlx_model.config.vocab_size
    prompt = [mlx_model.config.bos_token_id or 0] + torch.randint(
        0, vocab, (prompt_tokens - 1,), generator=torch.Generator().manual_seed(0)).tolist()
    last = mlx_model.poe_n_stages - 1
    runners = {
        "mlx": lambda stage: lambda n, streamer: poe_mlx.generate_stage(
            mlx_model, prompt, stage=stage, max_new_tokens=n, stop_tokens=[], streamer=streamer),
        "torch": lambda stage: lambda n, streamer: torch_model.generate_stage(
            torch.tensor([prompt]), stage=stage, max_new_tokens=n, stop_tokens=[], streamer=streamer),
    }
    out = {}
    for backend, runner in runners.items():
        stage0, full = decode_ms(runner(0), new_tokens, runs), decode_ms(runner(last), new_tokens, runs)
        out[backend] = {"stage0_ms_per_token": round(stage0, 3), "full_ms_per_token": round(full, 3),
                        "stage0_tok_per_s": round(1000 / stage0, 1), "full_tok_per_s": round(1000 / full, 1),
                        "stage0_speedup": round(full / stage0, 2)}
    out["mlx_over_torch_full"] = round(out["torch"]["full_ms_per_token"] / out["mlx"]["full_ms_per_token"], 2)
    out["mlx_over_torch_stage0"] = round(out["torch"]["stage0_ms_per_token"] / out["mlx"]["stage0_ms_per_token"], 2)
    out["torch_weight_layout"] = "packed" if count_packed(torch_model) else "plain"
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default=None, help="a preset (small, d12, d24, ...) with random weights "
                                                      "(default: the d8 reference if available, else small)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--out", default=None, help="result file (default: bench/results/mlx-<device>-<date>.json)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the physical cores)")
    args = parser.parse_args()
    set_threads(args.threads)

    folder, description = model_folder(args.shape, args.dtype)
    t0 = time.perf_counter()
    result = measure(folder, args.dtype, args.prompt_tokens, args.new_tokens, args.runs)
    device = str(mx.default_device())
    host = machine()
    chip = platform.processor() if sys.platform == "darwin" else host["cpu"]
    result = {"model": description, "dtype": args.dtype, "prompt_tokens": args.prompt_tokens,
              "new_tokens": args.new_tokens, "runs": args.runs, **result,
              "card_m1_ultra_d24_stage0_speedup": 2.9, "mlx_device": device, "mlx_version": mx.__version__,
              "machine": host, "chip": chip, "seconds": round(time.perf_counter() - t0, 1)}
    for backend in ("mlx", "torch"):
        r = result[backend]
        where = device if backend == "mlx" else "cpu"
        print(f"{backend:>5} on {where}: stage 0 {r['stage0_ms_per_token']:.2f} ms/token "
              f"({r['stage0_tok_per_s']} tok/s), full {r['full_ms_per_token']:.2f} ms/token ({r['full_tok_per_s']} "
              f"tok/s): stage 0 is {r['stage0_speedup']}x faster")
    print(f"MLX / PyTorch speed at full depth: {result['mlx_over_torch_full']}x, at stage 0: "
          f"{result['mlx_over_torch_stage0']}x ({chip})")
    kind = "gpu" if mx.default_device().type == mx.gpu else "cpu"
    slug = re.sub(r"[^a-z0-9]+", "-", f"{kind}-{chip}".lower()).strip("-")[:60]
    path = args.out
    if path is None:  # a new file per run: an earlier result is never overwritten
        stem, n = os.path.join(HERE, "results", f"mlx-{slug}-{time.strftime('%Y-%m-%d')}"), 1
        while os.path.exists(path := stem + (f"-run{n}" if n > 1 else "") + ".json"):
            n += 1
    with open(path, "w") as f:
        json.dump(result, f, indent=2)
        f.write("\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()

"""
Inference benchmark: every mode against full-depth cached greedy, side by side in one process.

Part 1, a trained model (../shared/models/poe-d8-classics, converted here): tokens/s of every mode,
speculative acceptance and speedup next to the cost-model ideal (1 - a^(K+1)) / ((1 - a)(K c + v)) with c and
v measured (the model describes decode steps, so it is compared with the decode-only speedup, prefill
excluded; the end-to-end speedup is reported too), WAND speedup / top-1 agreement / exit histogram at
several safeties (bounds calibrated on held-out text), stage-0 speedup. Part 2, speed at scale on a
d24-shaped model (random weights): full-depth cached decode, with prepacked weights (packed.py, the CLI's
default) and with plain ones, vs a transformers LlamaForCausalLM of the same width/depth/heads/vocab
(intermediate 4x) under its own generate(); achieved weight bandwidth; matrix-vector bandwidth measured over
>= 1 GB of weights, plain F.linear and prepacked; in bf16 also decode steps after a long prompt (--long-prompt),
where attention over the cache matters. Both parts run every mode with packed weights, as `cognica-poe report`.

Every speed is a median of >= 3 runs in this process; token counts are stated. The last line printed is one
JSON object with every figure and the machine.

    python bench/inference.py                 # everything (about 5 minutes on 2 CPU cores)
    python bench/inference.py --scale d12     # part 2 on a smaller shape
    python bench/inference.py --skip-scale    # part 1 only
    python bench/inference.py --skip-scale --compile   # part 1, fp32 also compiled (compiled.py; about 10 more
                                                       # minutes on 2 CPU cores, most of it compiling the graphs)

With --compile, part 1 in fp32 measures every mode a second time with compiled decode, in the same process after
the eager runs, under "compiled"; "targets" sets the figures the compiled decode is judged by (stage 0 over full
depth, the best speculative K, WAND's best speed at 100% top-1 agreement) beside the eager ones.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from cognica_poe.eval.speed import machine, median_time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.path.join(HERE, "..", "..", "shared")
D8 = os.path.join(SHARED, "models", "poe-d8-classics")


# -----------------------------------------------------------------------------
# part 1: a trained model


def load_trained(dtype: str):
    from cognica_poe.checkpoint import load_model
    from cognica_poe.nanochat import convert_nanochat
    from cognica_poe.tokenizer import CognicaPoETokenizer

    out = os.path.join(tempfile.mkdtemp(prefix="bench-d8-"), "hf")
    convert_nanochat(D8, out, dtype="float32", allow_pickle=True)
    return load_model(out, dtype=dtype, pack=True), CognicaPoETokenizer.from_pretrained(out)


def heldout_docs() -> list[str]:
    """The d8 model's validation documents (the last 1/20 of the corpus, as its README defines them)."""
    docs = []
    for name in ("tinyshakespeare.txt", "warpeace.txt"):
        with open(os.path.join(SHARED, "data", name), encoding="utf-8") as f:
            docs += [d.strip() for d in f.read().split("\n\n") if d.strip()]
    return docs[-(len(docs) // 20):]


def targets(modes: dict) -> dict:
    """The compiled-decode targets' figures from one measure_modes result: stage 0 over full depth, the best
    speculative speedup (stage 0 drafting) and its K, WAND's best speedup at 100% top-1 agreement (None if none)."""
    spec = max((r for r in modes["speculative"] if r["draft_stage"] == 0), key=lambda r: r["speedup"])
    exact = [r["speedup"] for r in modes["wand"] if r["top1_agreement"] == 1.0]
    return {"stage0_speedup": modes["stage_speedup"][0], "best_speculative_speedup": spec["speedup"],
            "best_speculative_k": spec["k"], "wand_full_agreement_speedup": max(exact) if exact else None}


def trained_part(dtype: str, new_tokens: int, runs: int, compile: bool = False) -> dict:
    """Every mode on the trained model: the capability report's speed measurements, with WAND bounds calibrated
    on the first half of the held-out documents and prompts from the second half; with compile, every mode again
    with compiled decode (its first run of each mode compiles, untimed as every warm-up run)."""
    from cognica_poe.eval.speed import measure_modes
    from cognica_poe.packed import count_packed
    from cognica_poe.train.data import documents_stream
    from cognica_poe.wand import calibrate_wand_bounds

    model, tok = load_trained(dtype)
    docs = heldout_docs()
    bounds = calibrate_wand_bounds(model.gpt, documents_stream(docs[: len(docs) // 2], tok, 40_000), seq_len=256)
    prompts = [[tok.bos_token_id] + tok.encoding.encode_ordinary(d)[:24] for d in docs[len(docs) // 2:][:4]]
    res = {"model": "poe-d8-classics (8 layers, 256 wide, 4 exits)", "dtype": dtype, "calibrated_p99_bounds": bounds,
           "packed_matrices": count_packed(model)}
    res.update(measure_modes(model, prompts, bounds, new_tokens, runs, safeties=(0.1, 0.25, 0.5, 1.0, 2.0),
                             ks=(1, 2, 3, 4, 5, 6), draft_stages=(0, 1)))
    if compile:
        from cognica_poe.compiled import compile_decode

        res["targets"] = {"eager": targets(res)}
        if compile_decode(model.gpt):
            res["compiled"] = measure_modes(model, prompts, bounds, new_tokens, runs,
                                            safeties=(0.1, 0.25, 0.5, 1.0, 2.0), ks=(1, 2, 3, 4, 5, 6),
                                            draft_stages=(0,))
            res["targets"]["compiled"] = targets(res["compiled"])
    return res


# -----------------------------------------------------------------------------
# part 2: speed at scale


def gemv_bandwidth(dtype: torch.dtype, packed: bool, total_bytes: float = 1.2e9, runs: int = 3) -> float:
    """GB/s of y = W x over enough 6144 x 1536 matrices to exceed total_bytes (no cache reuse): plain F.linear, or
    each matrix prepacked for oneDNN as `Linear.pack` does (the fastest matrix-vector product this build offers)."""
    from cognica_poe.packed import Linear

    rows, cols = 6144, 1536
    n = int(total_bytes // (rows * cols * torch.finfo(dtype).bits // 8)) + 1
    mats = []
    for _ in range(n):
        m = Linear(cols, rows, bias=False, dtype=dtype)
        if packed and not m.pack():
            return float("nan")
        mats.append(m)
    x = torch.randn(1, cols).to(dtype)

    @torch.no_grad()
    def run():
        for m in mats:
            m(x)

    t = median_time(run, runs)
    return n * rows * cols * (torch.finfo(dtype).bits // 8) / t / 1e9


def scale_part(preset: str, dtype_name: str, new_tokens: int, runs: int, long_prompt: int) -> dict:
    from transformers import LlamaConfig, LlamaForCausalLM

    from cognica_poe.config import preset_config
    from cognica_poe.hf import CognicaPoEForCausalLM
    from cognica_poe.model import GPT
    from cognica_poe.packed import count_packed

    dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype_name]
    cfg = preset_config(preset, bos_token_id=0, pad_token_id=0, eos_token_id=[0])
    with torch.device("meta"):
        model = CognicaPoEForCausalLM(cfg)
    model.gpt = GPT.from_config(cfg, seed=0).to(dtype)
    model.eval()
    n_packed = model.pack_weights()
    # every packed copy: each Linear's own and each attention's q|k|v stack
    stashed = [(m, name, getattr(m, name)) for m in model.modules() for name in ("packed", "packed_stack")
               if getattr(m, name, None) is not None]

    def packing(on: bool) -> None:
        """Switch the packed copies in or out without rebuilding them: plain and packed runs share one model."""
        for m, name, copy in stashed:
            setattr(m, name, copy if on else None)
        assert count_packed(model) == (n_packed if on else 0)

    bytes_per_param = torch.finfo(dtype).bits // 8
    # weights a decode step reads: every block matrix, lm_head, and one row of wte and of each value embedding
    read_params = sum(p.numel() for n, p in model.gpt.named_parameters() if n.startswith("transformer.h")) \
        + model.gpt.lm_head.weight.numel()
    ids = torch.randint(1, cfg.vocab_size, (1, 16))
    ids[0, 0] = 0
    last = cfg.poe_n_stages - 1
    kw = dict(max_new_tokens=new_tokens, stop_tokens=[])

    llama_cfg = LlamaConfig(hidden_size=cfg.n_embd, intermediate_size=4 * cfg.n_embd, num_hidden_layers=cfg.n_layer,
                            num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head,
                            vocab_size=cfg.vocab_size, max_position_embeddings=cfg.sequence_len,
                            tie_word_embeddings=False, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    with torch.device("meta"):
        llama = LlamaForCausalLM(llama_cfg)
    llama = llama.to_empty(device="cpu").to(dtype).eval()
    with torch.no_grad():
        for p in llama.parameters():
            p.normal_(0, 0.02)
    llama_read = sum(p.numel() for n, p in llama.named_parameters() if "layers." in n) + \
        llama.lm_head.weight.numel()

    def ours(packed: bool, fn):
        def run():
            packing(packed)
            return fn()
        return run

    def llama_generate(prompt: torch.Tensor, n: int):
        return lambda: llama.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False)

    def timed(fns: dict) -> dict:
        """Median wall time of each fn; the models' runs alternate, so a slow spell of this shared machine hits all."""
        times = {k: [] for k in fns}
        for fn in fns.values():
            fn()  # warm-up
        for _ in range(runs):
            for k, fn in fns.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
        return {k: statistics.median(v) for k, v in times.items()}

    t = timed({"full": ours(True, lambda: model.generate_stage(ids, stage=last, **kw)),
               "full_plain": ours(False, lambda: model.generate_stage(ids, stage=last, **kw)),
               "llama": llama_generate(ids, new_tokens),
               "hf_generate": ours(True, lambda: model.generate(ids, max_new_tokens=new_tokens,
                                                                min_new_tokens=new_tokens, do_sample=False)),
               "stage0": ours(True, lambda: model.generate_stage(ids, stage=0, **kw))})
    res = {"shape": preset, "dtype": dtype_name, "new_tokens": new_tokens, "prompt_tokens": 16, "runs": runs,
           "params": model.gpt.num_params(), "packed_matrices": n_packed,
           "weight_bytes_read_per_token": read_params * bytes_per_param,
           "llama_weight_bytes_read_per_token": llama_read * bytes_per_param}
    for k in t:
        res[f"{k}_tok_s"] = new_tokens / t[k]
    res["stage0_speedup"] = t["full"] / t["stage0"]
    res["packed_speedup"] = t["full_plain"] / t["full"]
    for k in ("full", "full_plain"):
        res[f"{k}_weight_GBps"] = res[f"{k}_tok_s"] * res["weight_bytes_read_per_token"] / 1e9
    res["llama_weight_GBps"] = res["llama_tok_s"] * res["llama_weight_bytes_read_per_token"] / 1e9
    res["bandwidth_ratio_vs_llama"] = res["full_weight_GBps"] / res["llama_weight_GBps"]
    res["bandwidth_ratio_vs_llama_plain_weights"] = res["full_plain_weight_GBps"] / res["llama_weight_GBps"]

    if long_prompt:  # decode over a long context: one decode step's attention reads every cached key
        long_ids = torch.randint(1, cfg.vocab_size, (1, long_prompt))
        long_ids[0, 0] = 0
        long_kw = dict(stop_tokens=[])
        t = timed({"full": ours(True, lambda: model.generate_stage(long_ids, stage=last, max_new_tokens=new_tokens,
                                                                   **long_kw)),
                   "full_prefill": ours(True, lambda: model.generate_stage(long_ids, stage=last, max_new_tokens=1,
                                                                           **long_kw)),
                   "llama": llama_generate(long_ids, new_tokens),
                   "llama_prefill": llama_generate(long_ids, 1)})
        step = {k: (t[k] - t[f"{k}_prefill"]) / (new_tokens - 1) for k in ("full", "llama")}
        res["long_context"] = {
            "prompt_tokens": long_prompt, "new_tokens": new_tokens,
            "note": "decode step time = (time for new_tokens - time for 1 token) / (new_tokens - 1): prefill excluded",
            "full_decode_ms_per_step": step["full"] * 1e3, "llama_decode_ms_per_step": step["llama"] * 1e3,
            "full_decode_weight_GBps": res["weight_bytes_read_per_token"] / step["full"] / 1e9,
            "llama_decode_weight_GBps": res["llama_weight_bytes_read_per_token"] / step["llama"] / 1e9}
        lc = res["long_context"]
        lc["bandwidth_ratio_vs_llama"] = lc["full_decode_weight_GBps"] / lc["llama_decode_weight_GBps"]
    model = llama = stashed = None
    res["gemv_GBps"] = gemv_bandwidth(dtype, packed=False)
    res["gemv_packed_GBps"] = gemv_bandwidth(dtype, packed=True)
    res["bandwidth_ratio_vs_gemv"] = res["full_weight_GBps"] / res["gemv_packed_GBps"]
    res["bandwidth_ratio_vs_plain_gemv"] = res["full_weight_GBps"] / res["gemv_GBps"]
    return res


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", default="d24", help="preset for part 2 (default d24)")
    parser.add_argument("--skip-scale", action="store_true")
    parser.add_argument("--skip-trained", action="store_true")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--long-prompt", type=int, default=1024,
                        help="part 2, bf16: also time decode steps after a prompt this long (0 = skip)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="part 1, fp32: also every mode with compiled decode")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in a subprocess
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.part:  # each heavy part runs in its own process so memory from one never slows the next
        kind, dtype = args.part.split(":")
        if kind == "trained":
            out = trained_part(dtype, args.new_tokens, args.runs, args.compile and dtype == "fp32")
        else:
            out = scale_part(args.scale, dtype, args.new_tokens, args.runs, args.long_prompt if dtype == "bf16" else 0)
        print(json.dumps(out))
        return
    results = {"machine": machine()}
    parts = ([] if args.skip_trained else ["trained:fp32", "trained:bf16"]) + \
        ([] if args.skip_scale else ["scale:bf16", "scale:fp32"])
    for part in parts:
        cmd = [sys.executable, __file__, "--part", part, "--scale", args.scale, "--new-tokens", str(args.new_tokens),
               "--runs", str(args.runs), "--threads", str(args.threads), "--long-prompt", str(args.long_prompt)] \
            + (["--compile"] if args.compile else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise SystemExit(f"{part} failed:\n{proc.stderr[-3000:]}")
        results[part] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{part} done in {time.perf_counter() - t0:.0f}s: {json.dumps(results[part])[:400]}...", flush=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()

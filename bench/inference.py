"""
Inference benchmark: every mode against full-depth cached greedy, side by side in one process.

Part 1, a trained model ($COGNICA_POE_SHARED/models/poe-d8-classics, else ../shared/models/..., converted here):
tokens/s of every mode, speculative acceptance and speedup next to the cost-model ideal (1 - a^(K+1)) / ((1 - a)(K c
+ v)) with c and v measured (the model describes decode steps, so it is compared with the decode-only speedup,
prefill excluded; the end-to-end speedup is reported too), WAND speedup / top-1 agreement / exit histogram at
several safeties (bounds calibrated on held-out text), stage-0 speedup. Part 1b, quantized quality on the same
model: int8 (per channel), int4 (round-to-nearest, default groups of 128) and int4 GPTQ (groups of 32, lm_head in
bf16, calibrated on the last 16k tokens of its training text), each made by `cognica-poe quantize` from bf16,
against bf16 on --quality-tokens of its held-out documents: per exit BPB, its relative change and greedy top-1
agreement (bpb.quality_against), and under "targets" which of issue 13's bars each meets at every exit (BPB
within 0.5% for int8 / 3% for int4, agreement >= 99% / 95%). Part 2, speed at scale on a
d24-shaped model (random weights): full-depth cached decode, with prepacked weights (packed.py, the CLI's
default) and with plain ones, vs a transformers LlamaForCausalLM of the same width/depth/heads/vocab
(intermediate 4x) under its own generate(); achieved weight bandwidth; matrix-vector bandwidth measured over
>= 1 GB of weights, plain F.linear and prepacked; in bf16 also decode steps after a long prompt (--long-prompt),
where attention over the cache matters. Parts 1 and 2 run every mode with the weight layout the CLI picks (packed
where the probe of cpu.py finds it faster; "weight_layout" says which ran, and the machine block gives the probe's
figures).
Part 3, quantized weights at the same shape (random weights): ours at bf16 (packed), int8 and int4 (quantize.py's
defaults) against llama.cpp at BF16, Q8_0 and Q4_0 on a random-weight Llama of the same width, depth, heads and
vocabulary (Llama's own MLP width, 8/3 x, so both read the same weight bytes per token; written with the gguf
package, its own Q8_0 / Q4_0 quantizers, a placeholder vocabulary): decode tok/s (16-token prompt, --new-tokens
greedy tokens), GB/s of weights each side reads per token, prefill tok/s of a --prefill-tokens prompt, batch 1,
the same threads, runs alternating ours / theirs; beside them this machine's memory bandwidth (torch: a sum over 1
GiB). With --compile, ours also decode compiled in mode "max-autotune" in the same alternation ("ours_compiled":
inductor's own weight-only kernels on frozen weights; minutes of compiling per model at d24).
llama.cpp comes from llama-cpp-python built from its PyPI source for this CPU by `bash
bench/setup_llama_cpp.sh` (never a project dependency); without it part 3 runs ours alone and says so.

Every speed is a median of >= 3 runs in this process; token counts are stated. The last line printed is one
JSON object with every figure and the machine.

    python bench/inference.py                 # everything (about 5 minutes on 2 CPU cores)
    python bench/inference.py --scale d12     # part 2 on a smaller shape
    python bench/inference.py --skip-scale    # parts 1, 1b and 3
    python bench/inference.py --skip-trained --skip-scale --skip-quant   # part 1b alone (1.5 minutes, 2 cores)
    python bench/inference.py --skip-trained --skip-quality --skip-scale --scale d12   # part 3 alone, smaller
                                                                                     # (5 minutes, 2 cores)
    python bench/inference.py --skip-llama-cpp    # part 3 without llama.cpp
    python bench/inference.py --skip-scale --skip-quant --compile   # part 1, fp32 also compiled (compiled.py;
                                                                  # about 10 more minutes on 2 CPU cores, most of it
                                                                  # compiling the graphs)
    python bench/inference.py --skip-trained --skip-quality --skip-scale --compile   # part 3 with ours compiled
                                                                  # (about 20 minutes at d24 on 2 CPU cores)

With --compile, part 1 in fp32 measures every mode a second time with compiled decode, in the same process after
the eager runs, under "compiled"; "targets" sets the figures the compiled decode is judged by (stage 0 over full
depth, the best speculative K, WAND's best speed at 100% top-1 agreement) beside the eager ones.
"""

import argparse
import atexit
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import torch

from cognica_poe.cpu import set_threads
from cognica_poe.eval.speed import machine, median_time

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED = os.environ.get("COGNICA_POE_SHARED") or os.path.join(HERE, "..", "..", "shared")  # as the tests
D8 = os.path.join(SHARED, "models", "poe-d8-classics")


# -----------------------------------------------------------------------------
# part 1: a trained model


def convert_trained() -> str:
    """The d8 model as an fp32 HF folder, in a temporary folder of this process's own (removed when it exits, with
    what a part writes beside it: quantized copies, calibration text)."""
    from cognica_poe.nanochat import convert_nanochat

    scratch = tempfile.mkdtemp(prefix="bench-d8-")
    atexit.register(shutil.rmtree, scratch, True)
    return convert_nanochat(D8, os.path.join(scratch, "hf"), dtype="float32", allow_pickle=True)


def load_trained(dtype: str):
    from cognica_poe.checkpoint import load_model
    from cognica_poe.tokenizer import CognicaPoETokenizer

    out = convert_trained()
    return load_model(out, dtype=dtype, pack="auto"), CognicaPoETokenizer.from_pretrained(out)  # as the CLI


def corpus_docs() -> list[str]:
    """The d8 model's corpus, document by document, in its training order."""
    docs = []
    for name in ("tinyshakespeare.txt", "warpeace.txt"):
        with open(os.path.join(SHARED, "data", name), encoding="utf-8") as f:
            docs += [d.strip() for d in f.read().split("\n\n") if d.strip()]
    return docs


def heldout_docs() -> list[str]:
    """The d8 model's validation documents (the last 1/20 of the corpus, as its README defines them)."""
    docs = corpus_docs()
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
           "packed_matrices": count_packed(model), "weight_layout": "packed" if count_packed(model) else "plain"}
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
# part 1b: quantized quality on the trained model

# issue 13's bars against bf16 at every exit: |BPB change| at most, greedy top-1 agreement at least
QUALITY_BARS = {"int8": (0.005, 0.99), "int4": (0.03, 0.95)}
# each recipe as `cognica-poe quantize` flags; int4_gptq: GPTQ in groups of 32 with lm_head kept in bf16, calibrated
# on the last 16k tokens of the model's training text (War and Peace prose, like the held-out documents; the recipe
# and the tokens of test_quantize's d8 quality test)
QUALITY_RECIPES = {"int8": ["--bits", "8"], "int4": ["--bits", "4"],
                   "int4_gptq": ["--bits", "4", "--group-size", "32", "--no-quantize-heads", "--calibration",
                                 "TRAINING_TEXT"]}


def quality_part(tokens: int, threads: int) -> dict:
    """
    int8 (per channel), int4 (round-to-nearest, default groups) and int4 GPTQ, each made by `cognica-poe quantize`
    from the model's bf16 weights, against the bf16 model on tokens tokens of its held-out documents: per exit BPB,
    its relative change and greedy top-1 agreement (bpb.quality_against, as the d8 quality test measures them: any of
    bf16's exactly tied top tokens counts as its pick; "top1_agreement_strict" counts only its argmax), and which of
    issue 13's bars each recipe meets at every exit ("targets").
    """
    from cognica_poe.bpb import quality_against
    from cognica_poe.checkpoint import load_model
    from cognica_poe.cli import main as cli
    from cognica_poe.tokenizer import CognicaPoETokenizer
    from cognica_poe.train.data import documents_stream, last_docs

    folder = convert_trained()
    tok = CognicaPoETokenizer.from_pretrained(folder)
    ref = load_model(folder, dtype="bfloat16")
    stream = documents_stream(heldout_docs(), tok, tokens)
    docs = corpus_docs()
    calibration = os.path.join(os.path.dirname(folder), "calibration.txt")  # the end of the training documents
    with open(calibration, "w", encoding="utf-8") as f:  # (the CLI reads its default 16k tokens of them)
        f.write("\n\n".join(last_docs(docs[: len(docs) - len(docs) // 20], tok, 16384)))
    res = {"model": "poe-d8-classics", "reference": "bf16", "eval_tokens": len(stream),
           "eval_text": "held-out documents (the last 1/20 of the corpus)", "recipes": {}, "targets": {}}
    for name, flags in QUALITY_RECIPES.items():
        out = os.path.join(os.path.dirname(folder), name)
        argv = ["quantize", folder, out, "--dtype", "bfloat16", "--threads", str(threads),
                *(calibration if f == "TRAINING_TEXT" else f for f in flags)]
        if cli(argv) != 0:
            raise SystemExit(f"cognica-poe {' '.join(argv)} failed")
        q = quality_against(load_model(out).gpt, ref.gpt, stream, tok.token_bytes(), seq_len=256, batch_size=8)
        res["recipes"][name] = {"cli": " ".join(["cognica-poe quantize MODEL OUT --dtype bfloat16", *flags]), **q}
        bpb_bar, agree_bar = QUALITY_BARS[name.split("_")[0]]
        res["targets"][name] = {"bpb_change_max": bpb_bar, "bpb_met": max(map(abs, q["bpb_change"])) <= bpb_bar,
                                "top1_agreement_min": agree_bar, "agreement_met": min(q["top1_agreement"]) >= agree_bar}
    return res


# -----------------------------------------------------------------------------
# part 2: speed at scale


def timed(fns: dict, runs: int) -> dict:
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

    t = timed({"full": ours(True, lambda: model.generate_stage(ids, stage=last, **kw)),
               "full_plain": ours(False, lambda: model.generate_stage(ids, stage=last, **kw)),
               "llama": llama_generate(ids, new_tokens),
               "hf_generate": ours(True, lambda: model.generate(ids, max_new_tokens=new_tokens,
                                                                min_new_tokens=new_tokens, do_sample=False)),
               "stage0": ours(True, lambda: model.generate_stage(ids, stage=0, **kw))}, runs)
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
                   "llama_prefill": llama_generate(long_ids, 1)}, runs)
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


# -----------------------------------------------------------------------------
# part 3: quantized weights, with llama.cpp as the yardstick

LLAMA_CPP_TYPES = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_0"}  # ours -> llama.cpp's counterpart


def llama_cpp_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("llama_cpp", "gguf"))


def cpu_has_amx() -> bool:
    """Whether the CPU has AMX (Linux reports its flags in /proc/cpuinfo; elsewhere: no AMX to avoid)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            return "amx_int8" in f.read()
    except OSError:
        return False


def llama_cpp_without_extra_buffers() -> None:
    """
    Load llama.cpp models without its extra weight buffer types (AMX, and the CPU repacking of Q4_0 / Q8_0): on
    CPUs with AMX its AMX matrix product crashes (segfault in the first Q8_0 decode here, ggml-org/llama.cpp#20824),
    so there llama.cpp runs its plain CPU kernels, and the JSON says so.
    """
    import llama_cpp.llama_cpp as lib

    defaults = lib.llama_model_default_params

    def params():
        p = defaults()
        p.use_extra_bufts = False
        return p

    lib.llama_model_default_params = params


def llama_ffn(n_embd: int) -> int:
    """Llama's own MLP width (2/3 of 4x, rounded up to 256): its three MLP matrices (gate, up, down) then hold as many
    weights as our two 4x ones, so both sides read the same bytes per token at the same precision."""
    return -(-(8 * n_embd // 3) // 256) * 256


def write_llama_ggufs(cfg, paths: dict[str, str], quantize_heads: bool, seed: int = 0) -> dict[str, int]:
    """
    One random-weight Llama of cfg's width, depth, heads and vocabulary (MLP width llama_ffn) written with the gguf
    package in every type of paths ({"BF16": path, "Q8_0": ..., "Q4_0": ...}; Q8_0 and Q4_0 by gguf's own
    quantizers): each matrix is drawn once (normal, std 0.02) and stored in every file. The block matrices and
    token_embd take the file's type; output.weight too when quantize_heads (as our lm_head), else BF16.
    llama.cpp needs a vocabulary, a speed bench no real one: vocab_size SentencePiece-style entries (<unk>, <s>,
    </s>, the 256 byte tokens, then placeholders "t<i>"). Returns each file's bytes of weights one decode step reads
    (every block matrix and output.weight; norms and the one embedding row are left out, as on our side).
    """
    import gguf
    import numpy as np

    types = gguf.GGMLQuantizationType
    d, ffn = cfg.n_embd, llama_ffn(cfg.n_embd)
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(cfg.vocab_size - len(tokens))]
    token_types = [2, 3, 3] + [6] * 256 + [1] * (cfg.vocab_size - 259)  # unknown, control, byte, normal
    writers = {}
    for name, path in paths.items():
        w = gguf.GGUFWriter(path, "llama")
        w.add_context_length(cfg.sequence_len)
        w.add_embedding_length(d)
        w.add_block_count(cfg.n_layer)
        w.add_feed_forward_length(ffn)
        w.add_head_count(cfg.n_head)
        w.add_head_count_kv(cfg.n_kv_head)
        w.add_rope_dimension_count(d // cfg.n_head)
        w.add_layer_norm_rms_eps(1e-6)
        w.add_tokenizer_model("llama")
        w.add_token_list(tokens)
        w.add_token_scores([-float(i) for i in range(cfg.vocab_size)])
        w.add_token_types(token_types)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        w.add_unk_token_id(0)
        writers[name] = w
    rng = np.random.default_rng(seed)
    read = dict.fromkeys(paths, 0)

    def add(tensor_name: str, shape: tuple[int, ...], read_per_token: bool = True, head: bool = False) -> None:
        if len(shape) == 1:  # a norm's gain: F32 in every file
            for w in writers.values():
                w.add_tensor(tensor_name, np.ones(shape, dtype=np.float32))
            return
        x = rng.standard_normal(shape, dtype=np.float32) * 0.02
        for name, w in writers.items():
            qtype = types[name] if quantize_heads or not head else types.BF16
            data = gguf.quants.quantize(x, qtype)
            w.add_tensor(tensor_name, data, raw_dtype=qtype)
            read[name] += data.nbytes if read_per_token else 0

    add("token_embd.weight", (cfg.vocab_size, d), read_per_token=False)
    for i in range(cfg.n_layer):
        add(f"blk.{i}.attn_norm.weight", (d,))
        add(f"blk.{i}.attn_q.weight", (d, d))
        add(f"blk.{i}.attn_k.weight", (cfg.n_kv_head * d // cfg.n_head, d))
        add(f"blk.{i}.attn_v.weight", (cfg.n_kv_head * d // cfg.n_head, d))
        add(f"blk.{i}.attn_output.weight", (d, d))
        add(f"blk.{i}.ffn_norm.weight", (d,))
        add(f"blk.{i}.ffn_gate.weight", (ffn, d))
        add(f"blk.{i}.ffn_up.weight", (ffn, d))
        add(f"blk.{i}.ffn_down.weight", (d, ffn))
    add("output_norm.weight", (d,))
    add("output.weight", (cfg.vocab_size, d), head=True)
    for w in writers.values():
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
    return read


def llama_cpp_greedy(llm, prompt: list[int], n: int) -> list[int]:
    """Greedy decoding on llama.cpp the way ours decodes: the prompt in one batch, then n - 1 one-token steps, each
    token the argmax of the last position's logits."""
    import llama_cpp
    import numpy as np

    llm.reset()  # the cache from position 0
    llm.eval(prompt)
    out = []
    for i in range(n):
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),))
        out.append(int(logits.argmax()))
        if i < n - 1:
            llm.eval(out[-1:])
    return out


def memory_bandwidth(gib: float = 1.0, runs: int = 5) -> dict:
    """This machine's memory bandwidth as torch reaches it with the bench's threads: a sum over gib GiB of fp32
    (reads only, what a decode step does to its weights) and a copy of it (read + write)."""
    x = torch.ones(int(gib * 2**30) // 4)
    y = torch.empty_like(x)
    read = x.numel() * 4 / median_time(lambda: x.sum(), runs) / 1e9
    copy = 2 * x.numel() * 4 / median_time(lambda: y.copy_(x), runs) / 1e9
    return {"read_GBps": read, "copy_GBps": copy, "bytes": x.numel() * 4}


def matrix_bytes(gpt) -> int:
    """Bytes of the matrices one decode step reads in full: every block matrix and the heads, as stored (int8 /
    int4 with their scales, or float)."""
    from cognica_poe.quantize import quantized_names

    mods = [gpt.get_submodule(n) for n in quantized_names(gpt, heads=True)]
    return sum(t.numel() * t.element_size() for m in mods for t in [*m.parameters(False), *m.buffers(False)])


def quant_part(preset: str, new_tokens: int, runs: int, prefill_tokens: int, llama_cpp: bool,
               compile: bool = False) -> dict:
    """
    Ours at bf16 (packed), int8 and int4 (quantize.py's defaults) against llama.cpp at BF16, Q8_0 and Q4_0 on a
    same-shape random-weight Llama, batch 1, the same threads: decode tok/s (a 16-token prompt, new_tokens
    greedy tokens) with the GB/s of weights each side reads per token, and prefill tok/s of a prefill_tokens
    prompt; all runs alternate. Beside them: this machine's memory bandwidth. compile: ours also decode compiled
    in mode "max-autotune" (compiled.py: inductor's own weight-only kernels on frozen weights), the same models in
    the same alternation ("ours_compiled"), with the first call's compile time and whether the greedy tokens equal
    eager's; prefill prompts are longer than compiled chunks, so prefill stays eager.
    """
    import copy

    from cognica_poe.compiled import compile_decode, eager_decode
    from cognica_poe.config import preset_config
    from cognica_poe.hf import CognicaPoEForCausalLM
    from cognica_poe.model import GPT
    from cognica_poe.quantize import DEFAULT_GROUP_SIZE, quantize_model

    cfg = preset_config(preset, bos_token_id=0, pad_token_id=0, eos_token_id=[0])
    res = {"shape": preset, "new_tokens": new_tokens, "prompt_tokens": 16, "prefill_tokens": prefill_tokens,
           "runs": runs, "threads": torch.get_num_threads(), "int4_group_size": DEFAULT_GROUP_SIZE,
           "memory": memory_bandwidth()}
    ours, read = {}, {}
    base = GPT.from_config(cfg, seed=0).to(torch.bfloat16)
    for kind in ("int4", "int8", "bf16"):  # bf16 last: the quantized ones are copies of it
        gpt = base if kind == "bf16" else copy.deepcopy(base)
        if kind != "bf16":
            quantize_model(gpt, kind)
        read[kind] = matrix_bytes(gpt)
        ours[kind] = CognicaPoEForCausalLM.from_gpt(gpt).eval()
        ours[kind].pack_weights()  # what stays float (bf16: every matrix)
    heads = not isinstance(ours["int4"].gpt.lm_head, torch.nn.Linear)
    theirs, their_read, gguf_dir = {}, {}, None
    if llama_cpp:
        from llama_cpp import Llama

        extra_buffers = not cpu_has_amx()
        if not extra_buffers:
            llama_cpp_without_extra_buffers()
        gguf_dir = tempfile.mkdtemp(prefix="bench-gguf-")
        paths = {t: os.path.join(gguf_dir, f"llama-{preset}-{t}.gguf") for t in LLAMA_CPP_TYPES.values()}
        their_read = write_llama_ggufs(cfg, paths, quantize_heads=heads)
        for t, path in paths.items():
            theirs[t] = Llama(model_path=path, n_ctx=prefill_tokens + new_tokens + 16, n_batch=prefill_tokens,
                              n_ubatch=prefill_tokens, n_threads=res["threads"], n_threads_batch=res["threads"],
                              verbose=False)
        res["llama_cpp_setup"] = {"version": __import__("llama_cpp").__version__, "ffn": llama_ffn(cfg.n_embd),
                            "output_weight": "file type" if heads else "BF16",
                            "vocab": "placeholder SentencePiece entries (speed only)",
                            "extra_buffer_types": "on" if extra_buffers else
                            "off: AMX / repacked Q4_0 and Q8_0 crash on this AMX CPU (ggml-org/llama.cpp#20824)"}
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(3, cfg.vocab_size, (1, 16), generator=gen)
    long_ids = torch.randint(3, cfg.vocab_size, (1, prefill_tokens), generator=gen)
    ids[0, 0] = long_ids[0, 0] = 0  # BOS
    last = cfg.poe_n_stages - 1

    @torch.no_grad()
    def first_step_logits(model, next_token: torch.Tensor) -> torch.Tensor:
        cache = model.new_cache(1, 64)
        model.gpt(ids, kv_cache=cache)
        return model.gpt(next_token, kv_cache=cache)[0, -1].float()

    compiled_slots, res["ours_compiled"] = {}, {}
    for kind in ours if compile else ():  # compile each now, then hold its graphs aside: eager runs keep running
        gpt = ours[kind].gpt
        compile_decode(gpt, "max-autotune")
        t0 = time.perf_counter()
        got = ours[kind].generate_stage(ids, stage=last, max_new_tokens=new_tokens, stop_tokens=[])
        row = res["ours_compiled"][kind] = {"compile_s": time.perf_counter() - t0}
        nxt = got[:, ids.size(1):ids.size(1) + 1]
        compiled_logits = first_step_logits(ours[kind], nxt)
        compiled_slots[kind] = gpt.compiled_slots
        eager_decode(gpt)
        want = ours[kind].generate_stage(ids, stage=last, max_new_tokens=new_tokens, stop_tokens=[])
        eager_logits = first_step_logits(ours[kind], nxt)
        # random weights give flat logits (top-2 gaps near bf16's rounding), so besides whether the greedy tokens
        # match: how many match before the first difference, and how far a decode step's logits are from eager's
        row["greedy_equals_eager"] = torch.equal(got, want)
        row["greedy_tokens_before_first_difference"] = int((got[0] == want[0])[ids.size(1):].int().cumprod(0).sum())
        row["step_logits_max_abs_diff"] = float((compiled_logits - eager_logits).abs().max())
        top2 = eager_logits.topk(2).values
        row["step_logits_eager_top2_gap"] = float(top2[0] - top2[1])
        row["step_logits_eager_abs_max"] = float(eager_logits.abs().max())

    def ours_fn(kind: str, prompt: torch.Tensor, n: int, compiled: bool = False):
        gpt = ours[kind].gpt

        def run():
            gpt.compiled_slots = compiled_slots[kind] if compiled else None
            try:
                return ours[kind].generate_stage(prompt, stage=last, max_new_tokens=n, stop_tokens=[])
            finally:
                gpt.compiled_slots = None
        return run

    def theirs_fn(t: str, prompt: torch.Tensor, n: int):
        return lambda: llama_cpp_greedy(theirs[t], prompt[0].tolist(), n)

    for phase, prompt, n in (("decode", ids, new_tokens), ("prefill", long_ids, 1)):
        fns = {}
        for kind, t in LLAMA_CPP_TYPES.items():  # alternating: ours, (ours compiled,) theirs, ours...
            fns[f"ours_{kind}"] = ours_fn(kind, prompt, n)
            if kind in compiled_slots and phase == "decode":
                fns[f"ours_compiled_{kind}"] = ours_fn(kind, prompt, n, compiled=True)
            if t in theirs:
                fns[f"llama_cpp_{t}"] = theirs_fn(t, prompt, n)
        times = timed(fns, runs)
        for kind in compiled_slots if phase == "decode" else ():
            row = res["ours_compiled"][kind]
            row["decode_tok_s"] = n / times[f"ours_compiled_{kind}"]
            row["weight_GBps"] = row["decode_tok_s"] * read[kind] / 1e9
        for kind, t in LLAMA_CPP_TYPES.items():
            for side, key, nbytes in (("ours", kind, read[kind]), ("llama_cpp", t, their_read.get(t))):
                if f"{side}_{key}" not in times:
                    continue
                row = res.setdefault(side, {}).setdefault(key, {})
                if phase == "decode":
                    row["decode_tok_s"] = n / times[f"{side}_{key}"]
                    row["weight_bytes_read_per_token"] = nbytes
                    row["weight_GBps"] = row["decode_tok_s"] * nbytes / 1e9
                else:
                    row["prefill_tok_s"] = prompt.size(1) / times[f"{side}_{key}"]
    ratios = {f"ours_{k}_vs_ours_bf16_decode": res["ours"][k]["decode_tok_s"] / res["ours"]["bf16"]["decode_tok_s"]
              for k in ("int8", "int4")}
    for kind, t in LLAMA_CPP_TYPES.items():
        if t in theirs:
            for phase in ("decode", "prefill"):
                ratios[f"ours_{kind}_vs_llama_cpp_{t}_{phase}"] = \
                    res["ours"][kind][f"{phase}_tok_s"] / res["llama_cpp"][t][f"{phase}_tok_s"]
    for kind in compiled_slots:  # compiled against the same baseline: ours bf16, packed, eager
        ratios[f"ours_compiled_{kind}_vs_ours_bf16_decode"] = \
            res["ours_compiled"][kind]["decode_tok_s"] / res["ours"]["bf16"]["decode_tok_s"]
        t = LLAMA_CPP_TYPES[kind]
        if t in theirs:
            ratios[f"ours_compiled_{kind}_vs_llama_cpp_{t}_decode"] = \
                res["ours_compiled"][kind]["decode_tok_s"] / res["llama_cpp"][t]["decode_tok_s"]
    res["ratios"] = ratios
    res["weight_GBps_vs_memory_read"] = {f"{side}_{key}": row["weight_GBps"] / res["memory"]["read_GBps"]
                                         for side in ("ours", "ours_compiled", "llama_cpp")
                                         for key, row in res.get(side, {}).items()}
    theirs.clear()
    if gguf_dir:
        shutil.rmtree(gguf_dir)  # the bench's own temporary files
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
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: the physical cores)")
    parser.add_argument("--skip-quant", action="store_true", help="skip part 3 (int8 / int4 and llama.cpp)")
    parser.add_argument("--skip-llama-cpp", action="store_true",
                        help="part 3 without llama.cpp (skipped by itself when llama-cpp-python is not installed)")
    parser.add_argument("--prefill-tokens", type=int, default=512, help="part 3: the prompt length of prefill")
    parser.add_argument("--compile", action="store_true",
                        help="part 1, fp32: also every mode with compiled decode; part 3: ours also compiled in mode "
                             "max-autotune (minutes of compiling per model at d24)")
    parser.add_argument("--skip-quality", action="store_true", help="skip part 1b (int8 / int4 quality against bf16)")
    parser.add_argument("--quality-tokens", type=int, default=32768, help="part 1b: held-out tokens evaluated")
    parser.add_argument("--part", default=None, help=argparse.SUPPRESS)  # internal: run one part in a subprocess
    args = parser.parse_args()
    args.threads = set_threads(args.threads)
    if args.part:  # each heavy part runs in its own process so memory from one never slows the next
        kind, dtype = args.part.split(":")
        if kind == "quant":
            out = quant_part(args.scale, args.new_tokens, args.runs, args.prefill_tokens, not args.skip_llama_cpp,
                             args.compile)
        elif kind == "quality":
            out = quality_part(args.quality_tokens, args.threads)
        elif kind == "trained":
            out = trained_part(dtype, args.new_tokens, args.runs, args.compile and dtype == "fp32")
        else:
            out = scale_part(args.scale, dtype, args.new_tokens, args.runs, args.long_prompt if dtype == "bf16" else 0)
        print(json.dumps(out))
        return
    results = {"machine": machine()}
    if not args.skip_quant and not args.skip_llama_cpp and not llama_cpp_installed():
        args.skip_llama_cpp = True
        results["llama_cpp"] = "skipped: llama-cpp-python / gguf not installed (bash bench/setup_llama_cpp.sh)"
        print(results["llama_cpp"], flush=True)
    parts = ([] if args.skip_trained else ["trained:fp32", "trained:bf16"]) + \
        ([] if args.skip_quality else ["quality:bf16"]) + \
        ([] if args.skip_scale else ["scale:bf16", "scale:fp32"]) + ([] if args.skip_quant else ["quant:bf16"])
    for part in parts:
        cmd = [sys.executable, __file__, "--part", part, "--scale", args.scale, "--new-tokens", str(args.new_tokens),
               "--runs", str(args.runs), "--threads", str(args.threads), "--long-prompt", str(args.long_prompt),
               "--prefill-tokens", str(args.prefill_tokens), "--quality-tokens", str(args.quality_tokens)] \
            + (["--skip-llama-cpp"] if args.skip_llama_cpp else []) + (["--compile"] if args.compile else [])
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:  # the other parts' figures still come out, with the failure named
            results[part] = {"failed": f"exit status {proc.returncode}", "stderr": proc.stderr[-3000:]}
            print(f"{part} failed (exit status {proc.returncode}):\n{proc.stderr[-3000:]}", flush=True)
            continue
        results[part] = json.loads(proc.stdout.strip().splitlines()[-1])
        print(f"{part} done in {time.perf_counter() - t0:.0f}s: {json.dumps(results[part])[:400]}...", flush=True)
    print(json.dumps(results))
    if any("failed" in r for r in results.values() if isinstance(r, dict)):
        sys.exit(1)


if __name__ == "__main__":
    main()

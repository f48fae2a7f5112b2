"""
The `cognica-poe` command line.

    cognica-poe info PATH_OR_PRESET            parameters, stages, boundaries, windows, memory
    cognica-poe convert NANOCHAT_DIR OUT_DIR   nanochat checkpoint -> HF folder (bf16 safetensors by default)
    cognica-poe convert --refresh-code DIR     replace a released folder's .py files with this package's
    cognica-poe generate MODEL "prompt" --mode full|stage|wand|speculative|compose
    cognica-poe calibrate MODEL TEXT           WAND p99 bounds for a checkpoint, stored in its config
    cognica-poe eval bpb MODEL [DATA]          bits per byte per exit and for Log-OP compositions
    cognica-poe eval core MODEL TASKS_DIR      CORE-style tasks, per stage exit
    cognica-poe stage new BASE --new-layers N --out DIR   a specialist stage on a frozen base
    cognica-poe sft MODEL CONVERSATIONS.jsonl  dual-head SFT of a specialist (base frozen)
    cognica-poe chat MODEL                     interactive chat
    cognica-poe demo                           train the tiny default on the bundled corpus, show every mode
    cognica-poe train [--data PATH] ...        train a PoE model from scratch (flat | hier | none)
    cognica-poe tokenizer train --out DIR      a BPE tokenizer from a corpus

Errors from bad input are printed as one clear line and exit with status 2; nothing is written.
"""

import argparse
import json
import os
import sys

from .config import PRESETS
from .train.loop import (
    add_dataclass_args,
    add_tokenizer_train_args,
    add_train_args,
    cmd_tokenizer_train,
    cmd_train,
    dataclass_from_args,
)
from .train.sft import SFTConfig


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_info(args: argparse.Namespace) -> None:
    import os

    import torch

    from .checkpoint import model_summary
    from .config import CognicaPoEConfig, preset_config
    from .model import GPT

    if os.path.isdir(args.model):
        config = CognicaPoEConfig.from_pretrained(args.model)
    else:
        config = preset_config(args.model)
    with torch.device("meta"):
        gpt = GPT(config)
    info = model_summary(gpt)
    if args.json:
        print(json.dumps(info))
        return
    print(f"model            {args.model}")
    print(f"parameters       {info['parameters']:,}")
    for k, v in info["parameter_groups"].items():
        print(f"  {k:<14} {v:,}")
    print(f"shape            n_layer {info['n_layer']}, n_embd {info['n_embd']}, heads {info['n_head']} "
          f"(kv {info['n_kv_head']}) x {info['head_dim']}, vocab {info['vocab_size']} "
          f"(padded {info['padded_vocab_size']}), sequence_len {info['sequence_len']}")
    print(f"poe              mode {info['poe_mode']}, every {info['poe_every']} layers -> "
          f"{info['poe_n_stages']} stages")
    print(f"stage boundaries {info['poe_stage_boundary_layers']} (0-based last layer of each stage)")
    print(f"windows          {info['window_sizes']}")
    print(f"value embeds on  {info['value_embed_layers']}; backout after block {info['backout_layer']}")
    print(f"weights          {_human_bytes(info['weights_bytes_bf16'])} bf16, "
          f"{_human_bytes(info['weights_bytes_fp32'])} fp32")
    print(f"kv cache         {_human_bytes(info['kv_cache_bytes_per_token_bf16'])} per token (bf16), "
          f"{_human_bytes(info['kv_cache_bytes_per_token_bf16'] * info['sequence_len'])} per full sequence")


def cmd_convert(args: argparse.Namespace) -> None:
    from .checkpoint import convert_nanochat, refresh_code

    if args.refresh_code:
        files = refresh_code(args.refresh_code)
        print(f"refreshed {args.refresh_code}: {', '.join(files)}")
        return
    if not args.src or not args.out:
        raise ValueError("convert needs NANOCHAT_DIR and OUT_DIR (or --refresh-code DIR)")
    out = convert_nanochat(args.src, args.out, dtype=args.dtype, allow_pickle=args.allow_pickle, step=args.step,
                           overwrite=args.overwrite)
    print(f"wrote {out}")


def mlx_backend():
    """cognica_poe.mlx's commands (`--backend mlx`), or a clear error when MLX is not installed."""
    try:
        from .mlx import cli
    except ModuleNotFoundError as e:
        if (e.name or "").split(".")[0] != "mlx":
            raise
        raise ValueError(f"--backend mlx: {e}") from None
    return cli


def add_backend_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--backend", choices=["torch", "mlx"], default="torch",
                   help="mlx: decode on MLX (Apple silicon; pip install 'cognica-poe[mlx]')")


def cmd_generate(args: argparse.Namespace) -> None:
    if args.backend == "mlx":
        return mlx_backend().generate(args)
    import time

    import torch

    from .checkpoint import load_model
    from .tokenizer import CognicaPoETokenizer

    if args.siblings:  # stage folders that branch from MODEL, on one shared trunk
        from .branches import load_siblings
        from .checkpoint import parse_dtype

        if args.mode not in ("stage", "compose"):
            raise ValueError("--siblings works with --mode stage or --mode compose")
        model = load_siblings(args.model, args.siblings, dtype=parse_dtype(args.dtype) if args.dtype else None)
        if not args.no_pack:
            model.pack_weights()
        n_exits = model.n_exits
    else:
        model = load_model(args.model, dtype=args.dtype, pack=not args.no_pack)
        n_exits = model.poe_n_stages
    tok = CognicaPoETokenizer.from_pretrained(args.model)
    ids = torch.tensor([[tok.bos_token_id] + tok(args.prompt)["input_ids"]])
    sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature if args.temperature > 0 else 1.0,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens,
                    stop_tokens=args.stop if args.stop is not None else None)
    stream = None
    if args.stream:
        def stream(row, token):
            print(tok.decode([token]), end="", flush=True)
    extra = ""
    t0 = time.perf_counter()
    if args.mode == "full":
        out = model.generate_stage(ids, stage=model.poe_n_stages - 1, streamer=stream, **sampling)
    elif args.mode == "stage":
        out = model.generate_stage(ids, stage=args.stage, streamer=stream, **sampling)
    elif args.mode == "wand":
        out, used = model.generate_wand(ids, safety=args.safety, p99_bounds=args.p99_bounds, return_stages_used=True,
                                        streamer=stream, **sampling)
        extra = f"exit stages: {used[0].tolist()}"
    elif args.mode == "speculative":
        out, acc = model.generate_speculative(ids, draft_stage=args.draft_stage, k_draft=args.k_draft,
                                              return_acceptance=True, streamer=stream, **sampling)
        extra = f"acceptance: {acc:.3f}"
    else:
        out = model.generate_parallel_composition(ids, stages=args.stages or list(range(n_exits)),
                                                  stage_weights=args.stage_weights, streamer=stream, **sampling)
    elapsed = time.perf_counter() - t0
    n = out.size(1) - ids.size(1)
    if args.stream:
        print()
    else:
        print(tok.decode(out[0, ids.size(1):]))
    print(f"[{args.mode}: {n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tok/s{'; ' + extra if extra else ''}]",
          file=sys.stderr)


def cmd_calibrate(args: argparse.Namespace) -> None:
    """p99 WAND bounds from a text file, stored in the model folder's config.json."""
    import torch

    from .checkpoint import load_model
    from .tokenizer import CognicaPoETokenizer
    from .wand import calibrate_wand_bounds

    model = load_model(args.model, dtype="float32")
    tok = CognicaPoETokenizer.from_pretrained(args.model)
    with open(args.data, encoding="utf-8") as f:
        docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    stream = []
    for doc in docs:
        stream += [tok.bos_token_id] + tok.encoding.encode_ordinary(doc)
        if len(stream) >= args.max_tokens:
            break
    bounds = calibrate_wand_bounds(model, torch.tensor(stream[:args.max_tokens]), seq_len=args.seq_len)
    model.config.wand_p99_bounds = bounds
    model.config.to_json_file(f"{args.model}/config.json")
    print(f"wand_p99_bounds = {bounds} (from {min(len(stream), args.max_tokens):,} tokens), saved to "
          f"{args.model}/config.json")


def cmd_stage_new(args: argparse.Namespace) -> None:
    from .checkpoint import new_stage_folder

    out = new_stage_folder(args.base, args.out, args.new_layers, head_mode=args.head_mode, seed=args.seed,
                           dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}: {args.new_layers} new layers on {args.base} (identity at start, lm_head_stage zero)")


def cmd_sft(args: argparse.Namespace) -> None:
    from .train.sft import SFTConfig, sft

    print(json.dumps(sft(dataclass_from_args(SFTConfig, args))))


def cmd_chat(args: argparse.Namespace) -> None:
    """An interactive terminal chat: the conversation is rendered with the chat tokens; replies stream."""
    if args.backend == "mlx":
        return mlx_backend().chat(args)
    from .checkpoint import load_model
    from .tokenizer import CognicaPoETokenizer

    model = load_model(args.model, dtype=args.dtype, pack=not args.no_pack)
    tok = CognicaPoETokenizer.from_pretrained(args.model)
    end = tok.convert_tokens_to_ids("<|assistant_end|>")
    messages = [{"role": "system", "content": args.system}] if args.system else []
    print(f"chatting with {args.model} ({model.poe_n_stages} stages); empty line or Ctrl-D to quit",
          file=sys.stderr)
    while True:
        try:
            line = input("you> ").strip()
        except EOFError:
            break
        if not line:
            break
        messages.append({"role": "user", "content": line})
        ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True, return_dict=False)
        reply = []

        def stream(row, token, reply=reply):
            if token != end:
                reply.append(token)
                print(tok.decode([token]), end="", flush=True)

        print("assistant> ", end="", flush=True)
        model.generate_stage([ids], stage=model.poe_n_stages - 1, max_new_tokens=args.max_new_tokens,
                             do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-6),
                             top_k=args.top_k, seed=args.seed, stop_tokens=[end, tok.bos_token_id], streamer=stream,
                             max_length=model.config.sequence_len * 10)
        print()
        messages.append({"role": "assistant", "content": tok.decode(reply)})


def cmd_eval_bpb(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .eval.bpb import evaluate_bpb
    from .tokenizer import CognicaPoETokenizer
    from .train import Corpus, token_stream

    model = load_model(args.model, dtype=args.dtype)
    tok = CognicaPoETokenizer.from_pretrained(args.model)
    stream = token_stream(Corpus(args.data), tok, args.split, max_tokens=args.max_tokens)
    combos, weights = [], []
    for spec in args.compose or []:  # "0,3" (weights 1) or "0:0.5,3:0.5"
        items = [item.split(":") for item in spec.split(",")]
        if any(len(it) > 2 for it in items):
            raise ValueError(f"--compose {spec!r}: write exits as I or I:WEIGHT, comma-separated")
        combos.append([int(it[0]) for it in items])
        weights.append([float(it[1]) if len(it) == 2 else 1.0 for it in items])
    r = evaluate_bpb(model.gpt, stream, tok.token_bytes(), seq_len=args.seq_len, batch_size=args.batch_size,
                     compositions=combos, composition_weights=weights)
    r["tokens"] = len(stream)
    if args.json:
        print(json.dumps(r))
        return
    for s, b in enumerate(r["stages"]):
        print(f"stage {s} exit (layer {model.poe_stage_boundary_layers[s]:>2}): {b:.6f} bits/byte")
    for name, b in r["compositions"].items():
        print(f"Log-OP of stages {name}: {b:.6f} bits/byte")
    print(f"({len(stream):,} tokens of the {args.split} split of {args.data or 'the bundled corpus'})")


def cmd_eval_core(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .eval.core import evaluate_core
    from .tokenizer import CognicaPoETokenizer

    model = load_model(args.model, dtype=args.dtype)
    tok = CognicaPoETokenizer.from_pretrained(args.model)
    r = evaluate_core(model, tok, args.tasks, max_per_task=args.max_per_task)
    if args.json:
        print(json.dumps(r))
        return
    stages = r["stages"]
    print(f"{'task':<32}" + "".join(f"{'stage ' + str(s):>10}" for s in stages) + "   (centered accuracy)")
    for label, t in r["tasks"].items():
        print(f"{label:<32}" + "".join(f"{c:>10.4f}" for c in t["centered"]) + f"   n={t['n']}")
    print(f"{'CORE':<32}" + "".join(f"{c:>10.4f}" for c in r["core"]))


def report_settings(args: argparse.Namespace):
    from .eval.report import ReportSettings

    return ReportSettings(eval_tokens=args.eval_tokens, new_tokens=args.new_tokens, runs=args.runs,
                          n_prompts=args.n_prompts, draft_stages=tuple(args.draft_stages))


def print_report(r: dict, files: dict[str, str]) -> None:
    from .eval.report import speed_table

    print(f"\n{r['capability_table']}\n\n{speed_table(r)}\n")
    print(f"machine: {r['machine']['cpu']}, {r['machine']['threads']} threads; wrote " + ", ".join(files.values()))


def cmd_report(args: argparse.Namespace) -> None:
    from .checkpoint import load_model
    from .eval.report import build_report, write_report
    from .tokenizer import CognicaPoETokenizer

    model = load_model(args.model, dtype=args.dtype, pack=not args.no_pack)
    tok = CognicaPoETokenizer.from_pretrained(args.model)
    prompts = None
    if args.prompts:
        with open(args.prompts, encoding="utf-8") as f:
            prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
    baseline = base_tok = None
    if args.baseline:
        baseline = load_model(args.baseline, dtype=args.dtype, pack=not args.no_pack)
        base_tok = CognicaPoETokenizer.from_pretrained(args.baseline)
    name = os.path.basename(os.path.normpath(args.model))
    r = build_report(model, tok, args.data, prompts, baseline, base_tok, report_settings(args), name=name,
                     progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    # not inside the model folder by default: it may be read-only (a hub cache snapshot)
    files = write_report(r, args.out or os.path.join("reports", name), plots=not args.no_plots)
    if args.json:
        print(json.dumps(r))
        return
    print_report(r, files)


def cmd_demo(args: argparse.Namespace) -> None:
    """
    Train the tiny default PoE model on the bundled corpus, load it back through transformers, measure its
    capability report, show every mode.
    """
    import tempfile

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from .eval.report import build_report, write_report
    from .train import TrainConfig, train

    out = args.out or tempfile.mkdtemp(prefix="cognica-poe-demo-")
    print(f"training the default PoE model (4 stages of 1 layer) on bundled Tiny Shakespeare for {args.steps} "
          f"steps -> {out}", flush=True)
    summary = train(TrainConfig(out_dir=out, num_steps=args.steps, eval_every=max(args.steps // 4, 1),
                                progress=not args.quiet, seed=args.seed))
    print("validation bits per byte by stage exit: "
          + ", ".join(f"stage {s}: {b:.4f}" for s, b in enumerate(summary["stage_bpb"])))
    folder = summary["hf_dir"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    if not args.no_pack:
        model.pack_weights()
    tok = AutoTokenizer.from_pretrained(folder)
    print(f"exported {folder} ({', '.join(sorted(os.listdir(folder)))}) and loaded it back with "
          f"AutoModelForCausalLM: {model.num_parameters():,} parameters, {model.poe_n_stages} stages ending at "
          f"layers {model.poe_stage_boundary_layers}")
    print("capability report (held-out Tiny Shakespeare):", flush=True)
    report = build_report(model, tok, None, settings=report_settings(args), name="cognica-poe demo",
                          progress=lambda msg: print(f"  {msg}", flush=True))
    print_report(report, write_report(report, os.path.join(out, "report")))
    ids = torch.tensor([[tok.bos_token_id] + tok("ROMEO:\n")["input_ids"]])
    n = args.sample_tokens
    samples = {f"stage {s} (prefix pruning)": model.generate_stage(ids, stage=s, max_new_tokens=n, stop_tokens=[])
               for s in range(model.poe_n_stages)}
    samples["full depth, transformers generate()"] = model.generate(ids, max_new_tokens=n, min_new_tokens=n,
                                                                    do_sample=False)
    bounds = report["wand"]["p99_bounds"]  # calibrated by the report on held-out text
    out_w, used = model.generate_wand(ids, max_new_tokens=n, safety=1.0, p99_bounds=bounds, return_stages_used=True,
                                      stop_tokens=[])
    samples[f"WAND, safety 1, calibrated bounds {bounds} (exit stages {used[0].tolist()})"] = out_w
    out_s, acc = model.generate_speculative(ids, max_new_tokens=n, draft_stage=0, k_draft=3, stop_tokens=[],
                                            return_acceptance=True)
    samples[f"speculative, stage 0 drafts K=3 (acceptance {acc:.2f})"] = out_s
    samples["Log-OP of all stages"] = model.generate_parallel_composition(
        ids, stages=list(range(model.poe_n_stages)), max_new_tokens=n, stop_tokens=[])
    samples["sampled, temperature 0.8, top-k 50"] = model.generate_stage(
        ids, stage=model.poe_n_stages - 1, max_new_tokens=n, do_sample=True, temperature=0.8, top_k=50, seed=0,
        stop_tokens=[])
    for name, seq in samples.items():
        print(f"--- {name}\n{tok.decode(seq[0, ids.size(1):])!r}")


def exit_arg(text: str) -> int | str:
    """An exit on the command line: an index (0-based, negative from the end) or a sibling's name."""
    return int(text) if text.lstrip("-").isdigit() else text


def add_pack_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-pack", action="store_true", help="keep plain weights only (packing adds a prepacked copy of "
                                                          "each large matrix for faster CPU decoding)")


def add_report_args(p: argparse.ArgumentParser) -> None:
    add_pack_arg(p)
    p.add_argument("--runs", type=int, default=3, help="timed runs per speed figure (the median is reported)")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens per prompt in the speed runs")
    p.add_argument("--n-prompts", type=int, default=4)
    p.add_argument("--eval-tokens", type=int, default=65_536, help="held-out tokens for the quality pass")
    p.add_argument("--draft-stages", type=int, nargs="+", default=[0], help="speculative drafter exits")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="cognica-poe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("info", help="parameters, stages, boundaries and memory of a model folder or preset")
    p.add_argument("model", help=f"an HF folder or a preset: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("convert", help="nanochat checkpoint folder -> HF folder")
    p.add_argument("src", nargs="?", help="nanochat checkpoint folder (model_*.pt, meta_*.json, tokenizer/)")
    p.add_argument("out", nargs="?", help="output HF folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", default="bfloat16", help="weights dtype in model.safetensors (default bfloat16)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading a legacy tokenizer.pkl (unpickling runs code: only for files you trust)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--refresh-code", metavar="DIR", help="replace DIR's remote-code .py files with this package's")
    p.set_defaults(func=cmd_convert)

    p = sub.add_parser("generate", help="generate text from a model folder with any inference mode")
    p.add_argument("model")
    p.add_argument("prompt", help="text; BOS is prepended")
    p.add_argument("--mode", choices=["full", "stage", "wand", "speculative", "compose"], default="full")
    p.add_argument("--stage", type=exit_arg, default=0, help="stage mode: the exit to decode from (0-based)")
    p.add_argument("--safety", type=float, default=1.0, help="wand: safety factor on the bounds")
    p.add_argument("--p99-bounds", type=float, nargs="+", default=None, help="wand: bounds (default: config/card)")
    p.add_argument("--draft-stage", type=int, default=0, help="speculative: the drafting exit")
    p.add_argument("--k-draft", type=int, default=3, help="speculative: drafts per iteration")
    p.add_argument("--stages", type=exit_arg, nargs="+", default=None, help="compose: the exits to combine")
    p.add_argument("--siblings", nargs="+", default=None,
                   help="stage folders branching from MODEL, loaded on one shared trunk (modes stage and compose); "
                        "exits: MODEL's, then one per sibling, also named by folder name")
    p.add_argument("--stage-weights", type=float, nargs="+", default=None, help="compose: their weights")
    p.add_argument("--stop", type=int, nargs="*", default=None, help="stop token ids (default: the config's eos)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", default=None, help="compute dtype (default: the folder's)")
    add_backend_arg(p)
    add_pack_arg(p)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("stage", help="specialist stages: `stage new BASE --new-layers N --out DIR`")
    stage_sub = p.add_subparsers(dest="stage_command", required=True)
    q = stage_sub.add_parser("new", help="append N new layers and a zero lm_head_stage to a frozen base")
    q.add_argument("base", help="the parent: an HF model folder or another stage folder")
    q.add_argument("--new-layers", type=int, required=True)
    q.add_argument("--out", required=True)
    q.add_argument("--head-mode", choices=["dual", "base", "spec"], default="dual")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--dtype", default=None, help="delta dtype (default: the base's, which keeps its wte rows exact)")
    q.add_argument("--overwrite", action="store_true")
    q.set_defaults(func=cmd_stage_new)

    p = sub.add_parser("sft", help="dual-head SFT of a specialist stage on conversations (the base stays frozen); "
                       "MODEL is a base folder (new layers are appended) or a stage folder, DATA a JSONL of "
                       "{messages: [...]} or ShareGPT {conversations: [...]}")
    add_dataclass_args(p, SFTConfig)
    p.set_defaults(func=cmd_sft)

    p = sub.add_parser("chat", help="chat with a model in the terminal (replies stream)")
    p.add_argument("model")
    p.add_argument("--system", default=None, help="a system message")
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.6, help="0 = greedy (nanochat's chat default is 0.6)")
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--dtype", default=None)
    add_pack_arg(p)
    add_backend_arg(p)
    p.set_defaults(func=cmd_chat)

    p = sub.add_parser("eval", help="evaluation: `eval core MODEL TASKS_DIR`")
    eval_sub = p.add_subparsers(dest="eval_command", required=True)
    q = eval_sub.add_parser("bpb", help="bits per byte of every exit and of Log-OP compositions")
    q.add_argument("model")
    q.add_argument("data", nargs="?", default=None, help="text / JSONL / parquet file or folder (default: bundled)")
    q.add_argument("--split", choices=["val", "train"], default="val")
    q.add_argument("--max-tokens", type=int, default=262_144)
    q.add_argument("--seq-len", type=int, default=None)
    q.add_argument("--batch-size", type=int, default=8)
    q.add_argument("--compose", nargs="*", default=None, metavar="I,J,...",
                   help="Log-OP exit subsets, e.g. 0,3 0,1,2,3; weights as I:W, e.g. 0:0.5,3:0.5 (default 1)")
    q.add_argument("--dtype", default=None)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_eval_bpb)

    q = eval_sub.add_parser("core", help="CORE-style tasks (nanochat's eval_bundle layout) scored at every exit")
    q.add_argument("model")
    q.add_argument("tasks", help="a folder with core.yaml, eval_meta_data.csv and eval_data/")
    q.add_argument("--max-per-task", type=int, default=-1, help="items per task (-1: all)")
    q.add_argument("--dtype", default=None)
    q.add_argument("--json", action="store_true")
    q.set_defaults(func=cmd_eval_core)

    p = sub.add_parser("calibrate", help="compute WAND p99 bounds on a text file and store them in config.json")
    p.add_argument("model", help="an HF model folder (its config.json is updated)")
    p.add_argument("data", help="a UTF-8 text file (documents separated by blank lines)")
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--seq-len", type=int, default=None, help="window length (default: the model's sequence_len)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("demo", help="train the tiny default on the bundled corpus and show every mode")
    p.add_argument("--out", default=None, help="the run folder (default: a temp folder)")
    p.add_argument("--steps", type=int, default=300, help="training steps (about a second each on 2 CPU cores)")
    p.add_argument("--sample-tokens", type=int, default=48, help="tokens of each mode's sample")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_report_args(p)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("report", help="the capability report of a checkpoint: per-stage quality, every mode's "
                                      "speed, report.json + PNG plots")
    p.add_argument("model", help="an HF folder (our export or a converted checkpoint)")
    p.add_argument("--data", default=None, help="held-out text source: its validation split is used (a .txt, "
                                                "a .jsonl / .parquet with a `text` field, a folder; default: the "
                                                "bundled corpus)")
    p.add_argument("--prompts", default=None, help="prompt file, one prompt per line (\\n for newlines); "
                                                   "default: the starts of held-out documents")
    p.add_argument("--baseline", default=None, help="a backprop model folder: adds the PoE-vs-BP BPB gap")
    p.add_argument("--out", default=None, help="output folder (default: ./reports/<model folder name>)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    p.add_argument("--no-plots", action="store_true")
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    add_report_args(p)
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("train", help="train a PoE model from scratch (torchrun for several processes)")
    add_train_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("tokenizer", help="`tokenizer train`: a BPE tokenizer from a corpus")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True)
    q = tok_sub.add_parser("train", help="train a BPE tokenizer (nanochat's split regex and specials)")
    add_tokenizer_train_args(q)
    q.set_defaults(func=cmd_tokenizer_train)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"cognica-poe {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

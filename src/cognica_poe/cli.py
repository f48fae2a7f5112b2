"""
The `cognica-poe` command line.

    cognica-poe info PATH_OR_PRESET            parameters, stages, boundaries, windows, memory
    cognica-poe convert NANOCHAT_DIR OUT_DIR   nanochat checkpoint -> HF folder (bf16 safetensors by default)
    cognica-poe convert --refresh-code DIR     replace a released folder's .py files with this package's
    cognica-poe quantize MODEL OUT --bits 8|4  a weight-only int8 / int4 folder (loads back as saved)
    cognica-poe generate MODEL "prompt" --mode full|stage|wand|speculative|compose
    cognica-poe calibrate MODEL TEXT           WAND p99 bounds for a checkpoint, stored in its config
    cognica-poe eval bpb MODEL [DATA]          bits per byte per exit and for Log-OP compositions
    cognica-poe eval core MODEL TASKS_DIR      CORE-style tasks, per stage exit
    cognica-poe stage new BASE --new-layers N --out DIR   a specialist stage on a frozen base
    cognica-poe sft MODEL CONVERSATIONS.jsonl  dual-head SFT of a specialist (base frozen)
    cognica-poe chat MODEL                     interactive chat
    cognica-poe serve MODEL [--siblings ...]   OpenAI-compatible server (127.0.0.1:8000), every PoE mode per request
    cognica-poe report MODEL                   capability report: per-stage quality, every mode's speed, plots
    cognica-poe demo                           train the tiny default on the bundled corpus, show every mode
    cognica-poe train [--data PATH] ...        train a PoE model from scratch (flat | hier | none)
    cognica-poe tokenizer train --out DIR      a BPE tokenizer from a corpus

`cognica-poe COMMAND --help` lists a command's flags with their defaults; `--threads N` sets torch's CPU threads
for the commands that compute (default: the physical cores). Errors from bad input are printed as one clear line
and exit with status 2; nothing is written.
"""

import argparse
import dataclasses
import json
import os
import shutil
import sys
import typing

from . import __version__
from .folders import check_model_folder, is_folder_name
from .presets import PRESETS
from .train.config import AUTOCAST_CHOICES, SFTConfig, TrainConfig

# torch and transformers are imported inside the commands, so `--help` and `--version` answer at once
DEMO_MARK = ".cognica-poe-demo"  # marks a folder the demo created, which a later demo may replace
SIBLINGS_MAP_HELP = ('JSON \'{"trunk": "cuda:0", "<sibling>": "cuda:1", ...}\': the shared trunk on one device, each '
                     "named sibling (its folder's name) on its own, run concurrently after the trunk; unnamed "
                     "siblings stay with the trunk")


# -----------------------------------------------------------------------------
# input checks shared by the commands (before anything slow runs)

def need_file(path: str, what: str) -> str:
    """`path` if it is a readable file, else one clear error naming it."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if not os.path.isfile(path):
        raise ValueError(f"{what} {path} is not a file")
    return path


def load_folder(path: str, dtype: str | None = None, pack: bool | str = False, quantize: dict | None = None,
                device_map=None, compile: bool | str | None = False):
    """(model, tokenizer) of an HF model folder (or a quantized one), checked before the weights load: its
    config.json, and a tokenizer whose vocabulary is the model's. quantize: load_model's quantization keywords;
    device_map: the stages' devices (placement.py); compile: compiled decode."""
    from .checkpoint import load_model, read_config

    quiet_loading()
    tok = load_tokenizer(path, read_config(path))
    return load_model(path, dtype=dtype, pack=pack, device_map=device_map, compile=compile, **(quantize or {})), tok


def quantize_options(args: argparse.Namespace) -> dict:
    """load_model's quantization keywords from --quantize, --group-size and --no-quantize-heads."""
    return dict(quantize=args.quantize, group_size=args.group_size, quantize_heads=not args.no_quantize_heads)


def quiet_loading() -> None:
    """No "Loading weights" bars from transformers: an error after loading stays one line on stderr."""
    from transformers.utils import logging

    logging.disable_progress_bar()


def load_tokenizer(path: str, config):
    """The folder's tokenizer, refused when its vocabulary is not the model's (another model's files)."""
    from .tokenizer import CognicaPoETokenizer

    tok = CognicaPoETokenizer.from_pretrained(path)
    if len(tok) != config.vocab_size:
        raise ValueError(f"{path}: the tokenizer has {len(tok)} ids but the model's vocab_size is "
                         f"{config.vocab_size}; the folder's tokenizer files belong to another model (restore them "
                         "from the model's own folder)")
    return tok


def check_corpus(data: str | None) -> None:
    """Read a corpus's file list and count its documents now, so a bad file fails before a model loads."""
    from .train.data import Corpus

    Corpus(data)


def _human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{n} B"
        n /= 1024
    return f"{n:.1f} GiB"


def cmd_info(args: argparse.Namespace) -> None:
    folder = is_folder_name(args.model)
    if folder:
        check_model_folder(args.model)  # before torch loads: a wrong path answers at once
    import torch

    from .checkpoint import model_summary, read_config
    from .config import preset_config
    from .model import GPT

    config = read_config(args.model) if folder else preset_config(args.model)
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
    from .checkpoint import refresh_code
    from .nanochat import convert_nanochat

    if args.refresh_code:
        files = refresh_code(args.refresh_code)
        print(f"refreshed {args.refresh_code}: {', '.join(files)}")
        return
    if not args.src or not args.out:
        raise ValueError("convert needs NANOCHAT_DIR and OUT_DIR (or --refresh-code DIR)")
    out = convert_nanochat(args.src, args.out, dtype=args.dtype, allow_pickle=args.allow_pickle, step=args.step,
                           overwrite=args.overwrite, tokenizer=args.tokenizer)
    print(f"wrote {out}")


def cmd_quantize(args: argparse.Namespace) -> None:
    """Quantize a model folder's block matrices (and heads) to int8 / int4 and save a quantized folder."""
    check_model_folder(args.model)
    from .checkpoint import is_quantized_folder, save_quantized

    if is_quantized_folder(args.model):
        raise ValueError(f"{args.model} is already quantized: quantize its float folder")
    opts = dict(quantize=f"int{args.bits}", group_size=args.group_size, quantize_heads=not args.no_quantize_heads)
    if args.calibration is None:
        model, tok = load_folder(args.model, dtype=args.dtype, quantize=opts)
    else:  # GPTQ: the float model reads the text first
        import torch

        from .quantize import quantize_model

        if args.bits != 4:
            raise ValueError("--calibration applies to --bits 4 (int8's per-channel rounding needs none): drop it")
        model, tok = load_folder(args.model, dtype=args.dtype)
        ids = text_tokens(args.calibration, tok, args.calibration_tokens)[:args.calibration_tokens]
        seq = min(256, model.config.sequence_len)
        if len(ids) < seq:
            raise ValueError(f"{args.calibration} holds {len(ids)} tokens; calibration needs at least {seq}: pass "
                             "more text")
        calibration = torch.tensor(ids[: len(ids) // seq * seq]).view(-1, seq)
        quantize_model(model.gpt, 4, args.group_size, not args.no_quantize_heads, calibration=calibration)
    out = save_quantized(model, tok, args.out, overwrite=args.overwrite, sources=(args.model,))
    print(f"wrote {out}: int{args.bits} weights" + (f" in groups of {args.group_size}" if args.bits == 4 else ""))


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
        flag = next((f for f, on in (("--quantize", args.quantize), ("--device-map", args.device_map),
                                     ("--compile", args.compile)) if on), None)
        if flag:
            raise ValueError(f"{flag} runs on the torch backend (leave out --backend mlx)")
        return mlx_backend().generate(args)
    check_model_folder(args.model)
    import time

    import torch

    from .checkpoint import read_config

    placement = None
    if args.siblings:  # stage folders that branch from MODEL, on one shared trunk
        from .branches import load_siblings
        from .checkpoint import parse_dtype
        from .cpu import apply_packing

        if args.mode not in ("stage", "compose"):
            raise ValueError("--siblings works with --mode stage or --mode compose")
        flag = next((f for f, on in (("--quantize", args.quantize), ("--compile", args.compile)) if on), None)
        if flag:
            raise ValueError(f"{flag} works on one model folder, not with --siblings")
        tok = load_tokenizer(args.model, read_config(args.model))
        for folder in args.siblings:
            read_config(folder)
        model = load_siblings(args.model, args.siblings, dtype=parse_dtype(args.dtype) if args.dtype else None,
                              device_map=args.device_map)
        apply_packing(model, args.pack, like=model.base)
        n_exits = model.n_exits
    else:
        ranks = args.device_map == "ranks"  # under torchrun: one contiguous stage range per process
        model, tok = load_folder(args.model, dtype=args.dtype, pack=args.pack, quantize=quantize_options(args),
                                 device_map=None if ranks else args.device_map, compile=args.compile)
        n_exits = model.poe_n_stages
        if ranks:
            from .placement import distribute_stages

            placement = distribute_stages(model.gpt)
            if placement.rank != 0:  # the others run their stages for rank 0, which decodes and prints
                placement.serve(model.gpt)
                return
    ids = torch.tensor([[tok.bos_token_id] + tok(args.prompt, split_special_tokens=True)["input_ids"]])  # all text
    sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature if args.temperature > 0 else 1.0,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens,
                    stop_tokens=args.stop if args.stop is not None else None, max_length=args.max_length)
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
        extra = f"exit stages: {used}"
    elif args.mode == "speculative":
        out, acc = model.generate_speculative(ids, draft_stage=args.draft_stage, k_draft=args.k_draft,
                                              return_acceptance=True, streamer=stream, **sampling)
        extra = f"acceptance: {acc:.3f}"
    else:
        out = model.generate_parallel_composition(ids, stages=args.stages or list(range(n_exits)),
                                                  stage_weights=args.stage_weights, streamer=stream, **sampling)
    elapsed = time.perf_counter() - t0
    if placement is not None:  # release the other ranks
        placement.stop()
    n = out.size(1) - ids.size(1)
    if args.stream:
        print()
    else:
        print(tok.decode(out[0, ids.size(1):]))
    print(f"[{args.mode}: {n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tok/s{'; ' + extra if extra else ''}]",
          file=sys.stderr)


def text_tokens(path: str, tok, max_tokens: int) -> list[int]:
    """[BOS] + tokens of each document (blank-line separated) of a UTF-8 text file, until at least max_tokens."""
    try:
        with open(path, encoding="utf-8") as f:
            docs = [d.strip() for d in f.read().split("\n\n") if d.strip()]
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}): pass a text file") from None
    stream = []
    for doc in docs:
        stream += [tok.bos_token_id] + tok.encoding.encode_ordinary(doc)
        if len(stream) >= max_tokens:
            break
    return stream


def cmd_calibrate(args: argparse.Namespace) -> None:
    """p99 WAND bounds from a text file, stored in the model folder's config.json: only that field changes (the
    folder's dtype and every other field stay), and the file is replaced atomically."""
    check_model_folder(args.model)
    import torch
    from tqdm.auto import tqdm

    from .atomic import write_json
    from .wand import calibrate_wand_bounds

    model, tok = load_folder(args.model, dtype="float32")  # computed in float32; the folder keeps its own dtype
    stream = text_tokens(args.data, tok, args.max_tokens)
    with tqdm(desc="calibrate", unit=" windows") as bar:
        def progress(done: int, total: int) -> None:
            bar.total = total
            bar.update(done - bar.n)

        bounds = calibrate_wand_bounds(model.gpt, torch.tensor(stream[:args.max_tokens]), seq_len=args.seq_len,
                                       progress=progress)
    config_path = os.path.join(args.model, "config.json")
    with open(config_path, encoding="utf-8") as f:
        config = json.load(f)
    config["wand_p99_bounds"] = bounds
    write_json(config_path, config)
    print(f"wand_p99_bounds = {bounds} (from {min(len(stream), args.max_tokens):,} tokens), saved to {config_path}")


def cmd_stage_new(args: argparse.Namespace) -> None:
    check_model_folder(args.base)
    from .checkpoint import new_stage_folder, read_config

    read_config(args.base)
    quiet_loading()
    out = new_stage_folder(args.base, args.out, args.new_layers, head_mode=args.head_mode, seed=args.seed,
                           dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}: {args.new_layers} new layers on {args.base} (identity at start, lm_head_stage zero)")


def cmd_sft(args: argparse.Namespace) -> None:
    check_model_folder(args.model)
    from .checkpoint import read_config
    from .train.sft import read_conversations, sft

    load_tokenizer(args.model, read_config(args.model))
    read_conversations(need_file(args.data, "conversations file"))  # a bad line fails before the model loads
    quiet_loading()
    print(json.dumps(sft(dataclass_from_args(SFTConfig, args))))


def cmd_chat(args: argparse.Namespace) -> None:
    """An interactive terminal chat: the conversation is rendered with the chat tokens; replies stream."""
    if args.backend == "mlx":
        if args.quantize:
            raise ValueError("--quantize runs on the torch backend (leave out --backend mlx)")
        return mlx_backend().chat(args)
    check_model_folder(args.model)
    model, tok = load_folder(args.model, dtype=args.dtype, pack=args.pack, quantize=quantize_options(args))
    max_length = args.max_length or model.config.rotary_seq_len
    if max_length > model.config.rotary_seq_len:
        raise ValueError(f"--max-length {max_length} exceeds {model.config.rotary_multiplier} x sequence_len "
                         f"({model.config.rotary_seq_len}), the rotary tables' reach")
    from .chat import chat_loop

    def generate(ids, streamer, stop_tokens):
        model.generate_stage([ids], stage=model.poe_n_stages - 1, max_new_tokens=args.max_new_tokens,
                             do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-6),
                             top_k=args.top_k, seed=args.seed, stop_tokens=stop_tokens, streamer=streamer,
                             max_length=max_length)

    chat_loop(tok, generate, f"chatting with {args.model} ({model.poe_n_stages} stages)", args.system)


def cmd_eval_bpb(args: argparse.Namespace) -> None:
    check_model_folder(args.model)
    from .bpb import evaluate_bpb
    from .train.data import Corpus, token_stream

    corpus = Corpus(args.data)  # a bad corpus fails before the model loads
    model, tok = load_folder(args.model, dtype=args.dtype, quantize=quantize_options(args))
    combos, weights = [], []
    for spec in args.compose or []:  # "0,3" (weights 1) or "0:0.5,3:0.5"
        items = [item.split(":") for item in spec.split(",")]
        try:
            if any(len(it) > 2 for it in items):
                raise ValueError
            combos.append([int(it[0]) for it in items])
            weights.append([float(it[1]) if len(it) == 2 else 1.0 for it in items])
        except ValueError:
            raise ValueError(f"--compose {spec!r}: write exits as I or I:WEIGHT, comma-separated, e.g. 0,3 or "
                             "0:0.5,3:0.5") from None
    stream = token_stream(corpus, tok, args.split, max_tokens=args.max_tokens)
    window = (args.seq_len or model.config.sequence_len) + 1
    if len(stream) <= window:
        raise ValueError(f"the {args.split} split of {args.data or 'the bundled corpus'} gave {len(stream)} tokens, "
                         f"fewer than one window of {window}: pass more data, a larger --max-tokens or a smaller "
                         "--seq-len")
    if args.data is None:
        print(f"cognica-poe eval: note: no DATA given: scoring the {args.split} split of the bundled Tiny Shakespeare, "
              "held out by `cognica-poe train`/`demo` runs on it but possibly seen by a model trained elsewhere; "
              "pass DATA (held-out text of your own) for a clean number", file=sys.stderr)
    r = evaluate_bpb(model.gpt, stream, tok.token_bytes(), seq_len=args.seq_len, batch_size=args.batch_size,
                     compositions=combos, composition_weights=weights, progress=True)
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
    check_model_folder(args.model)
    from .eval.core import evaluate_core

    if not os.path.isfile(os.path.join(args.tasks, "core.yaml")):
        raise FileNotFoundError(f"{args.tasks} has no core.yaml: give nanochat's eval_bundle folder (core.yaml, "
                                "eval_meta_data.csv, eval_data/)")
    model, tok = load_folder(args.model, dtype=args.dtype, quantize=quantize_options(args))
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
    check_model_folder(args.model)
    from .checkpoint import read_config
    from .eval.report import build_report, write_report
    from .extras import require

    # everything that can be wrong with the inputs fails here, before minutes of measurement
    if not args.no_plots:
        require("matplotlib", "plots", "the report's plots", "pass --no-plots")
    for folder in [args.model] + ([args.baseline] if args.baseline else []):
        read_config(folder)
    check_corpus(args.data)
    prompts = None
    if args.prompts:
        with open(need_file(args.prompts, "--prompts file"), encoding="utf-8") as f:
            try:
                prompts = [line.rstrip("\n").replace("\\n", "\n") for line in f if line.strip()]
            except UnicodeDecodeError as e:
                raise ValueError(f"--prompts file {args.prompts} is not UTF-8 text ({e.reason})") from None
    model, tok = load_folder(args.model, dtype=args.dtype, pack=args.pack, quantize=quantize_options(args),
                             compile=args.compile)
    baseline = base_tok = None
    if args.baseline:
        baseline, base_tok = load_folder(args.baseline, dtype=args.dtype, pack=args.pack)
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
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from . import register_auto_classes
    from .cpu import apply_packing
    from .eval.report import build_report, write_report
    from .extras import require
    from .train.loop import train

    try:
        require("matplotlib", "plots", "the demo's report plots")
        plots = True
    except ModuleNotFoundError as e:
        print(f"note: {e}; the report is written without plots", flush=True)
        plots = False
    out = prepare_demo_folder(args.out)
    register_auto_classes()  # the demo loads its export back through AutoModelForCausalLM
    print(f"training the default PoE model (4 stages of 1 layer) on bundled Tiny Shakespeare for {args.steps} "
          f"steps -> {out}", flush=True)
    summary = train(TrainConfig(out_dir=out, num_steps=args.steps, eval_every=max(args.steps // 4, 1),
                                progress=not args.quiet, seed=args.seed))
    print("validation bits per byte by stage exit: "
          + ", ".join(f"stage {s}: {b:.4f}" for s, b in enumerate(summary["stage_bpb"])))
    folder = summary["hf_dir"]
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    apply_packing(model, args.pack)
    tok = AutoTokenizer.from_pretrained(folder)
    print(f"exported {folder} ({', '.join(sorted(os.listdir(folder)))}) and loaded it back with "
          f"AutoModelForCausalLM: {model.num_parameters():,} parameters, {model.poe_n_stages} stages ending at "
          f"layers {model.poe_stage_boundary_layers}")
    print("capability report (held-out Tiny Shakespeare):", flush=True)
    report = build_report(model, tok, None, settings=report_settings(args), name="cognica-poe demo",
                          progress=lambda msg: print(f"  {msg}", flush=True))
    print_report(report, write_report(report, os.path.join(out, "report"), plots=plots))
    ids = torch.tensor([[tok.bos_token_id] + tok("ROMEO:\n")["input_ids"]])
    n = args.sample_tokens
    samples = {f"stage {s} (prefix pruning)": model.generate_stage(ids, stage=s, max_new_tokens=n, stop_tokens=[])
               for s in range(model.poe_n_stages)}
    samples["full depth, transformers generate()"] = model.generate(ids, max_new_tokens=n, min_new_tokens=n,
                                                                    do_sample=False)
    bounds = report["wand"]["p99_bounds"]  # calibrated by the report on held-out text
    out_w, used = model.generate_wand(ids, max_new_tokens=n, safety=1.0, p99_bounds=bounds, return_stages_used=True,
                                      stop_tokens=[])
    samples[f"WAND, safety 1, calibrated bounds {bounds} (exit stages {used})"] = out_w
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


def prepare_demo_folder(out: str) -> str:
    """
    The demo's run folder, ready to write: made and marked as the demo's; an earlier demo's (marked) folder is
    replaced, an empty one used, and any other existing path refused: the demo deletes only what a demo made.
    """
    if os.path.exists(out):
        if not os.path.isdir(out):
            raise FileExistsError(f"{out} is a file: pass --out DIR, a folder for the demo's run")
        entries = os.listdir(out)
        if entries and DEMO_MARK not in entries:
            raise FileExistsError(f"{out} exists and is not an earlier demo's run folder: pass --out DIR (a new "
                                  "folder), or remove it")
        if entries:
            shutil.rmtree(out)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, DEMO_MARK), "w") as f:
        f.write("written by `cognica-poe demo`: a later demo may replace this folder\n")
    return out


# -----------------------------------------------------------------------------
# `cognica-poe train`, `cognica-poe tokenizer train` (the training code is imported inside the commands)

def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, choices: dict | None = None) -> None:
    """One argument per field of a config dataclass, its help text from the field's metadata: fields without a
    default are positional, the others flags (--num-steps, ...; booleans as --x/--no-x) with the defaults."""
    for f in dataclasses.fields(cls):
        kinds = [t for t in (typing.get_args(f.type) or (f.type,)) if t is not type(None)]  # int | None -> int
        help_text = f.metadata["help"]
        if f.default is dataclasses.MISSING:
            parser.add_argument(f.name, type=kinds[0], help=help_text)
        elif kinds[0] is bool:
            parser.add_argument("--" + f.name.replace("_", "-"), action=argparse.BooleanOptionalAction,
                                default=f.default, help=help_text)
        else:
            parser.add_argument("--" + f.name.replace("_", "-"), type=kinds[0], default=f.default,
                                choices=(choices or {}).get(f.name), help=help_text)


def dataclass_from_args(cls: type, args: argparse.Namespace):
    return cls(**{f.name: getattr(args, f.name) for f in dataclasses.fields(cls)})


def add_train_args(parser: argparse.ArgumentParser) -> None:
    """One flag per TrainConfig field (--num-steps, --poe-mode, --resume, ...), defaults from TrainConfig."""
    add_dataclass_args(parser, TrainConfig, choices={"poe_mode": ("flat", "hier", "none"),
                                                     "autocast": AUTOCAST_CHOICES})


def cmd_train(args: argparse.Namespace) -> dict:
    from .train.loop import train

    if args.tokenizer is not None and not os.path.isdir(args.tokenizer):
        raise FileNotFoundError(f"--tokenizer {args.tokenizer}: no such folder (give a tokenizer folder, or leave "
                                "it out to train one on the corpus)")
    check_corpus(args.data)  # a bad corpus fails before the run folder is made
    summary = train(dataclass_from_args(TrainConfig, args))
    if summary["rank"] == 0:
        print(json.dumps({k: summary[k] for k in ("step", "poe_mode", "stage_bpb", "final_losses", "train_time_s",
                                                  "tok_per_s", "checkpoint", "hf_dir")}))
    return summary


def add_tokenizer_train_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", default=None, help="corpus (file or folder); default: the bundled tinyshakespeare")
    parser.add_argument("--vocab-size", type=positive_int, default=2048, help="ids of the tokenizer, the 9 "
                                                                              "special tokens included")
    parser.add_argument("--max-chars", type=positive_int, default=None,
                        help="stop reading the corpus after this many characters (default: all of it)")
    parser.add_argument("--out", required=True, help="output tokenizer folder (new, or empty)")


def cmd_tokenizer_train(args: argparse.Namespace) -> None:
    from .atomic import atomic_folder
    from .tokenizer_train import train_bpe
    from .train.data import iter_tokenizer_texts

    if os.path.exists(args.out) and (not os.path.isdir(args.out) or os.listdir(args.out)):
        raise FileExistsError(f"--out {args.out} exists and is not empty: pass a new folder")
    tok = train_bpe(iter_tokenizer_texts(args.data, args.max_chars), args.vocab_size)
    with atomic_folder(args.out, overwrite=True) as tmp:  # whole or not at all; only an empty folder is replaced
        tok.save_pretrained(tmp)
    print(f"tokenizer: {len(tok):,} ids (BOS = {tok.bos_token_id}) -> {args.out}")


# -----------------------------------------------------------------------------
# the parser

def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def non_negative_float(text: str) -> float:
    value = float(text)
    if not value >= 0:  # also refuses nan
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def probability(text: str) -> float:
    value = float(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must be in (0, 1], got {text}")
    return value


class Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one line on stderr (exit status 2), like every other input error."""

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Every flag's help shows its default, except None, whose meaning the help text says."""

    def _get_help_string(self, action: argparse.Action) -> str:
        return action.help if action.default is None else super()._get_help_string(action)


class TopHelpFormatter(argparse.RawDescriptionHelpFormatter, HelpFormatter):
    """The top-level help prints the module docstring's command table as written."""


def add_command(sub, name: str, help: str) -> argparse.ArgumentParser:
    return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)


def add_threads_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=positive_int, default=None,
                   help="CPU threads for torch (default: $OMP_NUM_THREADS, else the physical cores this process may "
                        "use: SMT siblings once, within its CPU affinity and cgroup quota)")


def exit_arg(text: str) -> int | str:
    """An exit on the command line: an index (0-based, negative from the end) or a sibling's name."""
    return int(text) if text.lstrip("-").isdigit() else text


def add_pack_arg(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--pack", dest="pack", action="store_const", const=True, default="auto",
                   help="always prepack the large matrices for CPU decoding (default: auto, where a short probe, "
                        "cached per CPU, dtype and threads, finds the packed product faster)")
    g.add_argument("--no-pack", dest="pack", action="store_const", const=False, help="keep plain weights only")


def add_compile_arg(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--compile", dest="compile", action="store_const", const="default", default=None,
                   help="compiled decode (torch.compile of each decode step; on CPU it needs a C++ compiler, else "
                        "it warns and decodes eagerly; the first steps of each mode compile, seconds each)")
    g.add_argument("--compile-max-autotune", dest="compile", action="store_const", const="max-autotune",
                   help="compiled decode that also autotunes its matrix products and, on CPU, freezes the weights "
                        "into the graph: the fastest with --quantize, but the first steps take minutes at d24 and "
                        "the frozen weights take a second copy of memory")


def add_quantize_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quantize", choices=["int8", "int4"], default=None,
                   help="weight-only quantization of the block matrices and heads at load (int8 per channel, int4 "
                        "in groups; CPU; default: none; a quantized folder loads as saved)")
    add_group_args(p)


def add_group_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--group-size", type=positive_int, default=128, help="int4: inputs per scale and zero")
    p.add_argument("--no-quantize-heads", action="store_true",
                   help="keep lm_head (and a specialist's heads) in the model's dtype")


def add_report_args(p: argparse.ArgumentParser) -> None:
    add_pack_arg(p)
    add_threads_arg(p)
    p.add_argument("--runs", type=positive_int, default=3, help="timed runs per speed figure (the median is reported)")
    p.add_argument("--new-tokens", type=positive_int, default=32, help="greedy tokens per prompt in the speed runs")
    p.add_argument("--n-prompts", type=positive_int, default=4, help="prompts in the speed runs")
    p.add_argument("--eval-tokens", type=positive_int, default=65_536, help="held-out tokens for the quality pass")
    p.add_argument("--draft-stages", type=int, nargs="+", default=[0], help="speculative drafter exits")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="cognica-poe", description=__doc__, formatter_class=TopHelpFormatter)
    parser.add_argument("--version", action="version", version=f"cognica-poe {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = add_command(sub, "info", "parameters, stages, boundaries and memory of a model folder or preset")
    p.add_argument("model", help=f"an HF folder or a preset: {', '.join(PRESETS)}")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=cmd_info)

    p = add_command(sub, "convert", "nanochat checkpoint folder -> HF folder")
    p.add_argument("src", nargs="?", help="nanochat checkpoint folder (model_*.pt, meta_*.json)")
    p.add_argument("out", nargs="?", help="output HF folder (must not exist unless --overwrite)")
    p.add_argument("--tokenizer", metavar="DIR", default=None,
                   help="the tokenizer's folder (tokenizer.tiktoken or tokenizer.pkl; default: where nanochat keeps "
                        "it: SRC/tokenizer, SRC, or <base_dir>/tokenizer two levels above SRC)")
    p.add_argument("--dtype", default="bfloat16", help="weights dtype in model.safetensors")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default: the last)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="allow reading a legacy tokenizer.pkl (unpickling runs code: only for files you trust)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("--refresh-code", metavar="DIR", help="replace DIR's remote-code .py files with this package's")
    p.set_defaults(func=cmd_convert)

    p = add_command(sub, "quantize", "a model folder -> a weight-only quantized folder (int8 per channel or int4 in "
                                     "groups: every block matrix, and the heads unless --no-quantize-heads)")
    p.add_argument("model", help="an HF model folder (float weights)")
    p.add_argument("out", help="the quantized folder to write (must not exist unless --overwrite)")
    p.add_argument("--bits", type=int, choices=[8, 4], default=8, help="bits per weight")
    add_group_args(p)
    p.add_argument("--dtype", default=None, help="dtype of the scales and the float tensors (default: the folder's)")
    p.add_argument("--calibration", metavar="TEXT",
                   help="int4: round by GPTQ against the inputs the model sees on this UTF-8 text (closer outputs "
                        "than plain rounding, same folder layout; text like the model's, not its evaluation text)")
    p.add_argument("--calibration-tokens", type=positive_int, default=16384, help="tokens of --calibration read")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists (only a model folder)")
    add_threads_arg(p)
    p.set_defaults(func=cmd_quantize)

    p = add_command(sub, "generate", "generate text from a model folder with any inference mode")
    p.add_argument("model", help="an HF model folder")
    p.add_argument("prompt", help="text; BOS is prepended")
    p.add_argument("--mode", choices=["full", "stage", "wand", "speculative", "compose"], default="full",
                   help="full depth, one stage's exit (prefix pruning), WAND adaptive depth, self-speculative "
                        "decoding, or a Log-OP composition of exits")
    p.add_argument("--stage", type=exit_arg, default=0, help="stage mode: the exit to decode from (0-based)")
    p.add_argument("--safety", type=non_negative_float, default=1.0, help="wand: safety factor on the bounds")
    p.add_argument("--p99-bounds", type=float, nargs="+", default=None,
                   help="wand: bounds (default: the config's calibrated ones, else the card's)")
    p.add_argument("--draft-stage", type=int, default=0, help="speculative: the drafting exit")
    p.add_argument("--k-draft", type=positive_int, default=3, help="speculative: drafts per iteration")
    p.add_argument("--stages", type=exit_arg, nargs="+", default=None,
                   help="compose: the exits to combine (default: all)")
    p.add_argument("--siblings", nargs="+", default=None,
                   help="stage folders branching from MODEL, loaded on one shared trunk (modes stage and compose); "
                        "exits: MODEL's, then one per sibling, also named by folder name")
    p.add_argument("--stage-weights", type=float, nargs="+", default=None,
                   help="compose: the exits' weights (default: 1 each)")
    p.add_argument("--stop", type=int, nargs="*", default=None, help="stop token ids (default: the config's eos)")
    p.add_argument("--stream", action="store_true", help="print tokens as they are generated")
    p.add_argument("--max-new-tokens", type=positive_int, default=64, help="tokens to generate at most")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="context limit, prompt + new tokens (default: the model's sequence_len; at most 10x it)")
    p.add_argument("--temperature", type=non_negative_float, default=0.0, help="0 = greedy")
    p.add_argument("--top-k", type=positive_int, default=None, help="sample from the k likeliest tokens (default: all)")
    p.add_argument("--top-p", type=probability, default=None,
                   help="sample from the smallest set of tokens holding this probability (default: all)")
    p.add_argument("--seed", type=int, default=0, help="sampling seed")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the folder's)")
    p.add_argument("--device-map", default=None,
                   help='the stages\' devices: JSON \'{"stage:0": "cuda:0", "stage:1": "cuda:1", ...}\' naming every '
                        'stage, "auto" (split over the GPUs by free memory; cpu without CUDA), one device, or "ranks" '
                        "(under torchrun: one contiguous stage range per process, rank 0 prints); with --siblings: "
                        + SIBLINGS_MAP_HELP)
    add_backend_arg(p)
    add_pack_arg(p)
    add_quantize_arg(p)
    add_compile_arg(p)
    add_threads_arg(p)
    p.set_defaults(func=cmd_generate)

    p = add_command(sub, "stage", "specialist stages: `stage new BASE --new-layers N --out DIR`")
    stage_sub = p.add_subparsers(dest="stage_command", required=True, metavar="COMMAND")
    q = add_command(stage_sub, "new", "append N new layers and a zero lm_head_stage to a frozen base")
    q.add_argument("base", help="the parent: an HF model folder or another stage folder")
    q.add_argument("--new-layers", type=positive_int, required=True, help="layers of the new stage")
    q.add_argument("--out", required=True, help="the stage folder to write (must not exist unless --overwrite)")
    q.add_argument("--head-mode", choices=["dual", "base", "spec"], default="dual",
                   help="the new exit's head: lm_head + lm_head_stage, the base's lm_head, or lm_head_stage alone")
    q.add_argument("--seed", type=int, default=0, help="seed of the new layers' init")
    q.add_argument("--dtype", default=None, help="delta dtype (default: the base's, which keeps its wte rows exact)")
    q.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    add_threads_arg(q)
    q.set_defaults(func=cmd_stage_new)

    p = add_command(sub, "sft", "dual-head SFT of a specialist stage on conversations (the base stays frozen); "
                    "MODEL is a base folder (new layers are appended) or a stage folder, DATA a JSONL of "
                    "{messages: [...]} or ShareGPT {conversations: [...]}")
    add_dataclass_args(p, SFTConfig)
    add_threads_arg(p)
    p.set_defaults(func=cmd_sft)

    p = add_command(sub, "chat", "chat with a model in the terminal (replies stream)")
    p.add_argument("model", help="an HF model or stage folder")
    p.add_argument("--system", default=None, help="a system message (default: none)")
    p.add_argument("--max-new-tokens", type=positive_int, default=256, help="tokens per reply at most")
    p.add_argument("--max-length", type=positive_int, default=None,
                   help="context limit of the whole conversation (default: 10x the model's sequence_len)")
    p.add_argument("--temperature", type=non_negative_float, default=0.6,
                   help="0 = greedy (nanochat's chat default is 0.6)")
    p.add_argument("--top-k", type=positive_int, default=50, help="sample from the k likeliest tokens")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: unseeded)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the folder's)")
    add_pack_arg(p)
    add_quantize_arg(p)
    add_threads_arg(p)
    add_backend_arg(p)
    p.set_defaults(func=cmd_chat)

    p = add_command(sub, "eval", "evaluation: `eval bpb MODEL [DATA]`, `eval core MODEL TASKS_DIR`")
    eval_sub = p.add_subparsers(dest="eval_command", required=True, metavar="COMMAND")
    q = add_command(eval_sub, "bpb", "bits per byte of every exit and of Log-OP compositions")
    q.add_argument("model", help="an HF model folder")
    q.add_argument("data", nargs="?", default=None,
                   help="held-out text / JSONL / parquet file or folder (default: the bundled Tiny Shakespeare, "
                        "with a note: held out only by models trained on it here)")
    q.add_argument("--split", choices=["val", "train"], default="val", help="which split of DATA to score")
    q.add_argument("--max-tokens", type=positive_int, default=262_144, help="tokens to score at most")
    q.add_argument("--seq-len", type=positive_int, default=None, help="window length (default: the model's "
                                                                      "sequence_len)")
    q.add_argument("--batch-size", type=positive_int, default=8, help="windows per forward pass")
    q.add_argument("--compose", nargs="*", default=None, metavar="I,J,...",
                   help="Log-OP exit subsets, e.g. 0,3 0,1,2,3; weights as I:W, e.g. 0:0.5,3:0.5 (default weight "
                        "1; default: no compositions)")
    q.add_argument("--dtype", default=None, help="compute dtype (default: the folder's)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    add_quantize_arg(q)
    add_threads_arg(q)
    q.set_defaults(func=cmd_eval_bpb)

    q = add_command(eval_sub, "core", "CORE-style tasks (nanochat's eval_bundle layout) scored at every exit")
    q.add_argument("model", help="an HF model folder")
    q.add_argument("tasks", help="a folder with core.yaml, eval_meta_data.csv and eval_data/")
    q.add_argument("--max-per-task", type=int, default=-1, help="items per task (-1: all)")
    q.add_argument("--dtype", default=None, help="compute dtype (default: the folder's)")
    q.add_argument("--json", action="store_true", help="print one JSON object")
    add_quantize_arg(q)
    add_threads_arg(q)
    q.set_defaults(func=cmd_eval_core)

    p = add_command(sub, "calibrate", "compute WAND p99 bounds on a text file and store them in config.json")
    p.add_argument("model", help="an HF model folder (its config.json is updated)")
    p.add_argument("data", help="a UTF-8 text file (documents separated by blank lines)")
    p.add_argument("--max-tokens", type=positive_int, default=65536, help="calibration tokens at most")
    p.add_argument("--seq-len", type=positive_int, default=None,
                   help="window length (default: the model's sequence_len)")
    add_threads_arg(p)
    p.set_defaults(func=cmd_calibrate)

    p = add_command(sub, "demo", "train the tiny default on the bundled corpus and show every mode")
    p.add_argument("--out", default=os.path.join("runs", "demo"),
                   help="the run folder (an earlier demo's run folder is replaced; any other existing one refused)")
    p.add_argument("--steps", type=positive_int, default=300,
                   help="training steps (about a second each on 2 CPU cores)")
    p.add_argument("--sample-tokens", type=positive_int, default=48, help="tokens of each mode's sample")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the data order")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    add_report_args(p)
    p.set_defaults(func=cmd_demo)

    p = add_command(sub, "report", "the capability report of a checkpoint: per-stage quality, every mode's speed, "
                                   "report.json + PNG plots")
    p.add_argument("model", help="an HF folder (our export or a converted checkpoint)")
    p.add_argument("--data", default=None, help="held-out text source: its validation split is used (a .txt, "
                                                "a .jsonl / .parquet with a `text` field, a folder; default: the "
                                                "bundled corpus)")
    p.add_argument("--prompts", default=None, help="prompt file, one prompt per line (\\n for newlines); "
                                                   "default: the starts of held-out documents")
    p.add_argument("--baseline", default=None, help="a backprop model folder: adds the PoE-vs-BP BPB gap "
                                                    "(default: none)")
    p.add_argument("--out", default=None, help="output folder (default: ./reports/<model folder name>)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: the folder's)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (they need matplotlib)")
    p.add_argument("--json", action="store_true", help="print report.json to stdout")
    add_report_args(p)
    add_quantize_arg(p)
    add_compile_arg(p)
    p.set_defaults(func=cmd_report)

    p = add_command(sub, "train", "train a PoE model from scratch (torchrun for several processes)")
    add_train_args(p)
    add_threads_arg(p)
    p.set_defaults(func=cmd_train)

    p = add_command(sub, "tokenizer", "`tokenizer train`: a BPE tokenizer from a corpus")
    tok_sub = p.add_subparsers(dest="tokenizer_command", required=True, metavar="COMMAND")
    q = add_command(tok_sub, "train", "train a BPE tokenizer (nanochat's split regex and specials)")
    add_tokenizer_train_args(q)
    q.set_defaults(func=cmd_tokenizer_train)

    def cmd_serve(args: argparse.Namespace) -> None:  # imported lazily: the web stack loads only for `serve`
        if args.replicas is not None and not args.ray:
            raise ValueError("--replicas needs --ray (one process serves one replica)")
        if args.compile and args.siblings:
            raise ValueError("--compile works on one model folder, not with --siblings")
        if args.ray and args.device_map is not None:  # a replica reserves CPUs only: it would see no GPU
            raise ValueError("--device-map places the model on this process's devices, which Ray replicas do not "
                             "reserve: leave out --ray (one server process) or --device-map")
        load_options = dict(quantize_options(args), compile=args.compile)  # load_model's keywords
        quiet_loading()  # an error found while loading (a bad --device-map) stays one line
        if args.ray:
            try:
                from .ray_serve import serve_ray
            except ImportError as e:
                raise ValueError(f"--ray needs Ray Serve ({e}): pip install 'cognica-poe[ray]'") from None
            serve_ray(args.model, args.siblings, args.host, args.port, args.api_key, args.replicas or 1,
                      args.threads or 1, dtype=args.dtype, pack=args.pack, max_batch=args.max_batch,
                      max_queue=args.max_queue, prefill_chunk=args.prefill_chunk,
                      request_timeout=args.request_timeout, max_model_len=args.max_model_len,
                      served_model_name=args.served_model_name, quantize=load_options)
            return
        from .server import serve

        serve(args.model, args.siblings, args.host, args.port, args.api_key, args.dtype, args.pack,
              args.max_batch, args.max_queue, args.prefill_chunk, args.request_timeout, args.max_model_len,
              args.served_model_name, load_options, args.device_map)

    p = add_command(sub, "serve", "an OpenAI-compatible server (/v1/completions, /v1/chat/completions, ...) with "
                                  "per-request PoE modes and continuous batching")
    p.add_argument("model", help="an HF model folder")
    p.add_argument("--siblings", nargs="+", default=None, help="stage folders branching from MODEL: served as "
                                                               "extra model ids on one shared trunk")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (loopback: this machine only)")
    p.add_argument("--port", type=positive_int, default=8000, help="TCP port to listen on")
    p.add_argument("--api-key", default=None, help="require `Authorization: Bearer KEY` (default: "
                                                   "$COGNICA_POE_API_KEY, else no key)")
    p.add_argument("--max-batch", type=positive_int, default=16, help="rows decoded together (requests x n)")
    p.add_argument("--max-queue", type=positive_int, default=64, help="requests waiting for a place; beyond it, 429")
    p.add_argument("--prefill-chunk", type=positive_int, default=64, help="prompt tokens prefilled per iteration")
    p.add_argument("--request-timeout", type=float, default=600.0, help="seconds a request may take in all")
    p.add_argument("--max-model-len", type=positive_int, default=None, help="prompt + completion limit (default: "
                                                                            "sequence_len)")
    p.add_argument("--served-model-name", default=None, help="the base's model id (default: the folder name)")
    p.add_argument("--dtype", default=None, help="compute dtype (default: the folder's)")
    p.add_argument("--device-map", default=None,
                   help='the stages\' devices: JSON \'{"stage:0": "cuda:0", "stage:1": "cuda:1", ...}\' naming every '
                        'stage, "auto" (split over the GPUs by free memory) or one device; with --siblings: '
                        + SIBLINGS_MAP_HELP)
    p.add_argument("--ray", action="store_true", help="serve N replicas on Ray Serve (the cluster of $RAY_ADDRESS or "
                                                      "`ray start`, else a local instance; --threads CPUs each, "
                                                      "default 1)")
    p.add_argument("--replicas", type=positive_int, default=None, help="replicas behind the endpoint (with --ray; "
                                                                       "default 1)")
    add_pack_arg(p)
    add_quantize_arg(p)
    add_compile_arg(p)
    add_threads_arg(p)
    p.set_defaults(func=cmd_serve)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if "threads" in vars(args):  # a command that computes: its --threads, else the physical cores
            from .cpu import set_threads

            set_threads(args.threads)
        args.func(args)
    except (ValueError, OSError, ModuleNotFoundError) as e:  # bad input, a missing file or package: one line
        print(f"cognica-poe {args.command}: error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

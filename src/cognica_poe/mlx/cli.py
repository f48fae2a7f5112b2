"""
`cognica-poe generate ... --backend mlx` and `cognica-poe chat ... --backend mlx`: the same commands and flags as
the PyTorch backend (../cli.py parses them), decoded by this subpackage's modes. The tokenizer stays the package's.
"""

import argparse
import sys
import time

from ..chat import chat_loop
from ..tokenizer import CognicaPoETokenizer
from .load import load
from .modes import generate_parallel_composition, generate_speculative, generate_stage, generate_wand


def generate(args: argparse.Namespace) -> None:
    if args.siblings:
        raise ValueError("--siblings is not available with --backend mlx (use the torch backend)")
    model = load(args.model, dtype=args.dtype)
    tok = CognicaPoETokenizer.from_pretrained(args.model)
    ids = [tok.bos_token_id] + tok(args.prompt)["input_ids"]
    sampling = dict(do_sample=args.temperature > 0, temperature=args.temperature if args.temperature > 0 else 1.0,
                    top_k=args.top_k, top_p=args.top_p, seed=args.seed, max_new_tokens=args.max_new_tokens,
                    stop_tokens=args.stop)
    stream = None
    if args.stream:
        def stream(row, token):
            print(tok.decode([token]), end="", flush=True)
    extra = ""
    t0 = time.perf_counter()
    if args.mode == "full":
        out = generate_stage(model, ids, stage=model.poe_n_stages - 1, streamer=stream, **sampling)
    elif args.mode == "stage":
        out = generate_stage(model, ids, stage=args.stage, streamer=stream, **sampling)
    elif args.mode == "wand":
        out, used = generate_wand(model, ids, safety=args.safety, p99_bounds=args.p99_bounds, return_stages_used=True,
                                  streamer=stream, **sampling)
        extra = f"exit stages: {used}"
    elif args.mode == "speculative":
        out, acc = generate_speculative(model, ids, draft_stage=args.draft_stage, k_draft=args.k_draft,
                                        return_acceptance=True, streamer=stream, **sampling)
        extra = f"acceptance: {acc:.3f}"
    else:
        out = generate_parallel_composition(model, ids, stages=args.stages or list(range(model.poe_n_stages)),
                                            stage_weights=args.stage_weights, streamer=stream, **sampling)
    elapsed = time.perf_counter() - t0
    n = len(out) - len(ids)
    if args.stream:
        print()
    else:
        print(tok.decode(out[len(ids):]))
    print(f"[{args.mode} (mlx): {n} tokens in {elapsed:.2f}s, {n / elapsed:.1f} tok/s{'; ' + extra if extra else ''}]",
          file=sys.stderr)


def chat(args: argparse.Namespace) -> None:
    """The terminal chat: the conversation rendered with the chat tokens, replies streamed from the last exit."""
    model = load(args.model, dtype=args.dtype)
    tok = CognicaPoETokenizer.from_pretrained(args.model)

    def generate(ids, streamer, stop_tokens):
        generate_stage(model, ids, stage=model.poe_n_stages - 1, max_new_tokens=args.max_new_tokens,
                       do_sample=args.temperature > 0, temperature=max(args.temperature, 1e-6), top_k=args.top_k,
                       seed=args.seed, stop_tokens=stop_tokens, streamer=streamer,
                       max_length=args.max_length or model.config.rotary_seq_len)

    chat_loop(tok, generate, f"chatting with {args.model} ({model.poe_n_stages} stages, MLX)", args.system)

"""
The capability report: what each PoE mode buys on THIS checkpoint, measured, with one command.

The model card's headline table was measured by hand on one checkpoint. `build_report` measures the same rows
for any checkpoint, on held-out text (the validation split of a corpus) and a prompt set:

  quality (one pass over the held-out text, every exit at once): per-stage BPB, Log-OP composition BPB, the
      agreement matrix (how often two exits pick the same top-1 token), top-1 accuracy, and the mean top-1
      margin of each exit and composition (how much sharper a product of exits is);
  speed (speed.py: greedy decode of the prompt set, every figure a same-process ratio to full-depth cached
      greedy): stage prefix pruning, Log-OP of all stages, WAND at several safeties, self-speculative decoding;
  with a backprop baseline, the PoE-vs-BP BPB gap on the same documents.

Where the card used an 8-prompt factual probe for prefix pruning, the report uses agreement with the final exit
and per-stage BPB, and says so. `write_report` saves report.json, report.md (the capability table) and PNG
plots. WAND needs p99 bounds: the config's calibrated ones, else bounds calibrated here on the first half of the
held-out documents (then prompts and speed runs use the second half).
"""

import json
import math
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch

from ..atomic import atomic_file, write_text
from .speed import machine, measure_modes


@dataclass
class ReportSettings:
    eval_tokens: int = 65_536  # held-out tokens for the quality pass
    calib_tokens: int = 32_768  # tokens for WAND calibration when the config has no bounds
    seq_len: int | None = None  # window of the quality pass (default: the model's sequence_len)
    batch_size: int = 8
    n_prompts: int = 4
    prompt_tokens: int = 24
    new_tokens: int = 32
    runs: int = 3  # timed runs per measurement (median), after one warm-up run
    safeties: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0)
    ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6)
    draft_stages: tuple[int, ...] = (0,)
    compositions: list[list[int]] | None = None  # default: all stages, and the last two


# -----------------------------------------------------------------------------
# the report


def heldout_documents(data: str | None) -> list[str]:
    """The validation documents of a corpus (file, folder, or None for the bundled one; see train.data)."""
    from ..train.data import Corpus

    docs = list(Corpus(data).docs("val"))
    if not docs:
        raise ValueError(f"no validation documents in {data or 'the bundled corpus'}")
    return docs


@torch.no_grad()
def build_report(model, tokenizer, data: str | None = None, prompts: list[str] | None = None,
                 baseline=None, baseline_tokenizer=None, settings: ReportSettings | None = None,
                 name: str | None = None, progress: Callable[[str], None] | None = None) -> dict:
    """
    Measure everything the capability table needs on `model` (a CognicaPoEForCausalLM in eval mode). `data` is
    the held-out text source (its validation split), `prompts` optional prompt strings (default: the starts of
    held-out documents), `baseline` an optional backprop model (its own tokenizer) scored on the same documents.
    With a `progress` callback (for messages), the quality pass and the speed runs also show bars on stderr.
    """
    from ..bpb import evaluate_bpb
    from ..packed import count_packed
    from ..train.data import documents_stream
    from ..wand import calibrate_wand_bounds

    st = settings or ReportSettings()
    say = progress or (lambda msg: None)
    gpt = model.gpt
    n_stages = model.poe_n_stages
    last = n_stages - 1
    if n_stages < 2:
        raise ValueError("the capability report compares stage exits: this model has a single exit (a backprop "
                         "model? pass it as --baseline of a PoE model instead)")
    if any(not 0 <= d < last for d in st.draft_stages):
        raise ValueError(f"draft stages must be in 0..{last - 1}, got {list(st.draft_stages)}")
    seq_len = st.seq_len or min(model.config.sequence_len, 1024)
    docs = heldout_documents(data)
    # the product of all exits (weights 1: the card's margin effect), their geometric mean (weights 1/n: a
    # calibrated distribution, the 1.5B card's combiner), and the product of the last two exits
    every = list(range(n_stages))
    compositions = st.compositions or ([every, every] + ([[last - 1, last]] if n_stages > 2 else []))
    weights = None if st.compositions else ([None, [1 / n_stages] * n_stages] + ([None] if n_stages > 2 else []))

    say(f"quality pass: {n_stages} exits over up to {st.eval_tokens:,} held-out tokens")
    stream = documents_stream(docs, tokenizer, st.eval_tokens)
    seq_len = min(seq_len, len(stream) - 2)
    quality = evaluate_bpb(gpt, stream, tokenizer.token_bytes(), seq_len=seq_len, batch_size=st.batch_size,
                           compositions=compositions, composition_weights=weights, progress=progress is not None)

    bounds, bounds_source, speed_docs = model.config.wand_p99_bounds, "config", docs
    if bounds is None:
        half = max(len(docs) // 2, 1)
        calib = documents_stream(docs[:half], tokenizer, st.calib_tokens)
        say(f"calibrating WAND bounds on {len(calib):,} tokens (the first half of the held-out documents)")
        bounds = calibrate_wand_bounds(model.gpt, calib, seq_len=min(seq_len, len(calib) - 1))
        bounds_source, speed_docs = "calibrated on the first half of the held-out documents", docs[half:] or docs
    if prompts:
        prompt_ids = [[tokenizer.bos_token_id] + tokenizer.encoding.encode_ordinary(p) for p in prompts]
    else:
        prompt_ids = [[tokenizer.bos_token_id] + tokenizer.encoding.encode_ordinary(d)[:st.prompt_tokens]
                      for d in speed_docs[:st.n_prompts]]
    say(f"speed: every mode on {len(prompt_ids)} prompts x {st.new_tokens} new tokens, median of {st.runs} runs")
    speed = measure_modes(model, prompt_ids, bounds, st.new_tokens, st.runs, tuple(st.safeties), tuple(st.ks),
                          tuple(st.draft_stages), progress=progress is not None)

    report = {
        "model": {"name": name, "parameters": gpt.num_params(), "n_layer": model.config.n_layer,
                  "n_embd": model.config.n_embd, "n_stages": n_stages,
                  "stage_boundary_layers": model.poe_stage_boundary_layers,
                  "dtype": str(next(gpt.parameters()).dtype).replace("torch.", ""),
                  "specialist_ends": model.config.specialist_ends,
                  "packed_matrices": count_packed(gpt)},  # prepacked for CPU inference (packed.py); 0 = plain
        "machine": machine(),
        "settings": {**asdict(st), "seq_len": seq_len, "compositions": list(quality["compositions"])},
        "heldout": {"source": data or "bundled corpus (validation split)", "documents": len(docs),
                    "tokens": len(stream), "counted_tokens": quality["counted_tokens"]},
        "stage_bpb": quality["stages"],
        "composition_bpb": quality["compositions"],
        "agreement_matrix": quality["agreement"],
        "agreement_with_final": [row[last] for row in quality["agreement"]],
        "top1_accuracy": quality["top1_accuracy"],
        "margins": quality["margin"],
        "wand": {"p99_bounds": list(bounds), "bounds_source": bounds_source, "safeties": speed.pop("wand")},
        "speculative": speed.pop("speculative"),
        "speed": speed,
        "baseline": None,
    }
    if baseline is not None:
        say("baseline: BPB of the backprop model on the same documents")
        base_tok = baseline_tokenizer or tokenizer
        base_stream = documents_stream(docs, base_tok, st.eval_tokens)
        # the same documents: cut the baseline's stream where the PoE stream's documents end
        n_docs = int((stream == tokenizer.bos_token_id).sum())
        bos_at = (base_stream == base_tok.bos_token_id).nonzero()[:, 0].tolist() + [len(base_stream)]
        base_stream = base_stream[:bos_at[min(n_docs, len(bos_at) - 1)]]
        b = evaluate_bpb(baseline.gpt, base_stream, base_tok.token_bytes(),
                         seq_len=min(seq_len, len(base_stream) - 2), batch_size=st.batch_size,
                         stage_boundaries=[baseline.config.n_layer - 1])["stages"][0]
        poe = quality["stages"][-1]
        report["baseline"] = {"bpb": b, "poe_bpb": poe, "gap": (poe - b) / b, "tokens": len(base_stream)}
    check_finite(report)
    report["capability_table"] = capability_table(report)
    return report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def capability_table(r: dict) -> str:
    """The model card's capability table, for this checkpoint (markdown)."""
    n = r["model"]["n_stages"]
    n_layer = r["model"]["n_layer"]
    last = n - 1
    sp = r["speed"]
    how_speed = f"{sp['tokens_per_run']} greedy tokens ({sp['prompts']} prompts), median of {sp['runs']} runs"
    how_quality = f"teacher-forced on {r['heldout']['counted_tokens']:,} held-out tokens"
    rows = [("Capability", "This checkpoint", "Measured how")]
    for s in range(last):
        layers = r["model"]["stage_boundary_layers"][s] + 1
        rows.append((f"Stage {s} prefix pruning ({layers}/{n_layer} layers)",
                     f"{sp['stage_speedup'][s]:.2f}x decode speed; {_pct(r['agreement_with_final'][s])} top-1 "
                     f"agreement with the final exit; BPB {r['stage_bpb'][s]:.4f} vs {r['stage_bpb'][last]:.4f}",
                     f"speed: {how_speed}; agreement and BPB {how_quality} (in place of the card's 8-prompt "
                     f"factual probe)"))
    wand = r["wand"]["safeties"]
    exact = [w for w in wand if w["top1_agreement"] >= 1.0]
    if exact:
        best = max(exact, key=lambda w: w["speedup"])
        text = f"{best['speedup']:.2f}x at 100% top-1 agreement (safety {best['safety']})"
    else:
        best = max(wand, key=lambda w: w["top1_agreement"])
        text = (f"100% top-1 agreement not reached; best {_pct(best['top1_agreement'])} at "
                f"{best['speedup']:.2f}x (safety {best['safety']})")
    frontier = "; ".join(f"s={w['safety']}: {w['speedup']:.2f}x, {_pct(w['top1_agreement'])}" for w in wand)
    rows.append(("WAND adaptive depth", f"{text} [{frontier}]",
                 f"{how_speed}; agreement = generated tokens equal to the full model's argmax at the same prefix; "
                 f"bounds {r['wand']['p99_bounds']} ({r['wand']['bounds_source']})"))
    spec = r["speculative"]
    best = max(spec, key=lambda x: x["speedup"])
    rows.append((f"Self-speculative decoding (stage {best['draft_stage']} drafts)",
                 f"{best['speedup']:.2f}x at {_pct(best['acceptance'])} acceptance (K={best['k']}); lossless: "
                 f"{all(x['lossless'] for x in spec)}; zero added parameters",
                 f"{how_speed}; K in {[x['k'] for x in spec if x['draft_stage'] == best['draft_stage']]}"))
    final_margin = r["margins"]["stages"][last]
    for name, m in r["margins"]["compositions"].items():
        rows.append((f"Parallel composition (Log-OP of stages {name})",
                     f"top-1 margin {final_margin:.2f} -> {m:.2f} ({m - final_margin:+.2f}) "
                     f"vs the final exit alone; BPB {r['composition_bpb'][name]:.4f} vs "
                     f"{r['stage_bpb'][last]:.4f}",
                     f"mean top-1 minus top-2 log-probability, {how_quality}"))
    if r["baseline"]:
        b = r["baseline"]
        rows.append(("PoE vs backprop baseline", f"BPB {b['poe_bpb']:.4f} vs {b['bpb']:.4f} ({b['gap']:+.2%} gap)",
                     "the same held-out documents, each model with its own tokenizer"))
    lines = ["| " + " | ".join(row) + " |" for row in rows]
    lines.insert(1, "|" + "---|" * 3)
    return "\n".join(lines)


def speed_table(r: dict) -> str:
    """Tokens/s of every mode, as measured (markdown)."""
    sp = r["speed"]
    rows = [("full depth, cached greedy", sp["full_tok_s"], 1.0)]
    rows += [(f"stage {s} (prefix pruning)", t, x) for s, (t, x) in enumerate(zip(sp["stage_tok_s"],
                                                                                   sp["stage_speedup"]))][:-1]
    rows.append(("Log-OP of all stages", sp["compose_all_tok_s"], sp["compose_all_speedup"]))
    rows += [(f"WAND safety {w['safety']}", w["tok_s"], w["speedup"]) for w in r["wand"]["safeties"]]
    rows += [(f"speculative stage {x['draft_stage']}, K={x['k']}", x["tok_s"], x["speedup"]) for x in r["speculative"]]
    lines = ["| Mode | tokens/s | vs full depth |", "|---|---|---|"]
    lines += [f"| {name} | {t:.1f} | {x:.2f}x |" for name, t, x in rows]
    return "\n".join(lines)


# -----------------------------------------------------------------------------
# files


def plot_report(r: dict, out_dir: str) -> list[str]:
    """report_quality.png (per-stage BPB, agreement matrix) and report_speed.png (WAND, speculative)."""
    from ..extras import require

    require("matplotlib", "plots", "the report's plots", "pass --no-plots")
    from matplotlib.figure import Figure

    n = r["model"]["n_stages"]
    paths = []
    fig = Figure(figsize=(11, 4))
    ax_bpb, ax_agree = fig.subplots(1, 2)
    # stage exits only: a product of exits with weights 1 is sharper and often far worse in BPB (see the table)
    bars = ax_bpb.bar([f"stage {s}" for s in range(n)], r["stage_bpb"], color="tab:blue")
    ax_bpb.bar_label(bars, fmt="%.4f")
    if r["baseline"]:
        ax_bpb.axhline(r["baseline"]["bpb"], color="tab:red", linestyle="--", label="backprop baseline")
        ax_bpb.legend()
    values = r["stage_bpb"] + ([r["baseline"]["bpb"]] if r["baseline"] else [])
    ax_bpb.set_ylim(min(values) * 0.97, max(values) * 1.02)
    ax_bpb.set_ylabel("validation bits per byte")
    ax_bpb.set_title("per-exit BPB (lower is better)")
    m = ax_agree.imshow(r["agreement_matrix"], vmin=0, vmax=1, cmap="viridis")
    for i in range(n):
        for j in range(n):
            ax_agree.text(j, i, f"{r['agreement_matrix'][i][j]:.2f}", ha="center", va="center", color="w")
    ax_agree.set_xticks(range(n))
    ax_agree.set_yticks(range(n))
    ax_agree.set_xlabel("stage")
    ax_agree.set_ylabel("stage")
    ax_agree.set_title("top-1 agreement between exits")
    fig.colorbar(m, ax=ax_agree)
    fig.suptitle(f"{r['model']['name'] or 'model'}: quality on {r['heldout']['counted_tokens']:,} held-out tokens")
    fig.tight_layout()
    paths.append(save_png(fig, os.path.join(out_dir, "report_quality.png")))

    fig = Figure(figsize=(11, 4))
    ax_wand, ax_spec = fig.subplots(1, 2)
    wand = r["wand"]["safeties"]
    xs = range(len(wand))
    bottom = [0.0] * len(wand)
    for s in range(n):
        share = [w["exit_histogram"][s] / max(sum(w["exit_histogram"]), 1) for w in wand]
        ax_wand.bar(xs, share, bottom=bottom, label=f"exit {s}")
        bottom = [b + x for b, x in zip(bottom, share)]
    ax_wand.set_xticks(list(xs), [f"s={w['safety']}\n{w['speedup']:.2f}x\n{_pct(w['top1_agreement'])}"
                                  for w in wand])
    ax_wand.set_ylabel("share of generated tokens")
    ax_wand.set_title("WAND exits (safety / speedup / top-1 agreement)")
    ax_wand.legend(fontsize=8)
    for d in sorted({x["draft_stage"] for x in r["speculative"]}):
        rows = [x for x in r["speculative"] if x["draft_stage"] == d]
        ks = [x["k"] for x in rows]
        ax_spec.plot(ks, [x["speedup"] for x in rows], "o-", label=f"speedup, stage {d} drafts")
        ax_spec.plot(ks, [x["cost_model_speedup"] for x in rows], "x:", label=f"cost model, stage {d}")
        ax_spec.plot(ks, [x["acceptance"] for x in rows], "s--", label=f"acceptance, stage {d}")
    ax_spec.axhline(1.0, color="gray", linewidth=0.8)
    ax_spec.set_xlabel("K (drafted tokens per iteration)")
    ax_spec.set_title("self-speculative decoding")
    ax_spec.legend(fontsize=8)
    fig.suptitle(f"speed vs full-depth cached greedy ({r['speed']['tokens_per_run']} tokens, median of "
                 f"{r['speed']['runs']} runs, {r['machine']['cpu']}, {r['machine']['threads']} threads)", fontsize=9)
    fig.tight_layout()
    paths.append(save_png(fig, os.path.join(out_dir, "report_speed.png")))
    return paths


def save_png(fig, path: str) -> str:
    """A matplotlib Figure as a PNG, written atomically (a failed write keeps the previous file)."""
    with atomic_file(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return path


def write_report(r: dict, out_dir: str, plots: bool = True) -> dict[str, str]:
    """report.json, report.md (capability table + speed table) and the PNG plots into out_dir."""
    os.makedirs(out_dir, exist_ok=True)
    files = {"json": os.path.join(out_dir, "report.json"), "markdown": os.path.join(out_dir, "report.md")}
    # each file is replaced whole or not at all (a NaN refused by json or a full disk keeps the previous one)
    markdown = (f"# Capability report: {r['model']['name'] or 'model'}\n\n{r['capability_table']}\n\n"
                f"## Tokens per second by mode\n\n{speed_table(r)}\n\nMachine: {r['machine']['cpu']}, "
                f"{r['machine']['threads']} threads, torch {r['machine']['torch']}.\n")
    write_text(files["json"], json.dumps(r, indent=1, allow_nan=False))
    write_text(files["markdown"], markdown)
    if plots:
        files["quality_plot"], files["speed_plot"] = plot_report(r, out_dir)
    return files


def check_finite(r: dict) -> None:
    """Raise if any number in the report is NaN or infinite (a broken checkpoint, not a result)."""
    def walk(x, path):
        if isinstance(x, float) and not math.isfinite(x):
            raise ValueError(f"report field {path} is {x}: the checkpoint produces non-finite values")
        if isinstance(x, dict):
            for k, v in x.items():
                walk(v, f"{path}.{k}")
        elif isinstance(x, list):
            for i, v in enumerate(x):
                walk(v, f"{path}[{i}]")
    walk(r, "report")

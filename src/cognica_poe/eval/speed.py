"""
Speed runs: every PoE mode against full-depth cached greedy, measured side by side in one process (the
capability report's speed rows, and bench/inference.py).

Each figure is a same-process ratio to full-depth cached greedy over the same prompts, the median of `runs` timed
runs after a warm-up run, with its token counts stated: stage prefix pruning, Log-OP of all stages, WAND at several
safeties (exit histogram, speedup, top-1 agreement of its tokens with the full model's argmax at the same prefix),
self-speculative decoding for K = 1..6 (acceptance, speedup, the cost model's ideal, losslessness checked against
plain greedy). `machine` says what a measurement ran on.
"""

import platform
import statistics
import time
from collections.abc import Callable

import torch

from ..cpu import cpu_name, layouts, physical_cores


def machine() -> dict:
    """The CPU/GPU, threads, versions and CPU weight layouts ("auto"'s choice per dtype, with the probe's GB/s) a
    measurement ran on."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_name(), "gpu": gpu, "threads": torch.get_num_threads(), "physical_cores": physical_cores(),
            "torch": torch.__version__, "python": platform.python_version(), "cuda": torch.cuda.is_available(),
            "weight_layout": layouts()}


def median_run(fn: Callable[[], object], runs: int = 3) -> tuple[float, object]:
    """
    (median wall time, result of the median run) over `runs` timed calls of fn, after one untimed warm-up call
    (allocations, kernel choice). With an odd number of runs the result comes from the run whose time is the
    median, so statistics and speed describe one run.
    """
    fn()
    timed = []
    for _ in range(runs):
        t0 = time.perf_counter()
        result = fn()
        timed.append((time.perf_counter() - t0, result))
    return statistics.median(t for t, _ in timed), sorted(timed, key=lambda x: x[0])[len(timed) // 2][1]


def median_time(fn: Callable[[], object], runs: int = 3) -> float:
    """Median wall time of `runs` calls of fn, after one untimed warm-up call."""
    return median_run(fn, runs)[0]


def divergence_margin(model, output: torch.Tensor, reference: torch.Tensor) -> float | None:
    """
    None when a mode's greedy output (1, T) equals plain greedy's; else the full model's top-1 minus top-2 logit
    where they first differ (teacher-forced on the reference): how near a tie the two paths' rounding broke.
    """
    if torch.equal(output, reference):
        return None
    n = min(output.size(1), reference.size(1))
    differ = (output[0, :n] != reference[0, :n]).nonzero()
    pos = int(differ[0]) if len(differ) else n  # equal up to n: one stopped earlier
    with torch.no_grad():
        top2 = model.gpt(reference[:, :pos], logits_to_keep=1)[0, -1].topk(2).values
    return float(top2[0] - top2[1])


def greedy_agreement(model, sequences: list[torch.Tensor], new_tokens: int) -> float:
    """Fraction of generated tokens equal to the full model's argmax at the same prefix (teacher-forced)."""
    hits = total = 0
    for seq in sequences:
        with torch.no_grad():
            ref = model.gpt(seq)[0].argmax(-1)  # (T,)
        n = min(new_tokens, seq.size(1) - 1)
        T = seq.size(1) - n
        hits += int((seq[0, T:] == ref[T - 1:-1]).sum())
        total += n
    return hits / max(total, 1)


@torch.no_grad()
def measure_modes(model, prompts: list[list[int]], bounds: list[float], new_tokens: int = 32, runs: int = 3,
                  safeties: tuple[float, ...] = (0.25, 0.5, 1.0, 2.0), ks: tuple[int, ...] = (1, 2, 3, 4, 5, 6),
                  draft_stages: tuple[int, ...] = (0,), progress: bool = False) -> dict:
    """
    Tokens/s of every mode over the prompts (batch 1, greedy, exactly new_tokens each) and each mode's speedup
    over full-depth cached greedy, measured side by side. Speculative rows also give the cost model's ideal
    tokens_per_iteration / (K c + v), c and v being the measured per-token costs of drafting and verifying in
    units of one full decode step (prefill excluded, so it is compared with the decode-only speedup).
    progress: a bar on stderr, one step per measurement.
    """
    from tqdm.auto import tqdm

    from ..speculative import run_speculative
    from ..wand import run_wand

    last = model.poe_n_stages - 1
    # full depth, prefill, every other stage, Log-OP, each WAND safety, each speculative (drafter, K)
    bar = tqdm(total=3 + last + len(safeties) + len(draft_stages) * len(ks), desc="speed", unit="run",
               disable=not progress)
    kw = dict(max_new_tokens=new_tokens, stop_tokens=[])
    n_tokens = new_tokens * len(prompts)
    tensors = [torch.tensor([p]) for p in prompts]

    def over_prompts(fn):
        return lambda: [fn(ids) for ids in tensors]

    t_full = median_time(over_prompts(lambda ids: model.generate_stage(ids, stage=last, **kw)), runs)
    # the prompts' prefill alone (one cached forward each), to compare decode time with the cost model
    t_prefill = median_time(over_prompts(lambda ids: model.gpt(ids, kv_cache=model.new_cache(1, ids.size(1)),
                                                               logits_to_keep=1)), runs)
    bar.update(2)
    res = {"tokens_per_run": n_tokens, "new_tokens": new_tokens, "prompts": len(prompts), "runs": runs,
           "full_tok_s": n_tokens / t_full, "stage_tok_s": [], "stage_speedup": []}
    for s in range(last + 1):
        t = t_full if s == last else median_time(over_prompts(lambda ids, s=s: model.generate_stage(ids, stage=s,
                                                                                                    **kw)), runs)
        bar.update(int(s != last))
        res["stage_tok_s"].append(n_tokens / t)
        res["stage_speedup"].append(t_full / t)
    t = median_time(over_prompts(lambda ids: model.generate_parallel_composition(ids, stages=list(range(last + 1)),
                                                                                  **kw)), runs)
    res["compose_all_tok_s"], res["compose_all_speedup"] = n_tokens / t, t_full / t
    bar.update(1)

    res["wand"] = []
    for safety in safeties:
        t, outs = median_run(lambda safety=safety: [run_wand(model.gpt, ids, safety=safety, p99_bounds=bounds, **kw)
                                                    for ids in tensors], runs)
        bar.update(1)
        used = torch.tensor([s for r in outs for s in r.stages_used[0]])
        hist = torch.bincount(used, minlength=last + 1).tolist()
        layers = sum(h * (model.poe_stage_boundary_layers[s] + 1) for s, h in enumerate(hist))
        res["wand"].append({"safety": safety, "tok_s": n_tokens / t, "speedup": t_full / t,
                            "top1_agreement": greedy_agreement(model, [r.sequences for r in outs], new_tokens),
                            "exit_histogram": hist,
                            "layer_fraction": layers / (len(used) * model.config.n_layer)})

    res["speculative"] = []
    step_time = (t_full - t_prefill) / n_tokens  # one full-depth decode step
    for draft_stage in draft_stages:
        for k in ks:
            # c, v and the wall time all come from the same (median) run, so the cost model and the measurement
            # see the same machine state
            t, stats = median_run(lambda k=k, d=draft_stage: [run_speculative(model.gpt, ids, draft_stage=d, k_draft=k,
                                                                              **kw) for ids in tensors], runs)
            bar.update(1)
            accepted = sum(r.accepted for r in stats)
            iters = sum(r.iterations for r in stats)
            tokens_per_iter = 1 + accepted / iters
            draft_steps = sum(r.draft_steps for r in stats)  # k per iteration, less where the budget ended sooner
            drafts_per_iter = draft_steps / iters
            c = sum(r.seconds["draft"] for r in stats) / draft_steps / step_time
            v = sum(r.seconds["verify"] for r in stats) / iters / step_time
            ideal = tokens_per_iter / (drafts_per_iter * c + v)
            decode_speedup = (t_full - t_prefill) / (t - sum(r.seconds["prefill"] for r in stats))
            margins = [divergence_margin(model, r.sequences, model.generate_stage(ids, stage=last, **kw))
                       for r, ids in zip(stats, tensors)]
            lossless = all(m is None for m in margins)
            res["speculative"].append({
                "draft_stage": draft_stage, "k": k, "acceptance": accepted / sum(r.drafted for r in stats),
                "tokens_per_iteration": tokens_per_iter, "drafts_per_iteration": drafts_per_iter, "c": c, "v": v,
                "bookkeeping_per_iteration": sum(r.seconds["accept"] for r in stats) / iters / step_time,
                "tok_s": n_tokens / t, "speedup": t_full / t, "decode_speedup": decode_speedup,
                "cost_model_speedup": ideal, "ratio_to_cost_model": decode_speedup / ideal, "lossless": lossless,
                "divergence_margins": [m for m in margins if m is not None]})
    bar.close()
    return res

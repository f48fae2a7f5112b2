"""
Bits per byte for every stage exit, nanochat's way.

BPB = sum of per-token cross-entropy (nats) over targets with a byte length > 0, divided by ln 2 times the
sum of the byte lengths of all targets. Special tokens have byte length 0, so they count in neither sum
(BOS targets at document starts are excluded). Bytes make the number comparable across tokenizers.
"""

import math

import torch

from .model import GPT


def windows(stream: torch.Tensor, seq_len: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping (input, target) windows of a 1-D token stream: inputs [s, s+T), targets [s+1, s+T+1)."""
    out = []
    s = 0
    while s < len(stream) - seq_len - 1:
        out.append((stream[s:s + seq_len], stream[s + 1:s + seq_len + 1]))
        s += seq_len
    return out


@torch.no_grad()
def evaluate_bpb(gpt: GPT, stream: torch.Tensor, token_bytes: torch.Tensor, seq_len: int | None = None,
                 batch_size: int = 8, stage_boundaries: list[int] | None = None,
                 compositions: list[list[int]] | None = None,
                 composition_weights: list[list[float] | None] | None = None, progress: bool = False) -> dict:
    """
    BPB of each exit (default: every stage boundary) and of Log-OP compositions of exits (lists of indices into
    the exits; weights 1, the product of experts, unless composition_weights gives a list for that composition,
    e.g. 1/n for the geometric mean; the result is renormalised), over fresh-context windows of `stream`, one
    pass per batch. A composition's key is "0+3" with weights 1, else "0.5*0+0.5*3".
    Returns {"stages": [...], "compositions": {"0+3": ...}} and, from the same pass and the same counted
    targets: "agreement" (exits x exits: how often two exits' top-1 tokens agree), "top1_accuracy" (per exit,
    then per composition) and "margin" (mean top-1 minus top-2 log-probability, per exit and per composition:
    how much sharper a product of exits is than one exit). progress: a progress bar on stderr.
    """
    from tqdm.auto import tqdm

    from .compose import log_op

    seq_len = seq_len or gpt.config.sequence_len
    boundaries = stage_boundaries or gpt.config.poe_stage_boundary_layers
    compositions = compositions or []
    weights = list(composition_weights or [None] * len(compositions))
    if len(weights) != len(compositions):
        raise ValueError(f"{len(weights)} weight lists for {len(compositions)} compositions")
    weights = [[1.0] * len(c) if w is None else [float(x) for x in w] for c, w in zip(compositions, weights)]
    for combo, w in zip(compositions, weights):
        if not combo or any(not 0 <= k < len(boundaries) for k in combo):
            raise ValueError(f"composition {combo} must list exit indices in 0..{len(boundaries) - 1}")
        if len(w) != len(combo):
            raise ValueError(f"composition {combo} has {len(combo)} exits but {len(w)} weights")
    names = ["+".join(map(str, c)) if all(x == 1.0 for x in w) else "+".join(f"{x:g}*{k}" for k, x in zip(c, w))
             for c, w in zip(compositions, weights)]
    device = gpt.device
    token_bytes = token_bytes.to(device)
    pairs = windows(stream, seq_len)
    if not pairs:
        raise ValueError(f"the stream ({len(stream)} tokens) is shorter than one window of {seq_len + 1} tokens")
    n_exits, n_scores = len(boundaries), len(boundaries) + len(compositions)
    nats = torch.zeros(n_scores, dtype=torch.float64, device=device)
    margin = torch.zeros(n_scores, dtype=torch.float64, device=device)
    correct = torch.zeros(n_scores, dtype=torch.float64, device=device)
    agree = torch.zeros(n_exits, n_exits, dtype=torch.float64, device=device)
    total_bytes = n_counted = 0
    for i in tqdm(range(0, len(pairs), batch_size), desc="bpb", unit="batch", disable=not progress):
        x = torch.stack([p[0] for p in pairs[i:i + batch_size]]).to(device)
        y = torch.stack([p[1] for p in pairs[i:i + batch_size]]).to(device)
        nb = token_bytes[y]  # (B, T)
        counted = (nb > 0).reshape(-1)
        total_bytes += int(nb.sum())
        n_counted += int(counted.sum())
        exits = gpt.forward_all_stages(x, boundaries)
        scores = list(exits) + [log_op([exits[k] for k in c], w) for c, w in zip(compositions, weights)]
        top1 = []
        for k, logits in enumerate(scores):
            logp = torch.log_softmax(logits.float().reshape(-1, logits.size(-1)), dim=-1)  # (B*T, V)
            nats[k] -= (logp.gather(1, y.reshape(-1, 1))[:, 0] * counted).sum().double()
            top = logp.topk(2, dim=-1)
            margin[k] += ((top.values[:, 0] - top.values[:, 1]) * counted).sum().double()
            correct[k] += ((top.indices[:, 0] == y.reshape(-1)) & counted).sum().double()
            top1.append(top.indices[:, 0])
        for a in range(n_exits):
            for b in range(n_exits):
                agree[a, b] += ((top1[a] == top1[b]) & counted).sum().double()
    bpb = [float(n) / (math.log(2) * total_bytes) for n in nats]
    n = max(n_counted, 1)

    def split(values: list[float]) -> dict:
        return {"stages": values[:n_exits],
                "compositions": dict(zip(names, values[n_exits:]))}

    return {**split(bpb), "agreement": (agree / n).tolist(), "top1_accuracy": split((correct / n).tolist()),
            "margin": split((margin / n).tolist()), "counted_tokens": n_counted}


def stage_bpb(gpt: GPT, stream: torch.Tensor, token_bytes: torch.Tensor, seq_len: int | None = None,
              batch_size: int = 8, stage_boundaries: list[int] | None = None) -> list[float]:
    """BPB of each exit (default: every stage boundary) over fresh-context windows of `stream`."""
    return evaluate_bpb(gpt, stream, token_bytes, seq_len, batch_size, stage_boundaries)["stages"]


@torch.no_grad()
def top1_counts(reference: torch.Tensor, logits: torch.Tensor) -> tuple[int, int, int]:
    """
    Over positions of two (..., V) logits: how many of logits' argmax are a top-1 token of reference (its logit
    equals reference's maximum, so ties count), how many equal reference's own argmax, and at how many positions
    reference's top-1 is tied.
    """
    reference, pick = reference.float().cpu(), logits.argmax(-1, keepdim=True).cpu()  # (..., V), (..., 1)
    top = reference.amax(-1, keepdim=True)
    return (int((reference.gather(-1, pick) == top).sum()), int((reference.argmax(-1, keepdim=True) == pick).sum()),
            int(((reference == top).sum(-1) > 1).sum()))


def quality_against(gpt: GPT, reference: GPT, stream: torch.Tensor, token_bytes: torch.Tensor,
                    seq_len: int | None = None, batch_size: int = 8) -> dict:
    """
    How far gpt (e.g. a quantized copy) has moved from reference (the model it was made from) at each exit, on the
    fresh-context windows of stream: each one's BPB (evaluate_bpb), gpt's relative change (gpt - reference) /
    reference, and how often gpt's top-1 token at an input position is one greedy decoding of reference could pick
    there. Where reference's top logits tie exactly (bf16 logits can at a few percent of positions: with 8 bits of
    mantissa, close logits round to one value), every tied token is its top-1, and which one argmax returns says
    nothing about the model; "top1_agreement_strict" counts only reference's argmax itself. Returns {"bpb",
    "reference_bpb", "bpb_change", "top1_agreement", "top1_agreement_strict", "reference_top1_ties"} (lists, one per
    exit; the last is the share of positions where reference's top-1 is tied) and "tokens".
    """
    ref = evaluate_bpb(reference, stream, token_bytes, seq_len, batch_size)["stages"]
    got = evaluate_bpb(gpt, stream, token_bytes, seq_len, batch_size)["stages"]
    device = gpt.device
    pairs = windows(stream, seq_len or gpt.config.sequence_len)
    counts, n = [[0, 0, 0] for _ in ref], 0  # per exit: (agreeing, agreeing strictly, tied) positions
    for i in range(0, len(pairs), batch_size):
        x = torch.stack([p[0] for p in pairs[i:i + batch_size]])
        for k, (a, b) in enumerate(zip(reference.forward_all_stages(x.to(reference.device)),
                                       gpt.forward_all_stages(x.to(device)))):
            counts[k] = [c + d for c, d in zip(counts[k], top1_counts(a, b))]
        n += x.numel()
    return {"bpb": got, "reference_bpb": ref, "bpb_change": [(b - a) / a for a, b in zip(ref, got)],
            "top1_agreement": [c[0] / n for c in counts], "top1_agreement_strict": [c[1] / n for c in counts],
            "reference_top1_ties": [c[2] / n for c in counts], "tokens": n}

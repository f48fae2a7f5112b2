"""
Bits per byte for every stage exit, nanochat's way.

BPB = sum of per-token cross-entropy (nats) over targets with a byte length > 0, divided by ln 2 times the
sum of the byte lengths of all targets. Special tokens have byte length 0, so they count in neither sum
(BOS targets at document starts are excluded). Bytes make the number comparable across tokenizers.
"""

import math

import torch
import torch.nn.functional as F

from ..model import GPT


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
                 compositions: list[list[int]] | None = None) -> dict:
    """
    BPB of each exit (default: every stage boundary) and of Log-OP compositions of exits (lists of indices into
    the exits, equal weights; the product is renormalised), over fresh-context windows of `stream`, one pass
    per batch. Returns {"stages": [...], "compositions": {"0+3": ...}}.
    """
    from ..compose import log_op

    seq_len = seq_len or gpt.config.sequence_len
    boundaries = stage_boundaries or gpt.config.poe_stage_boundary_layers
    compositions = compositions or []
    for combo in compositions:
        if not combo or any(not 0 <= k < len(boundaries) for k in combo):
            raise ValueError(f"composition {combo} must list exit indices in 0..{len(boundaries) - 1}")
    device = gpt.lm_head.weight.device
    token_bytes = token_bytes.to(device)
    pairs = windows(stream, seq_len)
    if not pairs:
        raise ValueError(f"the stream ({len(stream)} tokens) is shorter than one window of {seq_len + 1} tokens")
    nats = torch.zeros(len(boundaries) + len(compositions), dtype=torch.float64, device=device)
    total_bytes = 0
    for i in range(0, len(pairs), batch_size):
        x = torch.stack([p[0] for p in pairs[i:i + batch_size]]).to(device)
        y = torch.stack([p[1] for p in pairs[i:i + batch_size]]).to(device)
        nb = token_bytes[y]  # (B, T)
        counted = (nb > 0).reshape(-1)
        total_bytes += int(nb.sum())
        exits = gpt.forward_all_stages(x, boundaries)
        scores = list(exits) + [log_op([exits[k] for k in combo], [1.0] * len(combo)) for combo in compositions]
        for k, logits in enumerate(scores):
            ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
            nats[k] += (ce * counted).sum().double()
    bpb = [float(n) / (math.log(2) * total_bytes) for n in nats]
    return {"stages": bpb[:len(boundaries)],
            "compositions": {"+".join(map(str, c)): b for c, b in zip(compositions, bpb[len(boundaries):])}}


def stage_bpb(gpt: GPT, stream: torch.Tensor, token_bytes: torch.Tensor, seq_len: int | None = None,
              batch_size: int = 8, stage_boundaries: list[int] | None = None) -> list[float]:
    """BPB of each exit (default: every stage boundary) over fresh-context windows of `stream`."""
    return evaluate_bpb(gpt, stream, token_bytes, seq_len, batch_size, stage_boundaries)["stages"]

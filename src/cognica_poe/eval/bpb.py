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
def stage_bpb(gpt: GPT, stream: torch.Tensor, token_bytes: torch.Tensor, seq_len: int | None = None,
              batch_size: int = 8, stage_boundaries: list[int] | None = None) -> list[float]:
    """BPB of each exit (default: every stage boundary) over fresh-context windows of `stream`, one pass per batch."""
    seq_len = seq_len or gpt.config.sequence_len
    boundaries = stage_boundaries or gpt.config.poe_stage_boundary_layers
    device = gpt.lm_head.weight.device
    token_bytes = token_bytes.to(device)
    pairs = windows(stream, seq_len)
    if not pairs:
        raise ValueError(f"the stream ({len(stream)} tokens) is shorter than one window of {seq_len + 1} tokens")
    nats = torch.zeros(len(boundaries), dtype=torch.float64, device=device)
    total_bytes = 0
    for i in range(0, len(pairs), batch_size):
        x = torch.stack([p[0] for p in pairs[i:i + batch_size]]).to(device)
        y = torch.stack([p[1] for p in pairs[i:i + batch_size]]).to(device)
        nb = token_bytes[y]  # (B, T)
        counted = nb > 0
        total_bytes += int(nb.sum())
        for k, logits in enumerate(gpt.forward_all_stages(x, boundaries)):
            ce = F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), y.reshape(-1), reduction="none")
            nats[k] += (ce * counted.reshape(-1)).sum().double()
    return [float(n) / (math.log(2) * total_bytes) for n in nats]

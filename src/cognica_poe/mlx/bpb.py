"""
Bits per byte of every stage exit on MLX, with the PyTorch evaluator's protocol (../bpb.py): fresh-context
windows of a token stream, targets of byte length 0 (special tokens) counted in neither sum. It is how a quantized
model is compared with the one it came from.
"""

import math

import mlx.core as mx
import numpy as np

from ..bpb import windows
from .model import Model


def exit_bpb(model: Model, stream, token_bytes, seq_len: int | None = None, batch_size: int = 8,
             max_windows: int | None = None) -> list[float]:
    """BPB of each stage exit over non-overlapping windows of `stream` (1-D ids); token_bytes: bytes per id."""
    seq_len = seq_len or model.config.sequence_len
    pairs = windows(np.asarray(stream), seq_len)[:max_windows]
    if not pairs:
        raise ValueError(f"the stream ({len(stream)} tokens) is shorter than one window of {seq_len + 1} tokens")
    token_bytes = mx.array(np.asarray(token_bytes))
    nats = [0.0] * model.poe_n_stages
    total_bytes = 0
    for i in range(0, len(pairs), batch_size):
        x = mx.array(np.stack([p[0] for p in pairs[i:i + batch_size]]))
        y = mx.array(np.stack([p[1] for p in pairs[i:i + batch_size]]))
        nb = token_bytes[y]
        counted = (nb > 0).astype(mx.float32)
        total_bytes += int(nb.sum().item())
        for k, logits in enumerate(model.forward_all_stages(x)):
            logp = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            picked = mx.take_along_axis(logp, y[..., None], axis=-1)[..., 0]
            nats[k] -= float((picked * counted).sum().item())
    return [n / (math.log(2) * total_bytes) for n in nats]

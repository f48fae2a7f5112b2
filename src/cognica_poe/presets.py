"""
The named model sizes (`cognica-poe info d24`, `train --preset demo`, `preset_config("tiny")`).

Plain dicts of config fields, apart from config.py so that the command line can list them (and build its
parser) without importing torch or transformers. This file is copied into exported remote-code folders
(config.py imports it): it imports only the stdlib.
"""

import math


def _nanochat_preset(depth: int, poe_every: int) -> dict:
    """nanochat sizing: n_embd = 64 * depth rounded up to head_dim 128, n_kv_head = n_head."""
    n_embd = math.ceil(depth * 64 / 128) * 128
    return dict(n_layer=depth, n_embd=n_embd, n_head=n_embd // 128, n_kv_head=n_embd // 128,
                sequence_len=2048, vocab_size=32768, window_pattern="SSSL", poe_every=poe_every)


PRESETS: dict[str, dict] = {
    # CPU sizes for tests and demos
    "tiny": dict(n_layer=4, n_embd=64, n_head=4, n_kv_head=2, sequence_len=256, vocab_size=512,
                 window_pattern="SSSL", poe_every=1),
    # the default training run (`cognica-poe train` / `demo`): 4 one-layer stages, minutes on 2 CPU cores
    "demo": dict(n_layer=4, n_embd=128, n_head=4, n_kv_head=4, sequence_len=256, vocab_size=2048,
                 window_pattern="SSSL", poe_every=1),
    "small": dict(n_layer=8, n_embd=256, n_head=4, n_kv_head=4, sequence_len=256, vocab_size=4096,
                  window_pattern="SSSL", poe_every=2),
    # nanochat depths
    "d6": dict(n_layer=6, n_embd=384, n_head=3, n_kv_head=3, sequence_len=2048, vocab_size=32768,
               window_pattern="SSSL", poe_every=2),
    "d12": _nanochat_preset(12, 3),
    "d20": _nanochat_preset(20, 5),
    # the released Cognica-PoE-v1.0-1.3B-base: 1,384,122,122 parameters, stages end at [5, 11, 17, 23]
    "d24": _nanochat_preset(24, 6),
}

"""
Training from scratch: streamed packed data (data.py), nanochat's optimizer recipe on torch's Muon + AdamW
(optim.py), the run configurations (config.py), the PoE losses and the stage-wise flat-PoE backward (losses.py),
multi-process training (distributed.py: data parallel, FSDP; pipeline.py: stage-pipelined), checkpoints and
resume (checkpoints.py), the loop (loop.py), per-stage curves (plot.py), specialist SFT (sft.py).

The names below are imported on first use (PEP 562): the command line reads config.py to build its flags
without importing torch.
"""

import importlib

# public name -> the module that defines it
_EXPORTS = {
    "Corpus": "data", "PackedLoader": "data", "token_stream": "data", "TrainConfig": "config", "SFTConfig": "config",
    "train": "loop", "backward_step": "losses", "flat_stagewise_backward": "losses", "joint_stage_losses": "losses",
    "NonFiniteLossError": "losses", "MuonAdamW": "optim", "lr_multiplier": "optim", "muon_momentum": "optim",
    "muon_weight_decay": "optim", "flat_stage_range_backward": "losses", "split_stages": "pipeline",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cognica_poe.train' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value

"""
Training from scratch: streamed packed data (data.py), nanochat's optimizer recipe on torch's Muon + AdamW
(optim.py), stage-wise flat-PoE backward, the loop, checkpoints and the CLI (loop.py), BPB plots (plot.py).
"""

from .data import Corpus, PackedLoader, token_stream
from .loop import NonFiniteLossError, TrainConfig, backward_step, flat_stagewise_backward, joint_stage_losses, train
from .optim import MuonAdamW, lr_multiplier, muon_momentum, muon_weight_decay

__all__ = ["Corpus", "PackedLoader", "token_stream", "TrainConfig", "train", "backward_step",
           "flat_stagewise_backward", "joint_stage_losses", "NonFiniteLossError", "MuonAdamW", "lr_multiplier",
           "muon_momentum", "muon_weight_decay"]

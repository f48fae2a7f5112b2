"""
cognica_poe.mlx: the Cognica PoE model on MLX (Apple silicon; Linux CPUs through `mlx[cpu]`), an optional extra
(`pip install "cognica-poe[mlx]"`). Nothing else in the package imports it.

    from cognica_poe import mlx as poe_mlx
    model = poe_mlx.load("path/to/hf-folder")                    # or a stage folder, or a converted MLX folder
    ids = poe_mlx.generate_stage(model, prompt_ids, stage=0)     # prefix pruning: stage 0's layers only
    ids = poe_mlx.generate_speculative(model, prompt_ids)        # stage-drafted, lossless greedy
    poe_mlx.quantize(model, bits=8)                              # MLX affine quantization
"""

try:
    import mlx.core  # noqa: F401
except ModuleNotFoundError as e:
    raise ModuleNotFoundError("cognica_poe.mlx needs MLX: pip install 'cognica-poe[mlx]' (MLX runs on Apple silicon, "
                              "and on Linux CPUs as mlx[cpu])", name="mlx") from e

from .load import convert, load, quantize
from .model import Cache, Model, ModelArgs
from .modes import generate_parallel_composition, generate_speculative, generate_stage, generate_wand

__all__ = ["Cache", "Model", "ModelArgs", "convert", "generate_parallel_composition", "generate_speculative",
           "generate_stage", "generate_wand", "load", "quantize"]

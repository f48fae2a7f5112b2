"""
What a model folder is, checked without importing torch: the command line answers a wrong path at once.

An HF model folder holds config.json and its weights; a nanochat checkpoint folder holds model_*.pt and
meta_*.json instead, and becomes a model folder through `cognica-poe convert`.
"""

import glob
import os


def is_folder_name(path_or_preset: str) -> bool:
    """Whether a name means a folder (it exists, or it is written as a path) rather than a preset."""
    return os.path.exists(path_or_preset) or os.sep in path_or_preset or path_or_preset.startswith((".", "~"))


def check_model_folder(path: str) -> None:
    """One clear error when `path` is not an HF model folder: missing, a file, a nanochat checkpoint, no config."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"no model folder at {path} (give an HF model folder: config.json + weights)")
    if not os.path.isdir(path):
        raise ValueError(f"{path} is a file; expected an HF model folder (config.json + weights)")
    if os.path.isfile(os.path.join(path, "config.json")):
        return
    if glob.glob(os.path.join(path, "model_*.pt")):
        raise ValueError(f"{path} is a nanochat checkpoint folder: run `cognica-poe convert {path} OUT_DIR` first, "
                         "then use OUT_DIR")
    raise FileNotFoundError(f"{path} has no config.json: not an HF model folder (a nanochat checkpoint folder "
                            "converts with `cognica-poe convert`)")

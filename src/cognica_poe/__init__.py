"""
cognica-poe: the Cognica PoE language model (a nanochat GPT trained as a product of stage experts), its
transformers integration, tokenizer, checkpoints and stage-level inference modes.

The public names below are imported on first use (PEP 562), so that `cognica-poe --help` and other light
imports of the package do not pay for torch and transformers. The first use of any of them also registers our
classes with transformers' Auto classes, so `AutoModelForCausalLM.from_pretrained(dir)` then uses them for any
folder with model_type "cognica_poe"; `register_auto_classes()` does it explicitly.
"""

import importlib

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "GPT": "model", "PRESETS": "presets", "CognicaKVCache": "cache", "CognicaPoEConfig": "config",
    "CognicaPoEForCausalLM": "hf", "CognicaPoETokenizer": "tokenizer", "preset_config": "config",
    "SiblingSpecialists": "branches", "load_siblings": "branches",
}
__all__ = [*_EXPORTS, "register_auto_classes"]


def register_auto_classes() -> None:
    """Register the config, model and tokenizer with transformers' Auto classes (idempotent)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from .config import CognicaPoEConfig
    from .hf import CognicaPoEForCausalLM
    from .tokenizer import CognicaPoETokenizer

    AutoConfig.register(CognicaPoEConfig.model_type, CognicaPoEConfig, exist_ok=True)
    AutoModelForCausalLM.register(CognicaPoEConfig, CognicaPoEForCausalLM, exist_ok=True)
    AutoTokenizer.register(CognicaPoEConfig, slow_tokenizer_class=CognicaPoETokenizer, exist_ok=True)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'cognica_poe' has no attribute {name!r}")
    register_auto_classes()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value  # later lookups skip this function
    return value

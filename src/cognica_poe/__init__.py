"""
cognica-poe: the Cognica PoE language model (a nanochat GPT trained as a product of stage experts), its
transformers integration, tokenizer, checkpoints and stage-level inference modes.

Importing the package registers our classes with transformers' Auto classes, so
`AutoModelForCausalLM.from_pretrained(dir)` uses them for any folder with model_type "cognica_poe".
"""

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from .branches import SiblingSpecialists, load_siblings
from .cache import CognicaKVCache
from .config import PRESETS, CognicaPoEConfig, preset_config
from .hf import CognicaPoEForCausalLM
from .model import GPT
from .tokenizer import CognicaPoETokenizer

AutoConfig.register(CognicaPoEConfig.model_type, CognicaPoEConfig, exist_ok=True)
AutoModelForCausalLM.register(CognicaPoEConfig, CognicaPoEForCausalLM, exist_ok=True)
AutoTokenizer.register(CognicaPoEConfig, slow_tokenizer_class=CognicaPoETokenizer, exist_ok=True)

__all__ = [
    "GPT", "PRESETS", "CognicaKVCache", "CognicaPoEConfig", "CognicaPoEForCausalLM", "CognicaPoETokenizer",
    "preset_config", "SiblingSpecialists", "load_siblings",
]
__version__ = "0.1.0"

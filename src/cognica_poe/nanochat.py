"""
nanochat's files: its checkpoint folders, converted into our HF folder, and its pickled tokenizer.

A nanochat checkpoint folder holds model_{step:06d}.pt (a state_dict, keys maybe prefixed `_orig_mod.`,
embeddings in bf16) and meta_{step:06d}.json; its tokenizer/ holds tokenizer.pkl and token_bytes.pt. The .pt is
read with `torch.load(weights_only=True)`; the pickled tokenizer only with an explicit opt-in, once, and then saved
in the safe format (tokenizer.py), so an exported folder never needs this module (it is not remote code).
"""

import glob
import json
import os
import pickle
import re

import tiktoken
import torch

from .checkpoint import export_hf_folder
from .config import CognicaPoEConfig
from .hf import CognicaPoEForCausalLM
from .tokenizer import LEGACY_PICKLE_FILE, SPECIAL_TOKENS, VOCAB_FILE, CognicaPoETokenizer
from .weights import check_shapes, expected_shapes, strip_prefixes

# -----------------------------------------------------------------------------
# the legacy tokenizer pickle

class PickleNotAllowedError(ValueError):
    """Raised when a pickle would be loaded without the caller's explicit opt-in."""


class _PickledEncoding:
    """Stand-in for tiktoken.core.Encoding while unpickling: only records the state, runs no code."""

    def __setstate__(self, state):
        self.state = state


class _EncodingUnpickler(pickle.Unpickler):
    """Resolves tiktoken.core.Encoding to a record-only stand-in and refuses every other global."""

    def find_class(self, module: str, name: str):
        if (module, name) == ("tiktoken.core", "Encoding"):
            return _PickledEncoding
        raise pickle.UnpicklingError(f"refusing to load {module}.{name}: "
                                     "a tokenizer.pkl holds only a tiktoken Encoding")


def load_legacy_pickle(path: str, allow_pickle: bool = False) -> "CognicaPoETokenizer":
    """
    nanochat's tokenizer.pkl (a pickled tiktoken.Encoding) as a CognicaPoETokenizer. Unpickling can run
    arbitrary code, so this needs allow_pickle=True; even then only a tiktoken Encoding's state is accepted.
    """
    if os.path.isdir(path):
        path = os.path.join(path, LEGACY_PICKLE_FILE)
    if not allow_pickle:
        raise PickleNotAllowedError(
            f"{path} is a pickle (nanochat's tokenizer.pkl), and unpickling a file can run arbitrary code. "
            "If you trust it, opt in with allow_pickle=True (the converter's --allow-pickle flag); "
            f"converting once writes the safe format ({VOCAB_FILE} + tokenizer_config.json) and the pickle "
            "is never needed again.")
    with open(path, "rb") as f:
        obj = _EncodingUnpickler(f).load()
    state = getattr(obj, "state", None)
    if not isinstance(state, dict) or not {"pat_str", "mergeable_ranks", "special_tokens"} <= set(state):
        raise ValueError(f"{path} does not hold a tiktoken Encoding's state")
    encoding = tiktoken.Encoding(name=state.get("name", "rustbpe"), pat_str=state["pat_str"],
                                 mergeable_ranks=state["mergeable_ranks"],
                                 special_tokens=state["special_tokens"])
    return CognicaPoETokenizer.from_encoding(encoding)


# -----------------------------------------------------------------------------
# nanochat checkpoints

def find_nanochat_checkpoint(folder: str, step: int | None = None) -> tuple[str, str, int]:
    """(model_*.pt, meta_*.json, step): the given step or the last one."""
    steps = sorted(int(m.group(1)) for p in glob.glob(os.path.join(folder, "model_*.pt"))
                   if (m := re.search(r"model_(\d+)\.pt$", p)))
    if not steps:
        raise FileNotFoundError(f"no nanochat checkpoint (model_XXXXXX.pt) in {folder}")
    if step is None:
        step = steps[-1]
    elif step not in steps:
        raise FileNotFoundError(f"no model_{step:06d}.pt in {folder}; steps present: {steps}")
    model_path = os.path.join(folder, f"model_{step:06d}.pt")
    meta_path = os.path.join(folder, f"meta_{step:06d}.json")
    if not os.path.isfile(meta_path):
        raise FileNotFoundError(f"{model_path} has no {os.path.basename(meta_path)} beside it")
    return model_path, meta_path, step


def config_from_nanochat_meta(meta: dict) -> CognicaPoEConfig:
    """nanochat's 7 GPTConfig fields plus the PoE fields of the run's user_config (no PoE fields: one stage)."""
    mc = meta["model_config"]
    user = meta.get("user_config") or {}
    n_layer = mc["n_layer"]
    poe_mode = user.get("poe_mode") or "none"
    poe_every = int(user.get("poe_every") or n_layer)
    return CognicaPoEConfig(
        vocab_size=mc["vocab_size"], sequence_len=mc["sequence_len"], n_layer=n_layer, n_head=mc["n_head"],
        n_kv_head=mc["n_kv_head"], n_embd=mc["n_embd"], window_pattern=mc.get("window_pattern") or "L",
        poe_mode=poe_mode, poe_every=poe_every, poe_alpha=float(user.get("poe_alpha") or 0.0),
    )


def load_nanochat_state_dict(model_path: str) -> dict[str, torch.Tensor]:
    """nanochat's state_dict, read with weights_only=True, prefixes stripped, all in fp32."""
    try:
        sd = torch.load(model_path, map_location="cpu", weights_only=True)
    except Exception as e:
        raise ValueError(f"cannot read {model_path} as a weights-only torch checkpoint: {e}") from e
    if not isinstance(sd, dict):
        raise ValueError(f"{model_path} does not hold a state_dict")
    return {strip_prefixes(k): v.float() for k, v in sd.items()}


def nanochat_tokenizer_places(folder: str) -> list[str]:
    """Where nanochat keeps the tokenizer of a checkpoint folder: beside it, or in <base_dir>/tokenizer/ two levels
    above <base_dir>/base_checkpoints/<tag>/ (also the folder itself and one level up)."""
    folder = os.path.abspath(folder)
    parent = os.path.dirname(folder)
    places = [os.path.join(folder, "tokenizer"), folder, os.path.join(parent, "tokenizer"),
              os.path.join(os.path.dirname(parent), "tokenizer")]
    return list(dict.fromkeys(places))


def find_nanochat_tokenizer(folder: str, allow_pickle: bool = False, tokenizer: str | None = None
                            ) -> CognicaPoETokenizer:
    """
    The tokenizer of a nanochat checkpoint: in `tokenizer` if given, else in nanochat's places; our safe format if
    present, else the pickle (opt-in only).
    """
    if tokenizer is not None and not os.path.isdir(tokenizer):
        raise FileNotFoundError(f"--tokenizer {tokenizer}: no such folder (give the folder holding "
                                "tokenizer.tiktoken or nanochat's tokenizer.pkl)")
    candidates = [tokenizer] if tokenizer is not None else nanochat_tokenizer_places(folder)
    for d in candidates:
        if os.path.isfile(os.path.join(d, "tokenizer.tiktoken")):
            return CognicaPoETokenizer.from_pretrained(d)
    for d in candidates:
        pkl = os.path.join(d, "tokenizer.pkl")
        if os.path.isfile(pkl):
            try:
                return load_legacy_pickle(pkl, allow_pickle=allow_pickle)
            except (EOFError, pickle.UnpicklingError, AttributeError, TypeError, IndexError) as e:
                raise ValueError(f"{pkl} is not a readable tokenizer pickle ({type(e).__name__}: {e}); pass the "
                                 "right tokenizer folder with --tokenizer") from None
    if tokenizer is not None:
        raise FileNotFoundError(f"--tokenizer {tokenizer} holds neither tokenizer.tiktoken nor tokenizer.pkl")
    raise FileNotFoundError(f"no tokenizer (tokenizer.tiktoken or tokenizer.pkl) in {', '.join(candidates)}; "
                            "pass its folder with --tokenizer DIR")


def read_nanochat_meta(meta_path: str) -> tuple[CognicaPoEConfig, dict]:
    """(config, meta) of a nanochat meta_*.json; a bad file or a missing field is named in one line."""
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e})") from None
    if not isinstance(meta, dict) or not isinstance(meta.get("model_config"), dict):
        raise ValueError(f"{meta_path} has no model_config object: not a nanochat checkpoint's metadata")
    missing = [k for k in ("vocab_size", "sequence_len", "n_layer", "n_head", "n_kv_head", "n_embd")
               if k not in meta["model_config"]]
    if missing:
        raise ValueError(f"{meta_path}: model_config lacks {', '.join(missing)} (nanochat writes all of them)")
    try:
        return config_from_nanochat_meta(meta), meta
    except (ValueError, TypeError, AttributeError) as e:
        raise ValueError(f"{meta_path}: {e}") from None


def nanochat_to_model(folder: str, step: int | None = None) -> tuple[CognicaPoEForCausalLM, dict]:
    """Build our model (fp32) from a nanochat checkpoint folder; every tensor is checked first."""
    model_path, meta_path, step = find_nanochat_checkpoint(folder, step)
    config, meta = read_nanochat_meta(meta_path)
    sd = load_nanochat_state_dict(model_path)
    with torch.device("meta"):
        model = CognicaPoEForCausalLM(config)
    check_shapes(expected_shapes(model.gpt), {k: tuple(v.shape) for k, v in sd.items()}, model_path)
    model.gpt.load_state_dict(sd, strict=True, assign=True)
    model.gpt._rotary.clear()
    return model.eval(), meta


def convert_nanochat(folder: str, out_dir: str, dtype: str = "bfloat16", allow_pickle: bool = False,
                     step: int | None = None, overwrite: bool = False, tokenizer: str | None = None) -> str:
    """
    nanochat checkpoint folder -> self-contained HF folder. Nothing is written if any check fails. tokenizer: the
    tokenizer's folder (default: where nanochat keeps it, see nanochat_tokenizer_places).
    """
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"no nanochat checkpoint folder at {folder}")
    model, meta = nanochat_to_model(folder, step)
    tok = find_nanochat_tokenizer(folder, allow_pickle=allow_pickle, tokenizer=tokenizer)
    if len(tok) != model.config.vocab_size:
        raise ValueError(f"tokenizer has {len(tok)} ids but the checkpoint's vocab_size is "
                         f"{model.config.vocab_size}: wrong tokenizer for this checkpoint (pass the right one with "
                         "--tokenizer)")
    if tok.convert_tokens_to_ids(SPECIAL_TOKENS[0]) != model.config.vocab_size - len(SPECIAL_TOKENS):
        raise ValueError("tokenizer's special tokens are not the last 9 ids as nanochat lays them out")
    return export_hf_folder(model, tok, out_dir, dtype=dtype, overwrite=overwrite, sources=(folder,))

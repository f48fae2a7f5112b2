"""
Checkpoint formats: our HF folder (safetensors) and the remote-code export (nanochat.py converts nanochat's folders).

An HF folder holds config.json (with auto_map), model.safetensors (bf16 by default), generation_config.json,
the tokenizer files, the remote-code .py files (copied from THIS package: it is the single source of truth)
and LICENSE/NOTICE. Writing is atomic (atomic.py): everything goes to a temporary folder that is renamed at the
end, so a failure leaves nothing behind, and --overwrite replaces only a folder this package wrote (config.json
with our model_type), never the working directory, a source or a folder above either.
"""

import contextlib
import glob
import json
import os
import re
import shutil
from collections.abc import Iterable, Iterator
from importlib import resources

import torch
from transformers import GenerationConfig

from .atomic import atomic_file, atomic_folder, write_json
from .config import CognicaPoEConfig, preset_config
from .cpu import apply_packing
from .folders import check_model_folder, is_folder_name
from .hf import CognicaPoEForCausalLM, load_folder
from .model import GPT
from .placement import place_device_map
from .quantize import QUANT_FILE, WEIGHTS_FILE, parse_quantize, quantize_model, quantized_gpt, quantized_tensors
from .specialist import DELTA_FILE, add_specialist, parent_reference, stage_delta
from .tokenizer import CognicaPoETokenizer, tokenizer_auto_map

PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
# the modules transformers needs to run the model; their `from .x import` siblings are found by following imports
REMOTE_CODE_ENTRIES = ("config.py", "hf.py", "tokenizer.py")
DTYPES = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32, "fp32": torch.float32,
          "float16": torch.float16, "fp16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


# -----------------------------------------------------------------------------
# remote code

def remote_code_files() -> list[str]:
    """The package modules an exported folder needs: the entries plus everything they import as `from .x`."""
    todo, seen = list(REMOTE_CODE_ENTRIES), []
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.append(name)
        with open(os.path.join(PACKAGE_DIR, name)) as f:
            todo += [m + ".py" for m in re.findall(r"^\s*from \.(\w+) import", f.read(), flags=re.MULTILINE)]
    return sorted(seen)


def auto_map() -> dict:
    """config.json's auto_map. The tokenizer's entry lives in tokenizer_config.json, where transformers needs it
    as a [slow, fast] list; a list in config.json is what makes the Hub warn "must be a string"."""
    return {"AutoConfig": "config.CognicaPoEConfig", "AutoModelForCausalLM": "hf.CognicaPoEForCausalLM"}


def write_remote_code(folder: str) -> list[str]:
    files = remote_code_files()
    for name in files:
        shutil.copyfile(os.path.join(PACKAGE_DIR, name), os.path.join(folder, name))
    return files


def refresh_code(folder: str) -> list[str]:
    """Replace a released folder's .py files with this package's, and point config.json's auto_map at them.
    Each file is replaced atomically; the old .py files this package no longer has go last."""
    config_path = os.path.join(folder, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{folder} has no config.json: not an HF model folder")
    with open(config_path) as f:
        config = json.load(f)
    if config.get("model_type") != CognicaPoEConfig.model_type:
        raise ValueError(f"{config_path} has model_type {config.get('model_type')!r}, not 'cognica_poe'")
    files = remote_code_files()
    for name in files:
        with open(os.path.join(PACKAGE_DIR, name), "rb") as src, atomic_file(os.path.join(folder, name), "wb") as dst:
            shutil.copyfileobj(src, dst)
    config["auto_map"] = auto_map()
    write_json(config_path, config)
    tok_config = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(tok_config):
        with open(tok_config) as f:
            tc = json.load(f)
        tc["auto_map"] = {"AutoTokenizer": tokenizer_auto_map()}
        write_json(tok_config, tc)
    for old in glob.glob(os.path.join(folder, "*.py")):
        if os.path.basename(old) not in files:
            os.remove(old)
    return files


# -----------------------------------------------------------------------------
# our HF folder

def is_model_folder(folder: str) -> bool:
    """A folder this package wrote: its config.json names our model_type (the only kind --overwrite replaces)."""
    try:
        with open(os.path.join(folder, "config.json")) as f:
            return json.load(f).get("model_type") == CognicaPoEConfig.model_type
    except (OSError, ValueError, AttributeError):
        return False


@contextlib.contextmanager
def model_folder(out_dir: str, overwrite: bool = False, sources: Iterable[str | None] = ()) -> Iterator[str]:
    """atomic_folder for a model folder (replacing only one of ours, never a source); adds LICENSE and NOTICE."""
    with atomic_folder(out_dir, overwrite, owned=is_model_folder, sources=sources) as tmp:
        yield tmp
        for name in ("LICENSE", "NOTICE"):
            with resources.files("cognica_poe").joinpath(name).open("rb") as src, \
                    open(os.path.join(tmp, name), "wb") as dst:
                shutil.copyfileobj(src, dst)


def write_config_files(folder: str, config: CognicaPoEConfig, tokenizer: CognicaPoETokenizer | None) -> None:
    """config.json, generation_config.json and (with a tokenizer, whose special ids the config takes) the tokenizer
    files of a folder being written."""
    if tokenizer is not None:
        set_special_ids(config, tokenizer)
        tokenizer.save_pretrained(folder)
    config.save_pretrained(folder)
    generation_config_for(config).save_pretrained(folder)


def generation_config_for(config: CognicaPoEConfig) -> GenerationConfig:
    """Base models stop at <|bos|> (a new document) and chat models at <|assistant_end|>; pad with BOS."""
    eos = config.eos_token_id
    return GenerationConfig(bos_token_id=config.bos_token_id, eos_token_id=eos, pad_token_id=config.pad_token_id,
                            do_sample=False, max_new_tokens=256)


def set_special_ids(config: CognicaPoEConfig, tokenizer: CognicaPoETokenizer) -> None:
    bos = tokenizer.bos_token_id
    config.bos_token_id = bos
    config.pad_token_id = bos
    config.eos_token_id = [bos, tokenizer.convert_tokens_to_ids("<|assistant_end|>")]


def export_hf_folder(model: CognicaPoEForCausalLM, tokenizer: CognicaPoETokenizer | None, out_dir: str,
                     dtype: str | torch.dtype = "bfloat16", overwrite: bool = False,
                     sources: Iterable[str | None] = ()) -> str:
    """Write a complete, self-contained HF folder (weights in `dtype`) atomically. Returns out_dir. sources: what
    the model was made from (with the folder it was loaded from), which overwrite never replaces."""
    dtype = parse_dtype(dtype)
    with model_folder(out_dir, overwrite, (*sources, model.config._name_or_path)) as tmp:
        if tokenizer is not None:
            set_special_ids(model.config, tokenizer)
        model.config.auto_map = auto_map()
        model.generation_config = generation_config_for(model.config)
        original = model.gpt.lm_head.weight.dtype
        model.to(dtype)
        try:
            model.save_pretrained(tmp, safe_serialization=True)
        finally:
            model.to(original)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        write_remote_code(tmp)
    return os.path.abspath(out_dir)


def save_stage_folder(model: CognicaPoEForCausalLM, out_dir: str, base_model_name_or_path: str,
                      tokenizer: CognicaPoETokenizer | None = None, dtype: str | torch.dtype | None = None,
                      overwrite: bool = False, sources: Iterable[str | None] = ()) -> str:
    """
    A specialist's stage folder: config.json (with its parent), delta.safetensors, remote code, tokenizer.
    base_model_name_or_path is stored as given: a path relative to out_dir, an absolute path or a repo id
    (specialist.parent_reference makes one from a path the user typed). dtype defaults to the model's own (the
    base's): the delta carries the full wte, and any other dtype would round the base's rows, so the loaded base
    would no longer be bit-identical to its folder. sources: folders overwrite must never replace.
    """
    from safetensors.torch import save_file

    ref = base_model_name_or_path
    # by name: out_dir does not exist yet, so the system could not resolve "out_dir/../x" through it
    if not os.path.isabs(ref) and not os.path.isdir(os.path.normpath(os.path.join(out_dir, ref))) \
            and os.path.isdir(ref):
        raise ValueError(f"the parent {ref!r} is a folder relative to the working directory, which the stage folder "
                         "cannot rely on; pass it relative to the stage folder or absolute "
                         "(specialist.parent_reference)")
    dtype = model.gpt.dtype if dtype is None else parse_dtype(dtype)
    delta = {k: v.detach().to(dtype).contiguous() for k, v in stage_delta(model.gpt).items()}
    with model_folder(out_dir, overwrite, (*sources, model.config._name_or_path)) as tmp:
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.base_model_name_or_path = base_model_name_or_path
        config.auto_map = auto_map()
        config.architectures = ["CognicaPoEForCausalLM"]
        write_config_files(tmp, config, tokenizer)
        save_file(delta, os.path.join(tmp, DELTA_FILE), metadata={"format": "pt"})
        write_remote_code(tmp)
    return os.path.abspath(out_dir)


def new_stage_folder(base: str, out_dir: str, new_layers: int, head_mode: str = "dual", seed: int = 0,
                     dtype: str | None = None, overwrite: bool = False) -> str:
    """`cognica-poe stage new`: a fresh (identity) specialist on `base`, saved as a stage folder that names `base`
    relative to itself, so it loads from any working directory."""
    parent = load_folder(base)
    model = CognicaPoEForCausalLM.from_gpt(add_specialist(parent.gpt, new_layers, head_mode=head_mode, seed=seed))
    tokenizer = CognicaPoETokenizer.from_pretrained(base) if os.path.isfile(
        os.path.join(base, "tokenizer.tiktoken")) else None
    return save_stage_folder(model, out_dir, parent_reference(base, out_dir), tokenizer, dtype=dtype,
                             overwrite=overwrite, sources=(base,))


def read_config(path: str) -> CognicaPoEConfig:
    """A model folder's config.json, every problem with the file named in one line."""
    check_model_folder(path)
    config_path = os.path.join(path, "config.json")
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{config_path} is not valid JSON ({e}); restore it from the original folder") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path} must hold a JSON object of config fields, not {type(config).__name__}")
    if config.get("model_type", CognicaPoEConfig.model_type) != CognicaPoEConfig.model_type:
        raise ValueError(f"{config_path} has model_type {config['model_type']!r}, not 'cognica_poe'")
    try:
        return CognicaPoEConfig.from_dict(config)
    except (ValueError, TypeError) as e:
        raise ValueError(f"{config_path}: {e}") from None


def load_model(path_or_preset: str, dtype: str | torch.dtype | None = None, device: str = "cpu",
               seed: int = 0, pack: bool | str = False, quantize: str | None = None, group_size: int = 128,
               quantize_heads: bool = True, device_map=None, compile: bool | str = False) -> CognicaPoEForCausalLM:
    """
    An HF folder (ours or a released one), a quantized folder (`cognica-poe quantize`), or a preset name (randomly
    initialised, for shapes and speed), in eval mode. pack: also give the large matrices prepacked copies for CPU
    inference (model.pack_weights()): True always, "auto" where a probe says they decode faster here (cpu.py).
    quantize: "int8" or "int4" weight-only quantization of the block matrices (and the heads unless quantize_heads
    is False; int4 in groups of group_size inputs): see quantize.py. A quantized folder loads as saved; asking it
    for another quantization is an error. device_map: the stages' devices instead of `device` ({"stage:0":
    "cuda:0", "stage:1": "cuda:1", ...}, "auto" or one device; see placement.py). compile: compiled decode,
    True or a mode ("default", "max-autotune"; compiled.py; CPU needs a C++ compiler, else it warns and stays eager).
    """
    bits = parse_quantize(quantize)
    if is_folder_name(path_or_preset) and is_quantized_folder(path_or_preset):
        saved = read_quantization(path_or_preset)
        if bits is not None and (bits, group_size if bits == 4 else None) != (saved["bits"], saved["group_size"]):
            raise ValueError(f"{path_or_preset} is already quantized (int{saved['bits']}"
                             + (f", group size {saved['group_size']}" if saved["bits"] == 4 else "")
                             + "): load it without --quantize, or quantize its float folder")
        bits = None
        model = load_quantized(path_or_preset, None if dtype is None else parse_dtype(dtype), device)
    elif is_folder_name(path_or_preset):
        read_config(path_or_preset)  # a missing path, a file, a nanochat folder or a bad config.json: one clear line
        model = load_folder(path_or_preset, dtype=None if dtype is None else parse_dtype(dtype)).to(device).eval()
    else:
        gpt = GPT.from_config(preset_config(path_or_preset), device, parse_dtype(dtype or torch.float32), seed=seed)
        model = CognicaPoEForCausalLM.from_gpt(gpt).eval()
    if bits is not None:
        quantize_model(model.gpt, bits, group_size, quantize_heads)
    if device_map is not None:
        place_device_map(model.gpt, device_map)
    apply_packing(model, pack)  # only what stays float (a quantized matrix is never packed)
    if compile:
        from .compiled import compile_decode

        compile_decode(model.gpt, "default" if compile is True else compile)
    return model


# -----------------------------------------------------------------------------
# quantized folders (layout: quantize.py)

def is_quantized_folder(path: str) -> bool:
    return os.path.isfile(os.path.join(path, QUANT_FILE))


def read_quantization(path: str) -> dict:
    """A quantized folder's quantization.json, checked; every problem named in one line."""
    meta_path = os.path.join(path, QUANT_FILE)
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{meta_path} is not valid JSON ({e}); restore it from the original folder") from None
    if not isinstance(meta, dict) or meta.get("bits") not in (8, 4) or not isinstance(meta.get("modules"), list) \
            or (meta["bits"] == 4 and not isinstance(meta.get("group_size"), int)):
        raise ValueError(f"{meta_path} is not a cognica-poe quantization record (bits 8 or 4, group_size for 4, "
                         "modules); restore it from the original folder")
    return meta


def save_quantized(model: CognicaPoEForCausalLM, tokenizer: CognicaPoETokenizer | None, out_dir: str,
                   overwrite: bool = False, sources: Iterable[str | None] = ()) -> str:
    """
    Write a quantized model (its gpt went through quantize.quantize_model) as a quantized folder, atomically:
    config.json, generation_config.json, tokenizer files, quantization.json and model.safetensors (quantize.py
    documents the layout). No remote code: transformers cannot run it; cognica_poe.load_model loads it as saved.
    """
    from safetensors.torch import save_file

    tensors, meta = quantized_tensors(model.gpt)
    with model_folder(out_dir, overwrite, (*sources, model.config._name_or_path)) as tmp:
        config = model.config.__class__.from_dict(model.config.to_dict())
        config.base_model_name_or_path = None  # complete weights, not a delta on a parent
        config.auto_map = None
        write_config_files(tmp, config, tokenizer)
        save_file(tensors, os.path.join(tmp, WEIGHTS_FILE), metadata={"format": "pt"})
        write_json(os.path.join(tmp, QUANT_FILE), meta)
    return os.path.abspath(out_dir)


def load_quantized(path: str, dtype: torch.dtype | None = None, device: str = "cpu") -> CognicaPoEForCausalLM:
    """A quantized folder in eval mode, its integer weights exactly as saved (nothing re-quantized)."""
    from safetensors.torch import load_file

    config = read_config(path)
    meta = read_quantization(path)
    weights = os.path.join(path, WEIGHTS_FILE)
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"{path} has {QUANT_FILE} but no {WEIGHTS_FILE}: restore it from the original folder")
    dtype = parse_dtype(dtype or meta.get("dtype", "float32"))
    gpt = quantized_gpt(config, load_file(weights), meta, dtype, device, source=weights)
    model = CognicaPoEForCausalLM.from_gpt(gpt).eval()
    model.config._name_or_path = path
    return model


def model_summary(model: GPT) -> dict:
    """Numbers `cognica-poe info` prints: parameter groups, stages, windows, memory."""
    cfg = model.config
    groups = {"wte": 0, "value_embeds": 0, "lm_head": 0, "blocks": 0, "scalars": 0}
    for name, p in model.named_parameters():
        if name.startswith("transformer.wte"):
            groups["wte"] += p.numel()
        elif name.startswith("value_embeds"):
            groups["value_embeds"] += p.numel()
        elif name.startswith(("lm_head", "ancestor_heads")):  # every head: lm_head, lm_head_stage, folded ancestors
            groups["lm_head"] += p.numel()
        elif name.startswith("transformer.h"):
            groups["blocks"] += p.numel()
        else:
            groups["scalars"] += p.numel()
    total = sum(groups.values())
    kv_bytes_per_token_bf16 = 2 * cfg.n_layer * cfg.n_kv_head * cfg.head_dim * 2
    return {
        "parameters": total, "parameter_groups": groups,
        "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head, "n_kv_head": cfg.n_kv_head,
        "head_dim": cfg.head_dim, "vocab_size": cfg.vocab_size, "padded_vocab_size": cfg.padded_vocab_size,
        "sequence_len": cfg.sequence_len, "window_sizes": cfg.window_sizes(),
        "poe_mode": cfg.poe_mode, "poe_every": cfg.poe_every, "poe_n_stages": cfg.poe_n_stages,
        "poe_stage_boundary_layers": cfg.poe_stage_boundary_layers,
        "value_embed_layers": [i for i in range(cfg.n_layer) if cfg.has_value_embed(i)],
        "backout_layer": cfg.backout_layer,
        "weights_bytes_bf16": 2 * total, "weights_bytes_fp32": 4 * total,
        "kv_cache_bytes_per_token_bf16": kv_bytes_per_token_bf16,
    }

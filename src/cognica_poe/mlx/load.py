"""
Folders into MLX models: an exported HF folder, a specialist stage folder (assembled on its parents), or a folder
this module converted; MLX quantization; and the conversion into a folder `mlx_lm.load` can open.

Weights go from safetensors straight into MLX arrays (mx.load), in the file's dtype unless another is asked for.
A stage folder follows the same cascade as ../specialist.py: parents resolve offline down to a base folder, each
ancestor's lm_head_stage is folded into the head of its exit (and every deeper one), the leaf keeps its own
lm_head_stage, and each delta replaces wte and the lambdas and adds its layers.

A converted folder holds model.safetensors under this package's MLX names (quantized matrices as MLX stores
them), config.json with the derived layout (model.LAYOUT_KEY) and `model_file` naming a copy of model.py, and
the tokenizer with its remote code, so `mlx_lm.load(folder, trust_remote_code=True,
tokenizer_config={"trust_remote_code": True})` and mlx_lm's generate run it at the served exit.
"""

import json
import os
import shutil
from dataclasses import asdict

import mlx.core as mx
import mlx.nn as nn
import torch
from mlx.utils import tree_flatten

from ..checkpoint import atomic_folder, write_remote_code
from ..config import CognicaPoEConfig
from ..model import GPT
from ..specialist import DELTA_FILE, resolve_parent
from ..weights import check_shapes, safetensors_shapes, strip_prefixes
from .model import LAYOUT_KEY, Model, ModelArgs

WEIGHTS_FILE = "model.safetensors"
MODEL_FILE = "cognica_poe_mlx.py"  # model.py's copy in a converted folder (mlx_lm's `model_file`)
MODEL_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "model.py")
TOKENIZER_FILES = ("tokenizer.tiktoken", "tokenizer_config.json", "special_tokens_map.json", "token_bytes.safetensors",
                   "chat_template.jinja", "generation_config.json")
DTYPES = {"float32": mx.float32, "fp32": mx.float32, "bfloat16": mx.bfloat16, "bf16": mx.bfloat16,
          "float16": mx.float16, "fp16": mx.float16}
QUANT_BITS = (2, 3, 4, 5, 6, 8)  # what mx.quantize packs in its affine mode
QUANT_GROUPS = (32, 64, 128)


def parse_dtype(name: str | mx.Dtype | None) -> mx.Dtype | None:
    if name is None or isinstance(name, mx.Dtype):
        return name
    if name not in DTYPES:
        raise ValueError(f"unknown dtype {name!r}; choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def model_args(config: CognicaPoEConfig) -> ModelArgs:
    """The MLX model's numbers, every derived one computed by the package's config (and GPT for the served exit)."""
    with torch.device("meta"):
        served = GPT(config).served_layer
    return ModelArgs(
        vocab_size=config.vocab_size, padded_vocab_size=config.padded_vocab_size, n_layer=config.n_layer,
        n_head=config.n_head, n_kv_head=config.n_kv_head, n_embd=config.n_embd, head_dim=config.head_dim,
        rope_theta=config.rope_theta, softcap=config.softcap, qk_scale=config.qk_scale,
        window_sizes=config.window_sizes(),
        value_embed_layers=[i for i in range(config.n_layer) if config.has_value_embed(i)],
        backout_layer=config.backout_layer, trunk_n_layer=config.trunk_n_layer,
        poe_stage_boundary_layers=config.poe_stage_boundary_layers, specialist_ends=config.specialist_ends,
        head_mode=config.head_mode, served_layer=served, sequence_len=config.sequence_len,
        rotary_seq_len=config.rotary_seq_len, bos_token_id=config.bos_token_id, eos_token_id=config.eos_token_id,
        pad_token_id=config.pad_token_id, wand_p99_bounds=config.wand_p99_bounds)


def read_safetensors(path: str, dtype: mx.Dtype | None) -> dict[str, mx.array]:
    """A safetensors file as MLX arrays (known key prefixes dropped), checked first so damage is a clear error."""
    safetensors_shapes(path)
    weights = {strip_prefixes(k): v for k, v in mx.load(path).items()}
    return weights if dtype is None else {k: v.astype(dtype) for k, v in weights.items()}


def read_folder(path: str, dtype: mx.Dtype | None, parent_map: dict[str, str] | None = None,
                _seen: tuple[str, ...] = ()) -> tuple[CognicaPoEConfig, dict[str, mx.array], list[str]]:
    """(config, weights under GPT's names, folders from this one down to its base) of an HF or stage folder."""
    path = os.path.realpath(path)
    if path in _seen:
        raise ValueError(f"cyclic specialist chain: {' -> '.join(list(_seen) + [path])}")
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise FileNotFoundError(f"{path} has no config.json: not an HF model folder")
    config = CognicaPoEConfig.from_pretrained(path)
    delta = os.path.join(path, DELTA_FILE)
    if not os.path.isfile(delta):
        weights = os.path.join(path, WEIGHTS_FILE)
        if not os.path.isfile(weights):
            raise FileNotFoundError(f"{path} has neither {WEIGHTS_FILE} nor {DELTA_FILE}: not a model folder")
        return config, read_safetensors(weights, dtype), [path]
    if not config.base_model_name_or_path:
        raise ValueError(f"{path}/config.json has no base_model_name_or_path: not a stage folder")
    parent = resolve_parent(config.base_model_name_or_path, path, parent_map)
    parent_config, weights, chain = read_folder(parent, dtype, parent_map, _seen + (path,))
    if parent_config.specialist_ends:  # the parent's stage head becomes an ancestor head, folded into its exit's
        ends = parent_config.specialist_ends
        below = weights[f"ancestor_heads.{ends[-2]}.weight"] if len(ends) > 1 else weights["lm_head.weight"]
        weights[f"ancestor_heads.{ends[-1]}.weight"] = below + weights.pop("lm_head_stage.weight")
    base_dtype = weights["lm_head.weight"].dtype
    weights.update({k: v.astype(base_dtype) for k, v in read_safetensors(delta, None).items()})
    return config, weights, [path] + chain


def load_folder(path: str, dtype: str | mx.Dtype | None = None, parent_map: dict[str, str] | None = None
                ) -> tuple[Model, dict, list[str]]:
    """(model, config.json's dict, the folders read) for any folder `load` accepts."""
    dtype = parse_dtype(dtype)
    config_path = os.path.join(path, "config.json")
    if os.path.isfile(config_path):
        with open(config_path) as f:
            raw = json.load(f)
        if LAYOUT_KEY in raw:  # a converted folder: MLX names, maybe quantized
            model = Model(ModelArgs.from_dict(raw))
            weights = model.sanitize(read_safetensors(os.path.join(path, WEIGHTS_FILE), None))
            if "quantization" in raw:
                q = raw["quantization"]
                nn.quantize(model, group_size=q["group_size"], bits=q["bits"],
                            class_predicate=lambda p, m: f"{p}.scales" in weights)
            model.load_weights(list(weights.items()), strict=True)
            if dtype is not None:
                model.set_dtype(dtype)
            mx.eval(model.parameters())
            return model.eval(), raw, [os.path.realpath(path)]
    config, weights, chain = read_folder(path, dtype, parent_map)
    model = Model(model_args(config))
    weights = model.sanitize(weights)
    expected = {k: tuple(v.shape) for k, v in tree_flatten(model.parameters())}
    check_shapes(expected, {k: tuple(v.shape) for k, v in weights.items()}, os.path.join(chain[-1], WEIGHTS_FILE))
    model.load_weights(list(weights.items()), strict=True)
    mx.eval(model.parameters())
    return model.eval(), config.to_dict(), chain


def load(path: str, dtype: str | mx.Dtype | None = None, parent_map: dict[str, str] | None = None) -> Model:
    """
    An MLX model from an HF folder (ours, exported or converted), a specialist stage folder (parents resolved
    offline; parent_map maps repo ids to folders) or a converted MLX folder. dtype: float32 / bfloat16 / float16,
    default the file's.
    """
    return load_folder(path, dtype, parent_map)[0]


def quantize(model: Model, bits: int = 8, group_size: int = 64) -> Model:
    """
    MLX's affine quantization (nn.quantize) of every matrix and embedding whose rows split into whole groups: the
    blocks, the heads, wte and the value embeddings (the 12- and 24-channel gates stay as they are). In place.
    """
    if bits not in QUANT_BITS:
        raise ValueError(f"bits must be one of {QUANT_BITS}, got {bits!r}")
    if group_size not in QUANT_GROUPS:
        raise ValueError(f"group_size must be one of {QUANT_GROUPS}, got {group_size!r}")

    def wanted(_path: str, m: nn.Module) -> bool:
        return isinstance(m, (nn.Linear, nn.Embedding)) and m.weight.shape[-1] % group_size == 0

    nn.quantize(model, group_size=group_size, bits=bits, class_predicate=wanted)
    return model


def convert(path: str, out_dir: str, dtype: str | None = None, bits: int | None = None, group_size: int = 64,
            parent_map: dict[str, str] | None = None, overwrite: bool = False) -> str:
    """
    An HF or stage folder -> a self-contained MLX folder (quantized when bits is given) that this module's `load`
    and mlx_lm's `load` / `generate` open. Nothing is written if any step fails.
    """
    model, config, chain = load_folder(path, dtype, parent_map)
    if bits is not None:
        if "quantization" in config:
            raise ValueError(f"{path} is already quantized ({config['quantization']}): convert the unquantized "
                             "folder it came from")
        quantize(model, bits, group_size)
    config = {k: v for k, v in config.items() if k not in ("auto_map", "architectures", "base_model_name_or_path")}
    config[LAYOUT_KEY] = asdict(model.config)
    config["model_file"] = MODEL_FILE
    if bits is not None:
        config["quantization"] = {"group_size": group_size, "bits": bits}
    with atomic_folder(out_dir, overwrite) as tmp:
        mx.save_safetensors(os.path.join(tmp, WEIGHTS_FILE), dict(tree_flatten(model.parameters())),
                            metadata={"format": "mlx"})
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(config, f, indent=2)
            f.write("\n")
        shutil.copyfile(MODEL_SOURCE, os.path.join(tmp, MODEL_FILE))
        source = next((d for d in chain if os.path.isfile(os.path.join(d, "tokenizer.tiktoken"))), None)
        if source is not None:  # the tokenizer and the remote code it loads through (AutoTokenizer)
            for name in TOKENIZER_FILES:
                if os.path.isfile(os.path.join(source, name)):
                    shutil.copyfile(os.path.join(source, name), os.path.join(tmp, name))
            write_remote_code(tmp)
    return os.path.abspath(out_dir)

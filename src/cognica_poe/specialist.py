"""
Post-hoc specialist stages on a frozen base, and the cascade loader that assembles them.

A specialist appends N new blocks after its parent (c_proj zero, so the stage starts as the identity; q/k/v
and c_fc as in the base init; no value embeddings; resid_lambdas 1.0, x0_lambdas 0.0) and a zero-init
`lm_head_stage`. Its exit's logits are lm_head(x) + lm_head_stage(x) (head_mode "dual") or lm_head_stage(x)
("spec"); with head_mode "base" the exit uses lm_head alone and forward()/generate() serve the parent's exit,
so the model reproduces its parent bit for bit whatever the new layers learned. Backout stays at the base's
midpoint.

A stage folder holds config.json (with `base_model_name_or_path`, the parent: a path or a repo id) and
delta.safetensors: the new layers, lm_head_stage, the full wte (chat special-token rows may be trained),
resid_lambdas and x0_lambdas. Loading resolves parents recursively down to a base folder, appends each
ancestor's layers and loads its delta; each ancestor's lm_head_stage is folded into a head used at that
ancestor's exit and every deeper one (base exits keep the original lm_head); only the leaf keeps a separate
lm_head_stage. Parents resolve offline: a folder path (relative to the child folder, or absolute; never
relative to the working directory, so a stage folder loads the same from anywhere), the local HF cache, then a
user mapping of ids to paths (argument, or the COGNICA_POE_PARENTS environment variable pointing at a JSON file).

Everything here works on the core GPT; loading a base folder is the caller's (hf.load_folder passes its loader),
so this file never imports the transformers face.

This file is copied into exported remote-code folders: it imports only torch/transformers/safetensors.
"""

import json
import os
from collections.abc import Callable

import torch

from .config import CognicaPoEConfig
from .model import GPT, init_block, seeded_generator
from .weights import check_shapes, load_safetensors

DELTA_FILE = "delta.safetensors"


def specialist_config(parent: CognicaPoEConfig, new_layers: int, head_mode: str = "dual") -> CognicaPoEConfig:
    """The parent's config with `new_layers` blocks appended as one more stage."""
    if not isinstance(new_layers, int) or new_layers < 1:
        raise ValueError(f"new_layers must be a positive integer, got {new_layers!r}")
    d = parent.to_dict()
    for k in ("auto_map", "architectures", "_name_or_path", "transformers_version", "model_type"):
        d.pop(k, None)
    n = parent.n_layer + new_layers
    d.update(n_layer=n, base_n_layer=parent.trunk_n_layer, head_mode=head_mode,
             specialist_ends=(parent.specialist_ends or []) + [n - 1], base_model_name_or_path=None)
    return CognicaPoEConfig(**d)


@torch.no_grad()
def add_specialist(parent: GPT, new_layers: int, head_mode: str = "dual", seed: int | None = None) -> GPT:
    """
    A new model: the parent with `new_layers` fresh blocks (as the base's init; each starts as the identity) and a
    zero lm_head_stage. A specialist parent's own lm_head_stage is folded into the head of its exit (it becomes
    an ancestor). seed: the new blocks draw from a generator of their own (None: torch's global generator).
    """
    config = specialist_config(parent.config, new_layers, head_mode)
    with torch.device("meta"):
        child = GPT(config)
    child.to_empty(device=parent.device)
    child.to(parent.dtype)
    state = dict(parent.state_dict())
    leaf = parent.config.specialist_ends[-1] if parent.config.specialist_ends else None
    if leaf is not None:  # fold: the parent's exit head = (its ancestors' folded head or lm_head) + its stage head
        below = [e for e in parent.config.specialist_ends[:-1]]
        base_head = state[f"ancestor_heads.{below[-1]}.weight"] if below else state["lm_head.weight"]
        state[f"ancestor_heads.{leaf}.weight"] = base_head + state.pop("lm_head_stage.weight")
    for key in ("resid_lambdas", "x0_lambdas"):
        state[key] = torch.cat([state[key], child.resid_lambdas.new_zeros(new_layers)])
    missing, unexpected = child.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    generator = seeded_generator(seed, parent.device)
    for i in range(parent.config.n_layer, config.n_layer):  # the new layers: resid 1.0, x0 0.0
        init_block(child.transformer.h[i], config.n_embd, generator)
        child.resid_lambdas[i] = 1.0
        child.x0_lambdas[i] = 0.0
    child.lm_head_stage.weight.zero_()
    child.share_rotary_from(parent)
    return child.eval()


def stage_delta(gpt: GPT) -> dict[str, torch.Tensor]:
    """The tensors a stage folder stores: the leaf's layers, lm_head_stage, the full wte, resid/x0 lambdas."""
    cfg = gpt.config
    if not cfg.specialist_ends:
        raise ValueError("this model has no specialist stage: nothing to save as a delta")
    first = cfg.segments()[-1][0]
    sd = gpt.state_dict()
    keep = {k: v for k, v in sd.items()
            if k.startswith("transformer.h.") and int(k.split(".")[2]) >= first}
    for k in ("lm_head_stage.weight", "transformer.wte.weight", "resid_lambdas", "x0_lambdas"):
        keep[k] = sd[k]
    return keep


def parent_reference(parent: str, stage_dir: str, relative_to: str | None = None) -> str:
    """
    How a stage folder at stage_dir names `parent` so that it resolves from any working directory: a folder
    (`parent` read relative to `relative_to`, by default the working directory, as a user types it) becomes a
    path relative to stage_dir; anything else (a repo id) is kept as it is.
    """
    folder = os.path.join(relative_to or os.getcwd(), parent)
    if not os.path.isdir(folder):
        return parent
    return os.path.relpath(os.path.realpath(folder), os.path.realpath(stage_dir))


def resolve_parent(name_or_path: str, child_dir: str, parent_map: dict[str, str] | None = None) -> str:
    """A parent folder for `name_or_path` (a path relative to child_dir, an absolute path or a repo id), without
    touching the network."""
    candidate = os.path.join(child_dir, name_or_path)  # an absolute name_or_path stays itself
    if os.path.isdir(candidate):
        return os.path.realpath(candidate)
    try:  # a repo id already in the local HF cache (the cache only: cached_file would also try the cwd)
        from transformers.utils.hub import try_to_load_from_cache

        found = try_to_load_from_cache(name_or_path, "config.json")
        if isinstance(found, str):
            return os.path.dirname(os.path.realpath(found))
    except Exception:  # not a valid repo id
        pass
    mapping = dict(parent_map or {})
    env = os.environ.get("COGNICA_POE_PARENTS")
    if env and not mapping:
        with open(env) as f:
            mapping = json.load(f)
    if name_or_path in mapping and os.path.isdir(mapping[name_or_path]):
        return os.path.realpath(mapping[name_or_path])
    raise FileNotFoundError(
        f"cannot resolve the parent {name_or_path!r} of {child_dir} offline: it is not a folder (absolute or "
        "relative to the stage folder), not in the local Hugging Face cache, and not in the parent mapping (pass "
        "parent_map={id: path} or set COGNICA_POE_PARENTS to a JSON file of that mapping)")


def is_stage_folder(path: str) -> bool:
    """A specialist's stage folder (a delta on a parent), not a complete model."""
    has = lambda name: os.path.isfile(os.path.join(path, name))  # noqa: E731
    return has(DELTA_FILE) and not has("model.safetensors")


# a base folder's model: load_base(folder, dtype) (hf.load_folder passes transformers' loader)
BaseLoader = Callable[[str, torch.dtype | None], GPT]


def load_stage_folder(path: str, load_base: BaseLoader, parent_map: dict[str, str] | None = None,
                      dtype: torch.dtype | None = None, _seen: tuple[str, ...] = ()) -> GPT:
    """Assemble a stage folder and all its ancestors into one GPT; load_base loads the base folder at the root."""
    path = os.path.realpath(path)
    if path in _seen:
        chain = " -> ".join(list(_seen) + [path])
        raise ValueError(f"cyclic specialist chain: {chain}")
    config = CognicaPoEConfig.from_pretrained(path)
    if not config.base_model_name_or_path:
        raise ValueError(f"{path}/config.json has no base_model_name_or_path: not a stage folder")
    parent_dir = resolve_parent(config.base_model_name_or_path, path, parent_map)
    if os.path.isfile(os.path.join(parent_dir, DELTA_FILE)):
        parent = load_stage_folder(parent_dir, load_base, parent_map, dtype, _seen + (path,))
    else:
        if os.path.realpath(parent_dir) in _seen + (path,):
            raise ValueError(f"cyclic specialist chain through {parent_dir}")
        parent = load_base(parent_dir, dtype)
    new_layers = config.n_layer - parent.config.n_layer
    if new_layers < 1:
        raise ValueError(f"{path} has n_layer {config.n_layer}, not more than its parent's {parent.config.n_layer}")
    gpt = add_specialist(parent, new_layers, head_mode=config.head_mode)
    delta_path = os.path.join(path, DELTA_FILE)
    delta = load_safetensors(delta_path)
    expected = {k: tuple(v.shape) for k, v in stage_delta(gpt).items()}
    check_shapes(expected, {k: tuple(v.shape) for k, v in delta.items()}, delta_path)
    gpt.load_state_dict({k: v.to(gpt.dtype) for k, v in delta.items()}, strict=False)
    gpt.config.base_model_name_or_path = config.base_model_name_or_path
    gpt.config.wand_p99_bounds = config.wand_p99_bounds
    gpt.config._name_or_path = path
    return gpt.eval()

"""
Post-hoc specialist stages on a frozen base, and the cascade loader that assembles them (SPEC §5).

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

This file is copied into exported remote-code folders: it imports only torch/transformers/safetensors.
"""

import json
import os

import torch

from .config import CognicaPoEConfig
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
def init_new_layers(gpt, layers: range) -> None:
    """nanochat's block init for the appended layers (c_proj zero: each new block starts as the identity)."""
    s = 3**0.5 * gpt.config.n_embd**-0.5
    for i in layers:
        block = gpt.transformer.h[i]
        block.attn.c_q.weight.uniform_(-s, s)
        block.attn.c_k.weight.uniform_(-s, s)
        block.attn.c_v.weight.uniform_(-s, s)
        block.attn.c_proj.weight.zero_()
        block.mlp.c_fc.weight.uniform_(-0.4 * s, 0.4 * s)
        block.mlp.c_proj.weight.zero_()
        gpt.resid_lambdas[i] = 1.0
        gpt.x0_lambdas[i] = 0.0


@torch.no_grad()
def add_specialist(parent, new_layers: int, head_mode: str = "dual", seed: int | None = None):
    """
    A new model: the parent (a CognicaPoEForCausalLM) with `new_layers` fresh blocks and a zero lm_head_stage.
    A specialist parent's own lm_head_stage is folded into the head of its exit (it becomes an ancestor).
    """
    from .hf import CognicaPoEForCausalLM  # deferred: hf imports this module

    config = specialist_config(parent.config, new_layers, head_mode)
    ref = parent.gpt.lm_head.weight
    with torch.device("meta"):
        child = CognicaPoEForCausalLM(config)
    child.gpt.to_empty(device=ref.device)
    child.gpt.to(ref.dtype)
    state = dict(parent.gpt.state_dict())
    leaf = parent.config.specialist_ends[-1] if parent.config.specialist_ends else None
    if leaf is not None:  # fold: the parent's exit head = (its ancestors' folded head or lm_head) + its stage head
        below = [e for e in parent.config.specialist_ends[:-1]]
        base_head = state[f"ancestor_heads.{below[-1]}.weight"] if below else state["lm_head.weight"]
        state[f"ancestor_heads.{leaf}.weight"] = base_head + state.pop("lm_head_stage.weight")
    for key in ("resid_lambdas", "x0_lambdas"):
        state[key] = torch.cat([state[key], child.gpt.resid_lambdas.new_zeros(new_layers)])
    missing, unexpected = child.gpt.load_state_dict(state, strict=False)
    assert not unexpected, unexpected
    if seed is not None:
        torch.manual_seed(seed)
    init_new_layers(child.gpt, range(parent.config.n_layer, config.n_layer))
    child.gpt.lm_head_stage.weight.zero_()
    child.gpt._rotary.clear()
    return child.eval()


def stage_delta(model) -> dict[str, torch.Tensor]:
    """The tensors a stage folder stores: the leaf's layers, lm_head_stage, the full wte, resid/x0 lambdas."""
    cfg = model.config
    if not cfg.specialist_ends:
        raise ValueError("this model has no specialist stage: nothing to save as a delta")
    first = cfg.segments()[-1][0]
    sd = model.gpt.state_dict()
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


def load_stage_folder(path: str, parent_map: dict[str, str] | None = None, dtype: torch.dtype | None = None,
                      _seen: tuple[str, ...] = ()):
    """Assemble a stage folder and all its ancestors into one CognicaPoEForCausalLM."""
    from .hf import CognicaPoEForCausalLM

    path = os.path.realpath(path)
    if path in _seen:
        chain = " -> ".join(list(_seen) + [path])
        raise ValueError(f"cyclic specialist chain: {chain}")
    config = CognicaPoEConfig.from_pretrained(path)
    if not config.base_model_name_or_path:
        raise ValueError(f"{path}/config.json has no base_model_name_or_path: not a stage folder")
    parent_dir = resolve_parent(config.base_model_name_or_path, path, parent_map)
    if os.path.isfile(os.path.join(parent_dir, DELTA_FILE)):
        parent = load_stage_folder(parent_dir, parent_map, dtype, _seen + (path,))
    else:
        if os.path.realpath(parent_dir) in _seen + (path,):
            raise ValueError(f"cyclic specialist chain through {parent_dir}")
        parent = CognicaPoEForCausalLM.from_pretrained(parent_dir, **({} if dtype is None else {"dtype": dtype}))
    new_layers = config.n_layer - parent.config.n_layer
    if new_layers < 1:
        raise ValueError(f"{path} has n_layer {config.n_layer}, not more than its parent's {parent.config.n_layer}")
    model = add_specialist(parent, new_layers, head_mode=config.head_mode)
    delta_path = os.path.join(path, DELTA_FILE)
    delta = load_safetensors(delta_path)
    expected = {k: tuple(v.shape) for k, v in stage_delta(model).items()}
    check_shapes(expected, {k: tuple(v.shape) for k, v in delta.items()}, delta_path)
    dtype_now = model.gpt.lm_head.weight.dtype
    model.gpt.load_state_dict({k: v.to(dtype_now) for k, v in delta.items()}, strict=False)
    model.config.base_model_name_or_path = config.base_model_name_or_path
    model.config.wand_p99_bounds = config.wand_p99_bounds
    model.config._name_or_path = path
    return model.eval()

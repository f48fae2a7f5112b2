"""
Sibling specialists on ONE shared base trunk: several stage folders that branch from the same base, loaded onto a
single copy of it and composed with the trunk computed once.

The released stages are siblings (-stage-math, -stage-code, -stage-tool all continue the same base), so loading each
with `load_folder` would hold and run the base once per stage. Here the base's tensors (trunk blocks, wte,
value embeddings, smear, backout, lm_head and any folded ancestor heads) exist once; every branch references them and
owns only its new blocks, its lm_head_stage, its resid/x0 lambdas and its head_mode. Each branch is a complete
CognicaPoEForCausalLM that computes what `load_folder` builds for its folder, with the base's modules as its
base layers.

Exits are numbered flat and 0-based: the base's exits 0..n_base_exits-1 (its stage boundaries, as
`base.forward_all_stages` orders them), then one exit per branch, in the order the folders were given (the branch's
last layer). A branch can also be named by its name (default: its folder's name).

One pass: the trunk runs once up to its last layer and keeps its output stream (and the backout layer's) in its KV
cache; each requested branch then runs only its own layers from that stream, in KV storage of its own that hangs off
the trunk's cache (CognicaKVCache.extended: the trunk's layer objects and slot bookkeeping by reference, new layers
only). Decoding reuses the project's primitives: cache.claim, GPT.run_slots, compose.log_op and sampling.decode, all
on the core GPTs (`.gpt`) of the base and the branches.
"""

import copy
import json
import os
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from transformers import GenerationConfig

from .cache import CognicaKVCache
from .compose import composition_weights, log_op
from .config import CognicaPoEConfig
from .dispatch import IDLE, Peer, RankFailed, join_group, leave_group
from .hf import CognicaPoEForCausalLM, load_folder
from .packed import Linear, pack_linears
from .placement import parse_device, read_map
from .sampling import SamplingParams, decode, is_int
from .specialist import DELTA_FILE, resolve_parent, stage_delta
from .weights import check_shapes, load_safetensors

# config fields a branch must share with its base (anything else would change the shared trunk or the exits)
SHARED_FIELDS = ("vocab_size", "sequence_len", "n_head", "n_kv_head", "n_embd", "window_pattern", "rope_theta",
                 "rotary_multiplier", "softcap", "qk_scale", "pad_vocab_size_to", "poe_mode", "poe_every")
# rank 0's command to a branch rank: op, batch size, cache length, first slot, end slot, logits_to_keep
RUN, STOP, HEADER = 1, 0, 6


# -----------------------------------------------------------------------------
# checking that a stage folder continues this base


def folder_of(model: CognicaPoEForCausalLM, parent_map: dict[str, str] | None) -> str | None:
    """The folder a model was loaded from (None for a model built in memory)."""
    name = str(getattr(model.config, "_name_or_path", "") or "")
    try:
        return resolve_parent(name, os.getcwd(), parent_map) if name else None
    except FileNotFoundError:
        return None


def model_mismatch(base: CognicaPoEForCausalLM, other: CognicaPoEForCausalLM) -> str | None:
    """Why `other` is not the same model as `base` (None when the layout and every tensor agree)."""
    a, b = base.config, other.config
    for field in SHARED_FIELDS + ("n_layer", "trunk_n_layer", "specialist_ends"):
        if getattr(a, field) != getattr(b, field):
            return f"{field} is {getattr(b, field)!r} there, {getattr(a, field)!r} in the base"
    sa, sb = base.gpt.state_dict(), other.gpt.state_dict()
    differ = [k for k in sa if k not in sb or sa[k].shape != sb[k].shape or not torch.equal(sa[k], sb[k].to(sa[k]))]
    return f"{len(differ)} tensor(s) differ, e.g. {differ[:3]}" if differ else None


def check_branch(base: CognicaPoEForCausalLM, folder: str, config: CognicaPoEConfig,
                 parent_map: dict[str, str] | None, verified: set[str]) -> None:
    """
    Raise a ValueError unless the stage folder's parent is this base and its layout continues the base's.
    verified: parent folders already found to hold this base (each other folder is loaded once to compare).
    """
    if not config.base_model_name_or_path:
        raise ValueError(f"{folder} is not a stage folder: its config.json has no base_model_name_or_path")
    parent_dir = resolve_parent(config.base_model_name_or_path, folder, parent_map)
    base_dir = folder_of(base, parent_map)
    if parent_dir != base_dir and parent_dir not in verified:  # another folder may hold the same base: compare
        parent = load_folder(parent_dir, parent_map, base.gpt.dtype)
        why = model_mismatch(base, parent)
        del parent
        if why:
            raise ValueError(f"{folder} is not a specialist of this base ({base_dir or 'a model built in memory'}): "
                             f"its parent {parent_dir} is another model ({why})")
        verified.add(parent_dir)
    bc = base.config
    for field in SHARED_FIELDS:
        if getattr(config, field) != getattr(bc, field):
            raise ValueError(f"{folder}: {field} is {getattr(config, field)!r}, the base's is {getattr(bc, field)!r}")
    ends = config.specialist_ends or []
    if config.trunk_n_layer != bc.trunk_n_layer or ends != (bc.specialist_ends or []) + [config.n_layer - 1] \
            or config.n_layer <= bc.n_layer:
        raise ValueError(f"{folder} does not continue this base: its layer segments {config.segments()} should be "
                         f"the base's {bc.segments()} plus one more")


# -----------------------------------------------------------------------------
# building a branch on the shared tensors


@torch.no_grad()
def shared_heads(base: CognicaPoEForCausalLM) -> nn.ModuleDict:
    """
    The folded heads of a branch's ancestors' exits (as specialist.add_specialist folds them), made once for all
    branches: the base's own ancestor heads by reference, plus, when the base is itself a specialist, its leaf's
    head with its lm_head_stage folded in.
    """
    cfg, gpt = base.config, base.gpt
    heads = nn.ModuleDict()
    if cfg.specialist_ends:
        heads.update(gpt.ancestor_heads)
        below = cfg.specialist_ends[:-1]
        head = gpt.ancestor_heads[str(below[-1])] if below else gpt.lm_head
        leaf = Linear(cfg.n_embd, cfg.padded_vocab_size, bias=False, device="meta")
        leaf.weight = nn.Parameter(head.weight.detach() + gpt.lm_head_stage.weight.detach(), requires_grad=False)
        heads[str(cfg.specialist_ends[-1])] = leaf
    return heads


@torch.no_grad()
def build_branch(base: CognicaPoEForCausalLM, config: CognicaPoEConfig, delta: dict[str, torch.Tensor], folder: str,
                 heads: nn.ModuleDict) -> CognicaPoEForCausalLM:
    """The specialist of `folder` as one model whose base tensors ARE the base's (shared by reference, never copied)."""
    trunk = base.gpt
    n = base.config.n_layer
    with torch.device("meta"):
        model = CognicaPoEForCausalLM(config)
    gpt = model.gpt
    for i in range(n):
        gpt.transformer.h[i] = trunk.transformer.h[i]
    gpt.transformer.wte, gpt.lm_head, gpt.smear_gate = trunk.transformer.wte, trunk.lm_head, trunk.smear_gate
    gpt.value_embeds, gpt.ancestor_heads = trunk.value_embeds, heads
    gpt.smear_lambda, gpt.backout_lambda = trunk.smear_lambda, trunk.backout_lambda
    gpt.share_rotary_from(trunk)
    # the branch's own tensors: its new blocks, its stage head, its (n_layer,) lambdas
    for module in [gpt.transformer.h[i] for i in range(n, config.n_layer)] + [gpt.lm_head_stage]:
        module.to_empty(device=trunk.device).to(trunk.dtype)
    gpt.resid_lambdas = nn.Parameter(trunk.resid_lambdas.new_empty(config.n_layer))
    gpt.x0_lambdas = nn.Parameter(trunk.x0_lambdas.new_empty(config.n_layer))

    path = os.path.join(folder, DELTA_FILE)
    check_shapes({k: tuple(v.shape) for k, v in stage_delta(gpt).items()},
                 {k: tuple(v.shape) for k, v in delta.items()}, path)
    own = {k: v.to(device=trunk.device, dtype=trunk.dtype) for k, v in delta.items()}  # as load_folder casts
    wte, base_wte = own.pop("transformer.wte.weight"), trunk.transformer.wte.weight
    if not torch.equal(wte, base_wte):
        rows = (wte != base_wte).any(dim=1).nonzero()[:, 0].tolist()
        raise ValueError(f"{path}: transformer.wte.weight differs from the base's in {len(rows)} of {len(wte)} "
                         f"rows (first ids {rows[:5]}): siblings share one embedding, so a branch that retrained rows "
                         "(or was saved at a lower precision than the base) cannot join this trunk; load it alone "
                         "with load_folder")
    for key in ("resid_lambdas", "x0_lambdas"):
        if not torch.equal(own[key][:n], getattr(trunk, key)):
            raise ValueError(f"{path}: {key}[:{n}] differs from the base's (the base's lambdas are frozen)")
    missing, unexpected = gpt.load_state_dict(own, strict=False)
    assert not unexpected, unexpected
    model.config._name_or_path = folder
    return model.eval()


@torch.no_grad()
def place_branch(branch: CognicaPoEForCausalLM, n_base: int, device: torch.device) -> None:
    """
    Move a branch onto a device of its own: its own blocks, stage head and lambdas move; the shared tensors it reads
    besides the trunk's stream (embedding and smear for x0, backout, the heads of its exit) are copied there, so only
    the residual streams cross devices. The trunk's blocks stay referenced but never run on this device.
    """
    gpt = branch.gpt

    def copied(module: nn.Module) -> nn.Module:  # deepcopy with each parameter already copied to the device
        memo = {id(p): nn.Parameter(p.detach().to(device), requires_grad=False) for p in module.parameters()}
        return copy.deepcopy(module, memo)

    for i in range(n_base, branch.config.n_layer):
        gpt.transformer.h[i].to(device)
    gpt.lm_head_stage.to(device)
    gpt.transformer.wte, gpt.lm_head, gpt.smear_gate = (copied(m) for m in (gpt.transformer.wte, gpt.lm_head,
                                                                            gpt.smear_gate))
    gpt.ancestor_heads = copied(gpt.ancestor_heads)
    for name in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda"):
        setattr(gpt, name, nn.Parameter(getattr(gpt, name).detach().to(device), requires_grad=False))


def own_modules(branch: CognicaPoEForCausalLM, n_base: int) -> list[nn.Module]:
    """The modules a branch holds alone: its new blocks and its stage head."""
    gpt = branch.gpt
    return [gpt.transformer.h[i] for i in range(n_base, branch.config.n_layer)] + [gpt.lm_head_stage]


# -----------------------------------------------------------------------------
# a branch's cache away from the trunk's (another device or another process)


def mirror_cache(base_config: CognicaPoEConfig, config: CognicaPoEConfig, batch_size: int, max_len: int,
                 dtype: torch.dtype, device: torch.device) -> CognicaKVCache:
    """
    An empty cache for a branch that runs away from the trunk's cache: slot bookkeeping and kept streams of its own
    (filled by mirror_slots) and keys for the branch's own layers only.
    """
    slots = CognicaKVCache(base_config, batch_size, max_len, dtype=dtype, device=device)
    view = slots.extended(config)
    for layer in slots.layers:  # the trunk's layers never run here: keep no keys for them
        layer.keys = layer.values = layer.keys.new_empty(batch_size, layer.keys.size(1), 0, layer.keys.size(3))
    return view


def mirror_slots(view: CognicaKVCache, start: int, end: int, ids: torch.Tensor, positions: torch.Tensor,
                 valid: torch.Tensor, streams: dict[int, torch.Tensor]) -> None:
    """
    Make a mirror_cache follow the trunk's cache for the chunk at slots [start, end): forget the slots from start
    on (the trunk's cache may have been cropped), take the chunk's ids (B, T) and positions (B, T), the validity of
    every slot so far (B, end) (rows may have invalidated slots) and the trunk's kept streams {layer: (B, T, C)}.
    A compacted trunk cache is not mirrored.
    """
    device, dtype = view.token_ids.device, view.layers[-1].dtype
    view.crop(start)
    view.token_ids[:, start:end] = ids.to(device, non_blocking=True)
    view.positions[:, start:end] = positions.to(device, non_blocking=True)
    view.valid[:, :end] = valid.to(device, non_blocking=True)
    view.n_slots = end
    for layer, x in streams.items():
        view.store_hidden(layer, slice(start, end), x.to(device, dtype, non_blocking=True))


def mirror_rows(view: CognicaKVCache, cache: CognicaKVCache) -> None:
    """
    Make a mirror_cache follow its trunk cache again after the trunk cache's rows changed (rows joined, left or were
    laid out anew, as a server's scheduler does between steps; the same row operation already ran on the mirror's own
    layers): it takes a copy of the trunk cache's ids, validity and positions of every slot (later chunks read them
    for smear, masks and rotary angles) and drops its kept streams (every chunk brings its own).
    """
    slots = view.trunk
    device = slots.token_ids.device
    slots.token_ids, slots.valid, slots.positions = (t.to(device, copy=True) for t in (
        cache.token_ids, cache.valid, cache.positions))
    slots.batch_size_, slots.n_slots, slots.hidden = cache.batch_size, cache.n_slots, {}
    view._follow_trunk()


# -----------------------------------------------------------------------------
# the shared-trunk model


class SiblingSpecialists:
    """
    A base and sibling specialists sharing its tensors. Exits are flat and 0-based: the base's exits
    0..n_base_exits-1, then one per branch in load order (also addressable by branch name). `branches[i]` is a full
    CognicaPoEForCausalLM for branch i (usable alone, e.g. its generate_speculative, but then with KV for its own copy
    of the trunk's layers).

    Where branches run: by default on the trunk's device, one after another. Branches placed on devices of their own
    (load_siblings' device_map) run concurrently, each on its device's CUDA stream, so a step costs the trunk plus
    the slowest branch instead of the sum. After `distribute()` each branch runs in a process of its own
    (torch.distributed), concurrently too.
    """

    def __init__(self, base: CognicaPoEForCausalLM, branches: list[CognicaPoEForCausalLM], names: list[str],
                 devices: dict[int, torch.device] | None = None):
        self.base = base
        self.branches = branches
        self.names = names
        self.devices = devices or {}  # branch -> its own device (placed by load_siblings' device_map)
        self.streams = {b: torch.cuda.Stream(d) for b, d in self.devices.items() if d.type == "cuda"}
        self.peers: dict[int, Peer] = {}  # branch -> the rank that runs it (after distribute, on rank 0)
        self.own_group = False  # distribute joined the process group (close leaves it)

    @property
    def n_base_exits(self) -> int:
        return self.base.poe_n_stages

    @property
    def n_exits(self) -> int:
        return self.n_base_exits + len(self.branches)

    def pack_weights(self) -> int:
        """CPU inference: prepacked copies of the base's and every branch's large matrices, shared ones packed once."""
        return pack_linears(nn.ModuleList([self.base, *self.branches]))  # modules() visits a shared module once

    @property
    def exit_names(self) -> list[str]:
        return [f"base:{k}" for k in range(self.n_base_exits)] + list(self.names)

    def exit_index(self, stage: int | str) -> int:
        """The flat exit of `stage`: an index (negative counts from the end) or a branch name; a clear error else."""
        n, nb = self.n_exits, self.n_base_exits
        if isinstance(stage, str):
            if stage not in self.names:
                raise ValueError(f"no branch named {stage!r}; the branches are {self.names}")
            return nb + self.names.index(stage)
        if not is_int(stage) or not -n <= stage < n:  # Python or numpy integers; never a bool
            branches = ", ".join(f"{nb + i}={name}" for i, name in enumerate(self.names))
            raise ValueError(f"exit {stage!r} out of range: there are {n} exits, 0..{n - 1} (the base's exits "
                             f"0..{nb - 1}, then the branches {branches})")
        return int(stage) % n

    def check_composition(self, stages: list[int | str], stage_weights: list[float] | None
                          ) -> tuple[list[int], list[float]]:
        stages = list(stages)
        if not stages:
            raise ValueError("stages must name at least one exit")
        exits = [self.exit_index(s) for s in stages]
        return exits, composition_weights(len(exits), stage_weights)

    def attach(self, cache: CognicaKVCache, exits: list[int]) -> dict[int, CognicaKVCache]:
        """
        Prepare an empty base cache for these exits: it keeps the streams branches start from (after the base's last
        layer, and after the backout layer), and each requested branch gets a cache of its own new layers on it.
        """
        wanted = sorted({e - self.n_base_exits for e in exits if e >= self.n_base_exits})
        if wanted:
            cache.keep_hidden = True
            cache.hidden_layers = set(self.stream_layers)
        views = {}
        for b in wanted:
            if b in self.peers:  # its rank keeps the branch's cache (a fresh one when a chunk starts at slot 0)
                views[b] = None
            elif b in self.devices:  # a cache of its own on its device (its stream waits for it: run_branches)
                views[b] = mirror_cache(self.base.config, self.branches[b].config, cache.batch_size, cache.max_len,
                                        self.base.gpt.dtype, self.devices[b])
            else:
                views[b] = cache.extended(self.branches[b].config)
        return views

    def follow_rows(self, cache: CognicaKVCache, views: dict[int, CognicaKVCache]) -> None:
        """
        After a row operation on an attached trunk cache and, the same one, on its branches' caches (rows appended,
        kept, or copied into a fresh cache: a server's scheduler between steps): the caches of branches on devices
        of their own take the trunk cache's slot bookkeeping again (the others share it by reference).
        """
        for b, view in views.items():
            if b in self.devices and b not in self.peers:
                mirror_rows(view, cache)

    @property
    def stream_layers(self) -> tuple[int, int]:
        """The trunk layers whose output streams every branch starts from: the backout layer and the last one."""
        return self.base.config.backout_layer, self.base.config.n_layer - 1

    def run(self, cache: CognicaKVCache, views: dict[int, CognicaKVCache], ids: torch.Tensor,
            attention_mask: torch.Tensor | None, exits: list[int], logits_to_keep: int = 1) -> list[torch.Tensor]:
        """
        Logits (B, T', vocab) at flat `exits` for new tokens ids (B, T) (attention_mask covers past + new, or None):
        the trunk's layers run once, then each requested branch's own layers from the trunk's output stream.
        """
        nb, gpt = self.n_base_exits, self.base.gpt
        T = ids.size(1)
        start = cache.claim(ids, attention_mask[:, -T:] if attention_mask is not None else None)
        end = start + T
        base_layers = [self.base.config.stage_boundary(e) for e in exits if e < nb]
        last = self.base.config.n_layer - 1 if views else max(base_layers)
        hidden = gpt.run_slots(cache, start, end, 0, last, base_layers, logits_to_keep)
        logits = {e: gpt.exit_logits(hidden[layer], layer) for e, layer in zip(
            [e for e in exits if e < nb], base_layers)}
        for b, lg in self.run_branches(cache, views, start, end, logits_to_keep).items():
            logits[nb + b] = lg
        return [logits[e] for e in exits]

    def branch_logits(self, b: int, view: CognicaKVCache, start: int, end: int, logits_to_keep: int) -> torch.Tensor:
        """Branch b's exit logits for slots [start, end) of its cache, running only the branch's own layers."""
        branch = self.branches[b].gpt
        top = branch.config.n_layer - 1
        h = branch.run_slots(view, start, end, self.base.config.n_layer, top, [top], logits_to_keep)[top]
        return branch.exit_logits(h, top)

    def run_branches(self, cache: CognicaKVCache, views: dict[int, CognicaKVCache | None], start: int, end: int,
                     logits_to_keep: int) -> dict[int, torch.Tensor]:
        """
        Every attached branch's exit logits {branch: (B, T', vocab)} for slots [start, end), once the trunk has run
        them. Branches on other ranks get the trunk's streams first and work while this process runs the rest;
        branches on devices of their own run concurrently, each on its device's stream; the others run here, one
        after another. The result is on the trunk's device, ready on its current stream.
        """
        remote = [b for b in views if b in self.peers]
        placed = [b for b in views if b in self.devices and b not in self.peers]
        local = [b for b in views if b not in self.peers and b not in self.devices]
        pending, failed = {}, None
        for b in remote:  # a failed rank is reported once every healthy one has answered (none is left mid-message)
            try:
                pending[b] = self.post(b, cache, start, end, logits_to_keep)
            except RankFailed as e:
                failed = failed or e
        out = {}
        # branches on their own devices: copies in, then every branch's layers, then the logits back; three loops, so
        # no branch's copy waits for another's layers (on CPU the streams are plain calls)
        device = cache.token_ids.device
        main = torch.cuda.current_stream(device) if device.type == "cuda" else None
        for b in placed:
            stream = self.streams.get(b)
            if stream is not None:  # the branch starts after the trunk's work so far and its own device's (its caches)
                stream.wait_stream(torch.cuda.current_stream(self.devices[b]))
                if main is not None:
                    stream.wait_stream(main)
            with torch.cuda.stream(stream):
                streams = {i: cache.load_hidden(i, slice(start, end)) for i in self.stream_layers}
                mirror_slots(views[b], start, end, cache.token_ids[:, start:end], cache.positions[:, start:end],
                             cache.valid[:, :end], streams)
        for b in placed:
            with torch.cuda.stream(self.streams.get(b)):
                out[b] = self.branch_logits(b, views[b], start, end, logits_to_keep)
        for b in placed:
            stream = self.streams.get(b)
            with torch.cuda.stream(stream):
                out[b] = out[b].to(device, non_blocking=True)
            if stream is not None and main is not None:  # the join: the trunk's stream waits for the branch's
                main.wait_stream(stream)
                out[b].record_stream(main)  # (made on the branch's stream when both share a device)
        for b in local:
            out[b] = self.branch_logits(b, views[b], start, end, logits_to_keep)
        for b, (works, logits) in pending.items():
            try:
                self.peers[b].wait(works)
            except RankFailed as e:
                failed = failed or e
            out[b] = logits.to(cache.token_ids.device)
        if failed:
            raise failed
        return {b: out[b] for b in views}

    # -----------------------------------------------------------------------------
    # one process per branch (torch.distributed)

    def post(self, b: int, cache: CognicaKVCache, start: int, end: int, logits_to_keep: int
             ) -> "tuple[list[dist.Work], torch.Tensor]":
        """
        Rank 0: send branch b's rank the chunk (its slots' ids and positions, every slot's validity, the trunk's
        streams) and start receiving its logits. Returns the works to wait on and the logits' buffer.
        """
        B, T = cache.batch_size, end - start
        header = torch.tensor([RUN, B, cache.max_len, start, end, logits_to_keep])
        slots = torch.cat([cache.token_ids[:, start:end], cache.positions[:, start:end],
                           cache.valid[:, :end].long()], dim=1).cpu()
        x = torch.stack([cache.load_hidden(i, slice(start, end)) for i in self.stream_layers]).float().cpu()
        logits = torch.empty(B, logits_to_keep or T, self.base.config.vocab_size)
        peer = self.peers[b]
        return peer.send(header, slots, x) + peer.recv(logits), logits

    def serve(self, b: int) -> None:
        """
        Branch b's rank: run the branch for every chunk rank 0 sends, in a cache of its own that follows rank 0's,
        until rank 0 sends STOP (or leaves: RankFailed naming rank 0).
        """
        driver = Peer(0, "the trunk")
        device = self.devices.get(b, self.base.gpt.device)
        header, view = torch.zeros(HEADER, dtype=torch.long), None
        while True:
            driver.wait(driver.recv(header), IDLE)
            op, B, max_len, start, end, keep = header.tolist()
            if op == STOP:
                return
            if start == 0 or view is None:  # a new request (or the old one cropped to nothing)
                view = mirror_cache(self.base.config, self.branches[b].config, B, max_len, self.base.gpt.dtype,
                                    device)
            T = end - start
            slots = torch.empty(B, 2 * T + end, dtype=torch.long)
            x = torch.empty(len(self.stream_layers), B, T, self.base.config.n_embd)
            driver.wait(driver.recv(slots, x))
            ids, positions, valid = slots.split([T, T, end], dim=1)
            mirror_slots(view, start, end, ids, positions, valid.bool(), dict(zip(self.stream_layers, x)))
            logits = self.branch_logits(b, view, start, end, keep).float().cpu().contiguous()
            driver.wait(driver.send(logits))

    def distribute(self, timeout_s: float = 300.0, rank: int | None = None, world_size: int | None = None,
                   init_method: str | None = None) -> bool:
        """
        Run each branch in a process of its own: rank 0 keeps the trunk and drives (decoding, sampling, the Log-OP),
        rank b + 1 runs branch b. Every rank loads the same siblings and calls this. On rank 0 it returns True at
        once, and every later forward_exits / generate_* runs the branches on their ranks, concurrently; a branch rank
        that fails raises RankFailed naming it. On the other ranks it serves until rank 0 calls close() and returns
        False. Each process frees the blocks it will not run. The process group: see dispatch.join_group (torchrun's
        environment by default; timeout_s bounds every exchange).
        """
        created = join_group(timeout_s, rank, world_size, init_method)
        rank, world = dist.get_rank(), dist.get_world_size()
        if world != len(self.branches) + 1:
            if created:
                leave_group()
            raise ValueError(f"{world} processes for {len(self.branches)} branches: run one process for the trunk "
                             f"and one per branch (torchrun --nproc-per-node {len(self.branches) + 1})")
        n = self.base.config.n_layer
        if rank == 0:
            self.own_group = created
            self.peers = {b: Peer(b + 1, f"branch {name!r}") for b, name in enumerate(self.names)}
            for branch in self.branches:
                for module in own_modules(branch, n):
                    module.to("meta")
            return True
        b = rank - 1
        for module in [*self.base.gpt.transformer.h, *self.base.gpt.value_embeds.values()] + [
                m for i, branch in enumerate(self.branches) if i != b for m in own_modules(branch, n)]:
            module.to("meta")  # the trunk's blocks and the other branches' run elsewhere
        try:
            self.serve(b)
        finally:
            if created:
                leave_group()
        return False

    def close(self) -> None:
        """Rank 0: stop every branch rank (their distribute() returns) and leave the group distribute joined."""
        for peer in self.peers.values():
            try:
                peer.wait(peer.send(torch.tensor([STOP] + [0] * (HEADER - 1))))
            except RankFailed:
                pass  # already gone
        self.peers = {}
        if self.own_group:
            leave_group()
            self.own_group = False

    @torch.no_grad()
    def forward_exits(self, input_ids: torch.Tensor, exits: list[int | str] | None = None,
                      attention_mask: torch.Tensor | None = None) -> list[torch.Tensor]:
        """Logits (B, T, vocab) at the requested exits (default: all), from one pass, in the order requested."""
        exits = [self.exit_index(e) for e in (range(self.n_exits) if exits is None else exits)]
        if not exits:
            raise ValueError("at least one exit is needed")
        device = self.base.gpt.device
        input_ids = input_ids.to(device)
        attention_mask = attention_mask.to(device) if attention_mask is not None else None
        cache = self.base.gpt.new_cache(input_ids.size(0), input_ids.size(1))
        return self.run(cache, self.attach(cache, exits), input_ids, attention_mask, exits, logits_to_keep=0)

    def decode(self, exits: list[int], combine: Callable[[list[torch.Tensor]], torch.Tensor], input_ids: torch.Tensor,
               attention_mask: torch.Tensor | None, params: SamplingParams) -> torch.Tensor:
        """sampling.decode over the base's request checks and cache, with next-token scores = combine(exit logits)."""
        views: dict[int, CognicaKVCache] = {}

        def next_scores(cache, ids, mask):
            if cache.n_slots == 0:  # the prompt: hang the branches' layers off this fresh cache
                views.clear()
                views.update(self.attach(cache, exits))
            return combine([logits[:, -1] for logits in self.run(cache, views, ids, mask, exits)])

        return decode(self.base.gpt, input_ids, attention_mask, params, next_scores)

    @torch.no_grad()
    def generate_parallel_composition(self, input_ids: torch.Tensor, stages: list[int | str],
                                      stage_weights: list[float] | None = None,
                                      attention_mask: torch.Tensor | None = None,
                                      generation_config: GenerationConfig | None = None, **sampling) -> torch.Tensor:
        """
        Prompt + generated ids (B, T + n) decoded from the Log-OP sum_s w_s * log_softmax(logits_s) of the chosen
        exits (flat indices or branch names), as compose.generate_parallel_composition; the trunk runs once per token.
        sampling: the SamplingParams fields, as generate_stage.
        """
        params = SamplingParams.from_kwargs(generation_config, **sampling)
        exits, weights = self.check_composition(stages, stage_weights)
        return self.decode(exits, lambda logits: log_op(logits, weights), input_ids, attention_mask, params)

    @torch.no_grad()
    def generate_stage(self, input_ids: torch.Tensor, stage: int | str, attention_mask: torch.Tensor | None = None,
                       generation_config: GenerationConfig | None = None, **sampling) -> torch.Tensor:
        """
        Prompt + generated ids (B, T + n) from one exit (a base exit runs only the base layers up to it). sampling:
        the SamplingParams fields, as the model's generate_stage.
        """
        params = SamplingParams.from_kwargs(generation_config, **sampling)
        exits = [self.exit_index(stage)]
        return self.decode(exits, lambda logits: logits[0], input_ids, attention_mask, params)


def sibling_devices(device_map, names: list[str]) -> dict[str, torch.device]:
    """The devices a siblings' device_map names ({"trunk": device, branch name: device, ...}, or that map as a JSON
    string), each checked to exist here; a ValueError naming the first bad key or value."""
    example = json.dumps({"trunk": "cuda:0", **{name: f"cuda:{i + 1}" for i, name in enumerate(names)}})
    device_map = read_map({} if device_map is None else device_map, example)
    if not isinstance(device_map, dict):
        raise ValueError(f"device_map = {device_map!r}: sibling specialists take a map of the trunk and the branches "
                         f"to devices, e.g. '{example}'")
    unknown = sorted(str(k) for k in set(device_map) - {"trunk", *names})
    if unknown:
        raise ValueError(f"device_map names {unknown}: its keys are 'trunk' and the branch names {names}")
    return {key: parse_device(value, key) for key, value in device_map.items()}


def load_siblings(base: CognicaPoEForCausalLM | str, stage_folders: list[str], names: list[str] | None = None,
                  parent_map: dict[str, str] | None = None, dtype: torch.dtype | None = None,
                  device_map: dict[str, str | torch.device] | None = None) -> SiblingSpecialists:
    """
    Load stage folders that all branch from `base` (a model, or a base or stage folder to load) onto ONE copy of it.
    Each folder's parent must be this base: the base's own folder, or another folder holding identical weights (loaded
    once to compare). names default to the folders' names. Raises a ValueError naming any mismatch.
    device_map: {"trunk": device, branch name: device, ...} (or that map as a JSON string): the trunk (the base) on
    one device, each named branch on a device of its own (with its own copies of the embedding and heads it reads),
    run concurrently with the others; unnamed branches stay on the trunk's device.
    """
    folders = [os.path.realpath(f) for f in stage_folders]
    if not folders:
        raise ValueError("at least one stage folder is needed")
    names = [os.path.basename(f) for f in folders] if names is None else [str(n) for n in names]
    if len(names) != len(folders):
        raise ValueError(f"{len(names)} names for {len(folders)} stage folders")
    if len(set(names)) != len(names):
        raise ValueError(f"branch names must be distinct, got {names} (pass names=)")
    devices = sibling_devices(device_map, names)  # checked before anything loads
    if isinstance(base, (str, os.PathLike)):
        base = load_folder(os.path.realpath(base), parent_map, dtype)
    base.eval()
    if "trunk" in devices:
        base.to(devices.pop("trunk"))
    heads, verified = shared_heads(base), set()
    branches = []
    for folder in folders:
        config = CognicaPoEConfig.from_pretrained(folder)
        check_branch(base, folder, config, parent_map, verified)
        delta = load_safetensors(os.path.join(folder, DELTA_FILE))
        branches.append(build_branch(base, config, delta, folder, heads))
    devices = {names.index(name): device for name, device in devices.items()}
    for b, device in devices.items():
        place_branch(branches[b], base.config.n_layer, device)
    return SiblingSpecialists(base, branches, names, devices)

"""
Stage placement: which device, and under torch.distributed which process, runs each stage.

PoE stages exchange only the residual stream, so a model splits cleanly at stage boundaries. A Placement gives
every layer a device and an owner rank; the GPT's layer loop consults it (model.py `_run_layers`): at the first
layer of each range it moves the residual stream, x0 and the token ids to that range's device, or, when another
process owns the range, sends them there and receives the streams it needs back. Nothing else changes, so every
decoding mode (prefix, WAND, speculative, composition, generate()) runs unchanged on a placed model.

Policy. The embedding, smear, lambdas and every head (lm_head, a specialist's stage heads) live on the first
stage's device, with the token bookkeeping and sampling: each exit moves its (few positions of) stream there, so
exits cost one small copy and no head is replicated. The KV cache keeps each layer's keys on that layer's device.

In one process, `device_map` maps stages to devices: {"stage:0": "cuda:0", "stage:1": "cuda:1", ...} (every
stage named), "auto" (contiguous stages split in proportion to each GPU's free memory; everything on cpu without
CUDA), or one device. Place a model last: moving it afterwards (model.to) would gather the stages again.

Across processes (torchrun, or torch.multiprocessing in tests), rank r holds only the blocks of its contiguous
stage range and their cache layers; rank 0 also holds the embedding and the heads and drives decoding, while the
other ranks `serve`. A range on another rank runs by point-to-point send/recv of a command header and the streams
(torch.distributed). The cache bookkeeping stays on rank 0, with the fill level of every layer; each RUN carries
the rotary positions and the key mask, so workers need only two more commands: compact (slots move) and reorder
(beam search rows). Any failure to reach a rank raises one error that names it; gloo's timeout bounds the wait.

This file is copied into exported remote-code folders: it imports only torch/transformers and siblings.
"""

import json
import os
import weakref

import torch
import torch.distributed as dist

from .cache import CognicaKVCache
from .config import CognicaPoEConfig
from .dispatch import join_group
from .model import GPT, StepContext

META = torch.device("meta")
CPU = torch.device("cpu")
# the command header every worker reads first: op, cache id, then the op's integers
HEADER = 12
RUN, CACHE, COMPACT, REORDER, STOP = range(5)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


# -----------------------------------------------------------------------------
# device maps

def parse_device(value, key: str | None) -> torch.device:
    """One device a map names (key: its stage key, None for a lone device): it must exist here (cpu, or a CUDA
    index below the device count)."""
    where = "device_map" if key is None else f"device_map[{key!r}]"
    try:
        device = torch.device(value)
    except (RuntimeError, TypeError):
        raise ValueError(f"{where} = {value!r} is not a device (e.g. 'cpu', 'cuda:0')") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{where} = {value!r} but CUDA is not available here: use 'cpu' or 'auto'")
        device = torch.device("cuda", device.index or 0)
        if device.index >= torch.cuda.device_count():
            raise ValueError(f"{where} = {value!r} but this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type == "meta":
        raise ValueError(f"{where} = 'meta' holds no weights: name a real device")
    return device


def read_map(device_map, example: str = '{"stage:0": "cuda:0"}'):
    """A device_map as given: a JSON object string is read as the map (example: the map to suggest when it does not
    parse); anything else is returned as it is."""
    if isinstance(device_map, str) and device_map.lstrip().startswith("{"):
        try:
            return json.loads(device_map)
        except json.JSONDecodeError as e:
            raise ValueError(f"device_map is not valid JSON ({e}): write e.g. '{example}'") from None
    return device_map


def split_stages(sizes: list[int], capacities: list[float]) -> list[int]:
    """
    The part (device or rank) of each stage: contiguous ranges in stage order, each part's share of the total size
    in proportion to its capacity (a stage goes where the middle of it falls).
    """
    if len(sizes) < len(capacities):
        raise ValueError(f"{len(capacities)} parts but only {len(sizes)} stages: every part needs a stage")
    total, cap_total = sum(sizes), sum(capacities)
    edges, acc = [], 0.0
    for c in capacities:
        acc += c
        edges.append(acc / cap_total)
    parts, done = [], 0
    for size in sizes:
        mid = (done + size / 2) / total
        parts.append(next(p for p, e in enumerate(edges) if mid < e or p == len(edges) - 1))
        done += size
    return parts


def stage_bytes(gpt: GPT) -> list[int]:
    """Bytes of each stage's blocks and value embeddings (what a stage's device must hold)."""
    def size(module) -> int:
        return sum(p.numel() * p.element_size() for p in module.parameters())

    return [sum(size(gpt.transformer.h[i]) + (size(gpt.value_embeds[str(i)]) if str(i) in gpt.value_embeds else 0)
                for i in layers) for layers in gpt.config.stage_layers()]


def auto_devices(gpt: GPT) -> list[torch.device]:
    """"auto": contiguous stages over the GPUs in proportion to their free memory; all on cpu without CUDA."""
    n = gpt.config.poe_n_stages
    if not torch.cuda.is_available():
        return [CPU] * n
    free = [torch.cuda.mem_get_info(d)[0] for d in range(torch.cuda.device_count())]
    sizes = stage_bytes(gpt)
    if sum(sizes) > sum(free):
        raise ValueError(f"device_map='auto': the stages need {sum(sizes) / 2**30:.1f} GiB but the GPUs have "
                         f"{sum(free) / 2**30:.1f} GiB free")
    return [torch.device("cuda", d) for d in split_stages(sizes, free[:n])]


def stage_devices(gpt: GPT, device_map) -> list[torch.device]:
    """One device per stage from a device_map: {"stage:N": device, ...} naming every stage, "auto", or one device
    (also as transformers writes it, {"": device}; a JSON object string is read as the map). Unknown keys, stages
    out of range or missing: a ValueError."""
    n = gpt.config.poe_n_stages
    device_map = read_map(device_map)
    if isinstance(device_map, dict) and list(device_map) == [""]:  # transformers' map of a whole model: one device
        device_map = device_map[""]
    if device_map == "auto":
        return auto_devices(gpt)
    if not isinstance(device_map, dict):
        return [parse_device(device_map, None)] * n
    devices: list[torch.device | None] = [None] * n
    for key, value in device_map.items():
        name, _, index = str(key).partition(":")
        if name != "stage" or not index.isdigit():
            raise ValueError(f"device_map key {key!r} is not 'stage:N' (N = 0..{n - 1})")
        if int(index) >= n:
            raise ValueError(f"device_map key {key!r}: this model has stages 0..{n - 1}")
        devices[int(index)] = parse_device(value, key)
    missing = [f"stage:{s}" for s, d in enumerate(devices) if d is None]
    if missing:
        raise ValueError(f"device_map names no device for {', '.join(missing)}: map every stage 0..{n - 1}")
    return devices


# -----------------------------------------------------------------------------
# the placement the GPT consults

class Placement:
    """
    devices: each layer's device in this process (meta where another rank holds it); owners: each layer's rank;
    rank: this process; home: where the embedding and heads live (this rank's first device).
    """

    def __init__(self, devices: list[torch.device], owners: list[int], rank: int, home: torch.device,
                 comm: torch.device = CPU):
        self.devices, self.owners, self.rank, self.home, self.comm = devices, owners, rank, home, comm
        # layers where a range of one (owner, device) begins: the layer loop moves or ships the streams there
        self.starts = {i for i in range(1, len(devices)) if (owners[i], devices[i]) != (owners[i - 1], devices[i - 1])}
        self.ends = [min([s - 1 for s in self.starts if s > i] + [len(devices) - 1]) for i in range(len(devices))]
        self.workers = sorted(set(owners) - {rank})
        self._cache_ids: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self._next_id = 0

    @classmethod
    def in_process(cls, config: CognicaPoEConfig, devices: list[torch.device]) -> "Placement":
        """One device per stage, all in this process."""
        layer_devices = [devices[s] for s, layers in enumerate(config.stage_layers()) for _ in layers]
        return cls(layer_devices, [0] * config.n_layer, 0, devices[0])

    @classmethod
    def over_ranks(cls, gpt: GPT, world_size: int, rank: int, device: torch.device, comm: torch.device = CPU
                   ) -> "Placement":
        """Contiguous stage ranges, as even as the stages' sizes allow, one per rank; this rank's on `device`."""
        parts = split_stages(stage_bytes(gpt), [1.0] * world_size)
        owners = [parts[s] for s, layers in enumerate(gpt.config.stage_layers()) for _ in layers]
        return cls([device if o == rank else META for o in owners], owners, rank, device, comm)

    # -----------------------------------------------------------------------------
    # the layer loop's hook

    def enter(self, i: int, last: int, x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor, step: StepContext,
              need: set[int] | None) -> tuple:
        """
        At layer i, the first of a range: the streams on the range's device and remote=None, or, when another rank
        owns the range, the streams unchanged and remote = {layer: stream after it} for the layers in `need`
        (None: all) and the range's last (its output).
        """
        owner = self.owners[i]
        if owner == self.rank:
            d = self.devices[i]
            return x.to(d), x0.to(d), idx.to(d), step.to(d), None
        return x, x0, idx, step, self.run_remote(owner, i, min(self.ends[i], last), x, x0, idx, step, need)

    def run_remote(self, owner: int, first: int, last: int, x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor,
                   step: StepContext, need: set[int] | None) -> dict[int, torch.Tensor]:
        """Layers first..last on rank `owner`: send the header and the streams, receive the streams asked for."""
        cache = step.cache
        cid = -1 if cache is None else self.register(cache)
        returns = [j for j in range(first, last + 1) if need is None or j in need or j == last]
        B, T, C = x.shape
        pos = None if step.q_pos is None else torch.cat([step.q_pos, step.k_pos, step.k_valid.long()], dim=1)
        kv_len = 0 if pos is None else step.k_pos.size(1)
        header = [RUN, cid, first, last, step.start, T, kv_len, B, pos is not None, step.padded, len(returns),
                  DTYPES.index(x.dtype)]
        payload = [torch.tensor(returns), x, x0, idx] + ([] if pos is None else [pos])
        self.send(owner, header, payload)
        out = self.recv(owner, (len(returns), B, T, C), x.dtype)
        if cache is not None:  # the owner wrote these layers' keys: their fill levels move here too
            for j in range(first, last + 1):
                cache.layers[j].length = max(cache.layers[j].length, step.start + T)
        return dict(zip(returns, out.unbind(0)))

    # -----------------------------------------------------------------------------
    # the cache's mirrored operations (CognicaKVCache calls them on the driving rank)

    def register(self, cache: CognicaKVCache) -> int:
        """The cache's id on the workers; a new cache is announced (with the ids still alive, so dead ones free)."""
        cid = self._cache_ids.get(cache)
        if cid is None:
            cid, self._next_id = self._next_id, self._next_id + 1
            self._cache_ids[cache] = cid
            cache.placement = self
            live = torch.tensor(list(self._cache_ids.values()))
            layer = cache.layers[0]
            for r in self.workers:
                self.send(r, [CACHE, cid, cache.batch_size, cache.max_len, DTYPES.index(layer.dtype), len(live)],
                          [live])
        return cid

    def compact(self, cache: CognicaKVCache, src: torch.Tensor, n: int) -> None:
        for r in self.workers:
            self.send(r, [COMPACT, self._cache_ids[cache], n, src.size(0), src.size(1)], [src])

    def reorder(self, cache: CognicaKVCache, index: torch.Tensor) -> None:
        for r in self.workers:
            self.send(r, [REORDER, self._cache_ids[cache], index.numel()], [index.long()])

    def stop(self) -> None:
        """Release the workers: each returns from `serve`."""
        for r in self.workers:
            self.send(r, [STOP], [])

    # -----------------------------------------------------------------------------
    # transport: torch.distributed point-to-point, every failure named by its rank

    def send(self, rank: int, header: list, tensors: list[torch.Tensor]) -> None:
        head = torch.zeros(HEADER, dtype=torch.long)
        head[:len(header)] = torch.tensor([int(h) for h in header])
        try:
            for t in [head, *tensors]:
                dist.send(t.contiguous().to(self.comm), rank)
        except RuntimeError as e:
            raise self.lost(rank, e) from None

    def recv(self, rank: int, shape, dtype: torch.dtype) -> torch.Tensor:
        t = torch.empty(shape, dtype=dtype, device=self.comm)
        try:
            dist.recv(t, rank)
        except RuntimeError as e:
            raise self.lost(rank, e) from None
        return t

    def lost(self, rank: int, error: Exception) -> RuntimeError:
        layers = [i for i, o in enumerate(self.owners) if o == rank]
        span = f"layers {layers[0]}..{layers[-1]}" if layers else "no layers"
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
        return RuntimeError(f"stage placement: rank {rank} ({span}) stopped answering: {reason}")

    # -----------------------------------------------------------------------------
    # a worker's side

    @torch.no_grad()
    def serve(self, gpt: GPT) -> None:
        """Run rank 0's commands for this rank's layers until it calls `stop`."""
        caches: dict[int, CognicaKVCache] = {}
        while True:
            head = self.recv(0, (HEADER,), torch.long).tolist()
            op = head[0]
            if op == STOP:
                return
            if op == CACHE:  # a new cache on the driver: this rank's layers of it, and forget the dead ones
                cid, B, max_len, code, n_live = head[1:6]
                live = set(self.recv(0, (n_live,), torch.long).tolist())
                caches = {k: v for k, v in caches.items() if k in live}
                caches[cid] = CognicaKVCache(gpt.config, B, max_len, DTYPES[code], self.home,
                                             layer_devices=self.devices)
            elif op == COMPACT:
                cid, n, B, new_len = head[1:5]
                caches[cid].gather_slots(self.recv(0, (B, new_len), torch.long), n)
            elif op == REORDER:
                cid, size = head[1:3]
                caches[cid].reorder_cache(self.recv(0, (size,), torch.long))
            elif op == RUN:
                self.run_here(gpt, head, caches)

    def run_here(self, gpt: GPT, head: list[int], caches: dict[int, CognicaKVCache]) -> None:
        """One RUN: receive the streams and positions, run the layers, send back the streams asked for."""
        _, cid, first, last, start, T, kv_len, B, has_pos, padded, n_ret, code = head
        dtype, C, d = DTYPES[code], gpt.config.n_embd, self.devices[first]
        returns = set(self.recv(0, (n_ret,), torch.long).tolist())
        x = self.recv(0, (B, T, C), dtype).to(d)
        x0 = self.recv(0, (B, T, C), dtype).to(d)
        idx = self.recv(0, (B, T), torch.long).to(d)
        # the step context, as the driver built it: rotary angles from the positions, masks from the key mask
        cos_t, sin_t = gpt.rotary_tables(d)
        q_pos = k_pos = k_valid = None
        if has_pos:
            pos = self.recv(0, (B, T + 2 * kv_len), torch.long).to(d)
            q_pos, k_pos, k_valid = pos[:, :T], pos[:, T:T + kv_len], pos[:, T + kv_len:].bool()
            cos, sin = cos_t[q_pos][:, :, None], sin_t[q_pos][:, :, None]
        else:
            cos, sin = cos_t[None, :T, None], sin_t[None, :T, None]
        step = StepContext(gpt.window_sizes, cos.to(dtype), sin.to(dtype), T, start, caches.get(cid), q_pos, k_pos,
                           k_valid, bool(padded))
        out = []
        for i in range(first, last + 1):
            x = gpt.run_layer(i, x, x0, idx, step)
            if i in returns:
                out.append(x)
        try:
            dist.send(torch.stack(out).to(self.comm), 0)
        except RuntimeError as e:
            raise self.lost(0, e) from None


# -----------------------------------------------------------------------------
# putting a model in place

def place(gpt: GPT, placement: Placement | None) -> GPT:
    """
    Move each layer's block and value embedding to its placement device (meta, i.e. freed, where another rank
    holds it); the embedding, smear, lambdas and heads go to `home` on the driving rank (freed on workers, which
    keep only the lambdas). None: no placement (the model stays where it is).
    """
    gpt.placement = placement
    if placement is None:
        return gpt
    for i, block in enumerate(gpt.transformer.h):
        block.to(placement.devices[i])
        if str(i) in gpt.value_embeds:
            gpt.value_embeds[str(i)].to(placement.devices[i])
    drives = placement.rank == 0
    for module in (gpt.transformer.wte, gpt.smear_gate, gpt.lm_head,
                   *([gpt.lm_head_stage, gpt.ancestor_heads] if gpt.config.specialist_ends else [])):
        module.to(placement.home if drives else META)
    with torch.no_grad():
        for p in (gpt.resid_lambdas, gpt.x0_lambdas, gpt.smear_lambda, gpt.backout_lambda):
            p.data = p.data.to(placement.home)
    return gpt


def place_device_map(gpt: GPT, device_map) -> GPT:
    """In one process: the stages on the devices a device_map names (see stage_devices); one device for all of
    them needs no placement, a map (dict, or its JSON) always installs one."""
    device_map = read_map(device_map)
    devices = stage_devices(gpt, device_map)
    if len(set(devices)) == 1 and not isinstance(device_map, dict):
        gpt.placement = None
        return gpt.to(devices[0])
    return place(gpt, Placement.in_process(gpt.config, devices))


def distribute_stages(gpt: GPT, device: torch.device | str | None = None, timeout_s: float = 60.0) -> Placement:
    """
    Under torch.distributed (initialised here from torchrun's environment when it is not yet): the stages split
    into one contiguous range per rank; this rank keeps its own (on `device`, default cuda:LOCAL_RANK with nccl,
    else cpu) and frees the rest. Rank 0 then decodes as usual and calls placement.stop() at the end; every other
    rank calls placement.serve(gpt).
    """
    if not dist.is_initialized() and "WORLD_SIZE" not in os.environ:
        raise ValueError("stages over ranks need torch.distributed: run under torchrun (torchrun --nproc-per-node 2 "
                         "-m cognica_poe.cli generate MODEL PROMPT --device-map ranks)")
    join_group(timeout_s, backend="nccl" if torch.cuda.is_available() else "gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    if world < 2:
        raise ValueError("distribute_stages needs 2 or more processes (torchrun --nproc-per-node N, N >= 2)")
    nccl = dist.get_backend() == "nccl"
    if device is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank))) if nccl else CPU
    device = torch.device(device)
    placement = Placement.over_ranks(gpt, world, rank, device, device if nccl else CPU)
    place(gpt, placement)
    return placement

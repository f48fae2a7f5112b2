"""
CognicaKVCache: the one KV cache of the project, preallocated, behind transformers' `Cache` interface.

Layout. Every layer owns a preallocated (B, n_kv_head, max_len, head_dim) key and value buffer. A cache
"slot" is an absolute column: slot t of every row holds the token in column t of the batch (left padding
included), so all rows share slot indices and a step writes the same slots in every row. The cache also
records, per slot and row, the token id, whether it is a real token (attention mask) and its rotary
position (the count of real tokens before it), which is everything the model needs to build masks, rotary
angles and the smear input for any later chunk.

Per-layer fill levels. Each layer knows how many slots it has filled (`layer_len[i]`). In plain decoding all
layers move together; the stage-level modes (prefix pruning, early exit, speculative drafting) run only
some layers for some slots, and the fill levels are how they know which layers are missing which slots.

Smear needs the previous real token's pre-smear embedding, norm(wte(id)). That is a pure function of the
token id, so the cache keeps ids rather than embeddings: a rollback (crop, or a row's rejected drafts marked
invalid) never leaves a stale smear state.

Stage inputs. With `keep_hidden`, the cache also keeps the residual stream at every stage boundary (and at
the backout layer) for each slot, so a later call can run only the deeper layers for slots whose shallow
layers already ran: early-exit catch-up and speculative verification reuse that work instead of redoing it.

Rows with their own lengths. A batch shares slot columns; a row that accepts fewer tokens than another marks
its unused slots invalid (`invalidate`), and positions, masks and smear all skip invalid slots. Such holes
cost slots only: `compact` squeezes them out (per row, the valid slots move to the right end in order), so a
cache sized for one row's needs serves a batch whose rows advance at different paces.

Placement. A model whose stages live on several devices (placement.py) gets a cache whose layer buffers live on
their layer's devices; token ids, validity and positions stay with the embedding. Under a multi-process placement
another rank's layers are shape-only (meta) buffers here, their fill levels still tracked; that rank holds the keys.

This file is copied into exported remote-code folders: it imports only torch/transformers.
"""

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


def stack_rows(tensors: list[torch.Tensor], rows: list[torch.Tensor | None], slot_dim: int, n_slots: int
               ) -> torch.Tensor:
    """
    The concatenation along the batch of tensors' rows (all of them, or those indexed by rows[i]), copied over the
    first n_slots slots only; the rest of the new buffer is zeros (compiled decode attends over whole buffers under a
    mask, and a masked garbage value could still be a NaN). Each tensor is indexed on its own device (a placed
    model's layers live on several).
    """
    used = [t.narrow(slot_dim, 0, n_slots) for t in tensors]
    picked = [t if idx is None else t.index_select(0, idx.to(t.device)) for t, idx in zip(used, rows)]
    like = tensors[0]
    out = torch.zeros(sum(t.size(0) for t in picked), *like.shape[1:], dtype=like.dtype, device=like.device)
    b = 0
    for t in picked:
        out[b:b + t.size(0)].narrow(slot_dim, 0, n_slots).copy_(t)
        b += t.size(0)
    return out


class CognicaKVLayer(CacheLayerMixin):
    """One layer's preallocated keys/values; slots [0, length) are filled."""

    is_compileable = False
    is_croppable = True

    def __init__(self, batch_size: int, max_len: int, n_kv_head: int, head_dim: int, window: int,
                 dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.keys = torch.zeros(batch_size, n_kv_head, max_len, head_dim, dtype=dtype, device=device)
        self.values = torch.zeros_like(self.keys)
        self.window = window
        self.is_sliding = window < max_len
        self.length = 0
        self.device = self.keys.device
        self.dtype = dtype
        self.is_initialized = True

    # -----------------------------------------------------------------------------
    # our interface: explicit slots

    def write(self, k: torch.Tensor, v: torch.Tensor, start: int) -> None:
        """Store k, v of shape (B, H_kv, T, D) at slots [start, start + T)."""
        end = start + k.size(2)
        if end > self.keys.size(2):
            raise ValueError(f"KV cache overflow: writing slots up to {end} but the cache holds {self.keys.size(2)}")
        self.keys[:, :, start:end] = k
        self.values[:, :, start:end] = v
        self.length = max(self.length, end)

    def write_at(self, k: torch.Tensor, v: torch.Tensor, cols: slice | torch.Tensor) -> None:
        """Store k, v of shape (B, H_kv, T, D) at slots `cols` (claimed slots: a slice, or a tensor of T indices);
        the fill level is the caller's to record."""
        self.keys[:, :, cols] = k
        self.values[:, :, cols] = v

    def view(self, end: int | None) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of slots [0, end) (None: every slot): (B, H_kv, end, D) views, no copy."""
        return self.keys[:, :, :end], self.values[:, :, :end]

    # -----------------------------------------------------------------------------
    # transformers' CacheLayerMixin interface

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        pass  # preallocated in __init__

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        self.write(key_states, value_states, self.length)
        return self.view(self.length)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.keys.size(2)

    def reset(self) -> None:
        self.length = 0

    def crop(self, max_length: int) -> None:
        if max_length < 0:
            max_length = self.length + max_length
        self.length = min(self.length, max(0, max_length))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self.keys = self.keys.index_select(0, beam_idx.to(self.device))
        self.values = self.values.index_select(0, beam_idx.to(self.device))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    def batch_repeat_interleave(self, repeats: int) -> None:
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)


class CognicaKVCache(Cache):
    """Preallocated per-layer KV cache with per-slot token ids, validity and rotary positions."""

    placement = None  # set by a multi-process placement: compact and reorders are mirrored on the other ranks

    def __init__(self, config, batch_size: int, max_len: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", keep_hidden: bool = False,
                 layer_devices: list[torch.device] | None = None):
        max_len = max_len or config.sequence_len
        if max_len > config.rotary_seq_len:
            raise ValueError(f"cache length {max_len} exceeds the rotary table ({config.rotary_seq_len} positions, "
                             f"{config.rotary_multiplier}x sequence_len); raise sequence_len to go longer")
        windows = config.window_sizes()
        # a placed model's layers live on several devices: each layer's keys live with it ("meta": another rank's)
        layer_devices = layer_devices or [device] * config.n_layer
        layers = [CognicaKVLayer(batch_size, max_len, config.n_kv_head, config.head_dim, windows[i], dtype,
                                 layer_devices[i]) for i in range(config.n_layer)]
        super().__init__(layers=layers)
        self.max_len = max_len
        self.batch_size_ = batch_size
        self.n_slots = 0  # slots claimed by tokens so far (a chunk claims its slots before any layer runs)
        self.token_ids = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.positions = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        # stage inputs: the stream after every stage boundary but the last, and after the backout layer
        self.keep_hidden = keep_hidden
        self.hidden_layers = set(config.poe_stage_boundary_layers[:-1]) | {config.backout_layer}
        self.hidden: dict[int, torch.Tensor] = {}
        self.n_embd = config.n_embd
        self.stage_layers = config.stage_layers()

    # -----------------------------------------------------------------------------
    # slot bookkeeping, shared by all layers

    @property
    def batch_size(self) -> int:
        return self.batch_size_

    @property
    def layer_len(self) -> list[int]:
        """Fill level (slots with keys/values) of every layer."""
        return [layer.length for layer in self.layers]

    def claim(self, idx: torch.Tensor, valid: torch.Tensor | None = None) -> int:
        """
        Reserve the next T slots for tokens idx (B, T) with validity mask valid (B, T) (None = all real).
        Returns the start slot; the slots' rotary positions go to self.positions. Pads get position 0; they are
        masked everywhere.
        """
        B, T = idx.shape
        if B != self.batch_size_:
            raise ValueError(f"batch size {B} does not match the cache's batch size {self.batch_size_}")
        start = self.n_slots
        end = start + T
        if end > self.max_len:
            raise ValueError(f"sequence of {end} tokens exceeds the KV cache length {self.max_len}")
        if valid is None:
            valid = torch.ones(B, T, dtype=torch.bool, device=idx.device)
        valid = valid.to(torch.bool)
        seen = self.valid[:, :start].sum(dim=1, keepdim=True) if start > 0 else torch.zeros(B, 1, dtype=torch.long,
                                                                                           device=idx.device)
        pos = (seen + valid.long().cumsum(dim=1) - 1).clamp_min(0) * valid
        self.token_ids[:, start:end] = idx
        self.valid[:, start:end] = valid
        self.positions[:, start:end] = pos
        self.n_slots = end
        return start

    def invalidate(self, rows: torch.Tensor, starts: torch.Tensor, end: int) -> None:
        """Mark slots [starts[i], end) of row rows[i] as not real tokens (e.g. a row's rejected drafts)."""
        slot = torch.arange(self.max_len, device=self.valid.device)
        drop = (slot[None, :] >= starts[:, None]) & (slot[None, :] < end)  # (len(rows), max_len)
        self.valid[rows] &= ~drop

    def compact(self) -> int:
        """
        Squeeze out the invalid slots (pads, rejected drafts): per row, its valid slots move to the right end in
        their order, the left side is invalid, and the cache ends after the row with the most valid slots. Keys,
        values, kept streams, ids and positions move with their slots; since positions, masks and smear skip
        invalid slots, every later token computes exactly what it computed before. Every layer must hold every
        claimed slot. Returns the new length.
        """
        n = self.n_slots
        if any(length != n for length in self.layer_len):
            raise RuntimeError(f"compact needs every layer to hold all {n} claimed slots; fill levels {self.layer_len}")
        valid = self.valid[:, :n]
        new_len = int(valid.sum(dim=1).max()) if n else 0
        # per row: the invalid slots, then the valid ones in order (a stable sort); the last new_len of them stay
        src = torch.sort(valid.to(torch.uint8), dim=1, stable=True).indices[:, n - new_len:]  # (B, new_len)
        self.gather_slots(src, n)
        for t in (self.token_ids, self.valid, self.positions):
            t[:, :new_len] = t[:, :n].gather(1, src)
        self.valid[:, new_len:] = False
        self.n_slots = new_len
        return new_len

    def gather_slots(self, src: torch.Tensor, n: int) -> None:
        """Every layer's keys/values and every kept stream: slots src (B, new_len) of [0, n) move to [0, new_len)."""
        if self.placement is not None:  # the ranks holding other layers move theirs the same way
            self.placement.compact(self, src, n)
        new_len = src.size(1)
        for layer in self.layers:
            idx = src.to(layer.keys.device)[:, None, :, None].expand(-1, layer.keys.size(1), -1, layer.keys.size(3))
            layer.keys[:, :, :new_len] = layer.keys[:, :, :n].gather(2, idx)
            layer.values[:, :, :new_len] = layer.values[:, :, :n].gather(2, idx)
            layer.length = new_len
        for h in self.hidden.values():
            h[:, :new_len] = h[:, :n].gather(1, src.to(h.device)[:, :, None].expand(-1, -1, h.size(2)))

    def stage_len(self, stage: int) -> int:
        """Slots filled by every layer of `stage`."""
        return min(self.layers[i].length for i in self.stage_layers[stage])

    def store_hidden(self, layer: int, cols: slice | torch.Tensor, x: torch.Tensor) -> None:
        """Keep the stream after `layer` (B, T, C) for slots `cols` (a slice, or a tensor of T slot indices)."""
        if layer not in self.hidden:
            self.allocate_hidden(x.dtype)
        if layer not in self.hidden:  # a stream kept on another cache's behalf (a branch's mirror of its trunk's)
            self.hidden[layer] = torch.zeros(self.batch_size_, self.max_len, x.size(-1), dtype=x.dtype,
                                             device=self.token_ids.device)
        self.hidden[layer][:, cols] = x

    def allocate_hidden(self, dtype: torch.dtype) -> None:
        """The buffers of every kept stream, when the cache keeps them (before a compiled step, which cannot)."""
        if self.keep_hidden:
            for layer in self.hidden_layers - self.hidden.keys():
                self.hidden[layer] = torch.zeros(self.batch_size_, self.max_len, self.n_embd, dtype=dtype,
                                                 device=self.token_ids.device)

    def prepare_static(self, dtype: torch.dtype) -> None:
        """
        Ready for a compiled step (GPT.static_slots): every kept-stream buffer exists (a graph cannot allocate one);
        on CUDA every buffer is marked as a static address, so CUDA graphs write and read it in place (a new cache's
        buffers make them re-record).
        """
        self.allocate_hidden(dtype)
        if self.token_ids.is_cuda:
            for t in [self.token_ids, self.valid, self.positions, *self.hidden.values(),
                      *(b for layer in self.layers for b in (layer.keys, layer.values))]:
                torch._dynamo.mark_static_address(t)

    def load_hidden(self, layer: int, cols: slice | torch.Tensor) -> torch.Tensor:
        """The kept stream after `layer` for slots `cols` (a slice, or a tensor of slot indices)."""
        if layer not in self.hidden:
            raise RuntimeError(f"the cache kept no stream after layer {layer}: create it with keep_hidden=True")
        return self.hidden[layer][:, cols]

    def extended(self, config) -> "CognicaKVCache":
        """
        A cache for a model that continues this one with more layers (a sibling branch: config has this cache's
        layers and more). It shares this cache's layer objects and slot bookkeeping (slot count, token ids,
        validity, positions, kept streams), so the shared layers' keys exist once, and owns storage for the new
        layers only. Claim slots on this cache: the extension sees them; it keeps no streams of its own.
        """
        return ExtendedKVCache(self, config)

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.n_slots

    def crop(self, max_length: int) -> None:
        """Forget every slot at or beyond max_length (negative: drop that many from the end), in every layer."""
        if max_length < 0:
            max_length = self.n_slots + max_length
        max_length = max(0, min(self.n_slots, max_length))
        for layer in self.layers:
            layer.crop(max_length)
        self.valid[:, max_length:] = False
        self.n_slots = max_length

    def reset(self) -> None:
        self.crop(0)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        if self.placement is not None:
            self.placement.reorder(self, beam_idx)
        super().reorder_cache(beam_idx)
        for name in ("token_ids", "valid", "positions"):
            setattr(self, name, getattr(self, name).index_select(0, beam_idx.to(self.token_ids.device)))
        self.hidden = {k: v.index_select(0, beam_idx.to(v.device)) for k, v in self.hidden.items()}
        self.batch_size_ = len(beam_idx)

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self.reorder_cache(indices)

    @property
    def own_layers(self) -> list[CognicaKVLayer]:
        """The layers whose storage this cache owns (all of them; an extension owns only its new ones)."""
        return self.layers

    def append_rows(self, other: "CognicaKVCache") -> None:
        """
        Add other's rows after this cache's rows (the batch grows; slots keep their columns). Both must hold the same
        slots at the same fill level in every layer, in buffers of the same length: a row joining a running batch is
        first laid out on the batch's slots, then appended, so the running rows' keys are never copied one by one.
        """
        if (other.max_len, other.n_slots, other.layer_len) != (self.max_len, self.n_slots, self.layer_len):
            raise ValueError(f"cannot append rows of a cache with {other.n_slots} slots (of {other.max_len}, fill "
                             f"levels {other.layer_len}) to one with {self.n_slots} (of {self.max_len}, "
                             f"{self.layer_len})")
        self._restack([(self, None), (other, None)])

    def keep_rows(self, rows: list[int]) -> None:
        """Keep only these rows, in this order (the others leave the batch); slots keep their columns."""
        self._restack([(self, torch.tensor(rows, dtype=torch.long, device=self.token_ids.device))])

    def _restack(self, parts: list[tuple["CognicaKVCache", torch.Tensor | None]]) -> None:
        """This cache's rows become the concatenation of parts' rows (all of a part's rows, or those indexed)."""
        self._restack_layers(parts)
        for name in ("token_ids", "valid", "positions"):
            setattr(self, name, torch.cat([getattr(c, name) if idx is None else getattr(c, name).index_select(0, idx)
                                           for c, idx in parts]))
        for layer in set().union(*(c.hidden for c, _ in parts)):
            like = next(c.hidden[layer] for c, _ in parts if layer in c.hidden)
            streams = [c.hidden[layer] if layer in c.hidden else
                       torch.zeros(c.batch_size_, *like.shape[1:], dtype=like.dtype, device=like.device)
                       for c, _ in parts]
            self.hidden[layer] = stack_rows(streams, [idx for _, idx in parts], 1, self.n_slots)
        self.batch_size_ = self.token_ids.size(0)

    def _restack_layers(self, parts: list[tuple["CognicaKVCache", torch.Tensor | None]]) -> None:
        idxs = [idx for _, idx in parts]
        for i, layer in enumerate(self.own_layers):
            layer.keys = stack_rows([c.own_layers[i].keys for c, _ in parts], idxs, 2, self.n_slots)
            layer.values = stack_rows([c.own_layers[i].values for c, _ in parts], idxs, 2, self.n_slots)

    def batch_repeat_interleave(self, repeats: int) -> None:
        if self.placement is not None:
            self.placement.reorder(self, torch.arange(self.batch_size_).repeat_interleave(repeats))
        super().batch_repeat_interleave(repeats)
        for name in ("token_ids", "valid", "positions"):
            setattr(self, name, getattr(self, name).repeat_interleave(repeats, dim=0))
        self.hidden = {k: v.repeat_interleave(repeats, dim=0) for k, v in self.hidden.items()}
        self.batch_size_ *= repeats


class ExtendedKVCache(CognicaKVCache):
    """CognicaKVCache.extended: a trunk cache's layers and slots by reference, plus fresh layers after them."""

    def __init__(self, trunk: CognicaKVCache, config):
        k = trunk.layers[0].keys  # (B, H_kv, max_len, D)
        windows = config.window_sizes()
        new = [CognicaKVLayer(k.size(0), k.size(2), config.n_kv_head, config.head_dim, windows[i], k.dtype, k.device)
               for i in range(len(trunk.layers), config.n_layer)]
        Cache.__init__(self, layers=trunk.layers + new)
        self.trunk = trunk
        self.max_len, self.batch_size_, self.n_embd = trunk.max_len, trunk.batch_size_, trunk.n_embd
        self.token_ids, self.valid, self.positions = trunk.token_ids, trunk.valid, trunk.positions
        self.hidden, self.hidden_layers = trunk.hidden, trunk.hidden_layers
        self.keep_hidden = False  # reads the trunk's kept streams, stores none
        self.stage_layers = config.stage_layers()

    @property
    def own_layers(self) -> list[CognicaKVLayer]:
        return self.layers[len(self.trunk.layers):]

    def _follow_trunk(self) -> None:
        """Point at the trunk's bookkeeping again (after the trunk changed its rows)."""
        self.token_ids, self.valid, self.positions = self.trunk.token_ids, self.trunk.valid, self.trunk.positions
        self.hidden, self.batch_size_ = self.trunk.hidden, self.trunk.batch_size_

    def _restack(self, parts: list[tuple["CognicaKVCache", torch.Tensor | None]]) -> None:
        """The extension's own layers; the trunk (shared layers and bookkeeping) restacks its rows first."""
        self._restack_layers(parts)
        self._follow_trunk()

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        """Reorder the extension's own layers; the trunk (shared layers and bookkeeping) is reordered by its owner
        first."""
        for layer in self.own_layers:
            layer.reorder_cache(beam_idx)
        self._follow_trunk()

    @property
    def n_slots(self) -> int:
        return self.trunk.n_slots

    @n_slots.setter
    def n_slots(self, value: int) -> None:
        self.trunk.n_slots = value

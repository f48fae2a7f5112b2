"""
The Cognica PoE trunk: nanochat's GPT (as of commit 92d63d4) with stage exits.

Architecture, in forward order: x = norm(wte(idx)); smear (x[t] += smear_lambda *
sigmoid(smear_gate(x[t, :24])) * x[t-1]); x0 = x; per layer x = resid_lambdas[i] * x + x0_lambdas[i] * x0
then a pre-norm block (attention with rotary, QK norm x1.2, sliding windows, gated value embeddings on
alternating layers, GQA; a ReLU^2 MLP); the output of block n_layer // 2 is kept for backout; final exit
logits = softcap(lm_head(norm(x - backout_lambda * x_backout))). No biases, no affine norms, padded vocab.

PoE stages: every `poe_every` layers the stream is a valid predictor through the same lm_head. An
intermediate exit is softcap(lm_head(norm(h_k))) without backout (that is how the stage heads were
trained); the last exit is the standard forward. `forward_all_stages` returns any set of exits from ONE pass.

KV cache: an optional CognicaKVCache (cache.py). Slots are absolute columns; rotary positions come from the
attention mask (left padding), pads are masked out of every attention and never smeared into a real token.

Placement (placement.py): a model may keep its stages on several devices, or in several processes; the layer loop
moves the residual stream, x0 and the backout stream where the next layer lives, or ships them to the rank that
holds it. Embedding, smear and heads stay on the first stage's device, so exits and sampling happen there.

This file is copied into exported remote-code folders: it imports only torch/transformers and siblings.
"""

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn import Linear  # plain: packed.py turns a matrix into its packed subclass in place, when asked
from transformers import initialization as init
from transformers.modeling_layers import GradientCheckpointingLayer

from .cache import CognicaKVCache
from .config import CognicaPoEConfig
from .packed import StackedLinears, pack_linears, unpack_linears

VE_GATE_CHANNELS = 12  # value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24  # smear gate reads the first 24 channels of the current token's embedding
# compiled decode runs chunks of up to this many tokens (decode steps, speculative verification, WAND catch-up);
# longer ones (prompts) run eagerly: their length varies per request and their matrix products dominate anyway
COMPILED_MAX_CHUNK = 16


def norm(x: torch.Tensor) -> torch.Tensor:
    """Parameter-free RMSNorm (PyTorch's default eps), as nanochat."""
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """
    Half-split rotary with nanochat's sign convention: (x1, x2) -> (x1 cos + x2 sin, x2 cos - x1 sin).
    x: (B, T, H, D); cos = [cos, cos] and sin = [sin, -sin] over D, (B or 1, T, 1, D), built once per forward
    (StepContext), so each call is 4 ops instead of 10 (per-op dispatch dominates decode outside the matmuls).
    The same products summed in a different order: bitwise equal to the two-half form.
    """
    d = x.shape[-1] // 2
    return x * cos + torch.cat([x[..., d:], x[..., :d]], dim=-1) * sin


def attend_one_query(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """
    Attention of one query per row over cached keys: q (B, H, 1, D), k and v (B, H_kv, L, D), mask None or boolean
    (B, 1, 1, L) -> (B, H, 1, D), computed in fp32 (SDPA's accuracy or better). On CPU, SDPA's kernel for a single
    bf16 query is several times slower than this (bench/inference.py measures it); for fp32, or several queries,
    it is as fast as this, so only one-query reduced-precision decode steps on CPU come here.
    """
    B, H, _, D = q.shape
    H_kv = k.size(1)
    q = q.reshape(B, H_kv, H // H_kv, D)  # the query heads that share kv head j are rows of group j: GQA, no repeat
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)).mul_(D**-0.5)  # (B, H_kv, H / H_kv, L)
    if mask is not None:
        scores.masked_fill_(~mask, float("-inf"))
    y = torch.matmul(scores.softmax(dim=-1), v.float())  # (B, H_kv, H / H_kv, D)
    return y.to(q.dtype).reshape(B, H, 1, D)


def seeded_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator | None:
    """A generator of its own for seeded init (None: no seed, draw from torch's global generator)."""
    return None if seed is None else torch.Generator(device=device).manual_seed(seed)


def softcap(logits: torch.Tensor, cap: float) -> torch.Tensor:
    return cap * torch.tanh(logits / cap)


class CausalSelfAttention(StackedLinears):
    """
    GQA attention with rotary, QK norm and sliding windows. c_q, c_k and c_v multiply the same input: for CPU
    inference they can be packed as one stack (packed.StackedLinears), one product per step instead of three.
    """

    stacked = ("c_q", "c_k", "c_v")

    def __init__(self, config: CognicaPoEConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_head = config.n_head
        self.n_kv_head = config.n_kv_head
        self.head_dim = config.head_dim
        self.qk_scale = config.qk_scale
        C = config.n_embd
        self.c_q = Linear(C, self.n_head * self.head_dim, bias=False)
        self.c_k = Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_v = Linear(C, self.n_kv_head * self.head_dim, bias=False)
        self.c_proj = Linear(C, C, bias=False)
        has_ve = config.has_value_embed(layer_idx)
        self.ve_gate = Linear(VE_GATE_CHANNELS, self.n_kv_head, bias=False) if has_ve else None

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, step: "StepContext") -> torch.Tensor:
        B, T, _ = x.shape
        H, H_kv = self.n_head, self.n_kv_head
        # project: q | k | v side by side, one product when packed
        qkv = self.project_stack(x).view(B, T, H + 2 * H_kv, self.head_dim)
        v = qkv[:, :, H + H_kv:]
        if ve is not None:  # ResFormer-style value residual, gated per kv head
            gate = 3 * torch.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, H_kv)
            v = v + gate.unsqueeze(-1) * ve.view(B, T, H_kv, self.head_dim)
        # rotary, QK norm and the QK scale act per head: one call each for the queries' and keys' heads together
        qk = norm(apply_rotary(qkv[:, :, :H + H_kv], step.rotary_cos, step.rotary_sin)) * self.qk_scale
        q, k = qk.split([H, H_kv], dim=2)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # (B, H, T, D)
        # cache: write this chunk's keys/values at its slots, then attend over every slot so far
        if step.cache is not None:
            layer = step.cache.layers[self.layer_idx]
            layer.write_at(k, v, step.cols)
            k, v = layer.view(step.kv_len)
        # attend: causal within the layer's window, pads masked out
        mask, is_causal = step.mask_for(self.layer_idx)
        if T == 1 and q.dtype in (torch.bfloat16, torch.float16) and q.device.type == "cpu":
            y = attend_one_query(q, k, v, mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                               enable_gqa=H_kv != H)
        # re-assemble the heads side by side and project back to the residual stream
        y = y.transpose(1, 2).contiguous().view(B, T, -1)
        return self.c_proj(y)


class MLP(nn.Module):
    def __init__(self, config: CognicaPoEConfig):
        super().__init__()
        self.c_fc = Linear(config.n_embd, 4 * config.n_embd, bias=False)
        self.c_proj = Linear(4 * config.n_embd, config.n_embd, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c_proj(F.relu(self.c_fc(x)).square())


class Block(GradientCheckpointingLayer):
    """
    Pre-norm attention + MLP. A GradientCheckpointingLayer: after gradient_checkpointing_enable(), training forwards
    keep only the block's input and recompute the rest in the backward pass (inference is unaffected).
    """

    def __init__(self, config: CognicaPoEConfig, layer_idx: int):
        super().__init__()
        self.attn = CausalSelfAttention(config, layer_idx)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor, ve: torch.Tensor | None, step: "StepContext") -> torch.Tensor:
        x = x + self.attn(norm(x), ve, step)
        x = x + self.mlp(norm(x))
        return x


@torch.no_grad()
def init_block(block: Block, n_embd: int, generator: torch.Generator | None = None) -> None:
    """
    nanochat's init of one block, for the base's layers and a specialist's new ones alike: q, k, v and c_fc uniform,
    both output projections zero (so a new block starts as the identity). transformers' guarded init functions:
    tensors already loaded from a checkpoint are left alone.
    """
    s = 3**0.5 * n_embd**-0.5
    init.uniform_(block.attn.c_q.weight, -s, s, generator=generator)
    init.uniform_(block.attn.c_k.weight, -s, s, generator=generator)
    init.uniform_(block.attn.c_v.weight, -s, s, generator=generator)
    init.zeros_(block.attn.c_proj.weight)
    init.uniform_(block.mlp.c_fc.weight, -0.4 * s, 0.4 * s, generator=generator)
    init.zeros_(block.mlp.c_proj.weight)


class StepContext:
    """
    What every layer of one forward chunk shares: the chunk's slots, rotary angles and attention masks.
    Masks are built once per distinct window size and reused by all layers with that window.

    Static shapes (compiled decode): with `slots`, a tensor of the chunk's slot indices, the chunk writes its keys at
    those indices and attends over the cache's whole preallocated buffers, later slots masked out; every shape then
    depends on the cache's size and the chunk's length only, never on how far the cache is filled, so one compiled
    graph serves every step.
    """

    def __init__(self, windows: list[int], cos: torch.Tensor, sin: torch.Tensor, T: int, start: int,
                 cache: CognicaKVCache | None, q_pos: torch.Tensor | None, k_pos: torch.Tensor | None,
                 k_valid: torch.Tensor | None, padded: bool, slots: torch.Tensor | None = None):
        self.windows = windows
        # cos, sin (B or 1, T, 1, D/2) -> apply_rotary's full-width tables (B or 1, T, 1, D)
        self.rotary_cos = torch.cat([cos, cos], dim=-1)
        self.rotary_sin = torch.cat([sin, -sin], dim=-1)
        self.T, self.start = T, start  # the chunk occupies slots [start, start + T)
        self.slots = slots  # static shapes: the same slots as a tensor
        self.cols = slice(start, start + T) if slots is None else slots  # where its keys and streams go
        self.kv_len = start + T if slots is None else None  # the key slots attended over (None: the whole buffer)
        self.cache = cache
        self.q_pos = q_pos  # (B, T) rotary positions of the queries; None when simply arange(T)
        self.k_pos = k_pos  # (B, start + T) rotary positions of the keys
        self.k_valid = k_valid  # (B, start + T) real-token mask of the keys
        self.padded = padded  # some key slot is a pad
        self._masks: dict[int, tuple[torch.Tensor | None, bool]] = {}
        self._moved: dict[torch.device, StepContext] = {}

    def to(self, device: torch.device) -> "StepContext":
        """This context on `device`, made once per device: the layers a placed model keeps there read this copy."""
        if self.rotary_cos.device == device:
            return self
        if device not in self._moved:
            moved = copy.copy(self)
            for name in ("rotary_cos", "rotary_sin", "q_pos", "k_pos", "k_valid"):
                t = getattr(self, name)
                setattr(moved, name, None if t is None else t.to(device))
            moved._masks, moved._moved = {}, {}
            self._moved[device] = moved
        return self._moved[device]

    def mask_for(self, layer_idx: int) -> tuple[torch.Tensor | None, bool]:
        """(attn_mask, is_causal) for SDPA at this layer's window."""
        window = self.windows[layer_idx]
        if window not in self._masks:
            self._masks[window] = self._build(window)
        return self._masks[window]

    def _build(self, window: int) -> tuple[torch.Tensor | None, bool]:
        T, start = self.T, self.start
        device = self.rotary_cos.device
        if self.q_pos is None:  # no cache, no padding: positions are slots
            if T - 1 <= window:
                return None, True
            t = torch.arange(T, device=device)
            diff = t[:, None] - t[None, :]
            return ((diff >= 0) & (diff <= window))[None, None], False
        kv_len = self.k_pos.size(1)
        if T == 1 and not self.padded and kv_len - 1 <= window:
            return None, False  # one query that sees every cached key
        # general case: causal in slots, real keys only, window in rotary positions -> (B, 1, T, kv_len)
        q_slot = torch.arange(start, start + T, device=device) if self.slots is None else self.slots
        k_slot = torch.arange(kv_len, device=device)
        causal = k_slot[None, :] <= q_slot[:, None]  # (T, kv_len)
        diff = self.q_pos[:, :, None] - self.k_pos[:, None, :]  # (B, T, kv_len)
        allowed = causal[None] & self.k_valid[:, None, :] & (diff <= window)
        allowed = allowed | (k_slot[None, :] == q_slot[:, None])[None]  # a pad attends to itself: no NaN rows
        return allowed[:, None], False


class GPT(nn.Module):
    def __init__(self, config: CognicaPoEConfig):
        super().__init__()
        self.config = config
        V, C = config.padded_vocab_size, config.n_embd
        kv_dim = config.n_kv_head * config.head_dim
        # own parameters first, in nanochat's state_dict order
        self.resid_lambdas = nn.Parameter(torch.ones(config.n_layer))
        self.x0_lambdas = nn.Parameter(torch.zeros(config.n_layer))
        self.smear_lambda = nn.Parameter(torch.zeros(1))
        self.backout_lambda = nn.Parameter(torch.zeros(1))
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(V, C),
            h=nn.ModuleList([Block(config, i) for i in range(config.n_layer)]),
        ))
        self.lm_head = Linear(C, V, bias=False)
        self.smear_gate = Linear(SMEAR_CHANNELS, 1, bias=False)
        self.value_embeds = nn.ModuleDict({str(i): nn.Embedding(V, kv_dim)
                                           for i in range(config.n_layer) if config.has_value_embed(i)})
        if config.specialist_ends:  # specialist stages: the leaf's own head, and each ancestor's head folded in
            self.lm_head_stage = Linear(C, V, bias=False)
            self.ancestor_heads = nn.ModuleDict({str(e): Linear(C, V, bias=False)
                                                 for e in config.specialist_ends[:-1]})
        self.window_sizes = config.window_sizes()
        self._rotary: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        self.placement = None  # placement.Placement: the device, or the rank, of each layer (None: all here)
        self.compiled_slots = None  # compiled.compile_decode: a compiled static_slots that run_slots calls

    @classmethod
    def from_config(cls, config: CognicaPoEConfig, device: torch.device | str = "cpu",
                    dtype: torch.dtype = torch.float32, seed: int | None = None) -> "GPT":
        """
        Build on the meta device (no memory touched), then allocate on `device` and initialise; seed draws from a
        generator of its own (the same seed gives the same weights; torch's global generator is left alone).
        """
        with torch.device("meta"):
            model = cls(config)
        if str(device) == "meta":
            return model
        model.to_empty(device=device)
        model.init_weights(seeded_generator(seed, device))
        return model.to(dtype)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator | None = None) -> None:
        """
        nanochat's init, drawing in nanochat's order, so the same seed gives the same weights on CPU.
        Uses transformers' guarded init functions, so tensors already loaded from a checkpoint are left alone.
        generator: where the draws come from (None: torch's global generator, as transformers' post_init calls it).
        """
        cfg = self.config
        s = 3**0.5 * cfg.n_embd**-0.5
        init.normal_(self.transformer.wte.weight, mean=0.0, std=0.8, generator=generator)
        init.normal_(self.lm_head.weight, mean=0.0, std=0.001, generator=generator)
        for block in self.transformer.h:
            init_block(block, cfg.n_embd, generator)
        n, n_base = cfg.n_layer, cfg.trunk_n_layer
        denom = max(n_base - 1, 1)  # the base's ramps; appended specialist layers start as 1.0 / 0.0
        init.copy_(self.resid_lambdas, torch.tensor([1.15 - 0.10 * i / denom if i < n_base else 1.0
                                                     for i in range(n)]))
        init.copy_(self.x0_lambdas, torch.tensor([0.20 - 0.15 * i / denom if i < n_base else 0.0 for i in range(n)]))
        init.zeros_(self.smear_lambda)
        init.constant_(self.backout_lambda, 0.2)
        init.uniform_(self.smear_gate.weight, 0.0, 0.02, generator=generator)
        for ve in self.value_embeds.values():
            init.uniform_(ve.weight, -s, s, generator=generator)
        for block in self.transformer.h:
            if block.attn.ve_gate is not None:
                init.uniform_(block.attn.ve_gate.weight, 0.0, 0.02, generator=generator)
        if cfg.specialist_ends:  # a new specialist head starts at zero: the stage is the identity at first
            init.zeros_(self.lm_head_stage.weight)
            for head in self.ancestor_heads.values():
                init.copy_(head.weight, self.lm_head.weight)

    # -----------------------------------------------------------------------------
    # where the model lives, its caches and rotary tables

    @property
    def device(self) -> torch.device:
        """The model's device, read from the embedding (a dynamically quantized lm_head has no float weight)."""
        return self.transformer.wte.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: the embedding's, which every stream inherits."""
        return self.transformer.wte.weight.dtype

    def new_cache(self, batch_size: int, max_len: int | None = None, keep_hidden: bool = False) -> CognicaKVCache:
        """
        An empty KV cache for this model's dtype and device (keep_hidden: also keep stage-boundary streams). Under
        compiled decode its length is rounded up to a power of two (at least 256, at most the rotary table's), so a
        few cache sizes, each with its own static graph, serve every request.
        """
        if self.compiled_slots is not None:
            max_len = max_len or self.config.sequence_len
            max_len = max(max_len, min(max(256, 1 << (max_len - 1).bit_length()), self.config.rotary_seq_len))
        return CognicaKVCache(self.config, batch_size, max_len, dtype=self.dtype, device=self.device,
                              keep_hidden=keep_hidden,
                              layer_devices=None if self.placement is None else self.placement.devices)

    def share_rotary_from(self, other: "GPT") -> None:
        """Use other's rotary tables (one copy per device for models of the same attention geometry)."""
        a, b = self.config, other.config
        if (a.head_dim, a.rope_theta, a.rotary_seq_len) != (b.head_dim, b.rope_theta, b.rotary_seq_len):
            raise ValueError("rotary tables are shared only between models of the same head_dim, rope_theta and "
                             "rotary_seq_len")
        self._rotary = other._rotary

    # -----------------------------------------------------------------------------
    # pieces of the forward pass

    def rotary_tables(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of shape (rotary_seq_len, head_dim/2) in fp32, computed once per device (not in the state_dict)."""
        if device not in self._rotary:
            cfg = self.config
            hd = cfg.head_dim
            inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, hd, 2, dtype=torch.float32, device=device) / hd))
            t = torch.arange(cfg.rotary_seq_len, dtype=torch.float32, device=device)
            freqs = torch.outer(t, inv_freq)
            self._rotary[device] = (freqs.cos(), freqs.sin())
        return self._rotary[device]

    def embed(self, idx: torch.Tensor) -> torch.Tensor:
        """Pre-smear normalized token embedding (B, T, C), in wte's dtype: the model's compute dtype."""
        return norm(self.transformer.wte(idx))

    def smear(self, x: torch.Tensor, prev: torch.Tensor | None) -> torch.Tensor:
        """
        Mix each token's predecessor into it: x[t] += smear_lambda * sigmoid(smear_gate(x[t, :24])) * prev[t].
        prev (B, T, C) is the predecessor's pre-smear embedding, zero where there is none (sequence start, or the
        previous slot is a pad); None means the plain shift x[t-1] with nothing before position 0.
        """
        gate = self.smear_lambda.to(x.dtype) * torch.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))  # (B, T, 1)
        if prev is None:
            return torch.cat([x[:, :1], x[:, 1:] + gate[:, 1:] * x[:, :-1]], dim=1)
        return x + gate * prev

    def predecessor_embeddings(self, ids: torch.Tensor, valid: torch.Tensor, cols: slice | torch.Tensor
                               ) -> torch.Tensor:
        """
        Smear inputs for slots `cols` (a slice, or a tensor of slot indices) of rows whose tokens and real-token mask
        are ids, valid (B, L): the embedding of the last real token before each slot (zero if none). Pads and
        rejected drafts are skipped, so a row's first real token is never mixed with a pad and a rollback needs no
        saved state.
        """
        B, L = ids.shape
        slot = torch.arange(L, device=ids.device).expand(B, L)
        last = torch.where(valid, slot, -1).cummax(dim=1).values  # (B, L) last real slot <= t
        prev = torch.cat([torch.full_like(last[:, :1], -1), last[:, :-1]], dim=1)[:, cols]  # last real slot < t
        emb = self.embed(ids.gather(1, prev.clamp_min(0)))
        return emb * (prev >= 0)[..., None].to(emb.dtype)

    def step_for_slots(self, cache: CognicaKVCache, start: int, end: int) -> StepContext:
        """Rotary angles and masks for queries at cache slots [start, end) over keys [0, end)."""
        q_pos = cache.positions[:, start:end]
        self.check_positions(int(q_pos.max()))
        cos_t, sin_t = self.rotary_tables(q_pos.device)
        dtype = self.dtype
        k_valid = cache.valid[:, :end]
        return StepContext(self.window_sizes, cos_t[q_pos][:, :, None].to(dtype), sin_t[q_pos][:, :, None].to(dtype),
                           end - start, start, cache, q_pos, cache.positions[:, :end], k_valid,
                           not bool(k_valid.all()))

    def check_positions(self, max_pos: int) -> None:
        if max_pos >= self.config.rotary_seq_len:
            raise ValueError(f"position {max_pos} is beyond the rotary table ({self.config.rotary_seq_len} positions = "
                             f"{self.config.rotary_multiplier} x sequence_len {self.config.sequence_len})")

    def prepare(self, idx: torch.Tensor, attention_mask: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, StepContext]:
        """Uncached chunk: embed + smear and the shared step context. Returns (x0 (B, T, C), step)."""
        B, T = idx.shape
        valid = attention_mask[:, -T:].to(torch.bool) if attention_mask is not None else None
        if valid is not None and bool(valid.all()):
            valid = None
        x = self.embed(idx)
        cos_t, sin_t = self.rotary_tables(idx.device)
        if valid is None:
            self.check_positions(T - 1)
            x = self.smear(x, None)
            cos, sin = cos_t[None, :T, None], sin_t[None, :T, None]
            q_pos = None
        else:
            q_pos = (valid.long().cumsum(dim=1) - 1).clamp_min(0) * valid
            self.check_positions(int(q_pos.max()))
            x = self.smear(x, self.predecessor_embeddings(idx, valid, slice(None)))
            cos, sin = cos_t[q_pos][:, :, None], sin_t[q_pos][:, :, None]
        dtype = x.dtype
        step = StepContext(self.window_sizes, cos.to(dtype), sin.to(dtype), T, 0, None, q_pos, q_pos, valid,
                           valid is not None)
        return x, step

    def run_layer(self, i: int, x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor,
                  step: StepContext) -> torch.Tensor:
        """Layer i: lambda blend with x0, then the block."""
        x = self.resid_lambdas[i].to(x.device, x.dtype) * x + self.x0_lambdas[i].to(x.device, x.dtype) * x0
        ve = self.value_embeds[str(i)](idx).to(x.dtype) if str(i) in self.value_embeds else None
        return self.transformer.h[i](x, ve, step)

    def exit_logits(self, h: torch.Tensor, layer: int | None = None) -> torch.Tensor:
        """
        softcap(head(norm(h)))[..., :vocab] in fp32 at exit `layer` (default: the last layer); h already carries
        backout where it applies. Base exits use lm_head; a specialist's exit uses lm_head with every ancestor's
        stage head folded in, and the leaf's exit adds its own lm_head_stage per head_mode (dual/base/spec).
        """
        cfg = self.config
        x = norm(h.to(self.device))  # a placed model's heads live with the embedding
        layer = cfg.n_layer - 1 if layer is None else layer
        head = self.lm_head
        if cfg.specialist_ends and layer >= cfg.specialist_ends[0]:
            ancestors = [e for e in cfg.specialist_ends[:-1] if e <= layer]
            if ancestors:
                head = self.ancestor_heads[str(ancestors[-1])]
            if layer >= cfg.specialist_ends[-1] and cfg.head_mode != "base":
                stage = self.lm_head_stage(x)
                logits = stage if cfg.head_mode == "spec" else head(x) + stage
                return softcap(logits[..., :cfg.vocab_size].float(), cfg.softcap)
        return softcap(head(x)[..., :cfg.vocab_size].float(), cfg.softcap)

    @property
    def served_layer(self) -> int:
        """The exit forward() and generate() serve: config.poe_exit_stage's boundary when set (so one stage can be
        evaluated as a plain causal LM; forward then runs only the layers up to it), else the last layer, or with
        head_mode "base" the parent's exit (so a specialist in base mode reproduces its parent exactly)."""
        cfg = self.config
        if cfg.poe_exit_stage is not None:
            return cfg.stage_boundary(cfg.poe_exit_stage, "poe_exit_stage")
        if cfg.specialist_ends and cfg.head_mode == "base":
            return cfg.segments()[-2][1]
        return cfg.n_layer - 1

    def applies_backout(self, layer: int) -> bool:
        """Backout belongs to the base's last exit and every exit past it (specialist layers); not to stage exits."""
        return layer >= self.config.trunk_n_layer - 1

    def hidden_at_exits(self, idx: torch.Tensor, exits: list[int], kv_cache: CognicaKVCache | None = None,
                        attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                        streams: list[torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """
        Run layers 0..max(exits) once over new tokens idx (B, T); return {exit layer: stream (B, T', C)} with
        backout applied where it belongs (T' = logits_to_keep last positions, or all). With a cache the tokens
        take the next slots, and attention_mask may cover past + new tokens (as generate() passes it).
        streams, when a list, receives every full-length stream: x0 (the embedding after smear), then each layer's
        output, without backout (transformers' hidden_states).
        """
        exits = self.config.check_exit_layers(exits)
        if kv_cache is not None:  # cached: claim the next slots, then run them as the stage engine does
            T = idx.size(1)
            valid = attention_mask[:, -T:] if attention_mask is not None else None
            start = kv_cache.claim(idx, valid)
            return self.run_slots(kv_cache, start, start + T, 0, max(exits), exits, logits_to_keep, streams=streams)
        # uncached: prepare (embed, smear, rotary and masks), then run the layers
        x0, step = self.prepare(idx, attention_mask)
        return self._run_layers(x0, x0, idx, step, 0, max(exits), exits, logits_to_keep, None, None, streams)

    def run_slots(self, cache: CognicaKVCache, start: int, end: int, first_layer: int, last_layer: int,
                  exits: list[int] = (), logits_to_keep: int = 0, shared: dict | None = None,
                  streams: list[torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        """
        Run layers first_layer..last_layer for the tokens already claimed in cache slots [start, end): the stage
        engine's one primitive. Layer first_layer's input is the stream the cache kept at layer first_layer - 1
        for those slots (`keep_hidden` caches keep it at every stage boundary). Every layer must already hold
        keys for slots [0, start): a missing prefix is an error, never silently approximated.
        """
        for i in range(first_layer, last_layer + 1):
            if cache.layers[i].length < start:
                raise RuntimeError(f"layer {i} holds keys for {cache.layers[i].length} slots but the chunk starts at "
                                   f"slot {start}: catch the layer up first")
        T = end - start
        if self.compiled_slots is not None and streams is None and T <= COMPILED_MAX_CHUNK \
                and not torch.is_grad_enabled():
            # compiled decode: the same work with static shapes; arguments normalized so equal work shares a graph
            cache.prepare_static(self.dtype)
            slots = torch.arange(start, end, device=cache.token_ids.device)
            if T > 1:  # chunks of every length above one share a graph
                torch._dynamo.maybe_mark_dynamic(slots, 0)
            out = self.compiled_slots(cache, slots, first_layer, last_layer, tuple(sorted(set(exits))),
                                      0 if logits_to_keep >= T else logits_to_keep)
            if slots.is_cuda:  # a CUDA graph's outputs live in memory its next replay overwrites
                out = {i: h.clone() for i, h in out.items()}
        else:
            ids = cache.token_ids[:, start:end]
            if shared is not None and (start, end) in shared:  # several calls over the same slots share x0 and masks
                x0, step = shared[(start, end)]
            else:
                prev = self.predecessor_embeddings(cache.token_ids[:, :end], cache.valid[:, :end], slice(start, None))
                x0, step = self.smear(self.embed(ids), prev), self.step_for_slots(cache, start, end)
                if shared is not None:
                    shared[(start, end)] = (x0, step)
            out = self._run_slots(cache, step, x0, ids, first_layer, last_layer, exits, logits_to_keep, streams)
        for i in range(first_layer, last_layer + 1):  # the layers that ran now hold keys up to `end`
            cache.layers[i].length = max(cache.layers[i].length, end)
        return out

    def static_slots(self, cache: CognicaKVCache, slots: torch.Tensor, first_layer: int, last_layer: int,
                     exits: tuple[int, ...], logits_to_keep: int) -> dict[int, torch.Tensor]:
        """
        run_slots for the slots `slots` (a tensor: consecutive claimed slots) with static shapes: embeddings, smear,
        rotary angles and masks are read from the cache's whole buffers and every layer attends over all of them, so
        a compiled graph of this depends only on the cache's size and the chunk's length. The caller (run_slots)
        records the layers' new fill levels.
        """
        ids = cache.token_ids[:, slots]
        x0 = self.smear(self.embed(ids), self.predecessor_embeddings(cache.token_ids, cache.valid, slots))
        q_pos = cache.positions[:, slots]
        cos_t, sin_t = self.rotary_tables(q_pos.device)
        dtype = self.dtype
        step = StepContext(self.window_sizes, cos_t[q_pos][:, :, None].to(dtype), sin_t[q_pos][:, :, None].to(dtype),
                           slots.size(0), 0, cache, q_pos, cache.positions, cache.valid, True, slots)
        return self._run_slots(cache, step, x0, ids, first_layer, last_layer, exits, logits_to_keep, None)

    def _run_slots(self, cache: CognicaKVCache, step: StepContext, x0: torch.Tensor, ids: torch.Tensor,
                   first_layer: int, last_layer: int, exits: list[int], logits_to_keep: int,
                   streams: list[torch.Tensor] | None) -> dict[int, torch.Tensor]:
        """The layers of run_slots from the chunk's x0 and step: layer first_layer's input is x0 or the kept stream."""
        x = x0 if first_layer == 0 else cache.load_hidden(first_layer - 1, step.cols)
        x_backout = None
        if first_layer > self.config.backout_layer and last_layer >= self.config.trunk_n_layer - 1:
            x_backout = cache.load_hidden(self.config.backout_layer, step.cols)
        return self._run_layers(x, x0, ids, step, first_layer, last_layer, exits, logits_to_keep, x_backout, cache,
                                streams)

    def _run_layers(self, x: torch.Tensor, x0: torch.Tensor, idx: torch.Tensor, step: StepContext, first: int,
                    last: int, exits: list[int], logits_to_keep: int, x_backout: torch.Tensor | None,
                    cache: CognicaKVCache | None, streams: list[torch.Tensor] | None = None) -> dict[int, torch.Tensor]:
        wanted = set(exits)
        keep = cache is not None and cache.keep_hidden
        backout_layer = self.config.backout_layer  # read once: a config attribute costs microseconds (transformers)
        out = {}
        if streams is not None:
            streams.append(x)
        placement, remote = self.placement, None
        if placement is not None:  # the layer streams this call reads (None: every one)
            backout = {backout_layer} if any(self.applies_backout(e) for e in wanted) else set()
            need = None if streams is not None else wanted | backout | (cache.hidden_layers if keep else set())
        for i in range(first, last + 1):
            if placement is not None and (i == first or i in placement.starts):  # the streams go where layer i lives
                x, x0, idx, step, remote = placement.enter(i, last, x, x0, idx, step, need)
            # remote: the streams another rank sent back for its layers
            x = self.run_layer(i, x, x0, idx, step) if remote is None else remote.get(i)
            if streams is not None:
                streams.append(x)
            if i == backout_layer:  # kept for backout at the last exit
                x_backout = x
            if keep and (i in cache.hidden_layers):  # kept so a later call can start the next stage here
                cache.store_hidden(i, step.cols, x)
            if i in wanted:  # an exit: its stream, minus backout where that applies
                h = x[:, -logits_to_keep:] if logits_to_keep else x
                if self.applies_backout(i):
                    xb = x_backout[:, -logits_to_keep:] if logits_to_keep else x_backout
                    h = h - self.backout_lambda.to(h.device, h.dtype) * xb.to(h.device)
                out[i] = h
        return out

    # -----------------------------------------------------------------------------
    # public forward paths

    def forward(self, idx: torch.Tensor, targets: torch.Tensor | None = None, kv_cache: CognicaKVCache | None = None,
                attention_mask: torch.Tensor | None = None, logits_to_keep: int = 0,
                streams: list[torch.Tensor] | None = None) -> torch.Tensor:
        """
        The served exit's fp32 softcapped logits (B, T, vocab), or the CE loss when targets are given. streams: a
        list to receive the stream entering layer 0 and after every layer that runs (see hidden_at_exits).
        """
        # run the layers up to the served exit, then its head
        last = self.served_layer
        h = self.hidden_at_exits(idx, [last], kv_cache, attention_mask, 0 if targets is not None else logits_to_keep,
                                 streams)
        logits = self.exit_logits(h[last], last)
        if targets is None:
            return logits
        return F.cross_entropy(logits.view(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-1)

    def forward_all_stages(self, idx: torch.Tensor, stage_boundaries: list[int] | None = None,
                           kv_cache: CognicaKVCache | None = None, attention_mask: torch.Tensor | None = None,
                           logits_to_keep: int = 0) -> list[torch.Tensor]:
        """
        Logits (B, T, vocab) at every requested exit layer (default: the stage boundaries) from ONE pass, in the
        order requested. Intermediate exits skip backout; the last layer's exit is the standard forward.
        """
        if stage_boundaries is None:
            stage_boundaries = self.config.poe_stage_boundary_layers
        hidden = self.hidden_at_exits(idx, list(stage_boundaries), kv_cache, attention_mask, logits_to_keep)
        return [self.exit_logits(hidden[int(b)], int(b)) for b in stage_boundaries]

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def pack_weights(self) -> int:
        """
        Give every large matrix a oneDNN-prepacked copy for CPU inference (packed.py): faster decoding on CPU
        (bench/inference.py measures by how much), bf16 results unchanged bit for bit. Costs a second copy of those
        matrices in memory; stale copies (the weights changed since) are never used. Returns how many matrices
        were packed (0 off CPU).
        """
        return pack_linears(self)

    def unpack_weights(self) -> None:
        """Free the packed copies (plain F.linear everywhere again)."""
        unpack_linears(self)

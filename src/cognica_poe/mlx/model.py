"""
The Cognica PoE trunk in MLX: the same network as ../model.py (nanochat's GPT with stage exits), for Apple silicon.

Forward order: x = norm(wte(idx)); smear (x[t] += smear_lambda * sigmoid(smear_gate(x[t, :24])) * x[t-1]); x0 = x;
per layer x = resid_lambdas[i] * x + x0_lambdas[i] * x0, then a pre-norm block: attention (rotary with nanochat's
sign convention, QK norm x qk_scale, a sliding window per layer, gated value embeddings on alternating layers, GQA)
and a ReLU^2 MLP. The stream after layer backout_layer is kept for backout. An exit at layer i gives
softcap(head(norm(h_i)))[:vocab] in fp32, where h_i has backout subtracted only at the base's last layer and past
it (stage exits were trained without backout). Specialist layers fold their ancestors' stage heads into the head.

The cache serves one sequence (batch 1): slots are positions, every layer has its own fill level (the stage modes
run some layers for some slots), and with keep_hidden it keeps the stream at every stage boundary and the backout
layer so a later call can run only the deeper layers for those slots.

Everything derived from the configuration (windows, value-embedding layers, boundaries, backout layer, the served
exit) arrives precomputed in ModelArgs: load.py fills it from the package's CognicaPoEConfig, and a converted MLX
folder stores it in config.json. That keeps this file free of the package: it imports only mlx and the standard
library, so it is also the `model_file` that `mlx_lm.load(folder, trust_remote_code=True)` runs.
"""

import re
from dataclasses import dataclass, fields

import mlx.core as mx
import mlx.nn as nn

VE_GATE_CHANNELS = 12  # value-embedding gate reads the first 12 channels of the block input
SMEAR_CHANNELS = 24  # smear gate reads the first 24 channels of the current token's embedding
LAYOUT_KEY = "cognica_poe_mlx"  # where a converted folder's config.json keeps ModelArgs


@dataclass
class ModelArgs:
    """Every number the network and its decoding need, the derived ones included (no arithmetic on the config
    here). Names are CognicaPoEConfig's, so code reading `model.config` serves both backends."""

    vocab_size: int
    padded_vocab_size: int
    n_layer: int
    n_head: int
    n_kv_head: int
    n_embd: int
    head_dim: int
    rope_theta: float
    softcap: float
    qk_scale: float
    window_sizes: list[int]
    value_embed_layers: list[int]
    backout_layer: int
    trunk_n_layer: int
    poe_stage_boundary_layers: list[int]
    specialist_ends: list[int] | None
    head_mode: str
    served_layer: int
    sequence_len: int
    rotary_seq_len: int
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    wand_p99_bounds: list[float] | None = None
    model_type: str = "cognica_poe"

    @property
    def poe_n_stages(self) -> int:
        return len(self.poe_stage_boundary_layers)

    def stage_boundary(self, stage: int) -> int:
        """
        Last layer of `stage` (0-based, negative from the end); a clear error for a bad index. The same check as
        CognicaPoEConfig.stage_boundary, written again because this file imports nothing of the package.
        """
        n = self.poe_n_stages
        if isinstance(stage, bool) or not isinstance(stage, int) or not -n <= stage < n:
            raise ValueError(f"stage {stage!r} out of range: this model has {n} stages, 0..{n - 1} "
                             f"(boundaries {self.poe_stage_boundary_layers})")
        return self.poe_stage_boundary_layers[stage]

    @classmethod
    def from_dict(cls, config: dict) -> "ModelArgs":
        """From a converted folder's config.json (mlx_lm's entry point) or from a plain dict of the fields."""
        d = config.get(LAYOUT_KEY, config)
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def norm(x: mx.array) -> mx.array:
    """Parameter-free RMSNorm with PyTorch's default eps for the dtype (bf16: 2^-7), as the trained model used."""
    return mx.fast.rms_norm(x, None, mx.finfo(x.dtype).eps)


def softcap(logits: mx.array, cap: float) -> mx.array:
    return cap * mx.tanh(logits / cap)


# -----------------------------------------------------------------------------
# the cache

class Cache:
    """
    Keys/values of one sequence, per layer, grown in steps of `step` slots. `lengths[i]`: slots layer i holds.
    `tokens`: the token id of every claimed slot (smear reads the previous one). `hidden`: the kept streams.
    """

    step = 256

    def __init__(self, n_layer: int, keep_layers: set[int] | frozenset[int] = frozenset()):
        self.keys: list[mx.array | None] = [None] * n_layer
        self.values: list[mx.array | None] = [None] * n_layer
        self.lengths = [0] * n_layer
        self.tokens = mx.zeros((1, 0), dtype=mx.int32)
        self.n_slots = 0
        self.keep_layers = set(keep_layers)
        self.hidden: dict[int, mx.array] = {}

    def _grow(self, buf: mx.array | None, end: int, shape: tuple[int, ...], axis: int, dtype) -> mx.array:
        """buf with room for `end` slots along `axis` (a new, larger buffer holding the old contents if needed)."""
        have = 0 if buf is None else buf.shape[axis]
        if end <= have:
            return buf
        cap = (end + self.step - 1) // self.step * self.step
        new_shape = list(shape)
        new_shape[axis] = cap
        new = mx.zeros(new_shape, dtype=dtype)
        if buf is not None and have:
            index = [slice(None)] * len(shape)
            index[axis] = slice(0, have)
            new[tuple(index)] = buf
        return new

    def claim(self, ids: mx.array) -> int:
        """Reserve the next T slots for token ids (1, T); returns the first slot."""
        start, end = self.n_slots, self.n_slots + ids.shape[1]
        self.tokens = self._grow(self.tokens, end, (1, end), 1, mx.int32)
        self.tokens[:, start:end] = ids.astype(mx.int32)
        self.n_slots = end
        return start

    def write(self, layer: int, k: mx.array, v: mx.array, start: int) -> None:
        """Store k, v (1, H_kv, T, D) of `layer` at slots [start, start + T)."""
        end = start + k.shape[2]
        shape = (1, k.shape[1], end, k.shape[3])
        self.keys[layer] = self._grow(self.keys[layer], end, shape, 2, k.dtype)
        self.values[layer] = self._grow(self.values[layer], end, shape, 2, v.dtype)
        self.keys[layer][:, :, start:end] = k
        self.values[layer][:, :, start:end] = v
        self.lengths[layer] = max(self.lengths[layer], end)

    def view(self, layer: int, lo: int, end: int) -> tuple[mx.array, mx.array]:
        return self.keys[layer][:, :, lo:end], self.values[layer][:, :, lo:end]

    def store_hidden(self, layer: int, start: int, x: mx.array) -> None:
        end = start + x.shape[1]
        self.hidden[layer] = self._grow(self.hidden.get(layer), end, (1, end, x.shape[2]), 1, x.dtype)
        self.hidden[layer][:, start:end] = x

    def load_hidden(self, layer: int, start: int, end: int) -> mx.array:
        if layer not in self.hidden:
            raise RuntimeError(f"the cache kept no stream after layer {layer}: create it with keep_hidden=True")
        return self.hidden[layer][:, start:end]

    def crop(self, n: int) -> None:
        """Forget every slot at or beyond n, in every layer (the buffers keep their room)."""
        self.n_slots = min(self.n_slots, n)
        self.lengths = [min(length, n) for length in self.lengths]

    # mlx_lm's cache interface: what its generate loops and prompt-cache helpers call

    @property
    def state(self) -> list[mx.array]:
        """The arrays to evaluate (mlx_lm evaluates `cache.state` after each prompt chunk)."""
        return [a for a in self.keys + self.values + list(self.hidden.values()) if a is not None] + [self.tokens]

    @property
    def offset(self) -> int:
        return self.n_slots

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        """Drop the last n slots; returns how many were dropped."""
        n = min(n, self.n_slots)
        self.crop(self.n_slots - n)
        return n


# -----------------------------------------------------------------------------
# the network

class Step:
    """What every layer of one chunk of slots [start, start + T) shares: its place and one mask per window."""

    def __init__(self, start: int, T: int):
        self.start, self.T = start, T
        self._masks: dict[int, mx.array | None] = {}

    def first_key(self, window: int) -> int:
        """The first slot any query of the chunk can see at this window (a query at t sees [t - window, t])."""
        return max(0, self.start - window)

    def mask(self, window: int) -> mx.array | None:
        """Boolean (T, keys) mask: causal and inside the window. One query needs none: its keys are sliced."""
        if self.T == 1:
            return None
        if window not in self._masks:
            lo, end = self.first_key(window), self.start + self.T
            q = mx.arange(self.start, end)[:, None]
            k = mx.arange(lo, end)[None, :]
            self._masks[window] = (k <= q) & (q - k <= window)
        return self._masks[window]


class Attention(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.layer = layer
        self.n_head, self.n_kv_head, self.head_dim = args.n_head, args.n_kv_head, args.head_dim
        self.window = args.window_sizes[layer]
        self.qk_scale, self.rope_theta = args.qk_scale, args.rope_theta
        C, kv_dim = args.n_embd, args.n_kv_head * args.head_dim
        self.c_q = nn.Linear(C, args.n_head * args.head_dim, bias=False)
        self.c_k = nn.Linear(C, kv_dim, bias=False)
        self.c_v = nn.Linear(C, kv_dim, bias=False)
        self.c_proj = nn.Linear(C, C, bias=False)
        self.has_ve = layer in args.value_embed_layers
        if self.has_ve:  # ResFormer-style value residual, gated per kv head
            self.ve_gate = nn.Linear(VE_GATE_CHANNELS, args.n_kv_head, bias=False)
            self.value_embed = nn.Embedding(args.padded_vocab_size, kv_dim)

    def rotate(self, x: mx.array, start: int) -> mx.array:
        """Half-split rotary, nanochat's sign: (x1 cos + x2 sin, x2 cos - x1 sin) is MLX's rope at minus the angle."""
        return mx.fast.rope(x, self.head_dim, traditional=False, base=self.rope_theta, scale=-1.0, offset=start)

    def __call__(self, x: mx.array, ids: mx.array, step: Step, cache: Cache | None) -> mx.array:
        B, T, _ = x.shape
        H, H_kv, D = self.n_head, self.n_kv_head, self.head_dim
        q = self.c_q(x).reshape(B, T, H, D).transpose(0, 2, 1, 3)  # (B, H, T, D)
        k = self.c_k(x).reshape(B, T, H_kv, D).transpose(0, 2, 1, 3)
        v = self.c_v(x).reshape(B, T, H_kv, D)
        if self.has_ve:
            gate = 3 * mx.sigmoid(self.ve_gate(x[..., :VE_GATE_CHANNELS]))  # (B, T, H_kv)
            v = v + gate[..., None] * self.value_embed(ids).reshape(B, T, H_kv, D)
        v = v.transpose(0, 2, 1, 3)
        q = norm(self.rotate(q, step.start)) * self.qk_scale
        k = norm(self.rotate(k, step.start)) * self.qk_scale
        lo = step.first_key(self.window)
        if cache is not None:
            cache.write(self.layer, k, v, step.start)
            k, v = cache.view(self.layer, lo, step.start + T)
        y = mx.fast.scaled_dot_product_attention(q, k, v, scale=D**-0.5, mask=step.mask(self.window))
        return self.c_proj(y.transpose(0, 2, 1, 3).reshape(B, T, H * D))


class MLP(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.c_fc = nn.Linear(args.n_embd, 4 * args.n_embd, bias=False)
        self.c_proj = nn.Linear(4 * args.n_embd, args.n_embd, bias=False)

    def __call__(self, x: mx.array) -> mx.array:
        return self.c_proj(mx.square(nn.relu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, args: ModelArgs, layer: int):
        super().__init__()
        self.attn = Attention(args, layer)
        self.mlp = MLP(args)

    def __call__(self, x: mx.array, ids: mx.array, step: Step, cache: Cache | None) -> mx.array:
        x = x + self.attn(norm(x), ids, step, cache)
        return x + self.mlp(norm(x))


class Model(nn.Module):
    """The trunk with every stage exit. Parameter names follow ../model.py's GPT (see `sanitize` for the two that
    differ: value embeddings live in their layer's attention, and ancestors' folded heads are a list)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.config = args
        V, C = args.padded_vocab_size, args.n_embd
        self.resid_lambdas = mx.ones((args.n_layer,))
        self.x0_lambdas = mx.zeros((args.n_layer,))
        self.smear_lambda = mx.zeros((1,))
        self.backout_lambda = mx.zeros((1,))
        self.transformer = {"wte": nn.Embedding(V, C), "h": [Block(args, i) for i in range(args.n_layer)]}
        self.lm_head = nn.Linear(C, V, bias=False)
        self.smear_gate = nn.Linear(SMEAR_CHANNELS, 1, bias=False)
        if args.specialist_ends:  # the leaf's own head, and each ancestor's stage head folded into lm_head
            self.lm_head_stage = nn.Linear(C, V, bias=False)
            self.folded_heads = [nn.Linear(C, V, bias=False) for _ in args.specialist_ends[:-1]]
        self.keep_layers = frozenset(args.poe_stage_boundary_layers[:-1]) | {args.backout_layer}

    @property
    def layers(self) -> list[Block]:
        return self.transformer["h"]

    # -----------------------------------------------------------------------------
    # the PoE stage API (0-based stages, as in the PyTorch model)

    @property
    def poe_n_stages(self) -> int:
        return self.config.poe_n_stages

    @property
    def poe_stage_boundary_layers(self) -> list[int]:
        return self.config.poe_stage_boundary_layers

    def stage_boundary(self, stage: int) -> int:
        """Last layer of `stage` (0-based, negative from the end); a clear error for a bad index."""
        return self.config.stage_boundary(stage)

    def stage_layers(self, stage: int) -> range:
        """The layers of `stage`: from the previous boundary (exclusive) to its own."""
        bounds = self.poe_stage_boundary_layers
        stage %= len(bounds)
        return range(bounds[stage - 1] + 1 if stage > 0 else 0, bounds[stage] + 1)

    @property
    def dtype(self) -> mx.Dtype:
        return self.lm_head.scales.dtype if isinstance(self.lm_head, nn.QuantizedLinear) else self.lm_head.weight.dtype

    def sanitize(self, weights: dict[str, mx.array]) -> dict[str, mx.array]:
        """A checkpoint's tensor names -> this module's: known prefixes dropped, value_embeds.{i} moved into layer
        i's attention, ancestor_heads.{layer} -> folded_heads.{index}. Names already in this form pass through."""
        ends = self.config.specialist_ends or []
        out = {}
        for key, value in weights.items():
            key = re.sub(r"^(?:_orig_mod\.|gpt\.|model\.)+", "", key)
            if m := re.fullmatch(r"value_embeds\.(\d+)\.weight", key):
                key = f"transformer.h.{m.group(1)}.attn.value_embed.weight"
            elif (m := re.fullmatch(r"ancestor_heads\.(\d+)\.weight", key)) and int(m.group(1)) in ends[:-1]:
                key = f"folded_heads.{ends.index(int(m.group(1)))}.weight"
            out[key] = value
        return out

    # -----------------------------------------------------------------------------
    # pieces of the forward pass

    def embed(self, ids: mx.array) -> mx.array:
        """Pre-smear normalized token embedding (1, T, C)."""
        return norm(self.transformer["wte"](ids))

    def x0(self, ids: mx.array, prev: mx.array | None) -> mx.array:
        """
        Embedding with smear: each token mixes in its predecessor's embedding. prev: the token before ids[0]
        (1, 1), or None at the sequence start (nothing to mix into the first token).
        """
        x = self.embed(ids)
        before = self.embed(prev) if prev is not None else mx.zeros_like(x[:, :1])
        shifted = mx.concatenate([before, x[:, :-1]], axis=1)
        gate = self.smear_lambda * mx.sigmoid(self.smear_gate(x[..., :SMEAR_CHANNELS]))  # (1, T, 1)
        return x + gate * shifted

    def exit_logits(self, h: mx.array, layer: int) -> mx.array:
        """
        softcap(head(norm(h)))[..., :vocab] in fp32 at exit `layer` (h already carries backout where it applies).
        Base exits use lm_head; a specialist's exit uses lm_head with every ancestor's stage head folded in, and the
        leaf's exit adds its own lm_head_stage per head_mode (dual: both, spec: the stage head, base: lm_head).
        """
        a = self.config
        x = norm(h)
        head = self.lm_head
        ends = a.specialist_ends
        if ends and layer >= ends[0]:
            ancestors = [j for j, e in enumerate(ends[:-1]) if e <= layer]
            if ancestors:
                head = self.folded_heads[ancestors[-1]]
            if layer >= ends[-1] and a.head_mode != "base":
                stage = self.lm_head_stage(x)
                logits = stage if a.head_mode == "spec" else head(x) + stage
                return softcap(logits[..., :a.vocab_size].astype(mx.float32), a.softcap)
        return softcap(head(x)[..., :a.vocab_size].astype(mx.float32), a.softcap)

    def applies_backout(self, layer: int) -> bool:
        """Backout belongs to the base's last exit and every exit past it; not to stage exits."""
        return layer >= self.config.trunk_n_layer - 1

    def new_cache(self, keep_hidden: bool = False) -> Cache:
        return Cache(self.config.n_layer, self.keep_layers if keep_hidden else frozenset())

    def run(self, cache: Cache | None, start: int, end: int, first: int, last: int, exits: list[int] | tuple = (),
            keep: int = 1, ids: mx.array | None = None) -> dict[int, mx.array]:
        """
        Layers first..last for slots [start, end): the one primitive every mode uses. With a cache the slots'
        tokens are already claimed there, and layer `first`'s input is the stream the cache kept at layer first - 1;
        without one, `ids` (1, T) is the whole sequence. Returns {exit layer: stream of the last `keep` slots (0:
        all)} with backout applied where it belongs.
        """
        if cache is None:
            prev = None
        else:
            for i in range(first, last + 1):
                if cache.lengths[i] < start:
                    raise RuntimeError(f"layer {i} holds keys for {cache.lengths[i]} slots but the chunk starts at "
                                       f"slot {start}: catch the layer up first")
            ids = cache.tokens[:, start:end]
            prev = cache.tokens[:, start - 1:start] if start > 0 else None
        a = self.config
        x0 = self.x0(ids, prev)
        step = Step(start, end - start)
        x = x0 if first == 0 else cache.load_hidden(first - 1, start, end)
        x_backout = None
        if first > a.backout_layer and last >= a.trunk_n_layer - 1:
            x_backout = cache.load_hidden(a.backout_layer, start, end)
        keep_layers = cache.keep_layers if cache is not None else ()
        out = {}
        for i in range(first, last + 1):
            x = self.resid_lambdas[i] * x + self.x0_lambdas[i] * x0
            x = self.layers[i](x, ids, step, cache)
            if i == a.backout_layer:
                x_backout = x
            if i in keep_layers:
                cache.store_hidden(i, start, x)
            if i in exits:
                h = x[:, -keep:] if keep else x
                if self.applies_backout(i):
                    h = h - self.backout_lambda * (x_backout[:, -keep:] if keep else x_backout)
                out[i] = h
        return out

    # -----------------------------------------------------------------------------
    # public forward paths

    def forward_all_stages(self, ids: mx.array, boundaries: list[int] | None = None) -> list[mx.array]:
        """fp32 logits (B, T, vocab) at every requested exit layer (default: the stage boundaries) from one uncached
        pass over ids (B, T) or (T,)."""
        boundaries = list(self.config.poe_stage_boundary_layers if boundaries is None else boundaries)
        ids = mx.array(ids)
        ids = ids[None] if ids.ndim == 1 else ids
        hidden = self.run(None, 0, ids.shape[1], 0, max(boundaries), boundaries, keep=0, ids=ids)
        return [self.exit_logits(hidden[b], b) for b in boundaries]

    def __call__(self, inputs: mx.array, cache: list[Cache] | None = None, input_embeddings=None) -> mx.array:
        """mlx_lm's interface: logits (1, T, vocab) of the served exit for new tokens (1, T), cached in cache[0]."""
        served = self.config.served_layer
        if cache is None:
            h = self.run(None, 0, inputs.shape[1], 0, served, [served], keep=0, ids=inputs)
        else:
            start = cache[0].claim(inputs)
            h = self.run(cache[0], start, start + inputs.shape[1], 0, served, [served], keep=0)
        return self.exit_logits(h[served], served)

    def make_cache(self) -> list[Cache]:
        """mlx_lm's interface: one cache object serves every layer."""
        return [self.new_cache()]

"""
Weight-only int8 / int4 quantization for inference.

A decode step reads every weight matrix once per token, so its speed is bounded by the bytes of weights read: int8
weights halve what bf16 reads, int4 quarter it. Activations stay in the model's dtype; only the stored matrices
shrink, and torch's own kernels multiply by them directly (as gpt-fast does): per-channel symmetric int8 through
`aten._weight_int8pack_mm`, group-wise asymmetric int4 through `aten._weight_int4pack_mm_for_cpu`.

What is quantized: every block matrix (attention's c_q, c_k, c_v, c_proj and the MLP's c_fc, c_proj) and, unless
asked not to, the heads (lm_head, a specialist's lm_head_stage and folded ancestor heads). The embeddings (wte,
value embeddings: lookups, not products) and the two tiny gates (ve_gate, smear_gate) stay in the model's dtype.

int4 rounds each weight to the nearest level of its group by default; given calibration text, GPTQ rounds the
columns one at a time and spreads each one's error over the columns still to round, against the inputs the float
model sees on that text (closer outputs for the same bits and the same layout). int8's per-channel rounding is close
enough without it.

A quantized matrix is a `QuantizedLinear`, which is not an nn.Linear: packing (packed.py) never sees it, so a
matrix is either quantized or packed, never both. Training refuses a quantized model (there is no float weight to
update): quantize a trained model, never train a quantized one.

Quantized folder layout (checkpoint.save_quantized, `cognica-poe quantize`; checkpoint.load_quantized loads it
without re-quantizing): config.json, generation_config.json and the tokenizer files as in a model folder, plus
  quantization.json   {"format": "cognica-poe-weight-only", "version": 1, "bits": 8 | 4, "group_size": G | null,
                       "heads": bool, "dtype": "bfloat16" | ..., "modules": [names of the quantized matrices]}
  model.safetensors   every float tensor of the core GPT under its state_dict name (e.g. "transformer.wte.weight")
                      in `dtype`, and for each quantized matrix M of shape (out, in):
                        int8: M.qweight int8 (out, in), M.scales (out,); w[o, i] = scales[o] * q[o, i]
                        int4: M.qweight uint8 (out, in / 2), two 4-bit values q in 0..15 per byte, column 2j in the
                              high nibble; M.scales and M.zeros (out, in / G), in group g = i // G:
                              w[o, i] = scales[o, g] * (q[o, i] - 8) + zeros[o, g]
A quantized folder is not a transformers remote-code folder: load it with `cognica_poe.load_model`.
"""

import torch
import torch.nn as nn

from .model import GPT, MLP, CausalSelfAttention

QUANTIZE_MODES = {"int8": 8, "int4": 4}
DEFAULT_GROUP_SIZE = 128
INT4_GROUP_SIZES = (32, 64, 128, 256)
QUANT_FILE = "quantization.json"
WEIGHTS_FILE = "model.safetensors"
FORMAT = "cognica-poe-weight-only"
BLOCK_MATRICES = ("c_q", "c_k", "c_v", "c_proj", "c_fc")


def parse_quantize(mode: str | int | None) -> int | None:
    """"int8" / "int4" (or 8 / 4) -> bits; None -> None. Anything else: one clear line."""
    if mode is None:
        return None
    if mode in (8, 4):
        return int(mode)
    if mode not in QUANTIZE_MODES:
        raise ValueError(f"unknown quantization {mode!r}; choose one of {', '.join(QUANTIZE_MODES)}")
    return QUANTIZE_MODES[mode]


def int8_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-channel symmetric int8: (q int8 (out, in), scales fp32 (out,)) with w ~ scales[:, None] * q."""
    w = w.detach().float()
    scales = w.abs().amax(dim=1).clamp_min(1e-12) / 127
    q = torch.round(w / scales[:, None]).clamp(-128, 127).to(torch.int8)
    return q, scales


def int4_weight(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    Group-wise asymmetric int4 (gpt-fast's): each run of group_size inputs of a row maps its [min, max] onto 0..15.
    Returns (q int32 (out, in) in 0..15, scales, zeros fp32 (out, in / group_size)); w ~ scales * (q - 8) + zeros.
    """
    out, inp = w.shape
    g = w.detach().float().reshape(out, inp // group_size, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    scales = ((hi - lo) / 15).clamp_min(1e-6)
    zeros = lo + 8 * scales
    q = torch.round((g - lo[..., None]) / scales[..., None]).clamp(0, 15).to(torch.int32).reshape(out, inp)
    return q, scales, zeros


def int4_group_fit(g: torch.Tensor, ratios: tuple[float, ...] = (1.0, 0.95, 0.9, 0.85, 0.8, 0.75)) -> tuple:
    """
    The (scales, zeros) (out,) of one int4 group g (out, G) with the least squared error: each of the group's ends
    pulled in by every pair of ratios (clipping a rare large weight buys a finer step for the rest), the scale and
    zero then refitted by least squares to the rounded values. GPTQ's group fit; returns (scales, zeros).
    """
    lo0, hi0 = g.amin(-1), g.amax(-1)
    best = None
    for r_lo in ratios:
        for r_hi in ratios:
            lo, hi = lo0 * r_lo, hi0 * r_hi
            s = ((hi - lo) / 15).clamp_min(1e-6)
            q = torch.round((g - lo[:, None]) / s[:, None]).clamp(0, 15) - 8
            # least squares of g ~ s * q + z over the group, kept where the rounded values are not all equal
            n, sq, sqq = g.size(1), q.sum(-1), (q * q).sum(-1)
            det = n * sqq - sq * sq
            ok = det > 0.5
            s = torch.where(ok, (n * (q * g).sum(-1) - sq * g.sum(-1)) / det.clamp_min(1), s)
            z = torch.where(ok, (g.sum(-1) - s * sq) / n, lo + 8 * s)
            err = ((s[:, None] * q + z[:, None] - g) ** 2).sum(-1)
            if best is None:
                best = [err, s, z]
            else:
                better = err < best[0]
                best = [torch.where(better, a, b) for a, b in zip((err, s, z), best)]
    return best[1], best[2]


@torch.no_grad()
def gptq_int4(w: torch.Tensor, hessian: torch.Tensor, group_size: int, damp: float = 0.01, block: int = 128,
              act_order: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """
    GPTQ (Frantar et al., 2022) in int4_weight's layout: the columns are rounded one at a time and each column's
    rounding error is spread over the columns not yet rounded, through the inverse of hessian = X^T X of the
    inputs X the matrix saw on calibration text, so that the layer's outputs on such inputs move least (plain
    rounding minimises the weights' error instead). Returns (q, scales, zeros).

    act_order: the columns are rounded in order of decreasing hessian diagonal (the inputs that carry most first,
    while many columns are left to absorb their error), with static groups: every group's scale and zero are
    fitted (int4_group_fit) to the original weights before the sweep, so a column rounds on its own group's fixed
    grid wherever the order puts it, and the stored layout (and the kernel) stay as they are. Without act_order
    the columns go left to right and each group is fitted when its first column comes up, to the weights as the
    earlier errors left them.
    Off by default: it pays where a few inputs carry far more than the rest, but most of a model's matrices read
    normalised inputs whose scales differ by little, and there groups fitted to the updated weights count for more
    (on poe-d8-classics act-order moves nearly every block matrix's outputs more; README, Quantized weights).
    """
    w = w.detach().float().clone()
    out, inp = w.shape
    h = hessian.float().clone()
    dead = h.diagonal() == 0  # inputs never seen: their weights cannot matter on such text
    h[dead, dead] = 1
    w[:, dead] = 0
    scales = torch.zeros(out, inp // group_size, device=w.device)
    zeros = torch.zeros_like(scales)
    if act_order:  # static groups, from the original column order
        s, z = int4_group_fit(w.reshape(-1, group_size))
        scales, zeros = s.view(out, -1), z.view(out, -1)
    # the sweep's order (perm[j]: the original column rounded j-th), with the weights and hessian in that order
    perm = torch.argsort(h.diagonal(), descending=True) if act_order else torch.arange(inp, device=w.device)
    w, h = w[:, perm], h[perm][:, perm]
    order = perm.tolist()  # read once per column below: Python ints, not a tensor lookup each time
    h += damp * h.diagonal().mean() * torch.eye(inp, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    q = torch.zeros(out, inp, dtype=torch.int32, device=w.device)
    block = max(group_size, block // group_size * group_size)  # whole groups per block
    for b0 in range(0, inp, block):
        b1 = min(b0 + block, inp)
        wb, err = w[:, b0:b1].clone(), torch.zeros(out, b1 - b0, device=w.device)
        hb = hinv[b0:b1, b0:b1]
        for i in range(b1 - b0):
            c = order[b0 + i]  # the original column: its group, and where its q is stored
            g = c // group_size
            if not act_order and c % group_size == 0:  # in order: fit the group as the earlier errors left it
                scales[:, g], zeros[:, g] = int4_group_fit(wb[:, i:i + group_size])
            s, z = scales[:, g], zeros[:, g]
            qi = torch.round((wb[:, i] - z) / s + 8).clamp(0, 15)
            q[:, c] = qi.to(torch.int32)
            # the column's error, scaled by its pivot, moved onto the columns of the block still to round
            e = (wb[:, i] - (s * (qi - 8) + z)) / hb[i, i]
            wb[:, i:] -= e[:, None] * hb[i, i:][None]
            err[:, i] = e
        w[:, b1:] -= err @ hinv[b0:b1, b1:]  # the block's errors, spread over the columns after it at once
    return q, scales, zeros


@torch.no_grad()
def input_moments(gpt: GPT, names: list[str], tokens: torch.Tensor, batch_size: int = 8) -> dict[str, torch.Tensor]:
    """X^T X (fp32, in x in) of the inputs each named matrix sees while gpt reads tokens (B, T) through every exit:
    GPTQ's hessian. A matrix that never ran (a head no exit uses) gets zeros."""
    moments, hooks = {}, []
    for name in names:
        m = gpt.get_submodule(name)
        moments[name] = torch.zeros(m.in_features, m.in_features, device=tokens.device)

        def hook(module, inputs, output, name=name):
            x = inputs[0].reshape(-1, inputs[0].size(-1)).float()
            moments[name] += x.t() @ x

        hooks.append(m.register_forward_hook(hook))
    try:
        for b in range(0, tokens.size(0), batch_size):
            gpt.forward_all_stages(tokens[b:b + batch_size])
    finally:
        for h in hooks:
            h.remove()
    return moments


def nibbles(q: torch.Tensor) -> torch.Tensor:
    """int 0..15 (out, in) -> uint8 (out, in / 2), column 2j in the high nibble (the saved layout)."""
    return (q[:, 0::2] << 4 | q[:, 1::2]).to(torch.uint8)


def from_nibbles(b: torch.Tensor) -> torch.Tensor:
    """The saved uint8 (out, in / 2) -> int32 (out, in) in 0..15."""
    b = b.to(torch.int32)
    return torch.stack([b >> 4, b & 15], dim=-1).reshape(b.size(0), -1)


class QuantizedLinear(nn.Module):
    """
    A bias-free linear layer whose weight is stored as int8 (per output channel) or int4 (per group of inputs) and
    multiplied by torch's weight-only kernels. Buffers, not parameters: nothing here trains. The scales follow the
    model's dtype (`.to(torch.bfloat16)` casts them), the integer weights never change. int4's weight is held in the
    CPU kernel's own tiled layout; `portable()` gives the saved layout back.
    """

    def __init__(self, in_features: int, out_features: int, bits: int, group_size: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str | None = None):
        super().__init__()
        self.in_features, self.out_features, self.bits = in_features, out_features, bits
        self.group_size = group_size if bits == 4 else None
        if bits == 8:
            self.register_buffer("weight", torch.empty(out_features, in_features, dtype=torch.int8, device=device))
            self.register_buffer("scales", torch.empty(out_features, dtype=dtype, device=device))
        else:
            check_int4_shape(out_features, in_features, group_size)
            self.register_buffer("weight", torch.empty(out_features, in_features // 2, dtype=torch.uint8,
                                                       device=device))
            # the kernel's (in / G, out, 2) table: scale and zero of each group side by side
            self.register_buffer("scales_and_zeros", torch.empty(in_features // group_size, out_features, 2,
                                                                 dtype=dtype, device=device))

    @classmethod
    def from_linear(cls, linear: nn.Linear, bits: int, group_size: int | None = None,
                    hessian: torch.Tensor | None = None, act_order: bool = False) -> "QuantizedLinear":
        """Quantize one bias-free nn.Linear (its weight read in fp32), scales in the weight's dtype. int4 with a
        hessian (input_moments) goes through GPTQ (in act-order if asked), else plain rounding."""
        if linear.bias is not None:
            raise ValueError("weight-only quantization here covers bias-free matrices only")
        w = linear.weight
        m = cls(linear.in_features, linear.out_features, bits, group_size, dtype=w.dtype, device=w.device)
        if bits == 8:
            q, scales = int8_weight(w)
            m.load_portable({"qweight": q, "scales": scales})
        else:
            use_gptq = hessian is not None and bool(hessian.diagonal().any())
            q, scales, zeros = gptq_int4(w, hessian, group_size, act_order=act_order) if use_gptq \
                else int4_weight(w, group_size)
            m.load_portable({"qweight": nibbles(q), "scales": scales, "zeros": zeros})
        return m

    @torch.no_grad()
    def load_portable(self, tensors: dict[str, torch.Tensor]) -> None:
        """Fill the buffers from the saved layout (qweight, scales[, zeros]); int4 is converted to the kernel's."""
        dtype, device = self.scales_buffer().dtype, self.weight.device
        if self.bits == 8:
            # owned copies: tensors from safetensors are memory-mapped at any alignment, which the kernels cannot take
            self.weight = tensors["qweight"].to(device=device, dtype=torch.int8).clone()
            self.scales = tensors["scales"].to(device=device, dtype=dtype).clone()
            return
        q = from_nibbles(tensors["qweight"]).to(device)
        self.weight = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)
        sz = torch.stack([tensors["scales"], tensors["zeros"]], dim=-1).transpose(0, 1)  # (in / G, out, 2)
        self.scales_and_zeros = sz.to(device=device, dtype=dtype).contiguous()  # a new tensor: stack copies

    def scales_buffer(self) -> torch.Tensor:
        return self.scales if self.bits == 8 else self.scales_and_zeros

    @torch.no_grad()
    def portable(self) -> dict[str, torch.Tensor]:
        """The saved layout of this matrix (what load_portable reads back to the same buffers)."""
        if self.bits == 8:
            return {"qweight": self.weight, "scales": self.scales}
        sz = self.scales_and_zeros.float()
        scales, zeros = sz[..., 0].t().contiguous(), sz[..., 1].t().contiguous()
        # the kernel's layout is its own: read q back through the kernel itself, one identity block at a time
        # (each output is scale * (q - 8) + zero in fp32, which rounds back to q exactly)
        cols = []
        for start in range(0, self.in_features, 256):
            end = min(start + 256, self.in_features)
            eye = torch.eye(self.in_features, device=self.weight.device)[start:end]
            w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.weight, self.group_size, sz)  # (end-start, out)
            g = torch.arange(start, end, device=w.device) // self.group_size
            cols.append(torch.round((w - zeros[:, g].t()) / scales[:, g].t() + 8).t())
        q = torch.cat(cols, dim=1).clamp(0, 15).to(torch.int32)
        return {"qweight": nibbles(q), "scales": scales, "zeros": zeros}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).contiguous()
        if self.bits == 8:
            y = torch.ops.aten._weight_int8pack_mm(x2, self.weight, self.scales.to(x.dtype))
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.weight, self.group_size,
                                                           self.scales_and_zeros.to(x.dtype))
        return y.reshape(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}{group}"


def check_int4_shape(out_features: int, in_features: int, group_size: int | None) -> None:
    """The int4 kernel's limits: in divisible by the group size, out by 16, the group size one it takes."""
    if group_size is None or group_size < 2 or group_size % 2:
        raise ValueError(f"int4 needs an even group size >= 2, got {group_size}")
    if in_features % group_size:
        raise ValueError(f"int4 with group size {group_size}: a matrix has {in_features} inputs, not a multiple of "
                         "it; pass a group size that divides it (--group-size)")
    if out_features % 16:
        raise ValueError(f"int4: a matrix has {out_features} outputs, not a multiple of 16 (the CPU kernel's "
                         "tile); use int8")
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group size {group_size}: choose {', '.join(map(str, INT4_GROUP_SIZES[:-1]))} or "
                         f"{INT4_GROUP_SIZES[-1]} (the sizes torch's int4 CPU kernel takes; --group-size)")


def quantized_names(gpt: GPT, heads: bool = True) -> list[str]:
    """The names (in gpt) of the matrices quantization covers: every block matrix, and the heads if asked."""
    names = []
    for name, _ in gpt.named_modules():
        parent, _, leaf = name.rpartition(".")
        owner = gpt.get_submodule(parent) if parent else gpt
        if isinstance(owner, (CausalSelfAttention, MLP)) and leaf in BLOCK_MATRICES:
            names.append(name)
        elif heads and (name in ("lm_head", "lm_head_stage") or parent == "ancestor_heads"):
            names.append(name)
    return names


def is_quantized(module: nn.Module) -> bool:
    return any(isinstance(m, QuantizedLinear) for m in module.modules())


def check_trainable(module: nn.Module) -> None:
    """Training (and FSDP sharding) needs float weights: a quantized model is refused in one line."""
    if is_quantized(module):
        raise ValueError("the model holds quantized (int8/int4) weights, which cannot be trained or sharded: train "
                         "the float model (its original folder) and quantize afterwards")


def check_device(device: torch.device | str, bits: int) -> None:
    if bits == 4 and torch.device(device).type != "cpu":
        raise ValueError(f"int4 weights run on CPU only (torch's int4 CPU kernel); got device {device}: use int8")


@torch.no_grad()
def quantize_model(gpt: GPT, mode: str | int, group_size: int = DEFAULT_GROUP_SIZE, heads: bool = True,
                   calibration: torch.Tensor | None = None, act_order: bool = False) -> list[str]:
    """
    Quantize gpt's matrices in place (module by module; packed copies dropped first). Returns the names quantized.
    Every shape is checked before anything changes, so a refused model is left as it was. calibration: token ids
    (B, T) of representative text; int4 then rounds by GPTQ against the inputs the float model sees on it (closer
    outputs than plain rounding, same layout); int8 needs none and ignores it. act_order: GPTQ rounds each matrix's
    columns in order of decreasing input energy, on static groups (gptq_int4 says when that pays).
    """
    bits = parse_quantize(mode)
    if is_quantized(gpt):
        raise ValueError("the model is already quantized")
    check_device(gpt.device, bits)
    gpt.unpack_weights()  # a quantized matrix is never packed; stale stacks of q, k, v go too
    names = quantized_names(gpt, heads)
    if bits == 4:
        for name in names:
            m = gpt.get_submodule(name)
            try:
                check_int4_shape(m.out_features, m.in_features, group_size)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
    moments = input_moments(gpt, names, calibration) if bits == 4 and calibration is not None else {}
    for name in names:
        parent, _, leaf = name.rpartition(".")
        owner = gpt.get_submodule(parent) if parent else gpt
        hessian = moments.pop(name, None)  # freed as it goes: the largest are in x in fp32
        setattr(owner, leaf, QuantizedLinear.from_linear(getattr(owner, leaf), bits, group_size, hessian, act_order))
    return names


# -----------------------------------------------------------------------------
# the quantized folder

def quantized_tensors(gpt: GPT) -> tuple[dict[str, torch.Tensor], dict]:
    """A quantized gpt as the saved layout: (model.safetensors' tensors, quantization.json's record)."""
    names = [n for n, m in gpt.named_modules() if isinstance(m, QuantizedLinear)]
    if not names:
        raise ValueError("the model is not quantized: quantize_model(model.gpt, 'int8' | 'int4') first")
    first = gpt.get_submodule(names[0])
    tensors, own = {}, set()
    for name in names:
        m = gpt.get_submodule(name)
        tensors |= {f"{name}.{k}": v.contiguous() for k, v in m.portable().items()}
        own |= {f"{name}.{b}" for b, _ in m.named_buffers()}
    tensors |= {k: v.detach().contiguous() for k, v in gpt.state_dict().items() if k not in own}
    meta = {"format": FORMAT, "version": 1, "bits": first.bits, "group_size": first.group_size,
            "heads": "lm_head" in names, "dtype": str(gpt.dtype).removeprefix("torch."), "modules": names}
    return tensors, meta


@torch.no_grad()
def quantized_gpt(config, tensors: dict[str, torch.Tensor], meta: dict, dtype: torch.dtype, device: str,
                  source: str = WEIGHTS_FILE) -> GPT:
    """A GPT holding a saved layout's tensors (quantized_tensors' inverse): nothing is re-quantized or initialised.
    source names the file in errors."""
    check_device(device, meta["bits"])
    tensors = dict(tensors)
    gpt = GPT.from_config(config, "meta")
    known = {n for n, _ in gpt.named_modules()}
    for name in meta["modules"]:  # the quantized matrices replace their float ones, empty for now
        if name not in known:
            raise ValueError(f"{source}: quantization record names {name!r}, which the config's model does not have")
        parent, _, leaf = name.rpartition(".")
        owner = gpt.get_submodule(parent) if parent else gpt
        m = getattr(owner, leaf)
        setattr(owner, leaf, QuantizedLinear(m.in_features, m.out_features, meta["bits"], meta["group_size"],
                                             dtype=dtype, device="meta"))
    gpt.to_empty(device=device)
    # quantized matrices: from the saved layout
    own = set()
    for name in meta["modules"]:
        parts = {k: tensors.pop(f"{name}.{k}", None) for k in ("qweight", "scales", "zeros")}
        missing = [k for k, v in parts.items() if v is None and (k != "zeros" or meta["bits"] == 4)]
        if missing:
            raise ValueError(f"{source} lacks {', '.join(f'{name}.{k}' for k in missing)}: restore the folder")
        m = gpt.get_submodule(name)
        try:
            m.load_portable(parts)
        except RuntimeError as e:
            raise ValueError(f"{source}: {name} does not match the config's shape ({e})") from None
        if m.weight.shape != (m.out_features, m.in_features // (2 if m.bits == 4 else 1)):
            raise ValueError(f"{source}: {name}.qweight has shape {tuple(parts['qweight'].shape)}, not the "
                             "config's")
        own |= {f"{name}.{b}" for b, _ in m.named_buffers()}
    # float tensors: as saved, in dtype
    expected = {k for k in gpt.state_dict() if k not in own}
    if set(tensors) != expected:
        extra, lacking = sorted(set(tensors) - expected), sorted(expected - set(tensors))
        raise ValueError(f"{source} does not match the config: missing {lacking[:5]}, unexpected {extra[:5]}")
    try:
        gpt.load_state_dict({k: v.to(device=device, dtype=dtype) for k, v in tensors.items()}, strict=False)
    except RuntimeError as e:
        raise ValueError(f"{source} does not match the config's shapes: {' '.join(str(e).split())[:300]}") from None
    return gpt.to(dtype).eval()

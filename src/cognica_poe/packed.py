"""
Prepacked weights for CPU inference.

A decode step multiplies one token's vector by every weight matrix once, so its speed is the speed of
matrix-vector products. On many CPUs, `F.linear` with a plain (out, in) weight reaches well under half the memory
bandwidth that oneDNN reaches with the same weight stored once in its own blocked layout (bench/inference.py
measures both); on others the packed product is the slower one, so the command line packs where a probe at load
finds it faster (cpu.py). `Linear` is nn.Linear plus that stored copy: `pack()` makes it, and the forward uses it for
inference (autograd off) on CPU in the weight's dtype. bf16 results are bitwise those of F.linear; fp32 ones agree
to rounding (a different summation order).

Models are built from plain nn.Linear, so tools that match exact module types (torch.ao's quantize_dynamic) see
every matrix. Packing turns a module into the `Linear` subclass in place (same module, same parameters: what torch's
parametrizations do), and unpacking or `.to()` turns it back; quantize a model that is not packed.

A packed copy is a second copy of the matrix in memory (`unpack()` frees it). It is tied to the weight it was made
from: after the weight changes in place (an optimizer step, loading new weights) the copy is stale and never used,
and `.to()` and its kin drop it; the plain weight serves until `pack()` runs again. Training, saving and every
non-CPU device never see it.

This file is copied into exported remote-code folders: it imports only torch.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F

# below 256 x 256 elements the packed kernel's fixed cost per call outweighs what it saves (bench/inference.py)
MIN_PACKED_ELEMENTS = 256 * 256


def packing_supported(weight: torch.Tensor) -> bool:
    """Whether this build and CPU can pack `weight` (oneDNN present; bf16 needs the CPU's bf16 support)."""
    if weight.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if weight.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return weight.dtype == torch.float32


def weight_key(weight: torch.Tensor) -> tuple:
    """What identifies the exact weight a packed copy was made from: storage, in-place version, dtype."""
    return weight.data_ptr(), weight._version, weight.dtype


class PackedWeights:
    """
    One or more (out_i, in) weights stacked along `out` and stored once in oneDNN's layout: one product gives all
    their outputs side by side. Remembers which weights it was made from, so a stale copy is never used.
    """

    def __init__(self, *weights: torch.Tensor):
        w = weights[0] if len(weights) == 1 else torch.cat(weights)
        self.tensor = torch.ops.mkldnn._reorder_linear_weight(w.detach())
        self.keys = [weight_key(w) for w in weights]

    @staticmethod
    def make(*weights: torch.Tensor) -> "PackedWeights | None":
        """None (nothing stored) when the stack is too small to gain or this build/CPU cannot pack it."""
        if sum(w.numel() for w in weights) < MIN_PACKED_ELEMENTS or not packing_supported(weights[0]):
            return None
        with torch.no_grad():
            return PackedWeights(*weights)

    def current(self, *weights: torch.Tensor) -> bool:
        return [weight_key(w) for w in weights] == self.keys

    def serves(self, x: torch.Tensor, *weights: torch.Tensor) -> bool:
        """Inference (autograd off) on CPU in the packed dtype, from the same weights; not inside a compiled graph
        (compiled.py: inductor chooses its own kernels for the plain weights)."""
        return not torch.is_grad_enabled() and not torch.compiler.is_compiling() and x.dtype == self.tensor.dtype \
            and x.device.type == "cpu" and self.current(*weights)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.tensor, bias, "none", [], "")


class Linear(nn.Linear):
    """nn.Linear that multiplies by a prepacked copy of its weight in CPU inference (pack_linear makes one)."""

    packed: PackedWeights | None = None

    def pack(self) -> bool:
        self.packed = PackedWeights.make(self.weight)
        return self.packed is not None

    def unpack(self) -> None:
        unpack_linear(self)

    def _apply(self, fn, recurse=True):
        unpack_linear(self)  # .to() / .half() / .cuda() give the weight new storage: the copy is stale, free it now
        return nn.Linear._apply(self, fn, recurse)

    @property
    def is_packed(self) -> bool:
        """A packed copy exists and still matches the weight."""
        return self.packed is not None and self.packed.current(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and self.packed.serves(x, self.weight):
            return self.packed(x, self.bias)
        return F.linear(x, self.weight, self.bias)


class StackedLinears(nn.Module):
    """
    A module whose forward multiplies one input by several Linears (named in `stacked`; attention's c_q, c_k, c_v):
    for CPU inference they are packed as one stack, one product instead of several. project_stack(x) gives their
    outputs side by side, from the stack while it is current, else from each Linear.
    """

    stacked: tuple[str, ...] = ()
    packed_stack: PackedWeights | None = None

    def stacked_linears(self) -> list[nn.Module]:
        return [getattr(self, name) for name in self.stacked]

    def pack_stack(self) -> list[nn.Linear]:
        """Stack and pack the Linears; returns those the stack now serves (none if it cannot be packed)."""
        linears = self.stacked_linears()
        if not all(isinstance(m, nn.Linear) for m in linears):
            return []  # e.g. dynamically quantized: no float weight to pack
        self.packed_stack = PackedWeights.make(*(m.weight for m in linears))
        return linears if self.packed_stack is not None else []

    def unpack_stack(self) -> None:
        self.packed_stack = None

    def _apply(self, fn, recurse=True):
        self.packed_stack = None  # .to() and its kin give the weights new storage: drop the stale stack
        return super()._apply(fn, recurse)

    def stack_count(self) -> int:
        """How many matrices a current stack serves (0 without one)."""
        linears = self.stacked_linears()
        current = self.packed_stack is not None and self.packed_stack.current(*(m.weight for m in linears))
        return len(linears) if current else 0

    def project_stack(self, x: torch.Tensor) -> torch.Tensor:
        """(..., in) -> every stacked Linear's output side by side (..., sum of outs)."""
        linears = self.stacked_linears()
        packed = self.packed_stack
        if packed is not None and packed.serves(x, *(m.weight for m in linears)):
            return packed(x)
        return torch.cat([m(x) for m in linears], dim=-1)


def pack_linear(m: nn.Linear) -> bool:
    """Give one nn.Linear a packed copy, in place (it becomes a Linear); one that cannot be packed stays plain."""
    m.__class__ = Linear
    if m.pack():
        return True
    unpack_linear(m)
    return False


def unpack_linear(m: nn.Linear) -> None:
    """Drop m's packed copy: a Linear becomes a plain nn.Linear again."""
    if type(m) is Linear:
        m.__dict__.pop("packed", None)
        m.__class__ = nn.Linear


def pack_linears(module: nn.Module) -> int:
    """
    Pack module's matrices for CPU inference; returns how many are now served packed. StackedLinears (attention's
    q, k, v) pack their Linears as one stack first; every other Linear is packed alone. Shared submodules are
    visited once.
    """
    fused = set()
    for m in module.modules():
        if isinstance(m, StackedLinears):
            fused |= {id(lin) for lin in m.pack_stack()}
    n = 0
    for m in module.modules():
        if type(m) in (nn.Linear, Linear):  # exactly: other nn.Linear subclasses have forwards of their own
            if id(m) in fused:
                unpack_linear(m)  # served by the stack
            else:
                n += pack_linear(m)
    return n + len(fused)


def count_packed(module: nn.Module) -> int:
    """Matrices in module served by a current packed copy (what a report states about how it was measured)."""
    n = sum(m.is_packed for m in module.modules() if isinstance(m, Linear))
    return n + sum(m.stack_count() for m in module.modules() if isinstance(m, StackedLinears))


def unpack_linears(module: nn.Module) -> None:
    """Drop every packed copy: plain F.linear everywhere."""
    for m in module.modules():
        if isinstance(m, Linear):
            unpack_linear(m)
        if isinstance(m, StackedLinears):
            m.unpack_stack()

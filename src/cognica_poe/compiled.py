"""
Compiled decode: torch.compile of the per-step work, gpt-fast style.

A decode step of a small model is mostly per-op overhead (dozens of small kernels per layer, each dispatched from
Python). Compiling the step fuses them into a few kernels and runs them without the interpreter. What gets compiled
is GPT.static_slots, the same work as GPT.run_slots (the one primitive every decoding mode runs: full depth, stage
prefix, speculative drafting and verification, WAND's stage segments), with its shapes made static: each chunk
writes its keys at slot indices held in a tensor and attends over the cache's whole preallocated buffers under a
mask, so the graph depends on the cache's size and the chunk's length only. Under compiled decode caches come in
powers of two (GPT.new_cache), and chunks of more than one token (speculative verification, WAND's catch-up) share
a graph dynamic in their length; one graph per (first layer, last layer, exits, cache size, one token or more) then
serves every step: no recompiles in steady state. Prompts longer than model.COMPILED_MAX_CHUNK run eagerly.

CPU: inductor, which writes C++ and needs a C++ compiler (g++, or $CXX). Without one, compiling is refused with one
warning line and decoding stays eager. GPU: mode "reduce-overhead" (CUDA graphs); the cache buffers are marked as
static addresses, so a graph replays in place and a new cache re-records it.

Modes: "default" compiles each graph in seconds. "max-autotune" also lets inductor time its own matrix-product
kernels against aten's and keep the faster per shape; on CPU it freezes the weights into the graph (inductor's
freezing: they become constants, which its C++ templates repack once), because those templates take only constant
weights. That is where weight-only int8 and int4 models gain most: the templates read int8 / int4 weights faster
than aten's weight-only kernels do at batch 1 (bench/inference.py part 3 measures it). The price: the first call of
each graph autotunes (minutes for a d24 model on 2 cores), the frozen, repacked weights are a second copy in memory,
and the graph keeps the weights it saw; after changing weights in place, eager_decode then compile_decode again.
Freezing applies with autograd off, which is how every decoding mode runs. On GPU it is torch's "max-autotune"
mode (autotuned kernels and CUDA graphs).

Results: greedy tokens equal eager's; logits agree to fp32 rounding (a different reduction order over the masked
buffer and inductor's fused kernels; tests/test_compile.py states the tolerance). Under "max-autotune" the chosen
kernels sum in their own order too: the tests hold int8 to eager's greedy tokens and to bf16's logit tolerance;
inductor's int4 kernel rounds differently enough from aten's that a bf16 near-tie can go the other way.
"""

import warnings
from collections.abc import Callable

import torch

from .model import GPT

COMPILE_MODES = ("default", "max-autotune")
RECOMPILE_LIMIT = 64  # graphs per compiled function: every (layers, exits, length) a mode uses, with room to spare


def find_cpp_compiler() -> str | None:
    """The C++ compiler inductor will use on CPU (g++ or $CXX), or None when there is none."""
    from torch._inductor import cpp_builder, exc

    try:
        return cpp_builder.get_cpp_compiler()
    except (exc.InvalidCxxCompiler, OSError):
        return None


def missing_requirement(device: torch.device) -> str | None:
    """What compiling on `device` lacks, in words, or None when it can compile."""
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        return None if has_triton() else "CUDA compilation needs triton (pip install triton)"
    if device.type != "cpu":
        return f"compiled decode supports CPU and CUDA, not {device.type}"
    if find_cpp_compiler() is None:
        return "inductor needs a C++ compiler on CPU (install g++, or set CXX)"
    return None


def compile_decode(gpt: GPT, mode: str = "default") -> bool:
    """
    Make every decoding mode of gpt run its per-step work compiled (GPT.run_slots calls the compiled static_slots).
    Returns whether it did: without a compiler it warns in one line and gpt stays eager. Compiling happens at the
    first call of each graph (seconds each on CPU; minutes in mode "max-autotune", see above); eager_decode(gpt)
    undoes it.
    """
    if mode not in COMPILE_MODES:
        raise ValueError(f"unknown compile mode {mode!r}; choose one of {', '.join(COMPILE_MODES)}")
    if gpt.placement is not None:
        raise ValueError("compiled decode runs a model in one process on one device: leave out device_map (stage "
                         "placement) or compile")
    missing = missing_requirement(gpt.device)
    if missing is not None:
        warnings.warn(f"compiled decode is off: {missing}; decoding eagerly", RuntimeWarning, stacklevel=2)
        return False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # build the rotary tables now: a graph traced before they exist would build them itself, guarded on their
    # absence, and be compiled again at the next call
    gpt.rotary_tables(gpt.device)
    if gpt.device.type == "cuda":
        cuda_mode = "max-autotune" if mode == "max-autotune" else "reduce-overhead"
        gpt.compiled_slots = torch.compile(gpt.static_slots, mode=cuda_mode, fullgraph=True)
    elif mode == "max-autotune":
        gpt.compiled_slots = with_frozen_weights(torch.compile(gpt.static_slots, fullgraph=True,
                                                               options={"max_autotune": True}))
    else:
        gpt.compiled_slots = torch.compile(gpt.static_slots, fullgraph=True)
    return True


def with_frozen_weights(compiled: Callable) -> Callable:
    """
    compiled, called with inductor's freezing on. Dynamo reads that switch while it traces (to lift the modules'
    weights into the graph as constants rather than inputs), before torch.compile's per-call options apply, so it
    has to be on around every call, not in those options; guards then keep a graph to the weights it froze.
    """
    from torch._inductor import config

    def call(*args, **kwargs):
        with config.patch(freezing=True):
            return compiled(*args, **kwargs)

    return call


def eager_decode(gpt: GPT) -> None:
    """Decode eagerly again (the compiled graphs are dropped with the function that held them)."""
    gpt.compiled_slots = None

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

Results: greedy tokens equal eager's; logits agree to fp32 rounding (a different reduction order over the masked
buffer and inductor's fused kernels; tests/test_compile.py states the tolerance).
"""

import warnings

import torch

from .model import GPT

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


def compile_decode(gpt: GPT) -> bool:
    """
    Make every decoding mode of gpt run its per-step work compiled (GPT.run_slots calls the compiled static_slots).
    Returns whether it did: without a compiler it warns in one line and gpt stays eager. Compiling happens at the
    first call of each graph (seconds each on CPU); eager_decode(gpt) undoes it.
    """
    if gpt.placement is not None:
        raise ValueError("compiled decode runs a model in one process on one device: leave out device_map (stage "
                         "placement) or compile")
    missing = missing_requirement(gpt.device)
    if missing is not None:
        warnings.warn(f"compiled decode is off: {missing}; decoding eagerly", RuntimeWarning, stacklevel=2)
        return False
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    cuda = gpt.device.type == "cuda"
    gpt.compiled_slots = torch.compile(gpt.static_slots, mode="reduce-overhead" if cuda else None, fullgraph=True)
    return True


def eager_decode(gpt: GPT) -> None:
    """Decode eagerly again (the compiled graphs are dropped with the function that held them)."""
    gpt.compiled_slots = None

"""
Reading and checking weight files, safely.

Weights travel as safetensors. Key prefixes seen in the wild (none, "gpt.", "model.", "_orig_mod." from
torch.compile) are normalised to the core GPT's names, and a file is checked against the model it is meant
for BEFORE anything is loaded: a wrong vocab, a wrong shape, a missing or an unexpected tensor is a
ValueError that names the keys; a damaged file is a ValueError that names the file.

This file is copied into exported remote-code folders: it imports only torch/safetensors and siblings.
"""

import json
import os
import struct

import torch
from safetensors import safe_open

KNOWN_PREFIXES = ("_orig_mod.", "gpt.", "model.")


def strip_prefixes(key: str) -> str:
    """'_orig_mod.gpt.transformer.wte.weight' -> 'transformer.wte.weight'."""
    changed = True
    while changed:
        changed = False
        for p in KNOWN_PREFIXES:
            if key.startswith(p):
                key, changed = key[len(p):], True
    return key


def safetensors_shapes(path: str) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes from a safetensors header (no tensor data read); ValueError if the file is damaged."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise ValueError("file shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            size = os.path.getsize(path)
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file size {size}")
            header = json.loads(f.read(n))
        shapes = {}
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            shapes[name] = tuple(info["shape"])
            end = max(end, info["data_offsets"][1])
        if 8 + n + end > size:
            raise ValueError(f"tensor data runs past the end of the file ({8 + n + end} > {size} bytes): truncated?")
        return shapes
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise ValueError(f"corrupt or unreadable safetensors file {path}: {e}") from e


def load_safetensors(path: str, device: str = "cpu") -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, keys with known prefixes stripped."""
    safetensors_shapes(path)  # validates the header and the length first, with a clear message
    out = {}
    try:
        with safe_open(path, framework="pt", device=device) as f:
            for name in f.keys():
                out[strip_prefixes(name)] = f.get_tensor(name)
    except Exception as e:  # safetensors raises its own error type for damaged data
        raise ValueError(f"corrupt or unreadable safetensors file {path}: {e}") from e
    return out


def check_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]], where: str) -> None:
    """Raise a ValueError naming every missing, unexpected or mis-shaped tensor (keys already prefix-free)."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = sorted(k for k in set(expected) & set(found) if tuple(expected[k]) != tuple(found[k]))
    if not (missing or unexpected or wrong):
        return
    lines = [f"{where} does not match the model configuration:"]
    if wrong:
        lines.append("  shape mismatch: " + "; ".join(
            f"{k} is {tuple(found[k])} in the file but {tuple(expected[k])} in the model" for k in wrong[:8]))
        if any("wte" in k or "lm_head" in k or "value_embeds" in k for k in wrong):
            lines.append("  (a vocab/width mismatch: is this checkpoint for a different tokenizer or size?)")
    if missing:
        lines.append(f"  missing tensors ({len(missing)}): {', '.join(missing[:8])}"
                     + (" ..." if len(missing) > 8 else ""))
    if unexpected:
        lines.append(f"  unexpected tensors ({len(unexpected)}): {', '.join(unexpected[:8])}"
                     + (" ..." if len(unexpected) > 8 else ""))
    raise ValueError("\n".join(lines))


def expected_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}

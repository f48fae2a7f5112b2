"""
Training checkpoints: <out_dir>/checkpoints/step_NNNNNN/ holds model.safetensors, optim.pt and state.pt (step,
loader position, RNG states, configs, loop state).

A checkpoint is written to a temporary folder and renamed (atomic.py), then the `latest` pointer file is replaced
atomically, so a crash or a NaN stop never leaves a half-written or overwritten checkpoint. Reading is safe by
default (safetensors, torch.load with weights_only=True). Resume restores everything, so on CPU in fp32 the loss
curve is bitwise that of an unbroken run; if the latest checkpoint cannot be read (truncated on disk), it resumes
from the newest earlier one still kept, with a warning.
"""

import os
import random
import re
import shutil
import warnings

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch.distributed.tensor import DTensor, distribute_tensor

from ..atomic import atomic_folder, write_text
from ..model import GPT
from .distributed import full_model_state
from .optim import MuonAdamW


def rng_state() -> dict:
    """Every random generator training draws from (python's, torch's, CUDA's)."""
    state = dict(python=random.getstate(), torch=torch.get_rng_state())
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state  # numpy's RNG is not used anywhere in training, so it is not saved


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


CHECKPOINT_FILES = ("model.safetensors", "optim.pt", "state.pt")
STEP_DIR = re.compile(r"step_(\d{6,})")


def _is_checkpoint(folder: str) -> bool:
    return any(os.path.isfile(os.path.join(folder, f)) for f in CHECKPOINT_FILES)


def _step_dirs(ckpt_root: str) -> list[str]:
    """The step_NNNNNN folder names in ckpt_root, oldest first."""
    names = os.listdir(ckpt_root) if os.path.isdir(ckpt_root) else []
    return sorted((d for d in names if STEP_DIR.fullmatch(d)), key=lambda d: int(d[5:]))


def save_checkpoint(ckpt_root: str, step: int, gpt: GPT, optimizer: MuonAdamW, state: dict, keep: int = 2) -> str:
    """
    Write step_NNNNNN/ atomically (a re-saved step replaces the old folder only once the new one is whole), then
    flip the `latest` pointer. Returns the folder. Under FSDP every rank calls it (the shards are gathered) and
    only rank 0 writes.
    """
    tensors, optim_state = full_model_state(gpt), optimizer.state_dict()
    name = f"step_{step:06d}"
    final = os.path.join(ckpt_root, name)
    if dist.is_available() and dist.is_initialized() and dist.get_rank() != 0:
        return final
    os.makedirs(ckpt_root, exist_ok=True)
    with atomic_folder(final, overwrite=True, owned=_is_checkpoint) as tmp:
        save_file(tensors, os.path.join(tmp, "model.safetensors"))
        torch.save(optim_state, os.path.join(tmp, "optim.pt"))
        torch.save(state, os.path.join(tmp, "state.pt"))
    write_text(os.path.join(ckpt_root, "latest"), name + "\n")
    old = [d for d in _step_dirs(ckpt_root) if d != name]
    for d in old[:max(0, len(old) - (keep - 1))]:
        shutil.rmtree(os.path.join(ckpt_root, d), ignore_errors=True)
    return final


def latest_checkpoint(ckpt_root: str) -> str | None:
    pointer = os.path.join(ckpt_root, "latest")
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        return os.path.join(ckpt_root, f.read().strip())


def read_checkpoint(folder: str, with_optimizer: bool = True) -> dict:
    """A checkpoint's files, all read (so a truncated one fails here, before any of it is used)."""
    return dict(model=load_file(os.path.join(folder, "model.safetensors")),
                optim=torch.load(os.path.join(folder, "optim.pt"), weights_only=True) if with_optimizer else None,
                state=torch.load(os.path.join(folder, "state.pt"), weights_only=True), folder=folder)


def apply_checkpoint(ckpt: dict, gpt: GPT, optimizer: MuonAdamW | None = None) -> None:
    """Copy read_checkpoint's weights into gpt's own (aligned) tensors and restore the optimizer. Under FSDP each
    rank holds the full tensors and keeps its shard."""
    tensors, own = ckpt["model"], gpt.state_dict()
    wrong = [k for k, v in own.items() if k not in tensors or tuple(tensors[k].shape) != tuple(v.shape)]
    if wrong:
        raise ValueError(f"{ckpt['folder']}/model.safetensors does not fit this model: {len(wrong)} tensor(s) "
                         f"missing or of another shape, e.g. {wrong[:3]}")
    with torch.no_grad():
        for k, v in own.items():
            src = tensors[k]
            if isinstance(v, DTensor):
                src = distribute_tensor(src.to(v.device), v.device_mesh, v.placements, src_data_rank=None)
            v.copy_(src)
    if optimizer is not None:
        optimizer.load_state_dict(ckpt["optim"])


def load_checkpoint(folder: str, gpt: GPT, optimizer: MuonAdamW | None = None) -> dict:
    """Load a checkpoint into gpt (and the optimizer); returns state.pt's dict."""
    ckpt = read_checkpoint(folder, optimizer is not None)
    apply_checkpoint(ckpt, gpt, optimizer)
    return ckpt["state"]


def resume_checkpoint(ckpt_root: str) -> dict:
    """
    Read the `latest` checkpoint; if it cannot be read (truncated on disk by a crash or a full disk), the newest
    earlier one still kept, with a warning. Returns read_checkpoint's dict.
    """
    latest = latest_checkpoint(ckpt_root)
    newest = int(os.path.basename(latest)[5:]) if latest and STEP_DIR.fullmatch(os.path.basename(latest)) else None
    earlier = [os.path.join(ckpt_root, d) for d in reversed(_step_dirs(ckpt_root))
               if newest is None or int(d[5:]) < newest]
    candidates = ([latest] if latest else []) + earlier
    if not candidates:
        raise FileNotFoundError(f"--resume: no checkpoint in {ckpt_root}")
    unreadable = []
    for folder in candidates:
        try:
            ckpt = read_checkpoint(folder)
        except Exception as e:  # safetensors, torch.load and a missing file each raise their own kind
            unreadable.append((folder, f"{type(e).__name__}: {e}".splitlines()[0]))
            continue
        if unreadable:
            warnings.warn(f"{', '.join(f for f, _ in unreadable)} could not be read; resuming from {folder} "
                          f"({'; '.join(why for _, why in unreadable)})", stacklevel=2)
        return ckpt
    raise ValueError(f"--resume: no checkpoint in {ckpt_root} can be read: "
                     + "; ".join(f"{f} ({why})" for f, why in unreadable))


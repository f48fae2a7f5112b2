"""
Dual-head SFT of a specialist stage on a frozen base.

Only the specialist's own layers and its `lm_head_stage` train; every base tensor (layers, wte, lm_head,
value embeddings, smear, backout, earlier stages) is frozen and outside the optimizer, so weight decay cannot
touch it: with head_mode "base" the model reproduces the base bit for bit at every checkpoint. Conversations
are rendered with the chat special tokens (tokenizer.render_conversation) and the loss covers assistant
tokens (and <|assistant_end|>) only.

Optionally (`train_special_rows`) the wte rows of the chat special tokens (every special but BOS) train too: a
gradient hook zeroes every other row, and those rows sit in an AdamW group without weight decay, so each other
row's update is exactly zero and the base stays bit-identical on inputs without chat tokens. The stage folder
stores the full wte, so the trained rows travel with the delta.

Data: JSONL, one conversation per line, as {"messages": [{"role", "content"}, ...]} (OpenAI / nanochat), or
{"conversations": [{"from": "human" | "gpt" | "system", "value"}, ...]} (ShareGPT), or a bare list of
messages. The last `val_fraction` of conversations is held out.
"""

import json
import math
import os
import random
import time

import torch

from ..atomic import check_replaceable
from ..checkpoint import is_model_folder, save_stage_folder
from ..hf import CognicaPoEForCausalLM
from ..specialist import DELTA_FILE, add_specialist, parent_reference
from ..tokenizer import SPECIAL_TOKENS, CognicaPoETokenizer
from .checkpoints import latest_checkpoint, load_checkpoint, save_checkpoint
from .config import SFTConfig
from .losses import NonFiniteLossError

ROLE_ALIASES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "bot": "assistant",
                "system": "system"}


def normalize_conversation(record) -> list[dict]:
    """One conversation in any of the supported formats -> [{"role", "content"}, ...]."""
    if isinstance(record, dict) and "messages" in record:
        messages = record["messages"]
    elif isinstance(record, dict) and "conversations" in record:
        messages = [{"role": m.get("from"), "content": m.get("value")} for m in record["conversations"]]
    elif isinstance(record, list):
        messages = record
    else:
        keys = sorted(record) if isinstance(record, dict) else "-"
        raise ValueError(f"unrecognised conversation record (keys {keys}): expected messages or conversations")
    out = []
    for m in messages:
        role = ROLE_ALIASES.get(str(m.get("role")).lower())
        if role is None:
            raise ValueError(f"unknown role {m.get('role')!r} (expected user/assistant/system or human/gpt)")
        out.append({"role": role, "content": message_content(role, m.get("content", ""))})
    return out


def message_content(role: str, content) -> str | list[dict]:
    """A message's content as render_conversation takes it: text, or for the assistant a list of parts (text, python
    call, python output). A list of parts elsewhere is its text parts joined."""
    if not isinstance(content, list):
        return str(content)
    kinds = ("text", "python", "python_output") if role == "assistant" else ("text",)
    for part in content:
        if not isinstance(part, dict) or part.get("type") not in kinds or not isinstance(part.get("text"), str):
            kind = part.get("type") if isinstance(part, dict) else type(part).__name__
            raise ValueError(f"unsupported {role} content part type {kind!r}: expected {{'type': one of {kinds}, "
                             "'text': str}")
    return content if role == "assistant" else "".join(part["text"] for part in content)


def read_conversations(path: str) -> list[list[dict]]:
    """The conversations of a JSONL file (or a .json list); a bad one is named by its line (or its index)."""
    try:
        with open(path, encoding="utf-8") as f:
            if path.endswith(".json"):
                loaded = json.load(f)
                if not isinstance(loaded, list):
                    raise ValueError(f"{path} must hold a JSON list of conversations")
                records = [(f"conversation {i}", r) for i, r in enumerate(loaded, 1)]
            else:
                records = []
                for n, line in enumerate(f, 1):
                    if line.strip():
                        try:
                            records.append((f"line {n}", json.loads(line)))
                        except json.JSONDecodeError as e:
                            raise ValueError(f"{path} line {n}: not valid JSON ({e.msg})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} line {e.lineno}: not valid JSON ({e.msg})") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e.reason})") from None
    conversations = []
    for where, record in records:
        try:
            conversations.append(normalize_conversation(record))
        except ValueError as e:
            raise ValueError(f"{path} {where}: {e}") from None
        except (AttributeError, TypeError):
            raise ValueError(f'{path} {where} is not a conversation: write {{"messages": [{{"role": ..., "content": '
                             '...}, ...]}') from None
    return conversations


def sft_batch(tok: CognicaPoETokenizer, conversations: list[list[dict]], seq_len: int
              ) -> tuple[torch.Tensor, torch.Tensor]:
    """(inputs, targets) (B, T): targets are -1 except where the target token is assistant content or its end."""
    rows = []
    for conv in conversations:
        ids, mask = tok.render_conversation(conv, max_tokens=seq_len + 1)
        targets = [t if m else -1 for t, m in zip(ids[1:], mask[1:])]
        rows.append((ids[:-1], targets))
    T = max(len(x) for x, _ in rows)
    idx = torch.full((len(rows), T), tok.bos_token_id, dtype=torch.long)
    tgt = torch.full((len(rows), T), -1, dtype=torch.long)
    for i, (x, y) in enumerate(rows):
        idx[i, :len(x)] = torch.tensor(x)
        tgt[i, :len(y)] = torch.tensor(y)
    return idx, tgt


def trainable_parameters(model: CognicaPoEForCausalLM) -> list[torch.nn.Parameter]:
    """The leaf specialist's own tensors; everything else is frozen (requires_grad False)."""
    first = model.config.segments()[-1][0]
    own = []
    for name, p in model.gpt.named_parameters():
        mine = name == "lm_head_stage.weight" or (name.startswith("transformer.h.")
                                                  and int(name.split(".")[2]) >= first)
        p.requires_grad_(mine)
        if mine:
            own.append(p)
    return own


def chat_special_ids(tok: CognicaPoETokenizer) -> list[int]:
    """Ids of the chat special tokens: every special but BOS (which starts every base input too)."""
    return [tok.convert_tokens_to_ids(name) for name in SPECIAL_TOKENS if name != "<|bos|>"]


def train_wte_rows(model: CognicaPoEForCausalLM, rows: list[int]) -> torch.nn.Parameter:
    """Make wte trainable in `rows` only: gradients of every other row are zeroed by a hook."""
    wte = model.gpt.transformer.wte.weight
    mask = torch.zeros(wte.size(0), 1, dtype=wte.dtype, device=wte.device)
    mask[rows] = 1.0
    wte.requires_grad_(True)
    wte.register_hook(lambda grad: grad * mask)
    return wte


@torch.no_grad()
def val_loss(model: CognicaPoEForCausalLM, tok: CognicaPoETokenizer, convs: list[list[dict]], batch_size: int) -> float:
    total, count = 0.0, 0
    for i in range(0, len(convs), batch_size):
        idx, tgt = sft_batch(tok, convs[i:i + batch_size], model.config.sequence_len)
        n = int((tgt >= 0).sum())
        total += float(model.gpt(idx, targets=tgt)) * n
        count += n
    return total / max(count, 1)


def sft(cfg: SFTConfig) -> dict:
    """Train the leaf specialist on conversations; writes checkpoints, metrics.jsonl and a stage folder."""
    stage_dir = os.path.join(cfg.out_dir, "stage")
    check_replaceable(stage_dir, True, is_model_folder, (cfg.model, cfg.data))  # the last write, checked first
    torch.manual_seed(cfg.seed)
    tok = CognicaPoETokenizer.from_pretrained(cfg.model)
    loaded = CognicaPoEForCausalLM.from_pretrained(cfg.model)
    is_stage = os.path.isfile(os.path.join(cfg.model, DELTA_FILE))
    model = loaded if is_stage else CognicaPoEForCausalLM.from_gpt(add_specialist(loaded.gpt, cfg.new_layers,
                                                                                   seed=cfg.seed))
    # the parent as the new stage folder names it (a stage's own parent is relative to that stage's folder)
    parent = (parent_reference(model.config.base_model_name_or_path, stage_dir, relative_to=cfg.model) if is_stage
              else parent_reference(cfg.model, stage_dir))
    model.config.head_mode = "dual"
    groups = [{"params": trainable_parameters(model), "weight_decay": cfg.weight_decay}]
    if cfg.train_special_rows:  # no weight decay: the frozen rows must get an update of exactly zero
        groups.append({"params": [train_wte_rows(model, chat_special_ids(tok))], "weight_decay": 0.0})
    optimizer = torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.95))
    convs = read_conversations(cfg.data)
    n_val = max(1, int(len(convs) * cfg.val_fraction))
    train_convs, val_convs = convs[:-n_val], convs[-n_val:]
    if not train_convs:
        raise ValueError(f"{cfg.data} has {len(convs)} conversations: too few to hold out {n_val} for validation")
    ckpt_root = os.path.join(cfg.out_dir, "checkpoints")
    os.makedirs(cfg.out_dir, exist_ok=True)
    metrics = os.path.join(cfg.out_dir, "metrics.jsonl")
    step = 0
    if cfg.resume and (last := latest_checkpoint(ckpt_root)):
        state = load_checkpoint(last, model.gpt, optimizer)
        step = int(state["step"])
    model.train()
    losses = []
    t0 = time.time()
    while step < cfg.steps:
        rng = random.Random(cfg.seed * 1_000_003 + step)  # the batch depends only on (seed, step): resume is exact
        idx, tgt = sft_batch(tok, rng.sample(train_convs, min(cfg.batch_size, len(train_convs))),
                             model.config.sequence_len)
        loss = model.gpt(idx, targets=tgt)
        if not math.isfinite(loss.item()):
            raise NonFiniteLossError(f"non-finite SFT loss at step {step + 1}; last good checkpoint: "
                                     f"{latest_checkpoint(ckpt_root)}")
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        losses.append(loss.item())
        record = {"type": "train", "step": step, "loss": losses[-1]}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            model.eval()
            record["val_loss"] = val_loss(model, tok, val_convs, cfg.batch_size)
            model.train()
        with open(metrics, "a") as f:
            f.write(json.dumps(record) + "\n")
        if step % cfg.save_every == 0 or step == cfg.steps:
            save_checkpoint(ckpt_root, step, model.gpt, optimizer, {"step": step}, keep=cfg.keep_checkpoints)
    model.eval()
    stage_dir = save_stage_folder(model, stage_dir, parent, tok, overwrite=True, sources=(cfg.model, cfg.data))
    return {"step": step, "train_loss": losses[-1] if losses else None,
            "val_loss": val_loss(model, tok, val_convs, cfg.batch_size), "stage_dir": stage_dir,
            "seconds": time.time() - t0}

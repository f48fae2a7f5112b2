"""Dual-head SFT: the loss mask, the frozen base preserved bit for bit, and a toy task that SFT learns."""

import json
import os

import pytest
import torch
from conftest import perturbed_model

from cognica_poe import CognicaPoEForCausalLM
from cognica_poe.checkpoint import export_hf_folder
from cognica_poe.hf import load_folder
from cognica_poe.tokenizer_train import train_bpe
from cognica_poe.train.checkpoints import load_checkpoint
from cognica_poe.train.sft import SFTConfig, normalize_conversation, sft, sft_batch

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    with open(os.path.join(HERE, "..", "src", "cognica_poe", "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        tok = train_bpe(iter(f.read()[:200_000].split("\n\n")), vocab_size=512)
    model = perturbed_model(vocab_size=len(tok))
    return export_hf_folder(model, tok, str(tmp_path_factory.mktemp("sft") / "base"), dtype="float32"), tok


def toy_conversations(n: int) -> list[dict]:
    """A toy task: the assistant repeats the colour the user names."""
    colours = ["red", "green", "blue", "black", "white", "gold"]
    out = []
    for i in range(n):
        c = colours[i % len(colours)]
        fmt = i % 3
        if fmt == 0:
            out.append({"messages": [{"role": "user", "content": f"Say {c}."}, {"role": "assistant", "content": c}]})
        elif fmt == 1:
            out.append({"conversations": [{"from": "human", "value": f"Say {c}."}, {"from": "gpt", "value": c}]})
        else:
            out.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"Say {c}."},
                        {"role": "assistant", "content": c}])
    return out


def test_formats_and_loss_mask(base):
    _, tok = base
    convs = [normalize_conversation(r) for r in toy_conversations(3)]
    assert [m["role"] for m in convs[1]] == ["user", "assistant"]
    idx, tgt = sft_batch(tok, convs, 256)
    a_end = tok.convert_tokens_to_ids("<|assistant_end|>")
    for row in range(3):
        ids, mask = tok.render_conversation(convs[row])
        n = len(ids) - 1
        trained = [int(t) for t in tgt[row, :n] if t >= 0]
        assert trained == [t for t, m in zip(ids[1:], mask[1:]) if m]  # exactly the assistant tokens
        assert trained[-1] == a_end and torch.all(tgt[row, n:] == -1)
        text = tok.decode(trained)
        assert "Say" not in text and "Be brief" not in text
    with pytest.raises(ValueError, match="unknown role"):
        normalize_conversation({"messages": [{"role": "robot", "content": "x"}]})


def test_sft_preserves_base_and_learns(base, tmp_path):
    base_dir, tok = base
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in toy_conversations(60)) + "\n")
    cfg = SFTConfig(model=base_dir, data=str(data), out_dir=str(tmp_path / "run"), steps=40, batch_size=8,
                    lr=3e-3, weight_decay=0.1, eval_every=10, save_every=10, seed=0)
    summary = sft(cfg)
    lines = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    vals = [x["val_loss"] for x in lines if "val_loss" in x]
    assert vals[-1] < vals[0] - 0.5  # the toy task is learned
    # head_mode base: the base's logits, bit for bit, at every checkpoint (weight decay was on)
    reference = CognicaPoEForCausalLM.from_pretrained(base_dir).eval()  # the base, re-read from disk
    spec = load_folder(summary["stage_dir"])
    ids = torch.tensor([[tok.bos_token_id] + tok("ROMEO: what say you?")["input_ids"]])
    with torch.no_grad():
        want = reference.gpt(ids)
        for step in (10, 20, 30, 40):
            load_checkpoint(os.path.join(tmp_path, "run", "checkpoints", f"step_{step:06d}"), spec.gpt)
            spec.config.head_mode = "base"
            assert (spec.gpt(ids) - want).abs().max().item() == 0.0
            spec.config.head_mode = "dual"
            assert not torch.equal(spec.gpt(ids), want)  # the specialist itself did change
    # resume continues to the same final weights as an uninterrupted run
    cfg2 = SFTConfig(**{**cfg.__dict__, "out_dir": str(tmp_path / "run2"), "steps": 20})
    sft(cfg2)
    sft(SFTConfig(**{**cfg2.__dict__, "steps": 40, "resume": True}))
    a = load_folder(os.path.join(tmp_path, "run", "stage")).gpt.state_dict()
    b = load_folder(os.path.join(tmp_path, "run2", "stage")).gpt.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_sft_can_train_the_chat_token_rows_only(base, tmp_path):
    """train_special_rows: the chat specials' wte rows learn; every other row (BOS included) stays bit-identical."""
    from cognica_poe.train.sft import chat_special_ids

    base_dir, tok = base
    data = tmp_path / "chat.jsonl"
    data.write_text("\n".join(json.dumps(c) for c in toy_conversations(30)) + "\n")
    summary = sft(SFTConfig(model=base_dir, data=str(data), out_dir=str(tmp_path / "run"), steps=6, batch_size=4,
                            lr=3e-3, weight_decay=0.1, eval_every=3, save_every=3, train_special_rows=True))
    reference = CognicaPoEForCausalLM.from_pretrained(base_dir).eval()
    spec = load_folder(summary["stage_dir"])
    before, after = reference.gpt.transformer.wte.weight, spec.gpt.transformer.wte.weight
    changed = (before != after).any(dim=1).nonzero()[:, 0].tolist()
    # the tokens these conversations feed in (<|assistant_end|> is only ever a target here: no gradient)
    used = [tok.convert_tokens_to_ids(t) for t in ("<|user_start|>", "<|user_end|>", "<|assistant_start|>")]
    assert set(used) <= set(changed) <= set(chat_special_ids(tok)) and tok.bos_token_id not in changed
    spec.config.head_mode = "base"
    plain = torch.tensor([[tok.bos_token_id] + tok("ROMEO: what say you?")["input_ids"]])
    chat = torch.tensor([tok.render_conversation(normalize_conversation(toy_conversations(1)[0]))[0]])
    with torch.no_grad():
        assert (spec.gpt(plain) - reference.gpt(plain)).abs().max().item() == 0.0
        assert not torch.equal(spec.gpt(chat), reference.gpt(chat))  # the trained rows are read


def test_assistant_tool_parts_survive_reading():
    """An assistant message given as parts (text, python, python_output) keeps its parts, as render_conversation
    takes them: the python call becomes <|python_start|>...<|python_end|>, not the repr of a Python list."""
    from cognica_poe.train.sft import normalize_conversation

    parts = [{"type": "text", "text": "Let me compute. "}, {"type": "python", "text": "2+2"},
             {"type": "python_output", "text": "4"}, {"type": "text", "text": "It is 4."}]
    record = {"messages": [{"role": "user", "content": [{"type": "text", "text": "What is 2+2?"}]},
                           {"role": "assistant", "content": parts}]}
    messages = normalize_conversation(record)
    assert messages == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": parts}]
    with pytest.raises(ValueError, match="part type 'image'"):
        normalize_conversation({"messages": [{"role": "user", "content": "x"},
                                             {"role": "assistant", "content": [{"type": "image", "text": ""}]}]})

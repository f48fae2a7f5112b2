"""CognicaPoETokenizer: nanochat's BPE layout, safe files, legacy pickle opt-in, chat rendering."""

import os

import pytest
import torch

from cognica_poe.tokenizer import SPECIAL_TOKENS, CognicaPoETokenizer, load_legacy_pickle, load_token_bytes
from cognica_poe.tokenizer_train import train_bpe

HERE = os.path.dirname(os.path.abspath(__file__))
DATA = os.path.join(HERE, "..", "..", "shared", "data")
D8_TOK = os.path.join(HERE, "..", "..", "shared", "models", "poe-d8-classics", "tokenizer")
SAMPLE = "Hello, World! It's 2026: 12345 cafés\r\nnaïve — 🙂 ROMEO:\n\n  spaced   out\t\ttabs"


@pytest.fixture(scope="module")
def tok() -> CognicaPoETokenizer:
    with open(os.path.join(DATA, "tinyshakespeare.txt"), encoding="utf-8") as f:
        text = f.read()[:200_000]
    return train_bpe(iter(text.split("\n\n")), vocab_size=600)


def test_layout_and_round_trip(tok):
    assert len(tok) == 600 and tok.vocab_size == 600
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(591, 600))
    assert tok.bos_token_id == 591 and tok.pad_token_id == 591 and tok.eos_token == "<|assistant_end|>"
    ids = tok(SAMPLE)["input_ids"]
    assert ids[0] != tok.bos_token_id  # no BOS by default (the card's usage prepends it itself)
    assert tok.decode(ids) == SAMPLE
    assert ids == tok.encoding.encode_ordinary(SAMPLE)
    assert all(i < 591 for i in ids)
    assert tok.convert_tokens_to_ids(tok.tokenize(SAMPLE)) == ids  # token strings are reversible
    assert tok.decode(tok.encode("ab", add_special_tokens=False)) == "ab"


def test_bos_options(tok, tmp_path):
    with_bos = CognicaPoETokenizer.from_encoding(tok.encoding, add_bos_token=True)
    plain = tok("ROMEO: hi")["input_ids"]
    assert with_bos("ROMEO: hi")["input_ids"] == [tok.bos_token_id] + plain
    assert tok.add_bos(plain) == [tok.bos_token_id] + plain
    assert tok.add_bos([tok.bos_token_id] + plain) == [tok.bos_token_id] + plain
    assert tok.add_bos([plain, [tok.bos_token_id, 5]]) == [[tok.bos_token_id] + plain, [tok.bos_token_id, 5]]
    with_bos.save_pretrained(tmp_path)
    assert CognicaPoETokenizer.from_pretrained(tmp_path)("x")["input_ids"][0] == tok.bos_token_id


def test_batch_left_padding(tok):
    batch = tok(["a", "a much longer line of text"], padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    n = int(mask[0].sum())
    assert mask[0, :-n].sum() == 0 and torch.all(mask[0, -n:] == 1)  # pads on the left
    assert torch.all(ids[0, :-n] == tok.pad_token_id)
    assert tok.batch_decode(ids[1:]) == ["a much longer line of text"]


def test_save_load_identical(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    assert {"tokenizer.tiktoken", "tokenizer_config.json", "token_bytes.safetensors"} <= set(os.listdir(tmp_path))
    again = CognicaPoETokenizer.from_pretrained(tmp_path)
    assert again(SAMPLE)["input_ids"] == tok(SAMPLE)["input_ids"]
    assert torch.equal(load_token_bytes(str(tmp_path)), tok.token_bytes())
    assert again.padding_side == "left" and again.chat_template == tok.chat_template


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (600,)
    assert torch.all(tb[591:] == 0) and torch.all(tb[:256] == 1)
    ids = tok(SAMPLE)["input_ids"]
    assert int(tb[ids].sum()) == len(SAMPLE.encode("utf-8"))


def test_corrupt_vocab_file(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    path = tmp_path / "tokenizer.tiktoken"
    lines = path.read_text().splitlines()
    lines[300] = "!!!notbase64 300"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="tokenizer.tiktoken:301"):
        CognicaPoETokenizer.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        CognicaPoETokenizer(vocab_file=str(tmp_path / "missing.tiktoken"))


def test_too_small_vocab():
    with pytest.raises(ValueError, match="at least"):
        train_bpe(iter(["abc"]), vocab_size=200)


def test_legacy_pickle_needs_opt_in(tmp_path):
    pkl = os.path.join(D8_TOK, "tokenizer.pkl")
    if not os.path.isfile(pkl):
        pytest.skip("reference tokenizer not present")
    with pytest.raises(ValueError, match="arbitrary code"):
        load_legacy_pickle(pkl)
    legacy = load_legacy_pickle(pkl, allow_pickle=True)
    assert len(legacy) == 4096 and legacy.bos_token_id == 4087
    with open(os.path.join(DATA, "warpeace.txt"), encoding="utf-8") as f:
        text = f.read()[100_000:110_000]
    legacy.save_pretrained(tmp_path)
    safe = CognicaPoETokenizer.from_pretrained(tmp_path)
    assert safe(text)["input_ids"] == legacy.encoding.encode_ordinary(text)
    assert torch.equal(safe.token_bytes(), load_token_bytes(D8_TOK))


def test_chat_template_matches_render(tok):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Who are you?"},
            {"role": "assistant", "content": "A model."}, {"role": "user", "content": "Sure?"},
            {"role": "assistant", "content": "Yes."}]
    ids, mask = tok.render_conversation(msgs)
    assert tok.apply_chat_template(msgs, tokenize=True, return_dict=False) == ids
    assert ids[0] == tok.bos_token_id and len(ids) == len(mask)
    # the mask is 1 exactly on assistant content and <|assistant_end|>
    a_start, a_end = tok.convert_tokens_to_ids(["<|assistant_start|>", "<|assistant_end|>"])
    expected, inside = [], False
    for i in ids:
        if i == a_start:
            inside = True
            expected.append(0)
            continue
        expected.append(1 if inside else 0)
        if i == a_end:
            inside = False
    assert mask == expected and sum(mask) > 0
    assert tok.decode([i for i, m in zip(ids, mask) if m]) == "A model.<|assistant_end|>Yes.<|assistant_end|>"
    assert "Be brief.\n\nWho are you?" in tok.decode(ids)
    prompt = tok.apply_chat_template(msgs[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prompt[-1] == a_start
    with pytest.raises(ValueError, match="alternate"):
        tok.render_conversation([{"role": "assistant", "content": "hi"}])

"""CognicaPoETokenizer: nanochat's id layout, safe files, legacy pickle opt-in, chat, remote code."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from conftest import bundled_text, shared_path

from cognica_poe.nanochat import PickleNotAllowedError, load_legacy_pickle
from cognica_poe.tokenizer import (
    SPECIAL_TOKENS,
    SPLIT_PATTERN,
    CognicaPoETokenizer,
    load_token_bytes,
    tokenizer_auto_map,
)
from cognica_poe.tokenizer_train import train_bpe

HERE = os.path.dirname(os.path.abspath(__file__))
VOCAB = 512
SAMPLE = "Hello, World! It's 2026: 12345 cafés\r\nnaïve — 🙂👍🏽 ROMEO:\n\n  spaced   out\t\ttabs 中文 ∑x²"
CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Who are you?"},
    {"role": "assistant", "content": "A model."},
    {"role": "user", "content": "Sure?"},
    {"role": "assistant", "content": "Yes, 100%."},
]


@pytest.fixture(scope="module")
def tok() -> CognicaPoETokenizer:
    return train_bpe(iter(bundled_text(200_000).split("\n\n")), vocab_size=VOCAB)


@pytest.fixture(scope="module")
def legacy() -> CognicaPoETokenizer:
    return load_legacy_pickle(os.path.join(shared_path("models", "poe-d8-classics", "tokenizer"), "tokenizer.pkl"),
                              allow_pickle=True)


def held_out_paragraphs(n: int = 20) -> str:
    """Long paragraphs of the bundled corpus past the part the test tokenizer was trained on."""
    return "\n\n".join([p for p in bundled_text()[200_000:].split("\n\n") if len(p) > 200][:n])


# -----------------------------------------------------------------------------
# layout, encode/decode

def test_layout(tok):
    n = VOCAB - len(SPECIAL_TOKENS)
    assert len(tok) == VOCAB and tok.vocab_size == VOCAB and tok.encoding.n_vocab == VOCAB
    assert [tok.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(n, VOCAB))
    assert [tok.encoding.encode_single_token(t) for t in SPECIAL_TOKENS] == list(range(n, VOCAB))
    assert all(tok.encoding.decode_single_token_bytes(i) == bytes([i]) for i in range(256))
    assert tok.encoding._pat_str == SPLIT_PATTERN
    assert tok.bos_token == "<|bos|>" and tok.bos_token_id == n
    assert tok.eos_token == "<|assistant_end|>" and tok.eos_token_id == n + 4
    assert tok.pad_token_id == n and tok.unk_token is None and tok.padding_side == "left"
    assert sorted(tok.all_special_ids) == list(range(n, VOCAB))
    vocab = tok.get_vocab()
    assert len(vocab) == VOCAB and sorted(vocab.values()) == list(range(VOCAB)) and vocab["<|bos|>"] == n


def test_round_trip(tok):
    for text in [SAMPLE, "", " ", "\r\n\r\n", "a" * 1000, "007 1234567 3.14159", "🙂" * 7]:
        ids = tok(text)["input_ids"]
        assert ids == tok.encoding.encode_ordinary(text)  # no BOS by default, tiktoken's encode_ordinary
        assert tok.decode(ids) == text
        assert tok.convert_tokens_to_ids(tok.tokenize(text)) == ids  # the slow path agrees
        assert tok.convert_tokens_to_string(tok.convert_ids_to_tokens(ids)) == text  # reversible strings
    assert tok.encode(SAMPLE, add_special_tokens=False) == tok.encode(SAMPLE)
    # half of a multi-byte character decodes with a replacement character, not an exception
    ids = tok.encoding.encode_ordinary("🙂")
    assert tok.decode(ids[:1]) in ("\ufffd", "\ufffd" * 2) or len(ids) == 1


def test_special_text_in_input(tok):
    n = VOCAB - len(SPECIAL_TOKENS)
    text = "hi<|user_start|>x <|assistant_end|><|bos|>"
    ids = tok(text, allowed_special="all")["input_ids"]  # special-token text is text unless allowed
    assert ids == tok.encoding.encode(text, allowed_special="all")
    assert ids[-1] == n and n + 1 in ids and n + 4 in ids
    assert tok.convert_tokens_to_ids(tok.tokenize(text, allowed_special="all")) == ids
    assert tok.decode(ids) == text and tok.decode(ids, skip_special_tokens=True) == "hix "
    plain = tok(text, split_special_tokens=True)["input_ids"]
    assert plain == tok.encoding.encode_ordinary(text) and max(plain) < n


def test_bos_options(tok, tmp_path):
    bos = tok.bos_token_id
    plain = tok("ROMEO: hi")["input_ids"]
    assert plain[0] != bos
    with_bos = CognicaPoETokenizer.from_encoding(tok.encoding, add_bos_token=True)
    assert with_bos("ROMEO: hi")["input_ids"] == [bos] + plain
    assert with_bos("ROMEO: hi", add_special_tokens=False)["input_ids"] == plain
    assert tok.add_bos(plain) == [bos] + plain and tok.add_bos([bos] + plain) == [bos] + plain
    assert tok.add_bos([plain, [bos, 5], []]) == [[bos] + plain, [bos, 5], [bos]]
    with_bos.save_pretrained(tmp_path)
    assert CognicaPoETokenizer.from_pretrained(tmp_path)("x")["input_ids"][0] == bos
    assert CognicaPoETokenizer.from_pretrained(tmp_path, add_bos_token=False)("x")["input_ids"][0] != bos


def test_batch_left_padding(tok):
    texts = ["a", "a much longer line of text", SAMPLE]
    batch = tok(texts, padding=True, return_tensors="pt")
    ids, mask = batch["input_ids"], batch["attention_mask"]
    assert ids.shape == mask.shape and ids.shape[0] == 3
    for row, text in enumerate(texts):
        want = tok.encoding.encode_ordinary(text)
        n = int(mask[row].sum())
        assert n == len(want) and torch.all(mask[row, -n:] == 1) and torch.all(mask[row, :-n] == 0)  # left
        assert ids[row, -n:].tolist() == want and torch.all(ids[row, :-n] == tok.pad_token_id)
    assert tok.batch_decode(ids, skip_special_tokens=True) == texts
    right = tok(texts, padding=True, padding_side="right")
    assert right["input_ids"][0][0] != tok.pad_token_id and right["attention_mask"][0][-1] == 0


def test_token_bytes(tok):
    tb = tok.token_bytes()
    assert tb.dtype == torch.int32 and tb.shape == (VOCAB,)
    assert torch.all(tb[VOCAB - len(SPECIAL_TOKENS):] == 0) and torch.all(tb[:256] == 1)
    n = VOCAB - len(SPECIAL_TOKENS)
    assert all(tb[i] == len(tok.encoding.decode_single_token_bytes(i)) for i in range(n))
    for text in [SAMPLE, held_out_paragraphs(3)]:
        ids = tok(text)["input_ids"]
        assert int(tb[ids].sum()) == len(text.encode("utf-8"))


# -----------------------------------------------------------------------------
# files

def test_save_load_identical(tok, tmp_path):
    tok.save_pretrained(tmp_path)
    files = set(os.listdir(tmp_path))
    assert {"tokenizer.tiktoken", "tokenizer_config.json", "token_bytes.safetensors", "tokenizer.py"} <= files
    with open(tmp_path / "tokenizer_config.json") as f:
        config = json.load(f)
    assert config["pat_str"] == SPLIT_PATTERN and config["tokenizer_class"] == "CognicaPoETokenizer"
    assert config["special_tokens"] == {t: VOCAB - 9 + i for i, t in enumerate(SPECIAL_TOKENS)}
    assert config["auto_map"] == {"AutoTokenizer": tokenizer_auto_map()} and config["add_bos_token"] is False
    first = (tmp_path / "tokenizer.tiktoken").read_text().splitlines()[:2]
    assert first == ["AA== 0", "AQ== 1"]  # base64 of the raw bytes 0x00, 0x01, then the rank
    again = CognicaPoETokenizer.from_pretrained(tmp_path)
    text = SAMPLE + held_out_paragraphs(5)
    assert again(text)["input_ids"] == tok(text)["input_ids"]
    assert again.encoding._mergeable_ranks == tok.encoding._mergeable_ranks
    assert torch.equal(load_token_bytes(str(tmp_path)), tok.token_bytes())
    assert torch.equal(load_token_bytes(str(tmp_path / "token_bytes.safetensors")), again.token_bytes())
    assert again.padding_side == "left" and again.chat_template == tok.chat_template
    chat_ids = again.apply_chat_template(CHAT, tokenize=True, return_dict=False)
    assert chat_ids == tok.render_conversation(CHAT)[0]


def test_missing_and_corrupt_files(tok, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="tokenizer.tiktoken"):
        CognicaPoETokenizer.from_pretrained(empty)
    with pytest.raises(FileNotFoundError, match="tokenizer.tiktoken"):
        CognicaPoETokenizer(vocab_file=str(tmp_path / "missing.tiktoken"))
    with pytest.raises(FileNotFoundError, match="token_bytes"):
        load_token_bytes(str(empty))
    good = tmp_path / "good"
    tok.save_pretrained(good)
    path = good / "tokenizer.tiktoken"
    lines = path.read_text().splitlines()
    lines[300] = "!!!notbase64 300"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"tokenizer\.tiktoken:301"):
        CognicaPoETokenizer.from_pretrained(good)
    lines[300] = "QUJD"  # no rank
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match=r"tokenizer\.tiktoken:301"):
        CognicaPoETokenizer.from_pretrained(good)


def test_too_small_vocab():
    with pytest.raises(ValueError, match="must exceed 256"):
        train_bpe(iter(["abc"]), vocab_size=265)
    with pytest.raises(ValueError, match="too small"):
        train_bpe(iter(["abc abc"]), vocab_size=400)


# -----------------------------------------------------------------------------
# nanochat's legacy pickle

def test_legacy_pickle_needs_opt_in():
    D8_TOK = shared_path("models", "poe-d8-classics", "tokenizer")
    pkl = os.path.join(D8_TOK, "tokenizer.pkl")
    with pytest.raises(PickleNotAllowedError, match="(?s)arbitrary code.*allow_pickle=True.*--allow-pickle"):
        load_legacy_pickle(pkl)
    with pytest.raises(FileNotFoundError, match="tokenizer.pkl"):  # our loader points at the conversion
        CognicaPoETokenizer.from_pretrained(D8_TOK)


def test_legacy_pickle_converts(legacy, tmp_path):
    import pickle

    D8_TOK = shared_path("models", "poe-d8-classics", "tokenizer")
    with open(os.path.join(D8_TOK, "tokenizer.pkl"), "rb") as f:
        original = pickle.load(f)  # the test trusts this file; the library never unpickles without opt-in
    assert len(legacy) == 4096 and legacy.bos_token_id == 4087 and legacy.eos_token_id == 4091
    text = held_out_paragraphs()
    assert legacy(text)["input_ids"] == original.encode_ordinary(text)
    legacy.save_pretrained(tmp_path)
    safe = CognicaPoETokenizer.from_pretrained(tmp_path)
    ids = safe(text)["input_ids"]
    assert ids == original.encode_ordinary(text) and safe.decode(ids) == text
    assert safe.bos_token_id == original.encode_single_token("<|bos|>")
    legacy_bytes = load_token_bytes(D8_TOK)  # token_bytes.pt, read with weights_only=True
    assert legacy_bytes.dtype == torch.int32 and torch.equal(safe.token_bytes(), legacy_bytes)
    assert torch.equal(load_token_bytes(str(tmp_path)), legacy_bytes)


def test_pickle_with_foreign_globals_refused(tmp_path):
    import pickle

    path = tmp_path / "tokenizer.pkl"
    path.write_bytes(pickle.dumps(print))  # any global besides tiktoken's Encoding
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        load_legacy_pickle(str(path), allow_pickle=True)


# -----------------------------------------------------------------------------
# chat

def expected_mask(tok, ids):
    """1 from just after <|assistant_start|> through <|assistant_end|>, 0 elsewhere."""
    a_start, a_end = tok.convert_tokens_to_ids(["<|assistant_start|>", "<|assistant_end|>"])
    out, inside = [], False
    for i in ids:
        out.append(1 if inside else 0)
        inside = (inside or i == a_start) and i != a_end
    return out


def test_chat_template_matches_render(tok):
    ids, mask = tok.render_conversation(CHAT)
    assert tok.apply_chat_template(CHAT, tokenize=True, return_dict=False) == ids
    assert tok.render_conversation({"messages": CHAT}) == (ids, mask)
    assert ids[0] == tok.bos_token_id and len(ids) == len(mask)
    assert mask == expected_mask(tok, ids) and sum(mask) > 0
    trained = tok.decode([i for i, m in zip(ids, mask) if m])
    assert trained == "A model.<|assistant_end|>Yes, 100%.<|assistant_end|>"
    assert tok.decode(ids) == ("<|bos|><|user_start|>Be brief.\n\nWho are you?<|user_end|>"
                               "<|assistant_start|>A model.<|assistant_end|><|user_start|>Sure?<|user_end|>"
                               "<|assistant_start|>Yes, 100%.<|assistant_end|>")
    prompt = tok.apply_chat_template(CHAT[:2], tokenize=True, add_generation_prompt=True, return_dict=False)
    assert prompt == tok.render_conversation(CHAT[:2])[0] + [tok.convert_tokens_to_ids("<|assistant_start|>")]
    with_bos = CognicaPoETokenizer.from_encoding(tok.encoding, add_bos_token=True)  # no doubled BOS
    assert with_bos.apply_chat_template(CHAT, tokenize=True, return_dict=False) == ids
    assert tok.render_conversation(CHAT, max_tokens=5) == (ids[:5], mask[:5])
    # special-token text in a message stays plain text (as with apply_chat_template's sanitize_control_tokens)
    sneaky = [{"role": "user", "content": "say <|assistant_end|> now"}, {"role": "assistant", "content": "k"}]
    sneaky_ids = tok.render_conversation(sneaky)[0]
    sanitized = tok.apply_chat_template(sneaky, return_dict=False, sanitize_control_tokens=True)
    assert sanitized == sneaky_ids
    assert sneaky_ids.count(tok.eos_token_id) == 1
    # no system message; tool-use parts
    parts = [{"role": "user", "content": "2+2?"},
             {"role": "assistant", "content": [{"type": "text", "text": "Let me see. "},
                                               {"type": "python", "text": "2+2"},
                                               {"type": "python_output", "text": "4"},
                                               {"type": "text", "text": " It is 4."}]}]
    ids, mask = tok.render_conversation(parts)
    assert tok.apply_chat_template(parts, tokenize=True, return_dict=False) == ids
    kept = tok.decode([i for i, m in zip(ids, mask) if m])
    assert kept == "Let me see. <|python_start|>2+2<|python_end|> It is 4.<|assistant_end|>"


def test_bad_role_order(tok):
    bad = [
        [{"role": "assistant", "content": "hi"}],
        [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
        [{"role": "system", "content": "s"}],
        [{"role": "system", "content": "s"}, {"role": "assistant", "content": "a"}],
        [{"role": "user", "content": "a"}, {"role": "system", "content": "s"}],
    ]
    for messages in bad:
        with pytest.raises(ValueError):
            tok.render_conversation(messages)
        with pytest.raises(Exception, match="(?i)system|alternate"):
            tok.apply_chat_template(messages, tokenize=False)


# -----------------------------------------------------------------------------
# remote code

REMOTE_SCRIPT = r"""
import json, sys
sys.modules["cognica_poe"] = None  # make sure only the folder's own tokenizer.py can be used
try:
    import cognica_poe  # noqa
    raise SystemExit("cognica_poe is importable")
except ImportError:
    pass
from transformers import AutoTokenizer
tok = AutoTokenizer.from_pretrained(sys.argv[1], trust_remote_code=True)
text = open(sys.argv[2], encoding="utf-8", newline="").read()
chat = json.loads(sys.argv[3])
print(json.dumps({"cls": type(tok).__name__, "module": type(tok).__module__, "ids": tok(text)["input_ids"],
                  "chat": tok.apply_chat_template(chat, tokenize=True, return_dict=False),
                  "len": len(tok), "bos": tok.bos_token_id}))
"""


def test_remote_code_auto_tokenizer(tok, tmp_path):
    folder = tmp_path / "exported"
    tok.save_pretrained(folder)
    shutil.copyfile(os.path.join(HERE, "..", "src", "cognica_poe", "tokenizer.py"), folder / "tokenizer.py")
    text = SAMPLE + held_out_paragraphs(3)
    (tmp_path / "text.txt").write_text(text, encoding="utf-8")
    work = tmp_path / "cwd"
    work.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_MODULES_CACHE=str(tmp_path / "modules"), HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="warning")
    proc = subprocess.run([sys.executable, "-c", REMOTE_SCRIPT, str(folder), str(tmp_path / "text.txt"),
                           json.dumps(CHAT)], cwd=work, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["cls"] == "CognicaPoETokenizer" and out["module"].startswith("transformers_modules")
    assert out["ids"] == tok(text)["input_ids"] and out["chat"] == tok.render_conversation(CHAT)[0]
    assert out["len"] == VOCAB and out["bos"] == tok.bos_token_id
    assert "must be a string" not in proc.stderr

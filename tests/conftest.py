"""Shared fixtures: small models whose parameters are all away from their (degenerate) init."""

import os

import pytest
import torch

from cognica_poe.config import preset_config
from cognica_poe.hf import CognicaPoEForCausalLM


def perturbed_model(seed: int = 0, **overrides) -> CognicaPoEForCausalLM:
    """A tiny model with every tensor randomised (c_proj is zero and smear off at init, which would hide bugs)."""
    torch.manual_seed(seed)
    cfg = preset_config("tiny", **{"bos_token_id": 0, "pad_token_id": 0, "eos_token_id": None, **overrides})
    model = CognicaPoEForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
        model.gpt.smear_lambda.fill_(0.6)
        model.gpt.backout_lambda.fill_(0.3)
    return model


@pytest.fixture
def tiny_model() -> CognicaPoEForCausalLM:
    return perturbed_model()


@pytest.fixture
def long_model() -> CognicaPoEForCausalLM:
    """sequence_len 512 -> short window 128: generating past 300 tokens exercises the sliding windows."""
    return perturbed_model(sequence_len=512)


# The bundled corpus (shipped in the package): tests read text from it, so a clone of this repository alone passes.
BUNDLED_CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "cognica_poe", "data",
                              "tinyshakespeare.txt")
# The reference files (the nanochat-trained poe-d8-classics checkpoint, its corpora) live outside the repository;
# tests that need them find them through this variable, which .ci/run sets.
SHARED_ENV = "COGNICA_POE_SHARED"


def shared_path(*parts: str) -> str:
    """A path inside the reference folder; skips the test (with the fix) when the variable is unset, and fails when
    it is set but the path is missing, so CI never skips these tests silently."""
    root = os.environ.get(SHARED_ENV)
    if not root:
        pytest.skip(f"needs the reference files (poe-d8-classics and its corpora): set {SHARED_ENV} to the folder "
                    "holding models/ and data/ (.ci/run sets it)")
    path = os.path.join(root, *parts)
    if not os.path.exists(path):
        pytest.fail(f"{SHARED_ENV}={root} has no {os.path.join(*parts)}")
    return path


def bundled_text(n_chars: int | None = None) -> str:
    with open(BUNDLED_CORPUS, encoding="utf-8") as f:
        return f.read(n_chars) if n_chars else f.read()


@pytest.fixture(scope="session")
def d8_model(tmp_path_factory):
    """The nanochat-trained reference flat-PoE model (8 layers, 4 exits), converted once per session."""
    from cognica_poe.checkpoint import load_model
    from cognica_poe.nanochat import convert_nanochat
    from cognica_poe.tokenizer import CognicaPoETokenizer

    d8 = shared_path("models", "poe-d8-classics")
    out = convert_nanochat(d8, str(tmp_path_factory.mktemp("d8") / "hf"), dtype="float32", allow_pickle=True)
    return load_model(out), CognicaPoETokenizer.from_pretrained(out)


def specialize(parent: CognicaPoEForCausalLM, *args, **kwargs) -> CognicaPoEForCausalLM:
    """specialist.add_specialist (which works on the core GPT) for a transformers model."""
    from cognica_poe.specialist import add_specialist

    return CognicaPoEForCausalLM.from_gpt(add_specialist(parent.gpt, *args, **kwargs))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> str:
    """The first 60k characters of the bundled corpus as a text file (a small training corpus)."""
    path = tmp_path_factory.mktemp("corpus") / "small.txt"
    path.write_text(bundled_text(60_000), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> str:
    """A 512-id BPE tokenizer folder trained on `corpus`."""
    from cognica_poe.tokenizer_train import train_bpe
    from cognica_poe.train.data import iter_tokenizer_texts

    tok = train_bpe(iter_tokenizer_texts(corpus), vocab_size=512)
    out = str(tmp_path_factory.mktemp("tok"))
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session", autouse=True)
def user_cache_dir(tmp_path_factory) -> str:
    """The weight-layout probe's cache (cpu.py) lives in a folder of this session, not in the user's ~/.cache."""
    path = str(tmp_path_factory.mktemp("xdg_cache"))
    os.environ["XDG_CACHE_HOME"] = path
    return path

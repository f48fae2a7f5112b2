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


D8 = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "shared", "models", "poe-d8-classics")


@pytest.fixture(scope="session")
def d8_model(tmp_path_factory):
    """The nanochat-trained reference flat-PoE model (8 layers, 4 exits), converted once per session."""
    from cognica_poe.checkpoint import convert_nanochat, load_model
    from cognica_poe.tokenizer import CognicaPoETokenizer

    if not os.path.isdir(D8):
        pytest.skip(f"reference checkpoint not present at {D8}")
    out = convert_nanochat(D8, str(tmp_path_factory.mktemp("d8") / "hf"), dtype="float32", allow_pickle=True)
    return load_model(out), CognicaPoETokenizer.from_pretrained(out)

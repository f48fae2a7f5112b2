"""The core's contracts that a refactor must keep: seeded init, typed mode entry points, quantized models."""

import hashlib

import pytest
import torch
import torch.nn as nn
from conftest import perturbed_model

from cognica_poe.checkpoint import load_model, model_summary
from cognica_poe.config import preset_config
from cognica_poe.hf import CognicaPoEForCausalLM
from cognica_poe.model import GPT
from cognica_poe.specialist import add_specialist


def digest(module: nn.Module) -> str:
    """Every tensor's name and fp32 bytes, in key order."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def as_gpt(model) -> GPT:
    return model.gpt if isinstance(model, CognicaPoEForCausalLM) else model


def test_a_seed_gives_the_weights_it_always_gave():
    """The digests were computed by the code that seeded torch's global generator: a seed still means those weights
    (and library code leaves the global generator alone)."""
    torch.manual_seed(1234)
    before = torch.get_rng_state()
    base = GPT.from_config(preset_config("tiny"), seed=3)
    assert digest(base) == "2cb207966c04c3d2"
    child = add_specialist(base, 2, seed=7)
    assert digest(as_gpt(child)) == "f776887ef2917ba7"
    grandchild = add_specialist(as_gpt(child), 1, head_mode="spec", seed=8)
    assert digest(as_gpt(grandchild)) == "1996d26aa408348c"
    # a preset's random init: a seed gives one set of weights (now drawn through GPT.from_config's generator)
    assert digest(load_model("tiny", seed=5).gpt) == digest(load_model("tiny", seed=5).gpt)
    assert digest(load_model("tiny", seed=5).gpt) != digest(load_model("tiny", seed=6).gpt)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_stage_modes_run_on_a_dynamically_quantized_model():
    """A quantize_dynamic'd lm_head has no float weight: device and dtype come from the embedding."""
    from torch.ao.quantization import quantize_dynamic

    model = quantize_dynamic(perturbed_model(), {nn.Linear}, dtype=torch.qint8)
    ids = torch.tensor([[0, 5, 9, 3]])
    full = model.generate(ids, max_new_tokens=4, do_sample=False)
    last = model.poe_n_stages - 1
    assert torch.equal(model.generate_stage(ids, stage=last, max_new_tokens=4, stop_tokens=[]), full)
    assert model.generate_stage(ids, stage=0, max_new_tokens=4, stop_tokens=[]).shape == (1, 8)
    assert model.generate_wand(ids, max_new_tokens=4, p99_bounds=[1.0] * last, stop_tokens=[]).shape == (1, 8)


def test_model_summary_counts_every_head_as_a_head():
    base = perturbed_model()
    child = add_specialist(as_gpt(add_specialist(as_gpt(base), 1, seed=0)), 1, seed=1)
    gpt = as_gpt(child)
    groups = model_summary(gpt)["parameter_groups"]
    head = gpt.lm_head.weight.numel()
    assert groups["lm_head"] == 3 * head  # lm_head, the ancestor's folded head, the leaf's lm_head_stage
    assert groups["scalars"] == sum(p.numel() for n, p in gpt.named_parameters()
                                    if n in ("resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda",
                                             "smear_gate.weight"))

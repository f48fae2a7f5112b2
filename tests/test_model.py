"""The core GPT: exact d24 shapes, stage exits, masks, padding and clear errors."""

import pytest
import torch

from cognica_poe.config import CognicaPoEConfig, preset_config
from cognica_poe.model import GPT


def d24_expected_shapes() -> dict[str, tuple[int, ...]]:
    """SPEC §2 written out independently of the model code."""
    V, C = 32768, 1536
    shapes = {"resid_lambdas": (24,), "x0_lambdas": (24,), "smear_lambda": (1,), "backout_lambda": (1,),
              "transformer.wte.weight": (V, C), "lm_head.weight": (V, C), "smear_gate.weight": (1, 24)}
    for i in range(24):
        for name in ("c_q", "c_k", "c_v", "c_proj"):
            shapes[f"transformer.h.{i}.attn.{name}.weight"] = (C, C)
        shapes[f"transformer.h.{i}.mlp.c_fc.weight"] = (4 * C, C)
        shapes[f"transformer.h.{i}.mlp.c_proj.weight"] = (C, 4 * C)
        if i % 2 == 1:
            shapes[f"transformer.h.{i}.attn.ve_gate.weight"] = (12, 12)
            shapes[f"value_embeds.{i}.weight"] = (V, C)
    return shapes


def test_d24_on_meta_matches_release():
    gpt = GPT.from_config(preset_config("d24"), device="meta")
    sd = gpt.state_dict()
    assert sum(p.numel() for p in gpt.parameters()) == 1_384_122_122
    assert len(sd) == 175
    assert {k: tuple(v.shape) for k, v in sd.items()} == d24_expected_shapes()
    assert all(v.is_meta for v in sd.values())
    # nanochat's state_dict order: own scalars first, then the trunk
    assert list(sd)[:5] == ["resid_lambdas", "x0_lambdas", "smear_lambda", "backout_lambda", "transformer.wte.weight"]


def test_d24_layout():
    cfg = preset_config("d24")
    assert cfg.poe_stage_boundary_layers == [5, 11, 17, 23] and cfg.poe_n_stages == 4
    windows = cfg.window_sizes()
    assert [i for i, w in enumerate(windows) if w == 2048] == [3, 7, 11, 15, 19, 23]
    assert {w for w in windows} == {512, 2048}
    assert cfg.backout_layer == 12 and cfg.head_dim == 128
    assert preset_config("d24", sequence_len=512).window_sizes()[0] == 128
    # a window pattern without a trailing L still ends long
    assert CognicaPoEConfig(n_layer=3, n_embd=64, n_head=4, n_kv_head=4, window_pattern="S").window_sizes()[-1] == 2048


def test_padded_vocab_and_init():
    cfg = CognicaPoEConfig(vocab_size=300, n_layer=2, n_embd=64, n_head=4, n_kv_head=2, sequence_len=128, poe_every=1)
    gpt = GPT.from_config(cfg, seed=0)
    assert gpt.transformer.wte.weight.shape == (320, 64) and gpt.lm_head.weight.shape == (320, 64)
    assert torch.all(gpt.transformer.h[0].mlp.c_proj.weight == 0) and gpt.backout_lambda.item() == pytest.approx(0.2)
    assert gpt.resid_lambdas[0].item() == pytest.approx(1.15) and gpt.x0_lambdas[-1].item() == pytest.approx(0.05)
    logits = gpt(torch.randint(0, 300, (1, 7)))
    assert logits.shape == (1, 7, 300) and logits.dtype == torch.float32
    assert logits.abs().max() <= 15.0


def test_bad_configs_and_presets():
    with pytest.raises(ValueError, match="unknown preset"):
        preset_config("d999")
    with pytest.raises(ValueError, match="n_kv_head"):
        CognicaPoEConfig(n_head=4, n_kv_head=3, n_embd=64)
    with pytest.raises(ValueError, match="poe_mode"):
        CognicaPoEConfig(poe_mode="deep")


def test_forward_all_stages_one_pass_matches_single_exits(tiny_model):
    gpt = tiny_model.gpt
    ids = torch.randint(0, 512, (2, 33))
    with torch.no_grad():
        all_exits = gpt.forward_all_stages(ids)
        assert len(all_exits) == 4
        assert torch.equal(all_exits[-1], gpt(ids))  # the last exit is the standard forward
        for b, logits in zip(gpt.config.poe_stage_boundary_layers, all_exits):
            assert torch.equal(gpt.forward_all_stages(ids, [b])[0], logits)
        # an intermediate exit is softcap(lm_head(norm(h))) with no backout: recompute it by hand
        x, step = gpt.prepare(ids)
        x0 = x
        for i in range(2):
            x = gpt.run_layer(i, x, x0, ids, step)
        manual = gpt.exit_logits(x)
        assert torch.allclose(manual, all_exits[1], atol=1e-6)
        # any subset, any order
        sub = gpt.forward_all_stages(ids, [2, 0])
        assert torch.equal(sub[0], all_exits[2]) and torch.equal(sub[1], all_exits[0])


def test_exit_errors(tiny_model):
    ids = torch.randint(0, 512, (1, 5))
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.gpt.forward_all_stages(ids, [4])
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.forward_stage(ids, stage=4)
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.forward_stage(ids, stage=1.5)


def test_forward_stage_runs_only_its_prefix(tiny_model):
    calls = []
    blocks = tiny_model.gpt.transformer.h
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: calls.append(i)) for i, b in enumerate(blocks)]
    ids = torch.randint(0, 512, (1, 9))
    logits = tiny_model.forward_stage(ids, stage=1)
    for h in hooks:
        h.remove()
    assert calls == [0, 1]
    assert torch.equal(logits, tiny_model.gpt.forward_all_stages(ids)[1])


def test_padded_row_equals_row_alone(long_model):
    gpt = long_model.gpt
    torch.manual_seed(1)
    a = torch.randint(1, 512, (1, 200))
    b = torch.randint(1, 512, (1, 150))
    ids = torch.zeros(2, 200, dtype=torch.long)
    mask = torch.zeros(2, 200, dtype=torch.long)
    ids[0], mask[0] = a[0], 1
    ids[1, 50:], mask[1, 50:] = b[0], 1
    with torch.no_grad():
        batch = gpt(ids, attention_mask=mask)
        alone_a, alone_b = gpt(a), gpt(b)
        stages = gpt.forward_all_stages(ids, attention_mask=mask)
        stages_b = gpt.forward_all_stages(b)
    assert (batch[0] - alone_a[0]).abs().max() < 1e-5
    assert (batch[1, 50:] - alone_b[0]).abs().max() < 1e-5
    for s, sb in zip(stages, stages_b):
        assert (s[1, 50:] - sb[0]).abs().max() < 1e-5


def test_sliding_window_is_applied(long_model):
    """A token's influence travels at most one short window (128) per sliding layer; the long layer sees all."""
    gpt = long_model.gpt
    assert gpt.config.window_sizes() == [128, 128, 128, 512]
    ids = torch.randint(1, 512, (1, 300))
    other = ids.clone()
    other[0, 10] = (ids[0, 10] + 1) % 512  # smear carries it to position 11 too
    with torch.no_grad():
        e = gpt.forward_all_stages(ids, [0, 1, 3])
        o = gpt.forward_all_stages(other, [0, 1, 3])
    for k, n_sliding in ((0, 1), (1, 2)):
        t = 11 + 128 * n_sliding + 1  # first position out of reach
        assert torch.equal(e[k][0, t:], o[k][0, t:])
        assert not torch.equal(e[k][0, t - 1], o[k][0, t - 1])
    assert not torch.equal(e[2][0, 280:], o[2][0, 280:])  # the last layer is long


def test_rotary_limit_error():
    cfg = preset_config("tiny", sequence_len=16, rotary_multiplier=2)
    gpt = GPT.from_config(cfg, seed=0)
    gpt(torch.randint(0, 512, (1, 32)))
    with pytest.raises(ValueError, match="rotary"):
        gpt(torch.randint(0, 512, (1, 33)))

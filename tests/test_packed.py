"""Prepacked CPU weights (packed.py) and the one-query attention path: the same results as the plain paths."""

import pytest
import torch
import torch.nn.functional as F
from conftest import perturbed_model

from cognica_poe import model as model_module
from cognica_poe.hf import CognicaPoEForCausalLM
from cognica_poe.packed import MIN_PACKED_ELEMENTS, Linear, count_packed, packing_supported

needs_bf16_packing = pytest.mark.skipif(not packing_supported(torch.zeros(1, dtype=torch.bfloat16)),
                                        reason="this CPU/build has no oneDNN bf16 support")


def wide_model(dtype: torch.dtype) -> CognicaPoEForCausalLM:
    """Wide enough (256) that most matrices are packed; c_k / c_v (128 x 256, one kv head) stay plain."""
    return perturbed_model(n_layer=2, n_embd=256, n_head=2, n_kv_head=1, poe_every=1).to(dtype)


def batch(B: int = 2, T: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (B, T), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(B, T, dtype=torch.long)
    if B > 1:  # the last row left-padded, starting with BOS after its pads
        mask[B - 1, :3] = 0
        ids[B - 1, 3] = 0
    return ids, mask


def every_output(model: CognicaPoEForCausalLM) -> dict[str, torch.Tensor]:
    """Logits and generated tokens from every code path that multiplies by the packed matrices."""
    ids, mask = batch()
    with torch.no_grad():
        out = {"exits": torch.stack(model.gpt.forward_all_stages(ids, attention_mask=mask))}
    kw = dict(attention_mask=mask, max_new_tokens=6, stop_tokens=[])
    out["stage"] = model.generate_stage(ids, stage=1, **kw)
    out["sampled"] = model.generate_stage(ids, stage=1, do_sample=True, top_k=20, seed=3, **kw)
    out["speculative"] = model.generate_speculative(ids, draft_stage=0, k_draft=2, **kw)
    out["compose"] = model.generate_parallel_composition(ids, stages=[0, 1], **kw)
    out["wand"], used = model.generate_wand(ids, safety=1.0, p99_bounds=[0.5], return_stages_used=True, **kw)
    out["wand_stages"] = torch.tensor(used)  # one list per row
    return out


@needs_bf16_packing
def test_packed_bf16_is_bitwise_the_plain_model():
    model = wide_model(torch.bfloat16)
    plain = every_output(model)
    # per layer c_q | c_k | c_v as one stack, attn c_proj, c_fc, mlp c_proj (ve_gate, smear_gate are below the
    # threshold); lm_head
    assert model.pack_weights() == 2 * 6 + 1 == count_packed(model)
    packed_sizes = [m.weight.numel() for m in model.modules() if isinstance(m, Linear) and m.is_packed]
    assert min(packed_sizes) >= MIN_PACKED_ELEMENTS
    packed = every_output(model)
    for k in plain:
        assert torch.equal(plain[k], packed[k]), k


@needs_bf16_packing
def test_sibling_specialists_pack_their_shared_trunk_once(tmp_path):
    from conftest import specialize
    from test_specialist import train_like

    from cognica_poe import load_siblings
    from cognica_poe.checkpoint import export_hf_folder, save_stage_folder

    base_dir = export_hf_folder(wide_model(torch.float32), None, str(tmp_path / "base"), dtype="bfloat16")
    base = CognicaPoEForCausalLM.from_pretrained(base_dir).eval()
    folders = [save_stage_folder(train_like(specialize(base, 1, seed=k), 10 + k), str(tmp_path / f"s{k}"),
                                 base_dir) for k in range(2)]
    sib = load_siblings(base_dir, folders)
    ids, mask = batch()
    kw = dict(attention_mask=mask, max_new_tokens=6, stop_tokens=[])
    plain = [sib.generate_parallel_composition(ids, stages=[0, 2, 3], **kw), sib.generate_stage(ids, stage=3, **kw)]
    # the trunk's 13 once; each branch its own layer (q|k|v stack, c_proj, c_fc, mlp c_proj) and its heads
    n = sib.pack_weights()
    assert n == count_packed(torch.nn.ModuleList([sib.base, *sib.branches])) and 13 + 2 * 6 < n <= 13 + 2 * 9
    packed = [sib.generate_parallel_composition(ids, stages=[0, 2, 3], **kw), sib.generate_stage(ids, stage=3, **kw)]
    for a, b in zip(plain, packed):
        assert torch.equal(a, b)


def test_packed_fp32_agrees_to_rounding():
    model = wide_model(torch.float32)
    plain = every_output(model)
    assert model.pack_weights() == 13
    packed = every_output(model)
    torch.testing.assert_close(packed["exits"], plain["exits"], rtol=1e-5, atol=1e-5)
    for k in ("stage", "speculative", "compose", "wand", "wand_stages"):
        assert torch.equal(plain[k], packed[k]), k
    model.unpack_weights()
    assert count_packed(model) == 0


def test_stale_packed_copy_is_never_used():
    model = wide_model(torch.float32)
    model.pack_weights()
    ids, _ = batch(1)
    head = model.gpt.lm_head
    x = torch.randn(2, 3, 256)
    with torch.no_grad():
        assert head.is_packed and not torch.equal(head(x), F.linear(x, head.weight))  # fp32: the packed kernel
        head.weight.mul_(2.0)  # an in-place change, as an optimizer step makes
        assert not head.is_packed
        assert torch.equal(head(x), F.linear(x, head.weight))  # the stale copy is ignored: the new weight serves
        attn = model.gpt.transformer.h[0].attn  # the q | k | v stack goes stale when any of the three changes
        assert attn.stack_count() == 3
        attn.c_k.weight.add_(0.5)
        assert attn.stack_count() == 0 and count_packed(model) == 13 - 1 - 3
        plain = torch.cat([F.linear(x, lin.weight) for lin in (attn.c_q, attn.c_k, attn.c_v)], dim=-1)
        assert torch.equal(attn.project_stack(x), plain)
    # a dtype change after packing drops every copy (a later model.to(float32) could reuse the freed addresses, so
    # the storage pointer alone would not prove a copy stale): the bf16 model computes as an unpacked bf16 model
    model.pack_weights()
    model.to(torch.bfloat16)
    assert count_packed(model) == 0
    assert all(m.packed is None for m in model.modules() if isinstance(m, Linear))
    assert all(b.attn.packed_stack is None for b in model.gpt.transformer.h)
    with torch.no_grad():
        a = model.gpt(ids)
        model.unpack_weights()
        assert torch.equal(a, model.gpt(ids))


def test_training_and_saving_ignore_the_packed_copies(tmp_path):
    model, reference = wide_model(torch.float32), wide_model(torch.float32)
    keys = list(model.state_dict())
    model.pack_weights()
    assert list(model.state_dict()) == keys  # nothing registered: checkpoints are unchanged
    ids, _ = batch(1)
    for m in (model, reference):  # autograd on: the plain weight, with its gradient
        m.gpt(ids[:, :-1], targets=ids[:, 1:]).backward()
    assert torch.equal(model.gpt.lm_head.weight.grad, reference.gpt.lm_head.weight.grad)
    model.save_pretrained(tmp_path / "m")
    loaded = CognicaPoEForCausalLM.from_pretrained(tmp_path / "m").eval()
    for k, v in reference.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_one_query_attention_matches_sdpa():
    g = torch.Generator().manual_seed(0)
    for H, H_kv in [(4, 2), (3, 3), (8, 1)]:
        q = torch.randn(3, H, 1, 16, generator=g)
        k, v = torch.randn(2, 3, H_kv, 37, 16, generator=g)
        mask = torch.rand(3, 1, 1, 37, generator=g) > 0.3
        mask[..., -1] = True
        for m in (mask, None):
            ref = F.scaled_dot_product_attention(q, k, v, attn_mask=m, enable_gqa=True)
            torch.testing.assert_close(model_module.attend_one_query(q, k, v, m), ref, rtol=1e-5, atol=1e-6)


def test_bf16_decode_takes_the_one_query_path_and_matches_uncached(monkeypatch):
    model = wide_model(torch.bfloat16)
    calls = []
    original = model_module.attend_one_query
    monkeypatch.setattr(model_module, "attend_one_query", lambda *a: calls.append(1) or original(*a))
    ids, mask = batch(T=12)
    cache = model.new_cache(2, 16)
    with torch.no_grad():
        model.gpt(ids[:, :-1], kv_cache=cache, attention_mask=mask[:, :-1])
        assert not calls  # prefill: SDPA
        step = model.gpt(ids[:, -1:], kv_cache=cache, attention_mask=mask)[:, -1]
        assert len(calls) == model.config.n_layer
        full = model.gpt(ids, attention_mask=mask)[:, -1]
    torch.testing.assert_close(step, full, rtol=0, atol=0.05)  # bf16 rounding of two different summation orders

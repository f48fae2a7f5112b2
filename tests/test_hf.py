"""The transformers wrapper: generate() with our KV cache, parity with the core model, save/load."""

import warnings

import pytest
import torch

from cognica_poe import CognicaKVCache, CognicaPoEForCausalLM


def left_padded_batch(bos: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(3)
    ids = torch.randint(1, 512, (2, 24))
    mask = torch.ones(2, 24, dtype=torch.long)
    ids[:, 0] = bos
    ids[1, :8] = bos  # row 1: 7 pads then its own BOS
    mask[1, :7] = 0
    return ids, mask


def test_cached_generate_equals_uncached_recompute(long_model):
    """sequence_len 512 (short window 128), > 300 new tokens, batch 2 with left padding, fp32, within 1e-5."""
    model = long_model
    ids, mask = left_padded_batch()
    seen = []

    def spy(module, args, kwargs):
        seen.append((args[0].shape[1], type(kwargs.get("kv_cache")).__name__))

    hook = model.gpt.register_forward_pre_hook(spy, with_kwargs=True)
    out = model.generate(ids, attention_mask=mask, max_new_tokens=310, min_new_tokens=310, do_sample=False,
                         output_logits=True, return_dict_in_generate=True)
    hook.remove()
    seq = out.sequences
    assert seq.shape == (2, 24 + 310)
    assert seen[0] == (24, "CognicaKVCache")  # prefill
    assert all(s == (1, "CognicaKVCache") for s in seen[1:]) and len(seen) == 310  # one token per decode step
    full_mask = torch.cat([mask, torch.ones(2, 310, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = model.gpt(seq, attention_mask=full_mask)  # no cache: the whole sequence at once
    cached = torch.stack(out.logits, dim=1)  # (B, 310, V)
    assert (cached - ref[:, 23:-1]).abs().max().item() < 1e-5
    assert torch.equal(seq[:, 24:], ref[:, 23:-1].argmax(-1))
    # the padded row decodes exactly as it would alone
    alone = model.generate(ids[1:, 7:], max_new_tokens=310, min_new_tokens=310, do_sample=False)
    assert torch.equal(alone[0, 17:], seq[1, 24:])


def test_cache_is_preallocated_and_tracks_layers(tiny_model):
    cache = tiny_model.new_cache(batch_size=2, max_len=64)
    assert isinstance(cache, CognicaKVCache) and len(cache.layers) == 4
    k0 = cache.layers[0].keys
    ids = torch.randint(1, 512, (2, 10))
    with torch.no_grad():
        tiny_model(ids, cache=cache)
        tiny_model(ids[:, :1], cache=cache)
    assert cache.layers[0].keys is k0 and k0.shape == (2, 2, 64, 16)  # written in place, never reallocated
    assert cache.layer_len == [11, 11, 11, 11] and cache.get_seq_length() == 11
    cache.crop(5)
    assert cache.layer_len == [5] * 4 and cache.n_slots == 5
    with pytest.raises(ValueError, match="exceeds the KV cache"):
        tiny_model(torch.randint(1, 512, (2, 60)), cache=cache)


def test_chunked_prefill_equals_one_pass(tiny_model):
    """Smear and masks across chunk boundaries: prefill in 3 chunks == one uncached pass."""
    ids = torch.randint(1, 512, (2, 40))
    cache = tiny_model.new_cache(2, 64)
    with torch.no_grad():
        parts = [tiny_model(ids[:, a:b], cache=cache).logits for a, b in ((0, 13), (13, 14), (14, 40))]
        ref = tiny_model.gpt(ids)
    assert (torch.cat(parts, dim=1) - ref).abs().max() < 1e-5


def test_wrapper_equals_core(tiny_model):
    ids = torch.randint(0, 512, (3, 17))
    with torch.no_grad():
        assert torch.equal(tiny_model(ids).logits, tiny_model.gpt(ids))
        loss = tiny_model(ids, labels=ids).loss
        ref = torch.nn.functional.cross_entropy(tiny_model.gpt(ids)[:, :-1].reshape(-1, 512), ids[:, 1:].reshape(-1))
    assert torch.allclose(loss, ref)


def test_sampling_is_seeded_and_valid(tiny_model):
    ids, mask = left_padded_batch()
    runs = []
    for _ in range(2):
        torch.manual_seed(7)
        runs.append(tiny_model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=True, temperature=0.8,
                                        top_k=50, top_p=0.9))
    assert torch.equal(runs[0], runs[1]) and runs[0].shape == (2, 44)
    assert int(runs[0].max()) < 512


def test_save_load_identical(tiny_model, tmp_path):
    ids = torch.randint(0, 512, (2, 21))
    tiny_model.save_pretrained(tmp_path / "fp32")
    loaded = CognicaPoEForCausalLM.from_pretrained(tmp_path / "fp32").eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, tiny_model(ids).logits)
    # bf16 round trip is bit-identical in bf16
    bf = CognicaPoEForCausalLM.from_pretrained(tmp_path / "fp32", dtype=torch.bfloat16).eval()
    bf.save_pretrained(tmp_path / "bf16")
    bf2 = CognicaPoEForCausalLM.from_pretrained(tmp_path / "bf16").eval()
    for (k, a), (_, b) in zip(bf.state_dict().items(), bf2.state_dict().items()):
        assert a.dtype == torch.bfloat16 and torch.equal(a, b), k
    with torch.no_grad():
        assert torch.equal(bf(ids).logits, bf2(ids).logits)


def test_missing_bos_warns(tiny_model):
    ids = torch.randint(1, 512, (1, 5))
    with pytest.warns(UserWarning, match="BOS"):
        tiny_model.generate(ids, max_new_tokens=2)
    ids[0, 0] = 0
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*BOS.*")
        tiny_model.generate(ids, max_new_tokens=2)


def test_stage_api(tiny_model):
    assert tiny_model.poe_n_stages == 4 and tiny_model.poe_stage_boundary_layers == [0, 1, 2, 3]
    ids = torch.randint(0, 512, (2, 9))
    stages = tiny_model.gpt.forward_all_stages(ids)
    for s in range(4):
        assert torch.equal(tiny_model.forward_stage(ids, stage=s), stages[s])

"""transformers parity: beam search and several return sequences, Trainer with gradient accumulation, gradient
checkpointing, embedding resizing, hidden states, inputs_embeds and dynamic quantization."""

import torch


def left_padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 512, (2, 12), generator=g)
    mask = torch.ones(2, 12, dtype=torch.long)
    ids[:, 0] = 0
    ids[1, :5] = 0  # row 1: 4 pads then its own BOS
    mask[1, :4] = 0
    return ids, mask


# -----------------------------------------------------------------------------
# generate(): the cache is sized for the batch transformers expands (beams, return sequences)


def test_beam_search_with_cache_equals_no_cache(tiny_model):
    ids, mask = left_padded_batch()
    kw = dict(attention_mask=mask, num_beams=3, num_return_sequences=2, max_new_tokens=8, min_new_tokens=8,
              do_sample=False, output_scores=True, return_dict_in_generate=True)
    cached = tiny_model.generate(ids, **kw)
    plain = tiny_model.generate(ids, use_cache=False, **kw)  # every step recomputes the whole sequence
    assert cached.sequences.shape == (4, 20)
    assert torch.equal(cached.sequences, plain.sequences)
    torch.testing.assert_close(cached.sequences_scores, plain.sequences_scores, rtol=1e-5, atol=1e-5)


def test_several_return_sequences_equal_recompute(tiny_model):
    """Sampling 3 sequences per prompt: every step's logits are those of a no-cache pass over the final sequences."""
    ids, mask = left_padded_batch()
    torch.manual_seed(11)
    out = tiny_model.generate(ids, attention_mask=mask, num_return_sequences=3, do_sample=True, max_new_tokens=10,
                              min_new_tokens=10, output_logits=True, return_dict_in_generate=True)
    seq = out.sequences
    assert seq.shape == (6, 22)
    assert torch.equal(seq[:, :12], ids.repeat_interleave(3, dim=0))
    full_mask = torch.cat([mask.repeat_interleave(3, dim=0), torch.ones(6, 10, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = tiny_model.gpt(seq, attention_mask=full_mask)
    torch.testing.assert_close(torch.stack(out.logits, dim=1), ref[:, 11:-1], rtol=1e-5, atol=1e-5)
    assert len({tuple(r) for r in seq[:3, 12:].tolist()}) > 1  # the copies of one prompt really sample apart

"""transformers parity: beam search and several return sequences, Trainer with gradient accumulation, gradient
checkpointing, embedding resizing, hidden states, inputs_embeds and dynamic quantization."""

import pytest
import torch
import torch.nn as nn
from conftest import perturbed_model

from cognica_poe import CognicaPoEForCausalLM


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


# -----------------------------------------------------------------------------
# Trainer: gradient accumulation gives the loss and gradient of one large batch


def trainer_log(batch_size: int, accumulation: int, rows: list[dict], out_dir: str) -> list[tuple[float, float]]:
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=out_dir, per_device_train_batch_size=batch_size,
                             gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=1e-2,
                             lr_scheduler_type="constant", logging_steps=1, use_cpu=True, report_to=[],
                             save_strategy="no", train_sampling_strategy="sequential", disable_tqdm=True)
    trainer = Trainer(model=perturbed_model(), args=args, train_dataset=rows)
    trainer.train()
    return [(h["loss"], h["grad_norm"]) for h in trainer.state.log_history if "grad_norm" in h]


def test_trainer_gradient_accumulation_equals_one_batch(tmp_path):
    pytest.importorskip("accelerate")
    g = torch.Generator().manual_seed(1)
    rows = []
    for i in range(8):  # each row ignores a different number of leading labels: micro-batches count unequal tokens
        ids = torch.randint(1, 512, (16,), generator=g)
        ids[0] = 0
        labels = ids.clone()
        labels[: 2 + (3 * i) % 11] = -100
        rows.append({"input_ids": ids, "labels": labels})
    one = trainer_log(4, 1, rows, str(tmp_path / "a"))
    accumulated = trainer_log(2, 2, rows, str(tmp_path / "b"))
    assert len(one) == len(accumulated) == 2
    for (loss_a, norm_a), (loss_b, norm_b) in zip(one, accumulated):
        assert loss_b == pytest.approx(loss_a, rel=1e-5) and norm_b == pytest.approx(norm_a, rel=1e-5)
    # and the logged loss is the mean token loss of the first 4 rows, as the model computes it in one pass
    with torch.no_grad():
        batch = {k: torch.stack([r[k] for r in rows[:4]]) for k in ("input_ids", "labels")}
        assert one[0][0] == pytest.approx(perturbed_model()(**batch).loss.item(), rel=1e-5)


# -----------------------------------------------------------------------------
# gradient checkpointing


@pytest.mark.filterwarnings("ignore::FutureWarning")  # transformers renames it activation_checkpointing_enable
def test_gradient_checkpointing_recomputes_blocks_with_equal_gradients():
    ids, mask = left_padded_batch()
    grads, calls = [], []
    for checkpointing in (False, True):
        model = perturbed_model().train()
        if checkpointing:
            model.gradient_checkpointing_enable()
            assert model.is_gradient_checkpointing
        n = [0]
        model.gpt.transformer.h[1].attn.register_forward_pre_hook(lambda *a, n=n: n.__setitem__(0, n[0] + 1))
        model(ids, attention_mask=mask, labels=ids).loss.backward()
        grads.append({k: p.grad for k, p in model.named_parameters()})
        calls.append(n[0])
    assert calls == [1, 2]  # checkpointed: the block runs again in the backward pass
    for k, g in grads[0].items():
        torch.testing.assert_close(grads[1][k], g, rtol=1e-6, atol=1e-7, msg=k)


# -----------------------------------------------------------------------------
# resizing the vocabulary: wte, lm_head and value_embeds together, the padding kept, logits follow


def vocab_matrices(model: CognicaPoEForCausalLM) -> dict[str, torch.Tensor]:
    gpt = model.gpt
    out = {"wte": gpt.transformer.wte.weight, "lm_head": gpt.lm_head.weight}
    out.update({f"value_embeds.{k}": e.weight for k, e in gpt.value_embeds.items()})
    return out


def test_resize_token_embeddings_grows_every_vocab_matrix(tmp_path):
    model = perturbed_model()
    ids = torch.randint(1, 512, (2, 9))
    ids[:, 0] = 0
    with torch.no_grad():
        before = model(ids).logits
    old = {k: w.clone() for k, w in vocab_matrices(model).items()}
    emb = model.resize_token_embeddings(600)
    assert emb is model.get_input_embeddings()
    assert model.config.vocab_size == 600 and model.config.padded_vocab_size == 640
    for k, w in vocab_matrices(model).items():
        assert w.shape[0] == 640, k
        assert torch.equal(w[:512], old[k][:512]), k  # the old tokens keep their rows
        assert torch.allclose(w[600], old[k][:512].mean(dim=0)), k  # a new token starts at the mean of the old
    with torch.no_grad():
        after = model(ids).logits
        assert after.shape == (2, 9, 600)
        torch.testing.assert_close(after[..., :512], before, rtol=1e-6, atol=1e-6)  # old tokens: same predictions
        new = torch.cat([ids, torch.tensor([[599], [513]])], dim=1)
        logits = model(new).logits  # the new ids look up rows in every vocab-sized matrix
    model.save_pretrained(tmp_path / "m")
    loaded = CognicaPoEForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert loaded.config.vocab_size == 600
    with torch.no_grad():
        assert torch.equal(loaded(new).logits, logits)


def test_resize_token_embeddings_shrinks_and_pads():
    model = perturbed_model()
    ids = torch.randint(1, 300, (1, 7))
    with torch.no_grad():
        before = model(ids).logits
    model.resize_token_embeddings(300, pad_to_multiple_of=128)
    assert model.config.vocab_size == 300 and model.config.padded_vocab_size == 384
    assert all(w.shape[0] == 384 for w in vocab_matrices(model).values())
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before[..., :300], rtol=1e-6, atol=1e-6)
    model.config.eos_token_id = 250
    with pytest.raises(ValueError, match="eos_token_id 250"):
        model.resize_token_embeddings(200)
    with pytest.raises(ValueError, match="new_num_tokens"):
        model.resize_token_embeddings(0)
    assert model.config.vocab_size == 300 and model.gpt.lm_head.weight.shape[0] == 384  # refused: nothing changed


def test_set_embeddings_must_keep_the_vocab_shape():
    model = perturbed_model()
    ids = torch.randint(1, 512, (1, 6))
    new = nn.Embedding(512, 64)
    model.set_input_embeddings(new)
    assert model.get_input_embeddings() is new
    with torch.no_grad():
        model(ids)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        model.set_input_embeddings(nn.Embedding(700, 64))
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        model.set_output_embeddings(nn.Linear(64, 700, bias=False))
    head = nn.Linear(64, 512, bias=False)
    model.set_output_embeddings(head)
    assert model.get_output_embeddings() is head


# -----------------------------------------------------------------------------
# forward's transformers options: none silently ignored


def test_output_hidden_states_are_every_layers_stream_and_give_the_exits(tiny_model):
    ids, mask = left_padded_batch()
    gpt, cfg = tiny_model.gpt, tiny_model.config
    with torch.no_grad():
        out = tiny_model(ids, attention_mask=mask, output_hidden_states=True)
        hs = out.hidden_states
        assert len(hs) == cfg.n_layer + 1 and all(h.shape == (2, 12, cfg.n_embd) for h in hs)
        assert torch.equal(hs[0], gpt.prepare(ids, mask)[0])  # the embedding (after smear)
        exits = gpt.forward_all_stages(ids, attention_mask=mask)
        # exit at boundary layer b reads hs[b + 1]; the last exit also subtracts backout (the backout layer's stream)
        *inner, last = cfg.poe_stage_boundary_layers
        for k, b in enumerate(inner):
            assert torch.equal(gpt.exit_logits(hs[b + 1], b), exits[k])
        served = hs[last + 1] - gpt.backout_lambda * hs[cfg.backout_layer + 1]
        assert torch.equal(gpt.exit_logits(served, last), exits[-1])
        assert torch.equal(exits[-1], out.logits)
        # logits_to_keep narrows the logits only
        kept = tiny_model(ids, attention_mask=mask, output_hidden_states=True, logits_to_keep=1)
        assert kept.logits.shape[1] == 1 and all(torch.equal(a, b) for a, b in zip(kept.hidden_states, hs))
        assert tiny_model(ids).hidden_states is None


def test_generate_returns_hidden_states(tiny_model):
    ids, mask = left_padded_batch()
    out = tiny_model.generate(ids, attention_mask=mask, max_new_tokens=3, min_new_tokens=3, do_sample=False,
                              output_hidden_states=True, return_dict_in_generate=True)
    assert len(out.hidden_states) == 3
    assert [h.shape[1] for h in out.hidden_states[0]] == [12] * 5  # prefill: every position
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], dim=1)
    with torch.no_grad():
        ref = tiny_model(out.sequences, attention_mask=full_mask, output_hidden_states=True).hidden_states
    for step in (1, 2):  # a decode step's streams: its one new token, as a no-cache pass computes them
        for layer, h in enumerate(out.hidden_states[step]):
            torch.testing.assert_close(h, ref[layer][:, 11 + step:12 + step], rtol=1e-5, atol=1e-5)


def test_inputs_embeds_and_attentions_are_refused(tiny_model):
    ids = torch.randint(1, 512, (1, 5))
    embeds = tiny_model.get_input_embeddings()(ids)
    with pytest.raises(ValueError, match="inputs_embeds"):
        tiny_model(inputs_embeds=embeds)
    with pytest.raises(ValueError, match="inputs_embeds"):
        tiny_model(ids, inputs_embeds=embeds)
    with pytest.raises(ValueError, match="inputs_embeds"):
        tiny_model.generate(inputs_embeds=embeds, max_new_tokens=2)
    with pytest.raises(ValueError, match="output_attentions"):
        tiny_model(ids, output_attentions=True)


def test_return_dict_false_gives_a_tuple(tiny_model):
    ids = torch.randint(1, 512, (1, 5))
    with torch.no_grad():
        out = tiny_model(ids, labels=ids, return_dict=False)
        ref = tiny_model(ids, labels=ids)
    assert type(out) is tuple and len(out) == 2  # loss, logits (None fields are left out, HF-style)
    assert torch.equal(out[0], ref.loss) and torch.equal(out[1], ref.logits)


# -----------------------------------------------------------------------------
# dynamic quantization


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_dynamic_quantization_quantizes_every_matrix(tiny_model):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import quantize_dynamic

    ids, mask = left_padded_batch()
    n = sum(isinstance(m, nn.Linear) for m in tiny_model.modules())
    assert n == 4 * 6 + 2 + 2  # per layer q, k, v, c_proj, c_fc, c_proj; two ve_gates; lm_head and smear_gate
    quantized = quantize_dynamic(tiny_model, {nn.Linear}, dtype=torch.qint8)
    assert sum(isinstance(m, DynamicLinear) for m in quantized.modules()) == n  # nothing skipped
    assert not any(isinstance(m, nn.Linear) for m in quantized.modules())
    with torch.no_grad():
        ref = tiny_model(ids, attention_mask=mask).logits
        q = quantized(ids, attention_mask=mask).logits
    assert not torch.equal(q, ref) and (q - ref).abs().max() < 0.5  # int8 weights: close, not equal
    out = quantized.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False)
    assert out.shape == (2, 16)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::UserWarning")
def test_packing_leaves_plain_matrices_behind_for_quantization():
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from torch.ao.quantization import quantize_dynamic

    from cognica_poe.packed import Linear as PackedLinear
    from cognica_poe.packed import count_packed, packing_supported

    if not packing_supported(torch.zeros(1)):
        pytest.skip("this build has no oneDNN packing")
    model = perturbed_model(n_layer=2, n_embd=256, n_head=2, n_kv_head=1, poe_every=1)
    n = sum(type(m) is nn.Linear for m in model.modules())
    assert n == 2 * 6 + 1 + 2  # per layer q, k, v, c_proj, c_fc, c_proj; one ve_gate; lm_head and smear_gate
    assert model.pack_weights() > 0 and any(isinstance(m, PackedLinear) for m in model.modules())
    model.unpack_weights()
    assert count_packed(model) == 0 and sum(type(m) is nn.Linear for m in model.modules()) == n
    model.pack_weights()
    model.to(torch.float32)  # .to() drops the packed copies too
    assert sum(type(m) is nn.Linear for m in model.modules()) == n
    quantized = quantize_dynamic(model, {nn.Linear}, dtype=torch.qint8)
    assert sum(isinstance(m, DynamicLinear) for m in quantized.modules()) == n

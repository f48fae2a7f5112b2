"""Weight-only int8 / int4 quantization (quantize.py): every mode runs, folders round-trip, training refuses it."""

import os

import pytest
import torch
from conftest import bundled_text, perturbed_model, shared_path

from cognica_poe.checkpoint import export_hf_folder, load_model, save_quantized
from cognica_poe.cli import main
from cognica_poe.hf import CognicaPoEForCausalLM
from cognica_poe.packed import count_packed
from cognica_poe.quantize import QuantizedLinear, check_trainable, quantize_model, quantized_names

GROUP = 32  # the tiny model's matrices have 64 or 256 inputs


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 512, (2, 9), generator=g)
    ids[:, 0] = 0
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :3] = 0  # the second row left-padded
    ids[1, 3] = 0
    return ids, mask


def every_mode(model: CognicaPoEForCausalLM) -> dict[str, torch.Tensor]:
    ids, mask = batch()
    with torch.no_grad():
        out = {"exits": torch.stack(model.gpt.forward_all_stages(ids, attention_mask=mask))}
    kw = dict(attention_mask=mask, max_new_tokens=6, stop_tokens=[])
    out["full"] = model.generate_stage(ids, stage=model.poe_n_stages - 1, **kw)
    out["stage"] = model.generate_stage(ids, stage=1, **kw)
    out["sampled"] = model.generate_stage(ids, stage=1, do_sample=True, top_k=20, seed=3, **kw)
    out["speculative"] = model.generate_speculative(ids, draft_stage=0, k_draft=2, **kw)
    out["compose"] = model.generate_parallel_composition(ids, stages=[0, 1], **kw)
    out["wand"] = model.generate_wand(ids, safety=1.0, p99_bounds=[0.5, 0.5, 0.5], **kw)
    out["hf"] = model.generate(ids, attention_mask=mask, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    return out


@pytest.mark.parametrize("bits,group", [(8, None), (4, 32), (4, 64)])
def test_quantized_linear_multiplies_by_the_dequantized_matrix(bits, group):
    from cognica_poe.quantize import int4_weight, int8_weight

    torch.manual_seed(0)
    lin = torch.nn.Linear(128, 48, bias=False)
    if bits == 8:
        q, scales = int8_weight(lin.weight)
        w = scales[:, None] * q.float()
    else:
        q, scales, zeros = int4_weight(lin.weight, group)
        w = ((q.float().view(48, -1, group) - 8) * scales[..., None] + zeros[..., None]).view(48, 128)
    m = QuantizedLinear.from_linear(lin, bits, group)
    x = torch.randn(2, 3, 128)
    torch.testing.assert_close(m(x), x @ w.t(), rtol=1e-5, atol=1e-5)
    assert (w - lin.weight).abs().max() <= scales.max() / 2 + 1e-6  # rounding: at most half a step
    back = QuantizedLinear(128, 48, bits, group)  # the saved layout reads back to the same kernel buffers
    back.load_portable(m.portable())
    for k, v in m.state_dict().items():
        assert torch.equal(v, back.state_dict()[k]), k


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_every_block_matrix_and_head_is_quantized_and_never_packed(mode):
    model = perturbed_model()
    names = quantize_model(model.gpt, mode, GROUP)
    layer = ["attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"]
    assert names == [f"transformer.h.{i}.{m}" for i in range(4) for m in layer] + ["lm_head"]
    assert all(isinstance(model.gpt.get_submodule(n), QuantizedLinear) for n in names)
    assert model.gpt.transformer.wte.weight.dtype == torch.float32  # embeddings stay float
    model.pack_weights()
    assert count_packed(model) == 0  # a quantized matrix is not packed (the tiny float ones are below the threshold)
    assert quantized_names(perturbed_model().gpt, heads=False)[-1] == "transformer.h.3.mlp.c_proj"


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_modes_run_and_speculative_greedy_equals_plain_greedy(mode):
    model = perturbed_model()
    quantize_model(model.gpt, mode, GROUP)
    out = every_mode(model)
    ids, _ = batch()
    for k in ("full", "stage", "sampled", "speculative", "compose", "wand", "hf"):
        assert out[k].shape == (2, ids.size(1) + 6), k
    assert torch.isfinite(out["exits"]).all()
    # lossless self-speculation: greedy drafts verified by the full exit give the full exit's own greedy tokens
    assert torch.equal(out["speculative"], out["full"])
    assert torch.equal(out["hf"], out["full"])


def test_int8_stays_close_to_the_float_model():
    model = perturbed_model()
    ids, mask = batch()
    with torch.no_grad():
        ref = torch.stack(model.gpt.forward_all_stages(ids, attention_mask=mask))
        quantize_model(model.gpt, "int8")
        got = torch.stack(model.gpt.forward_all_stages(ids, attention_mask=mask))
    assert (got - ref).abs().max() < 0.05 * ref.abs().max()
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.95


@pytest.mark.parametrize("mode,dtype", [("int8", "float32"), ("int4", "float32"), ("int8", "bfloat16")])
def test_quantized_folder_round_trip_is_exact(tmp_path, mode, dtype):
    src = export_hf_folder(perturbed_model(), None, str(tmp_path / "float"), dtype=dtype)
    model = load_model(src, quantize=mode, group_size=GROUP)
    out = save_quantized(model, None, str(tmp_path / "q"))
    assert {"quantization.json", "model.safetensors", "config.json"} <= set(os.listdir(out))
    back = load_model(out)  # loads as saved: the same buffers bit for bit, nothing re-quantized
    sd, sd_back = model.gpt.state_dict(), back.gpt.state_dict()
    assert sd.keys() == sd_back.keys()
    for k in sd:
        assert sd[k].dtype == sd_back[k].dtype and torch.equal(sd[k], sd_back[k]), k
    ids, mask = batch()
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, back(ids, attention_mask=mask).logits)
    assert load_model(out, quantize=mode, group_size=GROUP).gpt.lm_head.bits == model.gpt.lm_head.bits
    other = "int4" if mode == "int8" else "int8"
    with pytest.raises(ValueError, match="already quantized"):
        load_model(out, quantize=other)


def test_training_and_transformers_refuse_quantized_weights(tmp_path):
    from cognica_poe.train.optim import MuonAdamW

    model = perturbed_model()
    quantize_model(model.gpt, "int8")
    with pytest.raises(ValueError, match="cannot be trained or sharded"):
        check_trainable(model.gpt)
    with pytest.raises(ValueError, match="cannot be trained or sharded"):
        MuonAdamW(model.gpt, batch_tokens=1024)
    out = save_quantized(model, None, str(tmp_path / "q"))
    with pytest.raises(ValueError, match="is a quantized folder"):
        CognicaPoEForCausalLM.from_pretrained(out)


def test_int4_refuses_a_group_size_that_does_not_divide_and_leaves_the_model_as_it_was():
    model = perturbed_model()
    with pytest.raises(ValueError, match=r"transformer\.h\.0\.attn\.c_q: int4 with group size 48"):
        quantize_model(model.gpt, "int4", 48)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


@pytest.mark.parametrize("group", [8, 16])
def test_int4_refuses_a_group_size_the_kernel_cannot_run_before_anything_changes(group):
    """torch's int4 CPU kernel takes groups of 32, 64, 128 or 256 only: any other size is refused at quantize time
    (it used to quantize, then fail inside the first forward)."""
    model = perturbed_model()
    with pytest.raises(ValueError, match=rf"int4 group size {group}: choose 32, 64, 128 or 256"):
        quantize_model(model.gpt, "int4", group)
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


def test_cli_quantize_then_generate(tmp_path, capsys):
    from cognica_poe.tokenizer_train import train_bpe

    tok = train_bpe(iter(bundled_text(60_000).split("\n\n")), vocab_size=512)
    src = export_hf_folder(perturbed_model(vocab_size=len(tok)), tok, str(tmp_path / "float"), dtype="float32")
    out = str(tmp_path / "q4")
    assert main(["quantize", src, out, "--bits", "4", "--group-size", str(GROUP)]) == 0
    assert main(["quantize", src, out, "--bits", "4"]) == 2  # exists: never replaced without --overwrite
    assert main(["quantize", out, str(tmp_path / "again")]) == 2
    assert "already quantized" in capsys.readouterr().err
    assert main(["generate", out, "Hello", "--mode", "speculative", "--max-new-tokens", "4"]) == 0
    assert main(["generate", src, "Hello", "--quantize", "int8", "--mode", "wand", "--max-new-tokens", "4"]) == 0
    assert main(["generate", out, "Hello", "--quantize", "int8", "--max-new-tokens", "4"]) == 2
    assert "already quantized" in capsys.readouterr().err


def test_top1_agreement_counts_any_of_the_references_tied_top_tokens():
    """bf16 logits tie exactly at the top on a few percent of positions; any tied token is a greedy pick of the
    reference, so picking another one of them agrees (strictly, only reference's own argmax does)."""
    from cognica_poe.bpb import top1_counts

    reference = torch.tensor([[1.0, 3.0, 3.0, 0.0],   # tokens 1 and 2 tie at the top
                              [5.0, 1.0, 0.0, 0.0],   # no tie
                              [2.0, 2.0, 1.0, 0.0]])  # tokens 0 and 1 tie
    logits = torch.tensor([[0.0, 1.0, 2.0, 0.0],      # picks 2: tied top-1 of the reference
                           [0.0, 3.0, 0.0, 0.0],      # picks 1: disagrees
                           [0.0, 0.0, 0.0, 1.0]])     # picks 3: disagrees
    assert top1_counts(reference, logits) == (1, 0, 2)
    assert top1_counts(reference, reference) == (3, 3, 2)


# top-1 agreement bars: the issue's 99% (int8) and 95% (int4) against bf16, counting any of bf16's exactly tied top
# tokens as its pick (bpb.top1_counts); strictly against bf16's argmax, int8 reaches 98.5-98.7% and even the fp32
# weights fall short of 99%: bf16's logits tie at the top on about 2% of this model's positions
# int4 (round-to-nearest, groups of 64) meets the BPB bar but not the 95% agreement on this small model: the
# strict xfail records that gap (it fails loudly once a better int4 closes it); 90% guards against regressions
INT4_GAP = "plain round-to-nearest int4 falls short of 95% top-1 agreement on poe-d8-classics (issue 13, open)"


# GPTQ (groups of 32, lm_head kept in bf16) closes int4's gap when calibrated on text like the held-out text: the
# last 16k tokens of the training split (War and Peace prose, as the held-out documents are) give 95.8, 95.8, 95.8,
# 95.2% strict top-1 agreement at the four exits on these 7,936 tokens, BPB within 0.06%. Calibrated on the start of the
# split instead (Shakespeare's verse) the later exits fall to 94.3-94.7%. Tried without a gain on this model:
# act-order with static groups (gptq_int4's act_order), 4x the calibration tokens, damp 0.001 to 0.1, calibrating
# each block on the outputs of the blocks already quantized, and a least-squares refit of the scales and zeros
D8_QUANTIZED = {}


@pytest.fixture(scope="module")
def d8_corpus(tmp_path_factory):
    """poe-d8-classics' corpus as one file, which Corpus splits as the model was trained (its README): the last 1/20
    of the documents (the end of War and Peace) held out."""
    from cognica_poe.train.data import Corpus

    texts = []
    for name in ("tinyshakespeare.txt", "warpeace.txt"):
        with open(shared_path("data", name), encoding="utf-8") as f:
            texts.append(f.read().strip())
    path = tmp_path_factory.mktemp("classics") / "classics.txt"
    path.write_text("\n\n".join(texts), encoding="utf-8")
    return Corpus(str(path))


@pytest.mark.parametrize("mode,bpb_tol,min_agree,gptq", [
    ("int8", 0.005, 0.99, False), ("int4", 0.03, 0.85, False),
    pytest.param("int4", 0.03, 0.95, False, marks=pytest.mark.xfail(strict=True, reason=INT4_GAP)),
    ("int4", 0.01, 0.95, True)])
def test_d8_quantized_quality_against_bf16(d8_model, d8_corpus, mode, bpb_tol, min_agree, gptq):
    """poe-d8-classics' held-out documents: per-exit BPB within 0.5% (int8) / 3% (int4) of bf16, greedy top-1
    agreement with bf16 at every exit. gptq: int4 calibrated on the end of the training split (groups of 32,
    lm_head bf16), the tokens bench/inference.py's quality part calibrates on."""
    import copy

    from cognica_poe.bpb import quality_against
    from cognica_poe.train.data import documents_stream, last_docs

    model, tok = d8_model
    bf16 = copy.deepcopy(model).to(torch.bfloat16)
    if (mode, gptq) not in D8_QUANTIZED:  # the passing and the xfail case of a recipe share one quantization
        quant = copy.deepcopy(bf16)
        if gptq:
            text = last_docs(list(d8_corpus.docs("train")), tok, 64 * 256)
            calibration = documents_stream(text, tok, 64 * 256).view(64, 256)
            quantize_model(quant.gpt, mode, 32, heads=False, calibration=calibration)
        else:
            quantize_model(quant.gpt, mode, 64)
        D8_QUANTIZED[mode, gptq] = quant
    quant = D8_QUANTIZED[mode, gptq]
    stream = documents_stream(d8_corpus.docs("val"), tok, 8192)
    got = quality_against(quant.gpt, bf16.gpt, stream, tok.token_bytes(), seq_len=256, batch_size=8)
    for s, change in enumerate(got["bpb_change"]):
        assert abs(change) <= bpb_tol, (s, got["reference_bpb"][s], got["bpb"][s])
    for s, agree in enumerate(got["top1_agreement"]):
        assert agree >= min_agree, (s, agree)


def test_gptq_int4_moves_the_outputs_on_its_calibration_inputs_less_than_plain_rounding():
    """GPTQ minimises the error of X W^T over the inputs it was calibrated on (correlated, of unequal scale, as
    a model's are), where plain rounding minimises the weights' own error."""
    from cognica_poe.quantize import gptq_int4, int4_weight

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(512, 128,
                                                                                                 generator=g)
    x = x * torch.linspace(0.2, 3, 128)  # some inputs carry more than others

    def dequant(q, s, z):
        return ((q.float().view(64, -1, 32) - 8) * s[..., None] + z[..., None]).view(64, 128)

    rtn, gptq = dequant(*int4_weight(w, 32)), dequant(*gptq_int4(w, x.t() @ x, 32))
    q, _, _ = gptq_int4(w, x.t() @ x, 32)
    assert q.min() >= 0 and q.max() <= 15
    err_rtn, err_gptq = (x @ (rtn - w).t()).norm(), (x @ (gptq - w).t()).norm()
    assert err_gptq < 0.7 * err_rtn, (err_gptq, err_rtn)
    # through the kernel, with the hessian as quantize_model gathers it, the same matrix comes back
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data = w
    m = QuantizedLinear.from_linear(lin, 4, 32, hessian=x.t() @ x)
    torch.testing.assert_close(m(x), x @ gptq.t(), rtol=1e-4, atol=1e-4)


def test_gptq_act_order_with_static_groups_does_at_least_as_well_on_inputs_of_unequal_scale():
    """act-order rounds the inputs that carry most first (here the last columns: plain order reaches them when no
    column is left to absorb their error), on groups fitted to the original weights before the sweep: the stored
    layout is unchanged, so the kernel multiplies by the same matrix."""
    from cognica_poe.quantize import gptq_int4, int4_group_fit

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 128, generator=g) * 0.05
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 128, generator=g) + 0.1 * torch.randn(512, 128,
                                                                                                 generator=g)
    x = x * torch.linspace(0.2, 3, 128)
    h = x.t() @ x

    def dequant(q, s, z):
        return ((q.float().view(64, -1, 32) - 8) * s[..., None] + z[..., None]).view(64, 128)

    plain, act = gptq_int4(w, h, 32), gptq_int4(w, h, 32, act_order=True)
    err_plain, err_act = (x @ (dequant(*plain) - w).t()).norm(), (x @ (dequant(*act) - w).t()).norm()
    assert err_act <= err_plain, (err_act, err_plain)
    # static groups: each group's scale and zero are those of the original weights, whatever the order did
    s, z = int4_group_fit(w.reshape(-1, 32))
    torch.testing.assert_close(act[1], s.view(64, 4))
    torch.testing.assert_close(act[2], z.view(64, 4))
    lin = torch.nn.Linear(128, 64, bias=False)
    lin.weight.data = w
    m = QuantizedLinear.from_linear(lin, 4, 32, hessian=h, act_order=True)
    torch.testing.assert_close(m(x), x @ dequant(*act).t(), rtol=1e-4, atol=1e-4)


def test_quantize_model_with_calibration_tokens_uses_gptq_and_stays_closer_to_the_float_model():
    model = perturbed_model()
    g = torch.Generator().manual_seed(2)
    calib = torch.randint(1, 512, (4, 32), generator=g)
    calib[:, 0] = 0
    ids, mask = batch()
    with torch.no_grad():
        ref = torch.stack(model.gpt.forward_all_stages(calib))
        plain, gptq = perturbed_model(), perturbed_model()
        quantize_model(plain.gpt, "int4", GROUP)
        quantize_model(gptq.gpt, "int4", GROUP, calibration=calib)
        err_plain = (torch.stack(plain.gpt.forward_all_stages(calib)) - ref).norm()
        err_gptq = (torch.stack(gptq.gpt.forward_all_stages(calib)) - ref).norm()
    assert err_gptq < err_plain, (err_gptq, err_plain)
    assert torch.equal(gptq.generate_speculative(ids, draft_stage=0, k_draft=2, attention_mask=mask, max_new_tokens=5,
                                                 stop_tokens=[]),
                       gptq.generate_stage(ids, stage=3, attention_mask=mask, max_new_tokens=5, stop_tokens=[]))


def test_cli_quantize_with_calibration_text(tmp_path, capsys):
    from safetensors.torch import load_file

    from cognica_poe.tokenizer_train import train_bpe

    text = bundled_text(60_000)
    tok = train_bpe(iter(text.split("\n\n")), vocab_size=512)
    src = export_hf_folder(perturbed_model(vocab_size=len(tok)), tok, str(tmp_path / "float"), dtype="float32")
    calib = tmp_path / "calib.txt"
    calib.write_text(text[:20_000], encoding="utf-8")
    plain, gptq = str(tmp_path / "plain"), str(tmp_path / "gptq")
    assert main(["quantize", src, plain, "--bits", "4", "--group-size", str(GROUP)]) == 0
    assert main(["quantize", src, gptq, "--bits", "4", "--group-size", str(GROUP), "--calibration", str(calib),
                 "--calibration-tokens", "2048"]) == 0
    a, b = load_file(os.path.join(plain, "model.safetensors")), load_file(os.path.join(gptq, "model.safetensors"))
    assert a.keys() == b.keys() and not torch.equal(a["transformer.h.0.mlp.c_fc.qweight"],
                                                    b["transformer.h.0.mlp.c_fc.qweight"])
    assert main(["generate", gptq, "Hello", "--max-new-tokens", "4"]) == 0
    capsys.readouterr()
    assert main(["quantize", src, str(tmp_path / "q8"), "--bits", "8", "--calibration", str(calib)]) == 2
    assert "--calibration applies to --bits 4" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("Too short.", encoding="utf-8")
    assert main(["quantize", src, str(tmp_path / "q4"), "--bits", "4", "--group-size", str(GROUP),
                 "--calibration", str(tmp_path / "short.txt")]) == 2
    assert "calibration needs at least" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "q8") and not os.path.exists(tmp_path / "q4")

"""The MLX backend: the same numbers and the same tokens as the PyTorch model on the same folder, in every mode."""

import json
import os
import sys

import numpy as np
import pytest
import torch
from conftest import bundled_text, perturbed_model, specialize

mx = pytest.importorskip("mlx.core", reason="MLX is not installed here: pip install 'cognica-poe[mlx]' "
                                            "(mlx[cpu] on Linux)")
import mlx.nn as nn  # noqa: E402

from cognica_poe import CognicaPoEForCausalLM  # noqa: E402
from cognica_poe import mlx as pm  # noqa: E402
from cognica_poe.checkpoint import export_hf_folder, save_stage_folder  # noqa: E402
from cognica_poe.cli import main as cli_main  # noqa: E402
from cognica_poe.mlx.bpb import exit_bpb  # noqa: E402
from cognica_poe.mlx.model import Block  # noqa: E402
from cognica_poe.tokenizer import CognicaPoETokenizer  # noqa: E402
from cognica_poe.tokenizer_train import train_bpe  # noqa: E402

N_NEW = 64
BOUNDS = [0.05, 0.05, 0.05]  # small WAND bounds on the tiny model: tokens exit at every stage


def as_np(a) -> np.ndarray:
    return np.array(a.astype(mx.float32)) if isinstance(a, mx.array) else a.float().numpy()


def max_diff(a, b) -> float:
    return float(np.abs(as_np(a) - as_np(b)).max())


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    """A tiny model (GQA, value embeddings, smear, backout, windows of 128 of 512) exported in fp32 with a BPE."""
    tok = train_bpe(iter(bundled_text(50_000).split("\n\n")), vocab_size=512)
    model = perturbed_model(sequence_len=512, vocab_size=len(tok))
    return export_hf_folder(model, tok, str(tmp_path_factory.mktemp("mlx") / "hf"), dtype="float32")


@pytest.fixture(scope="module")
def pair(folder) -> tuple:
    """The PyTorch and the MLX model read from the same folder."""
    return CognicaPoEForCausalLM.from_pretrained(folder).eval(), pm.load(folder)


@pytest.fixture(scope="module")
def prompt(folder) -> list[int]:
    """BOS + 80 tokens: with 64 new ones the context passes the 128-token window."""
    bos = CognicaPoETokenizer.from_pretrained(folder).bos_token_id
    return [bos] + torch.randint(0, bos, (80,), generator=torch.Generator().manual_seed(1)).tolist()


# -----------------------------------------------------------------------------
# the trunk


def test_every_exit_matches_torch_uncached_and_cached(pair):
    tm, mm = pair
    ids = torch.randint(0, 512, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = tm.gpt.forward_all_stages(ids)
    got = mm.forward_all_stages(mx.array(ids.numpy()))
    assert len(got) == 4
    for r, g in zip(ref, got):
        assert max_diff(r, g) <= 1e-4
    # the cache: a prompt chunk, a chunk of 3 (masks with a slot offset), then single tokens past the window
    cache, last, pieces = mm.new_cache(), mm.config.n_layer - 1, []
    for a, b in [(0, 250), (250, 253)] + [(t, t + 1) for t in range(253, 300)]:
        start = cache.claim(mx.array(ids[:, a:b].numpy()))
        pieces.append(mm.exit_logits(mm.run(cache, start, b, 0, last, [last], keep=0)[last], last))
    assert max_diff(ref[-1], mx.concatenate(pieces, axis=1)) <= 1e-4


def test_bf16_is_close_to_fp32_and_to_torch_bf16(folder, pair):
    tm, mm = pair
    ids = torch.randint(0, 512, (1, 64), generator=torch.Generator().manual_seed(2))
    m16 = pm.load(folder, dtype="bfloat16")
    assert m16.dtype == mx.bfloat16 and m16.layers[0].attn.c_q.weight.dtype == mx.bfloat16
    with torch.no_grad():
        t16 = CognicaPoEForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).gpt.forward_all_stages(ids)
    fp32 = mm.forward_all_stages(mx.array(ids.numpy()))
    for a, b, c in zip(m16.forward_all_stages(mx.array(ids.numpy())), t16, fp32):
        assert a.dtype == mx.float32  # logits come out in fp32 whatever the weights
        assert max_diff(a, b) < 0.1 and max_diff(a, c) < 0.1


def test_prefix_pruning_runs_only_the_stage_layers(pair, prompt, monkeypatch):
    _, mm = pair
    calls = []
    original = Block.__call__

    def counting(self, x, ids, step, cache):
        calls.append(self.attn.layer)
        return original(self, x, ids, step, cache)

    monkeypatch.setattr(Block, "__call__", counting)
    out = pm.generate_stage(mm, prompt, stage=1, max_new_tokens=8, stop_tokens=[])
    assert len(out) == len(prompt) + 8
    assert sorted(set(calls)) == [0, 1]  # the prompt and 7 decode steps, only layers 0 and 1
    assert len(calls) == 2 * 8


# -----------------------------------------------------------------------------
# the modes: greedy tokens equal PyTorch's


def torch_tokens(tm, prompt, mode, **kw):
    ids = torch.tensor([prompt])
    if mode == "wand":
        out, used = tm.generate_wand(ids, return_stages_used=True, **kw)
        used = used.tolist() if isinstance(used, torch.Tensor) else used
        return out[0].tolist(), [s for s in (used[0] if used and isinstance(used[0], list) else used) if s >= 0]
    fn = {"stage": tm.generate_stage, "speculative": tm.generate_speculative,
          "compose": tm.generate_parallel_composition}[mode]
    return fn(ids, **kw)[0].tolist(), None


@pytest.mark.parametrize("mode, kw", [
    ("stage", dict(stage=-1)), ("stage", dict(stage=0)), ("stage", dict(stage=2)),
    ("speculative", dict(draft_stage=0, k_draft=3)), ("speculative", dict(draft_stage=1, k_draft=5)),
    ("compose", dict(stages=[0, 3])), ("compose", dict(stages=[0, 1, 2, 3], stage_weights=[0.5, 1, 1, 2])),
    ("wand", dict(p99_bounds=BOUNDS)),
])
def test_greedy_tokens_match_torch(pair, prompt, mode, kw):
    tm, mm = pair
    ref, ref_used = torch_tokens(tm, prompt, mode, max_new_tokens=N_NEW, stop_tokens=[], **kw)
    if mode == "wand":
        got, used = pm.generate_wand(mm, prompt, max_new_tokens=N_NEW, stop_tokens=[], return_stages_used=True, **kw)
        assert used == ref_used and len(set(used)) == 4  # every stage decided some token
    else:
        fn = {"stage": pm.generate_stage, "speculative": pm.generate_speculative,
              "compose": pm.generate_parallel_composition}[mode]
        got = fn(mm, prompt, max_new_tokens=N_NEW, stop_tokens=[], **kw)
    assert len(got) == len(prompt) + N_NEW
    assert got == ref


def test_speculative_greedy_is_full_greedy(pair, prompt):
    _, mm = pair
    full = pm.generate_stage(mm, prompt, stage=-1, max_new_tokens=N_NEW, stop_tokens=[])
    for draft_stage, k in [(0, 1), (1, 2), (2, 4)]:
        out, acceptance = pm.generate_speculative(mm, prompt, max_new_tokens=N_NEW, draft_stage=draft_stage,
                                                  k_draft=k, stop_tokens=[], return_acceptance=True)
        assert out == full
        assert 0 < acceptance < 1  # some drafts were rejected and rolled back


def test_sampling_is_seeded_and_follows_top_k_top_p(pair, prompt):
    _, mm = pair
    greedy = pm.generate_stage(mm, prompt, stage=-1, max_new_tokens=24, stop_tokens=[])
    kw = dict(stage=-1, max_new_tokens=24, stop_tokens=[], do_sample=True)
    a = pm.generate_stage(mm, prompt, seed=7, **kw)
    assert a == pm.generate_stage(mm, prompt, seed=7, **kw)
    assert a != pm.generate_stage(mm, prompt, seed=8, **kw)
    assert a != greedy
    assert pm.generate_stage(mm, prompt, seed=7, top_k=1, **kw) == greedy
    assert pm.generate_stage(mm, prompt, seed=7, top_p=1e-6, **kw) == greedy
    assert pm.generate_stage(mm, prompt, seed=7, temperature=1e-4, **kw) == greedy
    # speculative sampling and WAND sampling: seeded, and the same settings give the same draws
    s = pm.generate_speculative(mm, prompt, max_new_tokens=24, stop_tokens=[], do_sample=True, seed=3, top_k=50)
    assert s == pm.generate_speculative(mm, prompt, max_new_tokens=24, stop_tokens=[], do_sample=True, seed=3,
                                        top_k=50)
    assert len(s) == len(prompt) + 24 and s != greedy
    w = pm.generate_wand(mm, prompt, p99_bounds=BOUNDS, max_new_tokens=24, stop_tokens=[], do_sample=True, seed=3)
    assert w == pm.generate_wand(mm, prompt, p99_bounds=BOUNDS, max_new_tokens=24, stop_tokens=[], do_sample=True,
                                 seed=3)


def test_streaming_and_stop_tokens(pair, prompt):
    _, mm = pair
    full = pm.generate_stage(mm, prompt, stage=-1, max_new_tokens=16, stop_tokens=[])
    for fn, kw in [(pm.generate_stage, dict(stage=-1)), (pm.generate_speculative, dict(k_draft=4)),
                   (pm.generate_wand, dict(p99_bounds=BOUNDS))]:
        seen = []
        out = fn(mm, prompt, max_new_tokens=16, stop_tokens=[],
                 streamer=lambda row, t, seen=seen: seen.append((row, t)), **kw)
        assert [t for _, t in seen] == out[len(prompt):] and {r for r, _ in seen} == {0}
    stop = full[len(prompt) + 5]  # the 6th new token (first occurrence): generation ends with it
    first = full[len(prompt):].index(stop)
    out = pm.generate_speculative(mm, prompt, max_new_tokens=16, stop_tokens=[stop], k_draft=3)
    assert out == full[:len(prompt) + first + 1]


def test_bad_requests_are_clear_errors(pair, prompt, tmp_path):
    _, mm = pair
    with pytest.raises(ValueError, match="stage 4 out of range"):
        pm.generate_stage(mm, prompt, stage=4)
    with pytest.raises(ValueError, match="one sequence at a time"):
        pm.generate_stage(mm, [prompt, prompt], stage=0)
    with pytest.raises(ValueError, match="draft_stage 3 is the last stage"):
        pm.generate_speculative(mm, prompt, draft_stage=3)
    with pytest.raises(ValueError, match="k_draft"):
        pm.generate_speculative(mm, prompt, k_draft=0)
    with pytest.raises(ValueError, match="p99_bounds needs 3 values"):
        pm.generate_wand(mm, prompt, p99_bounds=[1.0])
    with pytest.raises(ValueError, match="exceeds the context of 512"):
        pm.generate_stage(mm, prompt, stage=0, max_new_tokens=500)
    with pytest.raises(ValueError, match="token ids must be in 0..511"):
        pm.generate_stage(mm, [503, 512], stage=0)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        pm.load(str(tmp_path))
    with pytest.raises(ValueError, match="unknown dtype"):
        pm.load(str(tmp_path), dtype="int3")


# -----------------------------------------------------------------------------
# specialist stage folders


def test_specialist_stage_folders_match_torch(folder, tmp_path):
    """A base, a child stage (dual) and a grandchild (spec): ancestor heads folded as the PyTorch cascade folds."""
    base = CognicaPoEForCausalLM.from_pretrained(folder).eval()
    child = specialize(base, 1, head_mode="dual", seed=1)
    with torch.no_grad():
        for p in child.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    child_dir = save_stage_folder(child, str(tmp_path / "child"), folder)
    grand = specialize(CognicaPoEForCausalLM.from_pretrained(child_dir).eval(), 2, head_mode="spec", seed=2)
    with torch.no_grad():
        for p in grand.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    grand_dir = save_stage_folder(grand, str(tmp_path / "grand"), "../child")
    ids = torch.randint(0, 512, (1, 150), generator=torch.Generator().manual_seed(3))
    tm, mm = CognicaPoEForCausalLM.from_pretrained(grand_dir).eval(), pm.load(grand_dir)
    assert mm.poe_stage_boundary_layers == tm.poe_stage_boundary_layers == [0, 1, 2, 3, 4, 6]
    with torch.no_grad():
        ref, served = tm.gpt.forward_all_stages(ids), tm(ids).logits
    for r, g in zip(ref, mm.forward_all_stages(mx.array(ids.numpy()))):
        assert max_diff(r, g) <= 1e-4
    assert max_diff(served, mm(mx.array(ids.numpy()))) <= 1e-4
    prompt = [base.config.bos_token_id] + ids[0, :40].tolist()
    assert pm.generate_speculative(mm, prompt, max_new_tokens=32, stop_tokens=[], draft_stage=4) == \
        tm.generate_speculative(torch.tensor([prompt]), max_new_tokens=32, stop_tokens=[], draft_stage=4)[0].tolist()


# -----------------------------------------------------------------------------
# quantization and mlx_lm


def test_quantize_bits_and_group_size(folder, pair):
    _, mm = pair
    ids = mx.array(np.arange(1, 100)[None])
    ref = mm.forward_all_stages(ids)
    err = {}
    for bits, group in [(8, 64), (4, 32), (4, 64)]:
        q = pm.quantize(pm.load(folder), bits=bits, group_size=group)
        attn = q.layers[0].attn
        assert (attn.c_q.bits, attn.c_q.group_size) == (bits, group)
        assert isinstance(q.transformer["wte"], nn.QuantizedEmbedding)
        # the value embeddings are 32 wide: quantized in groups of 32, left whole for groups of 64
        assert isinstance(q.layers[1].attn.value_embed, nn.QuantizedEmbedding) == (group == 32)
        assert isinstance(q.lm_head, nn.QuantizedLinear) and isinstance(q.layers[3].mlp.c_fc, nn.QuantizedLinear)
        for gate in (q.layers[1].attn.ve_gate, q.smear_gate):  # 12 and 24 channels wide: no whole groups
            assert not isinstance(gate, nn.QuantizedLinear)
        err[bits, group] = max(max_diff(a, b) for a, b in zip(ref, q.forward_all_stages(ids)))
    assert err[8, 64] < 0.05 and err[8, 64] < err[4, 64] / 4 and err[4, 32] < 0.5
    with pytest.raises(ValueError, match="bits must be one of"):
        pm.quantize(mm, bits=7)
    with pytest.raises(ValueError, match="group_size must be one of"):
        pm.quantize(mm, group_size=48)


def test_converted_folder_loads_here_and_in_mlx_lm(folder, pair, prompt, tmp_path):
    mlx_lm = pytest.importorskip("mlx_lm", reason="mlx-lm is not installed (it is in the [mlx] extra)")
    tm, _ = pair
    ref = tm.generate_stage(torch.tensor([prompt]), stage=-1, max_new_tokens=24, stop_tokens=[])[0].tolist()
    out = pm.convert(folder, str(tmp_path / "mlx"))
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["model_file"] == "cognica_poe_mlx.py"
    assert pm.generate_stage(pm.load(out), prompt, stage=-1, max_new_tokens=24, stop_tokens=[]) == ref
    model, tokenizer = mlx_lm.load(out, trust_remote_code=True, tokenizer_config={"trust_remote_code": True})
    from mlx_lm.generate import generate_step

    assert [int(t) for t, _ in generate_step(mx.array(prompt), model, max_tokens=24)] == ref[len(prompt):]
    text = mlx_lm.generate(model, tokenizer, prompt=prompt, max_tokens=8)
    assert isinstance(text, str) and text
    # mlx_lm's prompt-cache helpers: trim the cache back and continue from there
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([prompt]), cache=cache)
    assert trim_prompt_cache(cache, 5) == 5 and cache[0].offset == len(prompt) - 5
    assert max_diff(model(mx.array([prompt[-5:]]), cache=cache)[:, -1], model(mx.array([prompt]))[:, -1]) <= 1e-5
    # quantized: the folder says so, and both loaders rebuild the same quantized model
    q_dir = pm.convert(folder, str(tmp_path / "mlx-q8"), bits=8, group_size=32)
    with open(os.path.join(q_dir, "config.json")) as f:
        assert json.load(f)["quantization"] == {"group_size": 32, "bits": 8}
    ours = pm.load(q_dir)
    assert ours.layers[1].attn.value_embed.bits == 8
    theirs, _ = mlx_lm.load(q_dir, trust_remote_code=True, tokenizer_config={"trust_remote_code": True})
    ids = mx.array([prompt])
    assert max_diff(ours(ids), theirs(ids)) == 0.0
    with pytest.raises(FileExistsError):
        pm.convert(folder, q_dir)
    with pytest.raises(ValueError, match="already quantized"):
        pm.convert(q_dir, str(tmp_path / "twice"), bits=4)
    assert not os.path.exists(tmp_path / "twice")


# -----------------------------------------------------------------------------
# the CLI


def test_cli_backend_mlx_prints_what_torch_prints(folder, capsys):
    outputs = {}
    for backend in ("torch", "mlx"):
        for mode in ("full", "speculative", "wand"):
            argv = ["generate", folder, "To be, or not", "--mode", mode, "--max-new-tokens", "12", "--stop",
                    "--no-pack", "--backend", backend, "--p99-bounds", *map(str, BOUNDS)]
            assert cli_main(argv) == 0
            captured = capsys.readouterr()
            outputs[backend, mode] = captured.out
            assert f"[{mode}" in captured.err
    for mode in ("full", "speculative", "wand"):
        assert outputs["mlx", mode] == outputs["torch", mode] and outputs["mlx", mode].strip()


def test_cli_chat_backend_mlx_replies_as_torch_does(folder, capsys, monkeypatch):
    outputs = {}
    for backend in ("torch", "mlx"):
        answers = iter(["hello", "who are you?", ""])
        monkeypatch.setattr("builtins.input", lambda prompt="", answers=answers: next(answers))
        argv = ["chat", folder, "--max-new-tokens", "6", "--temperature", "0", "--no-pack", "--backend", backend]
        assert cli_main(argv) == 0
        outputs[backend] = capsys.readouterr().out
    assert outputs["mlx"].count("assistant> ") == 2 and outputs["mlx"] == outputs["torch"]
    assert all(len(line) > len("assistant> ") for line in outputs["mlx"].splitlines() if "assistant> " in line)


def test_cli_backend_mlx_without_mlx_is_one_clear_line(folder, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "cognica_poe.mlx" or m.startswith("cognica_poe.mlx.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "mlx", None)
    monkeypatch.setitem(sys.modules, "mlx.core", None)
    assert cli_main(["generate", folder, "hi", "--backend", "mlx"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("cognica-poe generate: error: --backend mlx: ") and "pip install 'cognica-poe[mlx]'" in err
    assert "Traceback" not in err


# -----------------------------------------------------------------------------
# the reference checkpoint


def heldout_stream(tok) -> list[int]:
    """The bundled corpus's last 1/20 of documents (the reference model's validation split), BOS-prefixed."""
    docs = [d.strip() for d in bundled_text().split("\n\n") if d.strip()]
    stream = []
    for doc in docs[-(len(docs) // 20):]:
        stream += [tok.bos_token_id] + tok(doc)["input_ids"]
    return stream


def test_d8_every_exit_matches_torch(d8_model):
    tm, tok = d8_model
    mm = pm.load(tm.name_or_path)
    ids = torch.tensor([heldout_stream(tok)[:160]])
    with torch.no_grad():
        ref = tm.gpt.forward_all_stages(ids)
    for r, g in zip(ref, mm.forward_all_stages(mx.array(ids.numpy()))):
        assert max_diff(r, g) <= 1e-4
    prompt = ids[0, :32].tolist()
    assert pm.generate_speculative(mm, prompt, max_new_tokens=N_NEW, stop_tokens=[]) == \
        tm.generate_stage(ids[:, :32], stage=-1, max_new_tokens=N_NEW, stop_tokens=[])[0].tolist()


def test_d8_quantized_8bit_bpb_within_1pct_of_bf16(d8_model):
    """Per-exit BPB on held-out text: 8-bit (group 64) against bf16. MLX's CPU build has no fast bf16 quantized
    product, so the 8-bit model computes in fp32 here; its weights are the same 8-bit codes either way."""
    tm, tok = d8_model
    stream, token_bytes = heldout_stream(tok), tok.token_bytes().numpy()
    bf16 = exit_bpb(pm.load(tm.name_or_path, dtype="bfloat16"), stream, token_bytes, seq_len=256, max_windows=1)
    q8 = exit_bpb(pm.quantize(pm.load(tm.name_or_path), bits=8), stream, token_bytes, seq_len=256, max_windows=1)
    q4 = exit_bpb(pm.quantize(pm.load(tm.name_or_path), bits=4), stream, token_bytes, seq_len=256, max_windows=1)
    for a, b, c in zip(bf16, q8, q4):
        assert abs(b - a) / a < 0.01, (bf16, q8)
        assert abs(c - a) > abs(b - a)  # 4 bits lose more than 8: the comparison sees quantization

"""
Compiled decode (compiled.py): every mode's tokens equal eager's, logits agree to rounding (a tolerance per dtype),
no recompiles once warm, the --compile flag, and the one-line fallback without a C++ compiler.

Compiling costs seconds per graph on CPU, so the tests share one compiled two-layer model (module scope) whose
graphs every test reuses: full depth, stage 0 (also the speculative drafter and WAND's first segment), verification,
and WAND's catch-up of stage 1 (one token, and several); bf16 adds one graph.
"""

import warnings

import pytest
import torch
from conftest import bundled_text, perturbed_model
from torch._dynamo.utils import counters

from cognica_poe import compiled
from cognica_poe.checkpoint import export_hf_folder
from cognica_poe.cli import main
from cognica_poe.compiled import compile_decode, eager_decode
from cognica_poe.tokenizer_train import train_bpe

needs_compiler = pytest.mark.skipif(compiled.find_cpp_compiler() is None, reason="inductor needs a C++ compiler")

# fp32 logits of a compiled step against eager: a different reduction order (attention over the whole masked
# buffer, inductor's fused kernels), so agreement to rounding; greedy tokens are compared exactly
FP32_ATOL = 1e-4
BF16_ATOL = 0.05  # a few bf16 roundings at the tiny model's logit scale (about 1)
KW = dict(max_new_tokens=12, stop_tokens=[])
BOUNDS = [0.1]  # WAND: two exits, one transition; with safety 1 some tokens exit at stage 0 and some at stage 1


def prompt(n: int, seed: int = 0) -> torch.Tensor:
    """BOS and n - 1 tokens: more than COMPILED_MAX_CHUNK, so the prompt itself runs eagerly."""
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.zeros(1, 1, dtype=torch.long), torch.randint(1, 512, (1, n - 1), generator=g)], dim=1)


def run_modes(model, ids: torch.Tensor, k_draft: int = 2) -> dict:
    return {"full": model.generate_stage(ids, stage=1, **KW),
            "stage0": model.generate_stage(ids, stage=0, **KW),
            "speculative": model.generate_speculative(ids, k_draft=k_draft, **KW),
            "wand": model.generate_wand(ids, safety=1.0, p99_bounds=BOUNDS, return_stages_used=True, **KW)}


@pytest.fixture(scope="module")
def pair():
    """(eager model, compiled model with the same weights), the compiled one warmed up on every mode."""
    eager = perturbed_model(n_layer=2)
    model = perturbed_model(n_layer=2)
    assert compile_decode(model.gpt)
    run_modes(model, prompt(20))
    yield eager, model
    eager_decode(model.gpt)


@needs_compiler
@pytest.mark.slow  # the module's compiled graphs are built here, about a minute on 2 cores
def test_every_mode_decodes_the_same_tokens_compiled(pair):
    eager, model = pair
    ids = prompt(24, seed=1)
    want, got = run_modes(eager, ids), run_modes(model, ids)
    for mode in ("full", "stage0", "speculative"):
        assert torch.equal(got[mode], want[mode]), mode
    assert torch.equal(got["wand"][0], want["wand"][0])
    assert got["wand"][1] == want["wand"][1]
    assert set(want["wand"][1]) == {0, 1}  # both exits taken: stage 1 caught up over several pending slots
    assert torch.equal(want["speculative"], want["full"])  # lossless, compiled or not


def step_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Full-depth logits of four cached decode steps after the prompt ids (the steps compiled when model is)."""
    cache = model.new_cache(1, 40)
    model.gpt(ids, kv_cache=cache)  # the prompt (eager in both)
    steps = [model.gpt(torch.tensor([[t]]), kv_cache=cache)[:, -1] for t in (5, 77, 300, 9)]
    assert cache.layer_len == [ids.size(1) + 4] * 2
    return torch.stack(steps)


@needs_compiler
@torch.no_grad()  # compiled decode serves inference: autograd off
def test_compiled_step_logits_match_eager(pair):
    eager, model = pair
    ids = prompt(20, seed=2)
    torch.testing.assert_close(step_logits(model, ids), step_logits(eager, ids), atol=FP32_ATOL, rtol=0)


@needs_compiler
@pytest.mark.slow  # a graph of its own (bf16)
@torch.no_grad()
def test_bf16_compiled_greedy_equals_eager_and_logits_within_tolerance():
    eager, model = (perturbed_model(n_layer=2).to(torch.bfloat16) for _ in range(2))
    assert compile_decode(model.gpt)
    ids = prompt(20, seed=5)
    torch.testing.assert_close(step_logits(model, ids), step_logits(eager, ids), atol=BF16_ATOL, rtol=0)
    for seed in range(3):
        ids = prompt(20, seed)
        assert torch.equal(model.generate_stage(ids, stage=1, **KW), eager.generate_stage(ids, stage=1, **KW))


@needs_compiler
def test_no_recompile_once_warm_over_many_steps_and_other_cache_sizes(pair):
    _, model = pair
    with torch.compiler.set_stance("fail_on_recompile"):
        run_modes(model, prompt(30, seed=3), k_draft=3)  # other prompt and cache lengths, another verification length
        model.generate_stage(prompt(18, seed=4), stage=1, max_new_tokens=60, stop_tokens=[])  # many steps


@needs_compiler
def test_a_fresh_compiled_model_whose_first_prompt_is_short_does_not_recompile_on_the_next():
    """A first prompt short enough to run compiled used to trace the rotary tables' construction into its graph
    (they did not exist yet), guarded on their absence: the next prompt then compiled that graph again."""
    model = perturbed_model(n_layer=2)
    assert compile_decode(model.gpt)
    short = prompt(10, seed=7)  # at most COMPILED_MAX_CHUNK tokens: the prompt itself runs compiled
    model.generate_stage(short, stage=1, **KW)
    with torch.compiler.set_stance("fail_on_recompile"):
        model.generate_stage(prompt(10, seed=8), stage=1, **KW)
    eager_decode(model.gpt)


@needs_compiler
@pytest.mark.slow  # its own graph, with every int8 product autotuned (about a minute on 2 cores)
@torch.no_grad()
def test_max_autotune_int8_freezes_the_weights_into_inductors_own_kernels_and_decodes_as_eager(monkeypatch):
    """Mode "max-autotune": on CPU the int8 weights become graph constants, so inductor can choose its C++ template
    for weight-only int8 (it takes constant weights only); greedy tokens equal eager int8's, logits within bf16's
    tolerance."""
    # lowering before quantized_lowerings, which needs it loaded first
    from torch._inductor import ir, lowering, quantized_lowerings, utils  # noqa: F401

    from cognica_poe.quantize import quantize_model

    eager, model = (perturbed_model(n_layer=2).to(torch.bfloat16) for _ in range(2))
    for m in (eager, model):
        quantize_model(m.gpt, "int8")
    considered = []  # (weight dtype, whether the weight is a frozen constant) of each product inductor lowers
    use_template = utils.use_cpp_gemm_template

    def spy(layout, mat1, mat2, *args, **kwargs):
        weight = mat2.unwrap_view() if isinstance(mat2, ir.BaseView) else mat2
        considered.append((mat2.get_dtype(), isinstance(weight, ir.StorageBox) and weight.is_module_buffer()))
        return use_template(layout, mat1, mat2, *args, **kwargs)

    monkeypatch.setattr(utils, "use_cpp_gemm_template", spy)
    monkeypatch.setattr(quantized_lowerings, "use_cpp_gemm_template", spy)
    assert compile_decode(model.gpt, "max-autotune")
    ids = prompt(20, seed=6)
    with torch._inductor.config.patch(force_disable_caches=True):  # lowered here, not read from a cache
        torch.testing.assert_close(step_logits(model, ids), step_logits(eager, ids), atol=BF16_ATOL, rtol=0)
    int8 = [frozen for dtype, frozen in considered if dtype == torch.int8]
    assert int8 and all(int8), considered  # every int8 product, each with its weight frozen
    for seed in range(2):
        ids = prompt(20, seed)
        assert torch.equal(model.generate_stage(ids, stage=1, **KW), eager.generate_stage(ids, stage=1, **KW))
    with pytest.raises(ValueError, match="unknown compile mode 'fast'"):
        compile_decode(model.gpt, "fast")


def test_fallback_without_a_compiler_warns_once_and_decodes_eagerly(monkeypatch):
    monkeypatch.setattr(compiled, "find_cpp_compiler", lambda: None)
    model = perturbed_model(n_layer=2)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert not compile_decode(model.gpt)
    assert len(caught) == 1 and "C++ compiler" in str(caught[0].message)
    assert model.gpt.compiled_slots is None
    ids = prompt(20)
    assert torch.equal(model.generate_stage(ids, stage=1, **KW), perturbed_model(n_layer=2).generate_stage(ids, stage=1,
                                                                                                         **KW))


@needs_compiler
@pytest.mark.slow
def test_generate_compile_flag_prints_what_eager_prints(pair, tmp_path, capsys):
    tok = train_bpe(iter(bundled_text(30_000).split("\n\n")), vocab_size=512)
    folder = export_hf_folder(perturbed_model(n_layer=2, vocab_size=len(tok)), tok, str(tmp_path / "m"),
                              dtype="float32")
    text = "ROMEO: But soft, what light through yonder window breaks? It is the east, and Juliet is the sun."
    printed = []
    for flags in ([], ["--compile"], ["--compile", "--mode", "speculative"]):
        graphs = counters["stats"]["unique_graphs"]
        assert main(["generate", folder, text, "--max-new-tokens", "10", *flags]) == 0
        out, err = capsys.readouterr()
        assert "compiled decode is off" not in err
        assert (counters["stats"]["unique_graphs"] > graphs) == ("--compile" in flags)  # compiled only when asked
        printed.append(out)
    assert printed[1] == printed[0] and printed[2] == printed[0]


def test_compile_flag_on_generate_report_and_serve_and_refused_with_siblings(tmp_path, capsys):
    from cognica_poe.cli import build_parser

    parser = build_parser()
    for argv in (["generate", "M", "hi"], ["report", "M"], ["serve", "M"]):
        assert parser.parse_args(argv + ["--compile"]).compile == "default" and not parser.parse_args(argv).compile
        assert parser.parse_args(argv + ["--compile-max-autotune"]).compile == "max-autotune"
    folder = str(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    assert main(["serve", folder, "--siblings", folder, "--compile"]) == 2
    assert "--compile works on one model folder, not with --siblings" in capsys.readouterr().err

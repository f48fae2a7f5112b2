"""Specialist stages: identity at creation, base bit-identity, delta format, the cascade loader, modes on top."""

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import perturbed_model, specialize
from safetensors.torch import load_file

from cognica_poe import CognicaPoEForCausalLM
from cognica_poe.checkpoint import export_hf_folder, save_stage_folder
from cognica_poe.config import CognicaPoEConfig
from cognica_poe.hf import load_folder
from cognica_poe.model import GPT


def train_like(model, seed):
    """Stand-in for SFT: move the specialist's own tensors (new layers, lambdas, lm_head_stage) off their init."""
    g = torch.Generator().manual_seed(seed)
    first = model.config.segments()[-1][0]
    with torch.no_grad():
        for name, p in model.gpt.named_parameters():
            own = name == "lm_head_stage.weight" or (name.startswith("transformer.h.")
                                                       and int(name.split(".")[2]) >= first)
            if own:
                p.add_(torch.randn(p.shape, generator=g) * 0.05)
        model.gpt.resid_lambdas[first:] += 0.1
        model.gpt.x0_lambdas[first:] += 0.05
    return model


@pytest.fixture
def base_dir(tmp_path):
    return export_hf_folder(perturbed_model(seed=1), None, str(tmp_path / "base"), dtype="float32")


def test_new_specialist_is_identity_and_base_mode_is_bit_identical(base_dir):
    base = CognicaPoEForCausalLM.from_pretrained(base_dir).eval()
    spec = specialize(base, new_layers=2, seed=0)
    assert spec.config.n_layer == 6 and spec.config.poe_stage_boundary_layers == [0, 1, 2, 3, 5]
    assert spec.config.window_sizes()[4:] == [128, 256]  # the pattern continues, the last new layer is long
    assert not any(k.startswith("value_embeds.4") or k.startswith("value_embeds.5") for k in spec.gpt.state_dict())
    ids = torch.randint(0, 512, (2, 30))
    with torch.no_grad():
        ref = base.gpt.forward_all_stages(ids)
        out = spec.gpt.forward_all_stages(ids)
        assert all(torch.equal(a, b) for a, b in zip(ref, out[:4]))  # base exits untouched
        assert torch.equal(out[4], ref[3])  # zero c_proj + zero lm_head_stage: the new stage starts as identity
        train_like(spec, 0)
        spec.config.head_mode = "base"
        assert torch.equal(spec.gpt(ids), ref[3])  # head_mode base after "training": exactly the base model
        spec.config.head_mode = "dual"
        assert not torch.equal(spec.gpt(ids), ref[3])


def test_delta_format(base_dir, tmp_path):
    spec = train_like(specialize(CognicaPoEForCausalLM.from_pretrained(base_dir), 2, seed=0), 1)
    folder = save_stage_folder(spec, str(tmp_path / "chat"), base_dir)
    delta = load_file(os.path.join(folder, "delta.safetensors"))
    layer_keys = {f"transformer.h.{i}.{m}.weight" for i in (4, 5)
                  for m in ("attn.c_q", "attn.c_k", "attn.c_v", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert set(delta) == layer_keys | {"lm_head_stage.weight", "transformer.wte.weight", "resid_lambdas",
                                       "x0_lambdas"}
    assert len(delta) == 16 and all(v.dtype == torch.float32 for v in delta.values())  # the base's dtype
    base_wte = CognicaPoEForCausalLM.from_pretrained(base_dir).gpt.transformer.wte.weight
    assert torch.equal(delta["transformer.wte.weight"], base_wte)  # so the base's rows load back exactly
    small = load_file(os.path.join(save_stage_folder(spec, str(tmp_path / "bf16"), base_dir, dtype="bfloat16"),
                                   "delta.safetensors"))
    assert all(v.dtype == torch.bfloat16 for v in small.values())
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["base_model_name_or_path"] == base_dir and cfg["specialist_ends"] == [5]
    assert not os.path.exists(os.path.join(folder, "model.safetensors"))


def test_three_deep_chain_equals_raw_state_dict_arithmetic(base_dir, tmp_path):
    base = CognicaPoEForCausalLM.from_pretrained(base_dir)
    a = train_like(specialize(base, 2, seed=0), 1)
    a_dir = save_stage_folder(a, str(tmp_path / "A"), base_dir, dtype="float32")
    b = train_like(specialize(load_folder(a_dir), 3, seed=1), 2)
    b_dir = save_stage_folder(b, str(tmp_path / "B"), "../A", dtype="float32")  # a path relative to B
    loaded = CognicaPoEForCausalLM.from_pretrained(b_dir).eval()
    assert loaded.config.specialist_ends == [5, 8] and loaded.poe_n_stages == 6

    # the same model by hand: base tensors + both deltas, A's stage head folded into the head of A's exit
    raw = {k: v for k, v in load_file(os.path.join(base_dir, "model.safetensors")).items()}
    raw = {k.removeprefix("gpt."): v for k, v in raw.items()}
    da = load_file(os.path.join(a_dir, "delta.safetensors"))
    db = load_file(os.path.join(b_dir, "delta.safetensors"))
    sd = dict(raw)
    sd.update({k: v for k, v in da.items() if k.startswith("transformer.h.")})
    sd.update({k: v for k, v in db.items() if k.startswith("transformer.h.")})
    sd["transformer.wte.weight"] = db["transformer.wte.weight"]
    sd["resid_lambdas"], sd["x0_lambdas"] = db["resid_lambdas"], db["x0_lambdas"]
    sd["ancestor_heads.5.weight"] = raw["lm_head.weight"] + da["lm_head_stage.weight"]
    sd["lm_head_stage.weight"] = db["lm_head_stage.weight"]
    with open(os.path.join(b_dir, "config.json")) as f:
        cfg = CognicaPoEConfig(**{k: v for k, v in json.load(f).items() if k not in ("auto_map", "architectures")})
    manual = GPT.from_config(cfg, device="meta")
    manual.load_state_dict(sd, strict=True, assign=True)
    ids = torch.randint(0, 512, (2, 40))
    with torch.no_grad():
        got = loaded.gpt.forward_all_stages(ids)
        want = manual.forward_all_stages(ids)
        base_exits = base.gpt.forward_all_stages(ids)
    assert all(torch.equal(x, y) for x, y in zip(got, want))
    # exits inside the base keep the original lm_head (wte came from the delta but is unchanged here)
    assert all(torch.equal(x, y) for x, y in zip(got[:4], base_exits))


def test_parent_resolution_and_errors(base_dir, tmp_path, monkeypatch):
    spec = specialize(CognicaPoEForCausalLM.from_pretrained(base_dir), 1, seed=0)
    folder = save_stage_folder(spec, str(tmp_path / "s"), "acme/poe-base")  # a repo id
    with pytest.raises(FileNotFoundError, match="cannot resolve the parent 'acme/poe-base'"):
        load_folder(folder)
    m = load_folder(folder, parent_map={"acme/poe-base": base_dir})
    assert m.config.n_layer == 5
    mapping = tmp_path / "parents.json"
    mapping.write_text(json.dumps({"acme/poe-base": base_dir}))
    monkeypatch.setenv("COGNICA_POE_PARENTS", str(mapping))
    assert CognicaPoEForCausalLM.from_pretrained(folder).config.n_layer == 5
    # a cycle: x -> y -> x
    x = save_stage_folder(spec, str(tmp_path / "x"), "../y")
    save_stage_folder(spec, str(tmp_path / "y"), "../x")
    with pytest.raises(ValueError, match="cyclic"):
        load_folder(x)
    # a delta that does not fit its config names the tensors
    bad = save_stage_folder(spec, str(tmp_path / "bad"), base_dir)
    cfg = json.loads(open(os.path.join(bad, "config.json")).read())
    cfg["n_layer"], cfg["specialist_ends"] = 6, [5]
    open(os.path.join(bad, "config.json"), "w").write(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing tensors"):
        load_folder(bad)


def test_stage_modes_on_a_specialist(base_dir):
    spec = train_like(specialize(CognicaPoEForCausalLM.from_pretrained(base_dir), 2, seed=0), 3)
    ids = torch.tensor([[0, 5, 6, 7]])
    last = spec.poe_n_stages - 1
    out = spec.generate_stage(ids, stage=last, max_new_tokens=20, stop_tokens=[])
    with torch.no_grad():
        ref = spec.gpt(out)
    assert torch.equal(out[0, 4:], ref[0, 3:-1].argmax(-1))
    spec_out = spec.generate_speculative(ids, draft_stage=3, k_draft=3, max_new_tokens=20, stop_tokens=[])
    assert torch.equal(spec_out, out)  # the base's final exit drafts for the specialist, losslessly
    wand = spec.generate_wand(ids, safety=1e9, p99_bounds=[1.0] * last, max_new_tokens=20, stop_tokens=[])
    assert torch.equal(wand, out)
    both = spec.generate_parallel_composition(ids, stages=[3, 4], max_new_tokens=20, stop_tokens=[])
    assert both.shape == out.shape


def test_stage_folder_loads_as_remote_code(base_dir, tmp_path):
    spec = train_like(specialize(CognicaPoEForCausalLM.from_pretrained(base_dir), 2, seed=0), 4)
    folder = save_stage_folder(spec, str(tmp_path / "remote"), base_dir, dtype="float32")
    ids = torch.tensor([[0, 3, 4, 5, 6]])
    with torch.no_grad():
        ref = spec.gpt(ids)[0, -1].argmax().item()
    code = textwrap.dedent(f"""
        import sys
        sys.modules['cognica_poe'] = None
        import torch
        from transformers import AutoModelForCausalLM
        model = AutoModelForCausalLM.from_pretrained({folder!r}, trust_remote_code=True)
        print("NEXT", model(torch.tensor([[0, 3, 4, 5, 6]])).logits[0, -1].argmax().item(), model.poe_n_stages)
    """)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    r = subprocess.run([sys.executable, "-I", "-c", code], cwd=str(tmp_path), env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert f"NEXT {ref} 5" in r.stdout


def test_chat_cli_streams_replies(base_dir, tmp_path, monkeypatch, capsys):
    from cognica_poe.cli import main as cli_main
    from cognica_poe.tokenizer_train import train_bpe

    with open(os.path.join(os.path.dirname(__file__), "..", "src", "cognica_poe", "data", "tinyshakespeare.txt")) as f:
        tok = train_bpe(iter(f.read()[:100_000].split("\n\n")), 300)
    model = perturbed_model(vocab_size=len(tok))
    folder = export_hf_folder(model, tok, str(tmp_path / "chat"), dtype="float32")
    answers = iter(["hello", "who are you?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(answers))
    assert cli_main(["chat", folder, "--max-new-tokens", "5", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2

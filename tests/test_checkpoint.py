"""Checkpoint formats: nanochat conversion fidelity, HF export, remote code, and clear errors on bad input."""

import ast
import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import bundled_text, perturbed_model, shared_path
from safetensors.torch import load_file

from cognica_poe import CognicaPoEForCausalLM
from cognica_poe.checkpoint import export_hf_folder, load_model, refresh_code, remote_code_files
from cognica_poe.cli import main as cli_main
from cognica_poe.nanochat import convert_nanochat, nanochat_to_model
from cognica_poe.tokenizer import CognicaPoETokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
GOLDEN = os.path.join(HERE, "fixtures", "nanochat_tiny")
ALLOWED_IMPORTS = {"torch", "transformers", "safetensors", "tiktoken"}


def test_golden_fixture_from_nanochat(tmp_path):
    """Weights with `_orig_mod.` keys and bf16 embeddings; logits computed by nanochat's own gpt.py at 92d63d4."""
    golden = load_file(os.path.join(GOLDEN, "golden.safetensors"))
    raw = torch.load(os.path.join(GOLDEN, "model_000000.pt"), weights_only=True)
    assert all(k.startswith("_orig_mod.") for k in raw)
    assert raw["_orig_mod.transformer.wte.weight"].dtype == torch.bfloat16
    model, _ = nanochat_to_model(GOLDEN)
    out = export_hf_folder(model, None, str(tmp_path / "hf"), dtype="float32")
    loaded = CognicaPoEForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        logits = loaded(golden["input_ids"]).logits
        loss = loaded.gpt(golden["input_ids"], targets=golden["targets"])
    assert logits.shape == golden["logits"].shape
    assert (logits - golden["logits"]).abs().max().item() < 1e-4
    assert abs(loss.item() - golden["loss"].item()) < 1e-4


def test_d8_classics_stage_bpb(tmp_path):
    """Convert the nanochat-trained reference (opting in to its pickle once) and reproduce its per-stage val BPB."""
    from cognica_poe.bpb import stage_bpb

    D8, DATA = shared_path("models", "poe-d8-classics"), shared_path("data")
    with pytest.raises(ValueError, match="pickle"):
        convert_nanochat(D8, str(tmp_path / "refused"))
    assert not os.path.exists(tmp_path / "refused")
    out = convert_nanochat(D8, str(tmp_path / "d8"), dtype="float32", allow_pickle=True)
    assert sorted(f for f in os.listdir(out) if not f.endswith(".py")) == sorted(
        ["config.json", "generation_config.json", "model.safetensors", "tokenizer.tiktoken", "tokenizer_config.json",
         "chat_template.jinja", "token_bytes.safetensors", "tokenizer.json", "LICENSE", "NOTICE"])
    assert sorted(f for f in os.listdir(out) if f.endswith(".py")) == remote_code_files()
    model = load_model(out)
    tok = CognicaPoETokenizer.from_pretrained(out)
    legacy_bytes = torch.load(os.path.join(D8, "tokenizer", "token_bytes.pt"), weights_only=True)
    assert torch.equal(tok.token_bytes().to(legacy_bytes.dtype), legacy_bytes)
    # the README's protocol: blank-line documents, the last 1/20 as validation, BOS-prefixed, 256-token windows
    docs = []
    for name in ("tinyshakespeare.txt", "warpeace.txt"):
        with open(os.path.join(DATA, name), encoding="utf-8") as f:
            docs += [d.strip() for d in f.read().split("\n\n") if d.strip()]
    val = docs[-(len(docs) // 20):]
    stream = []
    for doc in val:
        stream += [tok.bos_token_id] + tok(doc)["input_ids"]
    with open(os.path.join(D8, "meta_000800.json")) as f:
        reference = json.load(f)["stage_val_bpb"]
    ours = stage_bpb(model.gpt, torch.tensor(stream), tok.token_bytes(), seq_len=256, batch_size=32)
    for a, b in zip(ours, reference):
        assert abs(a - b) / b < 0.005, (ours, reference)
    assert model.poe_stage_boundary_layers == [1, 3, 5, 7]


def _fresh_python(code: str, cwd: str) -> subprocess.CompletedProcess:
    """Run code in a new interpreter where importing cognica_poe fails (it may be pip-installed in this venv)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    code = "import sys\nsys.modules['cognica_poe'] = None  # any import of the package now raises\n" + code
    return subprocess.run([sys.executable, "-I", "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture
def exported(tmp_path) -> str:
    from cognica_poe.tokenizer_train import train_bpe

    tok = train_bpe(iter(bundled_text(200_000).split("\n\n")), vocab_size=512)

    model = perturbed_model(vocab_size=len(tok))
    return export_hf_folder(model, tok, str(tmp_path / "exported"), dtype="bfloat16")


def test_export_is_self_contained_remote_code(exported, tmp_path):
    # the exported .py files import only the allowed libraries and each other
    for name in remote_code_files():
        with open(os.path.join(exported, name)) as f:
            src = f.read()
        for node in ast.walk(ast.parse(src)):
            if isinstance(node, ast.Import):
                tops = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                tops = [node.module.split(".")[0]]
            else:
                continue
            for top in tops:
                assert top in ALLOWED_IMPORTS or top in sys.stdlib_module_names, (name, top)
    with open(os.path.join(exported, "config.json")) as f:
        cfg = json.load(f)
    assert cfg["auto_map"]["AutoModelForCausalLM"] == "hf.CognicaPoEForCausalLM"
    assert all(isinstance(v, str) for v in cfg["auto_map"].values())  # no list: no Hub "must be a string" warning
    with open(os.path.join(exported, "tokenizer_config.json")) as f:
        assert json.load(f)["auto_map"]["AutoTokenizer"] == ["tokenizer.CognicaPoETokenizer", None]
    assert load_file(os.path.join(exported, "model.safetensors"))["gpt.transformer.wte.weight"].dtype == torch.bfloat16
    # the model card's usage, verbatim, in a fresh interpreter without cognica_poe
    code = textwrap.dedent(f"""
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_id = {exported!r}
        tokenizer = AutoTokenizer.from_pretrained(model_id, trust_remote_code=True)
        model = AutoModelForCausalLM.from_pretrained(model_id, trust_remote_code=True, torch_dtype="bfloat16")
        prompt = "ROMEO: "
        ids = [tokenizer.bos_token_id] + tokenizer(prompt)["input_ids"]
        input_ids = torch.tensor([ids])
        out = model.generate(input_ids, max_new_tokens=12, do_sample=False)
        print("GREEDY", tokenizer.decode(out[0]))
        out = model.generate(input_ids, max_new_tokens=12, do_sample=True, temperature=0.8, top_p=0.95)
        print("NUCLEUS", tokenizer.decode(out[0]))
        print("STAGES", model.poe_n_stages, model.poe_stage_boundary_layers, type(model).__module__)
        print("STAGE0", tuple(model.forward_stage(input_ids, stage=0).shape))
    """)
    r = _fresh_python(code, str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "GREEDY <|bos|>ROMEO: " in r.stdout and "NUCLEUS" in r.stdout
    assert "STAGES 4 [0, 1, 2, 3] transformers_modules" in r.stdout
    assert "must be a string" not in r.stderr


def test_registered_classes_load_released_folder(exported):
    """After `import cognica_poe`, from_pretrained without trust_remote_code uses our classes."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    assert type(model) is CognicaPoEForCausalLM and type(tok) is CognicaPoETokenizer
    assert model.gpt.lm_head.weight.dtype == torch.bfloat16


def test_save_load_round_trip_is_bit_identical(exported, tmp_path):
    model = load_model(exported)
    again = export_hf_folder(model, CognicaPoETokenizer.from_pretrained(exported), str(tmp_path / "again"),
                             dtype="bfloat16")
    a = load_file(os.path.join(exported, "model.safetensors"))
    b = load_file(os.path.join(again, "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ids = torch.randint(0, model.config.vocab_size, (2, 15))
    with torch.no_grad():
        assert torch.equal(load_model(again)(ids).logits, model(ids).logits)


def test_refresh_code(exported):
    for name in remote_code_files():
        with open(os.path.join(exported, name), "w") as f:
            f.write("raise RuntimeError('stale release code')\n")
    with open(os.path.join(exported, "old_modeling.py"), "w") as f:
        f.write("# stale\n")
    assert cli_main(["convert", "--refresh-code", exported]) == 0
    assert not os.path.exists(os.path.join(exported, "old_modeling.py"))
    for name in remote_code_files():
        with open(os.path.join(exported, name)) as f:
            assert "stale release code" not in f.read()
    with pytest.raises(FileNotFoundError):
        refresh_code(os.path.dirname(exported))


def test_corrupt_and_mismatched_weights_are_clear_errors(exported, tmp_path):
    bad = tmp_path / "corrupt"
    shutil.copytree(exported, bad)
    path = bad / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(ValueError, match="corrupt or unreadable safetensors"):
        load_model(str(bad))
    path.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError, match="corrupt or unreadable safetensors"):
        load_model(str(bad))
    # a config whose vocab does not match the weights: the error names the keys
    wrong = tmp_path / "wrong_vocab"
    shutil.copytree(exported, wrong)
    with open(wrong / "config.json") as f:
        cfg = json.load(f)
    cfg["vocab_size"] = 1024
    with open(wrong / "config.json", "w") as f:
        json.dump(cfg, f)
    with pytest.raises(ValueError, match=r"(?s)transformer\.wte\.weight.*vocab"):
        load_model(str(wrong))


def test_converter_rejects_mismatched_checkpoint(tmp_path):
    src = tmp_path / "nano"
    shutil.copytree(GOLDEN, src)
    meta = json.loads((src / "meta_000000.json").read_text())
    meta["model_config"]["n_embd"] = 128
    (src / "meta_000000.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"shape mismatch: .*transformer\.h\.0\.attn\.c_q\.weight"):
        convert_nanochat(str(src), str(tmp_path / "out"), allow_pickle=True)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(FileNotFoundError, match="model_XXXXXX.pt"):
        convert_nanochat(str(tmp_path), str(tmp_path / "out"))


def test_cli_info_and_errors(capsys, tmp_path):
    assert cli_main(["info", "d24"]) == 0
    out = capsys.readouterr().out
    assert "1,384,122,122" in out and "[5, 11, 17, 23]" in out
    assert cli_main(["info", "d24", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["parameters"] == 1_384_122_122 and info["poe_n_stages"] == 4
    assert cli_main(["info", "d9000"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    assert cli_main(["convert", str(tmp_path / "missing"), str(tmp_path / "out")]) == 2
    assert not os.path.exists(tmp_path / "out")


def test_demo_runs_end_to_end(tmp_path, capsys):
    """The README's first command, shortened: train a few steps, export, reload, report, every mode's sample."""
    assert cli_main(["demo", "--out", str(tmp_path / "demo"), "--steps", "4", "--sample-tokens", "6", "--quiet",
                     "--runs", "1", "--new-tokens", "4", "--n-prompts", "2", "--eval-tokens", "2000"]) == 0
    out = capsys.readouterr().out
    assert "loaded it back with AutoModelForCausalLM" in out and "validation bits per byte by stage exit" in out
    assert "| Capability | This checkpoint | Measured how |" in out and "| Mode | tokens/s | vs full depth |" in out
    report = json.loads((tmp_path / "demo" / "report" / "report.json").read_text())
    assert report["model"]["n_stages"] == 4 and len(report["speculative"]) == 6
    assert (tmp_path / "demo" / "report" / "report_speed.png").exists()
    for name in ("stage 0 (prefix pruning)", "stage 3 (prefix pruning)", "WAND", "speculative", "Log-OP"):
        assert f"--- {name}" in out

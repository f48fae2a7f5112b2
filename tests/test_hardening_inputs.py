"""Strict inputs and a usable command line: every user error is one line and exit status 2, the CLI starts
without torch, configs name their missing fields, convert finds nanochat's tokenizer, the demo's folder."""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib

import pytest
import torch
from conftest import perturbed_model

from cognica_poe.checkpoint import export_hf_folder
from cognica_poe.cli import build_parser, main
from cognica_poe.config import CognicaPoEConfig
from cognica_poe.nanochat import convert_nanochat
from cognica_poe.tokenizer_train import train_bpe
from cognica_poe.train.data import bundled_corpus

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
SRC = os.path.join(ROOT, "src")
GOLDEN = os.path.join(HERE, "fixtures", "nanochat_tiny")  # a nanochat checkpoint with vocab_size 300


@pytest.fixture(scope="module")
def texts() -> list[str]:
    with open(bundled_corpus(), encoding="utf-8") as f:
        return f.read()[:60_000].split("\n\n")


@pytest.fixture(scope="module")
def folder(tmp_path_factory, texts) -> str:
    """A tiny exported model folder (vocab 512) with its tokenizer."""
    tok = train_bpe(iter(texts), vocab_size=512)
    return export_hf_folder(perturbed_model(vocab_size=len(tok)), tok, str(tmp_path_factory.mktemp("m") / "m"),
                            dtype="float32")


@pytest.fixture(scope="module")
def tok300(texts):
    return train_bpe(iter(texts), vocab_size=300)


def cli(capsys, *argv: str) -> tuple[int, str, str]:
    """main() in process: (status, stdout, stderr); argparse's own exits count as statuses too."""
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    out, err = capsys.readouterr()
    return rc, out, err


def assert_one_line_error(result: tuple[int, str, str], *needles: str) -> str:
    rc, _, err = result
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def copy_folder(src: str, dst) -> str:
    shutil.copytree(src, dst)
    return str(dst)


def nanochat_base(tmp_path, tok=None) -> tuple[str, str]:
    """nanochat's layout: <base>/base_checkpoints/d4/{model,meta}_000000.* and, if tok, <base>/tokenizer/."""
    ckpt = tmp_path / "base" / "base_checkpoints" / "d4"
    os.makedirs(ckpt)
    for name in ("model_000000.pt", "meta_000000.json"):
        shutil.copy(os.path.join(GOLDEN, name), ckpt / name)
    if tok is not None:
        tok.save_pretrained(str(tmp_path / "base" / "tokenizer"))
    return str(tmp_path / "base"), str(ckpt)


# -----------------------------------------------------------------------------
# item 6: required config fields, tokenizer vs model vocabulary


def test_config_json_missing_a_required_field_names_it(tmp_path):
    full = CognicaPoEConfig(n_layer=4, n_embd=64, n_head=4, n_kv_head=2, sequence_len=256, vocab_size=512,
                            poe_every=2).to_dict()
    for field in ("n_layer", "n_embd", "n_head", "vocab_size", "sequence_len", "poe_every"):
        partial = {k: v for k, v in full.items() if k != field}
        os.makedirs(tmp_path / field)
        with open(tmp_path / field / "config.json", "w") as f:
            json.dump(partial, f)
        with pytest.raises(ValueError, match=rf"config\.json .*lacks the required field {field}"):
            CognicaPoEConfig.from_pretrained(str(tmp_path / field))
        with pytest.raises(ValueError, match=rf"lacks the required field {field}"):
            CognicaPoEConfig.from_dict(partial)
    # documented optional fields take their defaults: n_kv_head follows n_head, the rest the constructor's
    required = {k: full[k] for k in ("n_layer", "n_embd", "n_head", "vocab_size", "sequence_len", "poe_every")}
    cfg = CognicaPoEConfig.from_dict({"model_type": "cognica_poe", **required})
    assert cfg.n_kv_head == 4 and cfg.window_pattern == "SSSL" and cfg.poe_mode == "flat"
    # transformers builds default configs internally (diffs against defaults): the no-argument constructor stays
    assert CognicaPoEConfig().n_layer == 24
    assert "n_layer" in cfg.to_diff_dict()


def test_config_fields_of_the_wrong_type_are_named():
    base = dict(n_layer=4, n_embd=64, n_head=4, sequence_len=256, vocab_size=512, poe_every=2)
    for field, value in [("window_pattern", 5), ("rope_theta", "big"), ("softcap", None), ("n_layer", True),
                         ("wand_p99_bounds", "1,2")]:
        with pytest.raises(ValueError, match=field):
            CognicaPoEConfig.from_dict({**base, field: value})
    with pytest.raises(ValueError, match="JSON object"):
        CognicaPoEConfig.from_dict([1, 2])


def test_tokenizer_of_another_vocabulary_is_refused_naming_both_sizes(folder, tok300, tmp_path, capsys):
    other = copy_folder(folder, tmp_path / "m")
    tok300.save_pretrained(other)  # a 300-id tokenizer beside 512-id weights
    for argv in (["generate", other, "hello"], ["eval", "bpb", other]):
        assert_one_line_error(cli(capsys, *argv), "300", "512")


# -----------------------------------------------------------------------------
# item 7: every user error is one line and exit 2


def test_missing_model_path_is_not_an_unknown_preset(tmp_path, capsys):
    for argv in (["generate", tmp_path / "nope", "x"], ["chat", tmp_path / "nope"], ["eval", "bpb", tmp_path / "nope"],
                 ["report", tmp_path / "nope"], ["stage", "new", tmp_path / "nope", "--new-layers", "1", "--out",
                                                 tmp_path / "o"], ["info", tmp_path / "nope"]):
        line = assert_one_line_error(cli(capsys, *argv), "no model folder at", str(tmp_path / "nope"))
        assert "preset" not in line
    assert not os.path.exists(tmp_path / "o")


def test_nanochat_folder_passed_to_generate_says_convert_first(tmp_path, capsys):
    _, ckpt = nanochat_base(tmp_path)
    for argv in (["generate", ckpt, "x"], ["info", ckpt], ["eval", "bpb", ckpt]):
        assert_one_line_error(cli(capsys, *argv), ckpt, "cognica-poe convert")


def test_bad_config_json_is_one_line(folder, tmp_path, capsys):
    m = copy_folder(folder, tmp_path / "m")
    config = os.path.join(m, "config.json")
    for text in ("", "{not json", "[1, 2]", '"a string"'):
        with open(config, "w") as f:
            f.write(text)
        for argv in (["generate", m, "x"], ["info", m]):
            assert_one_line_error(cli(capsys, *argv), config)
    os.remove(config)
    for argv in (["generate", m, "x"], ["info", m]):
        assert_one_line_error(cli(capsys, *argv), "config.json")
    with open(os.path.join(folder, "config.json")) as f:
        cfg = json.load(f)
    del cfg["poe_every"]
    with open(config, "w") as f:
        json.dump(cfg, f)
    assert_one_line_error(cli(capsys, "generate", m, "x"), "poe_every")
    assert_one_line_error(cli(capsys, "info", m), "poe_every")


def test_convert_pickle_and_meta_errors_are_one_line(tmp_path, capsys):
    _, ckpt = nanochat_base(tmp_path)
    os.makedirs(os.path.join(ckpt, "tokenizer"))
    pkl = os.path.join(ckpt, "tokenizer", "tokenizer.pkl")
    with open(pkl, "wb"):
        pass  # empty
    out = tmp_path / "out"
    assert_one_line_error(cli(capsys, "convert", ckpt, out), "--allow-pickle")  # blocked without the opt-in
    assert_one_line_error(cli(capsys, "convert", ckpt, out, "--allow-pickle"), pkl)  # empty pickle
    with open(pkl, "wb") as f:
        f.write(b"\x80\x04garbage")
    assert_one_line_error(cli(capsys, "convert", ckpt, out, "--allow-pickle"), pkl)
    meta = os.path.join(ckpt, "meta_000000.json")
    with open(meta) as f:
        good = json.load(f)
    del good["model_config"]["vocab_size"]
    with open(meta, "w") as f:
        json.dump(good, f)
    assert_one_line_error(cli(capsys, "convert", ckpt, out), meta, "vocab_size")
    with open(meta, "w") as f:
        json.dump({"step": 0}, f)
    assert_one_line_error(cli(capsys, "convert", ckpt, out), meta, "model_config")
    with open(meta, "w") as f:
        f.write("nope")
    assert_one_line_error(cli(capsys, "convert", ckpt, out), meta)
    shutil.copy(os.path.join(GOLDEN, "meta_000000.json"), meta)
    with open(os.path.join(ckpt, "model_000000.pt"), "wb"):
        pass
    assert_one_line_error(cli(capsys, "convert", ckpt, out), "model_000000.pt")
    assert not os.path.exists(out)


def test_corpus_errors_name_the_file(folder, tmp_path, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text('{"text": "a"}\n{"content": "b"}\n')
    parquet = tmp_path / "docs.parquet"
    pq.write_table(pa.table({"content": ["a", "b"]}), str(parquet))
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 10)
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"text": "a"}\n{oops\n')
    cases = [(jsonl, ["line 2", "text"]), (parquet, ["text"]), (binary, ["UTF-8"]), (broken, ["line 2"])]
    for path, needles in cases:
        assert_one_line_error(cli(capsys, "eval", "bpb", folder, path), str(path), *needles)
        assert_one_line_error(cli(capsys, "tokenizer", "train", "--data", path, "--out", tmp_path / "tok"), str(path))
        assert_one_line_error(cli(capsys, "report", folder, "--data", path, "--no-plots", "--out", tmp_path / "r"),
                              str(path))
    assert not os.path.exists(tmp_path / "tok")


def test_missing_and_wrong_kind_of_input_files(folder, tmp_path, capsys):
    missing = tmp_path / "missing.txt"
    assert_one_line_error(cli(capsys, "eval", "bpb", folder, missing), str(missing))
    assert_one_line_error(cli(capsys, "eval", "core", folder, tmp_path), str(tmp_path), "core.yaml")
    assert_one_line_error(cli(capsys, "report", folder, "--prompts", missing, "--no-plots"), str(missing))
    assert_one_line_error(cli(capsys, "report", folder, "--prompts", tmp_path, "--no-plots"), str(tmp_path))
    assert_one_line_error(cli(capsys, "sft", folder, missing, "--out-dir", tmp_path / "s"), str(missing))
    garbage = tmp_path / "chats.jsonl"
    garbage.write_text("{not json\n")
    assert_one_line_error(cli(capsys, "sft", folder, garbage, "--out-dir", tmp_path / "s"), str(garbage), "line 1")
    assert_one_line_error(cli(capsys, "info", garbage), str(garbage))
    assert_one_line_error(cli(capsys, "generate", garbage, "x"), str(garbage))
    assert not os.path.exists(tmp_path / "s")


def test_more_bad_inputs_are_one_line_and_write_nothing(folder, tmp_path, capsys):
    binary = tmp_path / "image.txt"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\xff\xfe" * 10)
    assert_one_line_error(cli(capsys, "train", "--data", binary, "--out-dir", tmp_path / "run", "--num-steps", "1"),
                          str(binary), "UTF-8")
    assert not os.path.exists(tmp_path / "run")
    assert_one_line_error(cli(capsys, "tokenizer", "train", "--out", folder), "--out", "not empty")
    assert_one_line_error(cli(capsys, "eval", "bpb", folder, "--compose", "0,x"), "--compose", "0:0.5,3:0.5")
    short = tmp_path / "short.txt"
    short.write_text("a\n\nb\n")
    assert_one_line_error(cli(capsys, "eval", "bpb", folder, short), str(short), "--max-tokens", "--seq-len")
    chats = tmp_path / "chats.jsonl"
    chats.write_text("[1, 2]\n")
    assert_one_line_error(cli(capsys, "sft", folder, chats, "--out-dir", tmp_path / "s"), "line 1",
                          "not a conversation")
    assert_one_line_error(cli(capsys, "demo", "--out", short), str(short), "--out")
    assert not os.path.exists(tmp_path / "s")


def test_bad_flag_values_are_one_line(folder, capsys):
    for argv, needle in [(["generate", folder, "x", "--temperature", "-1"], "--temperature"),
                         (["generate", folder, "x", "--top-k", "0"], "--top-k"),
                         (["generate", folder, "x", "--top-p", "1.5"], "--top-p"),
                         (["generate", folder, "x", "--max-new-tokens", "0"], "--max-new-tokens"),
                         (["generate", folder, "x", "--mode", "fast"], "--mode"),
                         (["eval", "bpb", folder, "--threads", "0"], "--threads"),
                         (["nonsense"], "nonsense"), ([], "COMMAND")]:
        assert_one_line_error(cli(capsys, *argv), needle)


def test_context_overflow_names_the_flag_that_exists(folder, capsys):
    assert_one_line_error(cli(capsys, "generate", folder, "x", "--max-new-tokens", "300"), "--max-length")
    rc, _, err = cli(capsys, "generate", folder, "x", "--max-new-tokens", "300", "--max-length", "400")
    assert rc == 0 and "[full: 300 tokens" in err
    assert_one_line_error(cli(capsys, "chat", folder, "--max-length", "100000"), "--max-length")


def test_one_error_in_a_fresh_process(tmp_path):
    r = subprocess.run([sys.executable, "-m", "cognica_poe.cli", "generate", str(tmp_path / "nope"), "x"],
                       env={**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                       timeout=300)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"cognica-poe generate: error: no model folder at {tmp_path / 'nope'}")


# -----------------------------------------------------------------------------
# item 20: a fast, documented command line


def test_cli_module_imports_no_torch_and_help_lists_every_command():
    code = ("import sys, cognica_poe.cli\n"
            "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": SRC}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0 and r.stdout.strip() == "[]", r.stderr
    r = subprocess.run([sys.executable, "-m", "cognica_poe.cli", "--help"], env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0
    commands = build_parser()._subparsers._group_actions[0].choices
    for name in commands:
        assert f"cognica-poe {name}" in r.stdout, name


def test_package_exports_load_lazily_and_register_the_auto_classes(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import cognica_poe

    cognica_poe.register_auto_classes()  # the README's usage
    model = AutoModelForCausalLM.from_pretrained(folder)
    assert type(model) is cognica_poe.CognicaPoEForCausalLM
    assert type(AutoTokenizer.from_pretrained(folder)) is cognica_poe.CognicaPoETokenizer
    assert cognica_poe.PRESETS["d24"]["n_layer"] == 24 and cognica_poe.preset_config("tiny").n_layer == 4
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        cognica_poe.nope  # noqa: B018


def test_version(capsys):
    import cognica_poe

    rc, out, _ = cli(capsys, "--version")
    assert rc == 0 and out.strip() == f"cognica-poe {cognica_poe.__version__}"
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        assert tomllib.load(f)["project"]["version"] == cognica_poe.__version__


def all_parsers(parser: argparse.ArgumentParser, name: str = "cognica-poe"):
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub, p in action.choices.items():
                yield from all_parsers(p, f"{name} {sub}")


def test_every_flag_has_help_and_shows_its_default():
    for name, p in all_parsers(build_parser()):
        help_text = p.format_help()
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
                continue
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
            if action.option_strings and action.default is not None and not isinstance(action.default, bool):
                shown = action.default if not isinstance(action.default, list) else action.default
                assert f"default: {shown}" in " ".join(help_text.split()), (name, action.dest)
    generate = dict(all_parsers(build_parser()))["cognica-poe generate"].format_help()
    assert "(default: 64)" in generate


def test_threads_flag_on_every_computing_command(folder, monkeypatch, capsys):
    from cognica_poe.cpu import default_threads

    parsers = dict(all_parsers(build_parser()))
    for name in ("generate", "chat", "calibrate", "eval bpb", "eval core", "report", "demo", "sft", "train",
                 "stage new"):
        assert "--threads" in parsers[f"cognica-poe {name}"].format_help(), name
    calls = []
    monkeypatch.setattr(torch, "set_num_threads", calls.append)
    assert cli(capsys, "generate", folder, "x", "--max-new-tokens", "2", "--threads", "3")[0] == 0
    assert calls == [3]
    assert cli(capsys, "generate", folder, "x", "--max-new-tokens", "2")[0] == 0
    assert calls == [3, default_threads()]  # default: the physical cores (or $OMP_NUM_THREADS)


def test_progress_bars_and_default_corpus_note(folder, capsys):
    from cognica_poe.bpb import evaluate_bpb
    from cognica_poe.eval.speed import measure_modes
    from cognica_poe.hf import CognicaPoEForCausalLM

    model = CognicaPoEForCausalLM.from_pretrained(folder).eval()
    stream = torch.randint(0, 512, (600,))
    evaluate_bpb(model.gpt, stream, torch.ones(512, dtype=torch.int32), seq_len=64, progress=True)
    assert "bpb" in capsys.readouterr().err
    measure_modes(model, [[0, 5, 6]], [1.0, 1.0, 1.0], new_tokens=2, runs=1, safeties=(1.0,), ks=(1,), progress=True)
    err = capsys.readouterr().err
    assert "speed" in err and "8/8" in err  # full, prefill, stages 0-2, Log-OP, one WAND safety, one K
    evaluate_bpb(model.gpt, stream, torch.ones(512, dtype=torch.int32), seq_len=64)
    assert capsys.readouterr().err == ""
    rc, out, err = cli(capsys, "eval", "bpb", folder, "--max-tokens", "2000", "--seq-len", "64")
    assert rc == 0 and "bundled" in err and "pass DATA" in err


# -----------------------------------------------------------------------------
# item 21: packaging


def test_pyproject_dependencies_and_extras():
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        project = tomllib.load(f)["project"]
    deps = project["dependencies"]
    extras = project["optional-dependencies"]
    assert "torch>=2.13,<2.14" in deps
    assert not any(d.startswith(("lm-eval", "matplotlib", "pyarrow")) for d in deps)
    assert any(d.startswith("lm-eval") for d in extras["eval"])
    assert any(d.startswith("matplotlib") for d in extras["plots"])
    assert any(d.startswith("pyarrow") for d in extras["parquet"])
    from packaging.requirements import Requirement

    dev = [Requirement(r) for r in extras["dev"]]
    included = set().union(*(r.extras for r in dev if r.name == "cognica-poe"))
    assert {"eval", "plots", "parquet"} <= included  # CI installs .[dev] and runs every test


def test_missing_optional_packages_say_which_extra(folder, tmp_path, monkeypatch, capsys):
    from cognica_poe.train.data import Corpus
    from cognica_poe.train.plot import plot_metrics

    parquet = tmp_path / "a.parquet"
    parquet.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)
    with pytest.raises(ModuleNotFoundError, match=r"cognica-poe\[parquet\]"):
        Corpus(str(parquet))
    assert_one_line_error(cli(capsys, "eval", "bpb", folder, parquet), "cognica-poe[parquet]")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"type": "train", "step": 1, "losses": [1.0]}\n')
    with pytest.warns(UserWarning, match=r"cognica-poe\[plots\]"):
        assert plot_metrics(str(metrics), str(tmp_path / "c.png")) is None
    from cognica_poe.eval.report import plot_report

    with pytest.raises(ModuleNotFoundError, match=r"cognica-poe\[plots\].*--no-plots"):
        plot_report({}, str(tmp_path))
    # the report fails before measuring anything, naming the extra and the flag that avoids it
    assert_one_line_error(cli(capsys, "report", folder, "--out", tmp_path / "r"), "cognica-poe[plots]", "--no-plots")
    assert not os.path.exists(tmp_path / "r")


# -----------------------------------------------------------------------------
# item 22: convert finds nanochat's tokenizer


def test_convert_finds_the_tokenizer_in_nanochats_base_dir(tok300, tmp_path, capsys):
    _, ckpt = nanochat_base(tmp_path, tok300)  # <base>/tokenizer, two levels above the checkpoint
    for src in (ckpt, ckpt + os.sep):
        out = tmp_path / f"out{len(src)}"
        assert convert_nanochat(src, str(out), dtype="float32") == str(out)
        assert os.path.isfile(out / "tokenizer.tiktoken")


def test_convert_tokenizer_flag_and_where_it_looked(tok300, tmp_path, capsys):
    _, ckpt = nanochat_base(tmp_path)
    line = assert_one_line_error(cli(capsys, "convert", ckpt, tmp_path / "out"), "--tokenizer")
    base = str(tmp_path / "base")
    for place in (os.path.join(ckpt, "tokenizer"), ckpt, os.path.join(base, "base_checkpoints", "tokenizer"),
                  os.path.join(base, "tokenizer")):
        assert place in line, place
    tok300.save_pretrained(str(tmp_path / "elsewhere"))
    rc, out, err = cli(capsys, "convert", ckpt, tmp_path / "out", "--tokenizer", tmp_path / "elsewhere",
                       "--dtype", "float32")
    assert rc == 0, err
    assert os.path.isfile(tmp_path / "out" / "tokenizer.tiktoken")
    assert_one_line_error(cli(capsys, "convert", ckpt, tmp_path / "out2", "--tokenizer", tmp_path / "nowhere"),
                          str(tmp_path / "nowhere"))
    assert not os.path.exists(tmp_path / "out2")


# -----------------------------------------------------------------------------
# item 23: the demo's run folder


def test_demo_defaults_to_runs_demo_and_keeps_foreign_folders(tmp_path, monkeypatch, capsys):
    from cognica_poe.cli import prepare_demo_folder

    parsers = dict(all_parsers(build_parser()))
    assert parsers["cognica-poe demo"].parse_args([]).out == os.path.join("runs", "demo")
    monkeypatch.chdir(tmp_path)
    os.makedirs("runs/demo")
    with open("runs/demo/notes.txt", "w") as f:
        f.write("mine")
    assert_one_line_error(cli(capsys, "demo", "--steps", "1"), "runs/demo", "--out")
    assert open("runs/demo/notes.txt").read() == "mine"
    # an empty folder is used; an earlier demo's folder (marked) is replaced; nothing else is touched
    os.makedirs("empty")
    assert prepare_demo_folder("empty") == "empty"
    earlier = prepare_demo_folder("earlier")
    with open(os.path.join(earlier, "metrics.jsonl"), "w") as f:
        f.write("{}\n")
    assert prepare_demo_folder("earlier") == "earlier" and os.listdir("earlier") == [".cognica-poe-demo"]
    assert open("runs/demo/notes.txt").read() == "mine"

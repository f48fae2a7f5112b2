"""Writers: overwrite never deletes what it did not create, atomic replacement, stage parents independent of the
working directory, run folders, NaN/inf stops that keep a good checkpoint, calibrate, permissions, stale temps."""

import hashlib
import json
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
import torch
from conftest import perturbed_model, specialize
from safetensors.torch import load_file

from cognica_poe import CognicaPoEForCausalLM
from cognica_poe.checkpoint import export_hf_folder, load_model, new_stage_folder, save_stage_folder
from cognica_poe.cli import main as cli_main
from cognica_poe.hf import load_folder
from cognica_poe.model import GPT
from cognica_poe.tokenizer_train import train_bpe
from cognica_poe.train import data as tdata
from cognica_poe.train import loop
from cognica_poe.train.loop import NonFiniteLossError, TrainConfig, train


@pytest.fixture(scope="module")
def tok(corpus):
    return train_bpe(tdata.iter_tokenizer_texts(corpus), vocab_size=512)


@pytest.fixture(scope="module")
def tok_dir(tok, tmp_path_factory) -> str:
    out = str(tmp_path_factory.mktemp("tok"))
    tok.save_pretrained(out)
    return out


def small_cfg(corpus: str, tok_dir: str | None, out_dir, **kw) -> TrainConfig:
    base = dict(preset="tiny", sequence_len=64, data=corpus, tokenizer=tok_dir, device_batch_size=4, num_steps=4,
                eval_every=1000, eval_tokens=8 * 65, out_dir=str(out_dir), progress=False, export=False,
                warmup_steps=2, batch_lr_scale=0.5, shuffle_block=64)
    return TrainConfig(**{**base, **kw})


def digest(folder) -> dict[str, str]:
    """Every file under folder (relative path -> sha256)."""
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def export(tmp_path, name: str, seed: int = 0) -> str:
    return export_hf_folder(perturbed_model(seed=seed), None, str(tmp_path / name), dtype="float32")


# -----------------------------------------------------------------------------
# 1. --overwrite never deletes what it did not create; replacement is atomic

def test_overwrite_refuses_the_working_directory_and_its_ancestors(tmp_path, monkeypatch):
    outer = export(tmp_path, "outer")  # a cognica-poe output that holds the working directory
    work = os.path.join(outer, "work")
    os.makedirs(work)
    open(os.path.join(work, "notes.txt"), "w").write("mine")
    before = digest(outer)
    monkeypatch.chdir(work)
    for target in (outer, ".."):
        with pytest.raises(ValueError, match="current directory"):
            export_hf_folder(perturbed_model(seed=1), None, target, overwrite=True)
    assert digest(outer) == before
    monkeypatch.chdir(outer)
    with pytest.raises(ValueError, match="current directory"):
        export_hf_folder(perturbed_model(seed=1), None, ".", overwrite=True)
    assert digest(outer) == before


def test_overwrite_refuses_the_source_and_its_ancestors(tmp_path):
    outer = export(tmp_path, "outer")
    base = export_hf_folder(perturbed_model(seed=2), None, os.path.join(outer, "base"), dtype="float32")
    before = digest(outer)
    with pytest.raises(ValueError, match="source"):  # `stage new BASE --out BASE --overwrite`
        new_stage_folder(base, base, 1, overwrite=True)
    with pytest.raises(ValueError, match="source"):  # a folder above the source
        new_stage_folder(base, outer, 1, overwrite=True)
    with pytest.raises(ValueError, match="source"):  # re-exporting a loaded model over its own folder
        export_hf_folder(load_model(base), None, base, overwrite=True)
    assert digest(outer) == before


def test_overwrite_refuses_folders_and_files_it_did_not_write(tmp_path):
    foreign = tmp_path / "notes"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("years of work")
    (tmp_path / "file").write_text("a file")
    for target in (foreign, tmp_path / "file"):
        with pytest.raises(ValueError, match="did not write"):
            export_hf_folder(perturbed_model(), None, str(target), overwrite=True)
    assert (foreign / "thesis.tex").read_text() == "years of work" and (tmp_path / "file").read_text() == "a file"
    other = tmp_path / "other-model"  # a config.json of another model type is not ours either
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="did not write"):
        export_hf_folder(perturbed_model(), None, str(other), overwrite=True)
    assert os.listdir(other) == ["config.json"]
    (tmp_path / "empty").mkdir()  # an empty folder and our own output may be replaced
    export_hf_folder(perturbed_model(), None, str(tmp_path / "empty"), overwrite=True)
    assert os.path.isfile(tmp_path / "empty" / "model.safetensors")


def test_overwrite_swaps_atomically_and_keeps_the_old_folder_on_failure(tmp_path, monkeypatch):
    out = export(tmp_path, "hf", seed=0)
    old = digest(out)
    real_rename, real_replace, failed = os.rename, os.replace, []

    def failing(real):
        def move(src, dst, *a, **kw):
            if os.path.abspath(dst) == out and os.path.basename(src).startswith(".") and not failed:
                failed.append(src)
                raise OSError("disk on fire")
            return real(src, dst, *a, **kw)
        return move

    monkeypatch.setattr(os, "rename", failing(real_rename))
    monkeypatch.setattr(os, "replace", failing(real_replace))
    with pytest.raises(OSError, match="disk on fire"):
        export_hf_folder(perturbed_model(seed=5), None, out, dtype="float32", overwrite=True)
    monkeypatch.undo()
    assert failed and digest(out) == old  # the old folder is whole
    assert sorted(os.listdir(tmp_path)) == ["hf"]  # no temporary folder left beside it
    export_hf_folder(perturbed_model(seed=5), None, out, dtype="float32", overwrite=True)
    assert digest(out) != old and sorted(os.listdir(tmp_path)) == ["hf"]
    assert torch.equal(load_model(out).gpt.lm_head.weight, perturbed_model(seed=5).gpt.lm_head.weight)


# -----------------------------------------------------------------------------
# 2. a stage folder's parent resolves the same from any working directory

def test_stage_new_parent_resolves_from_any_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    export(tmp_path, "models/base")
    new_stage_folder("models/base", "stages/chat", 1)
    assert cli_main(["stage", "new", "models/base", "--new-layers", "1", "--out", "stages/cli"]) == 0
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    for name in ("chat", "cli"):
        cfg = json.load(open(tmp_path / "stages" / name / "config.json"))
        assert cfg["base_model_name_or_path"] in ("../../models/base", str(tmp_path / "models" / "base"))
        assert load_folder(str(tmp_path / "stages" / name)).config.n_layer == 5


def test_loading_never_resolves_a_parent_against_the_working_directory(tmp_path, monkeypatch):
    base = export(tmp_path, "cwd/base")
    spec = specialize(CognicaPoEForCausalLM.from_pretrained(base), 1, seed=0)
    stage = save_stage_folder(spec, str(tmp_path / "stages" / "s"), "base")  # "base" beside the stage: absent
    monkeypatch.chdir(tmp_path / "cwd")  # ... but present in the working directory
    with pytest.raises(FileNotFoundError, match="cannot resolve the parent 'base'"):
        load_folder(stage)


def test_sft_of_a_stage_folder_keeps_a_resolvable_parent(tmp_path, tok, monkeypatch):
    from cognica_poe.train.sft import SFTConfig, sft

    base = export_hf_folder(perturbed_model(vocab_size=len(tok)), tok, str(tmp_path / "models" / "base"),
                            dtype="float32")
    monkeypatch.chdir(tmp_path)
    stage = new_stage_folder("models/base", "stages/a", 1)
    data = tmp_path / "chat.jsonl"
    conv = {"messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"}]}
    data.write_text("\n".join(json.dumps(conv) for _ in range(4)) + "\n")
    summary = sft(SFTConfig(model=stage, data=str(data), out_dir=str(tmp_path / "runs" / "sft"), steps=1,
                            batch_size=2, eval_every=1, save_every=1))
    monkeypatch.chdir(tmp_path / "runs")
    model = load_folder(summary["stage_dir"])
    assert model.config.n_layer == 5
    assert torch.equal(model.gpt.lm_head.weight, CognicaPoEForCausalLM.from_pretrained(base).gpt.lm_head.weight)


# -----------------------------------------------------------------------------
# 3. train --out-dir on another run's folder

def test_train_refuses_another_runs_folder_without_resume(corpus, tok_dir, tmp_path, capsys):
    out = tmp_path / "run"
    train(small_cfg(corpus, tok_dir, out, num_steps=2))
    before = digest(out)
    with pytest.raises(FileExistsError, match="--resume"):
        train(small_cfg(corpus, tok_dir, out, num_steps=2))
    args = ["train", "--preset", "tiny", "--sequence-len", "64", "--data", corpus, "--tokenizer", tok_dir,
            "--num-steps", "2", "--device-batch-size", "4", "--out-dir", str(out), "--no-progress", "--no-export"]
    capsys.readouterr()
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cognica-poe train: error:") and "--resume" in err[0]
    assert digest(out) == before  # nothing deleted, nothing appended


# -----------------------------------------------------------------------------
# 4. a non-finite stop keeps a good checkpoint

def _poison_grad(monkeypatch, at_call: int) -> None:
    """The at_call-th backward leaves a NaN in lm_head's gradient (the loss itself stays finite)."""
    original, calls = loop.backward_step, {"n": 0}

    def poisoned(gpt, *args, **kwargs):
        losses = original(gpt, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == at_call:
            gpt.lm_head.weight.grad[0, 0] = float("nan")
        return losses

    monkeypatch.setattr(loop, "backward_step", poisoned)


def _poison_weight(monkeypatch, at_call: int) -> None:
    """The at_call-th optimizer step leaves an inf in lm_head (softcapped logits hide it from that step's loss)."""
    original, calls = loop.MuonAdamW.step, {"n": 0}

    def poisoned(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == at_call:
            with torch.no_grad():
                self.adamw.param_groups[0]["params"][0][0, 0] = float("inf")

    monkeypatch.setattr(loop.MuonAdamW, "step", poisoned)


@pytest.mark.parametrize("poison,what", [(_poison_grad, "gradient"), (_poison_weight, "weights")])
def test_nonfinite_grads_or_weights_stop_before_saving(corpus, tok_dir, tmp_path, monkeypatch, poison, what):
    out = tmp_path / "run"
    poison(monkeypatch, 3)
    with pytest.raises(NonFiniteLossError, match=what) as e:
        train(small_cfg(corpus, tok_dir, out, num_steps=5, save_every=1))
    monkeypatch.undo()
    named = re.search(r"last good checkpoint: (\S+)", str(e.value)).group(1)
    ckpt_root = out / "checkpoints"
    assert named == str(ckpt_root / "step_000002")
    assert open(ckpt_root / "latest").read().strip() == "step_000002"
    assert not os.path.exists(ckpt_root / "step_000003")
    assert all(torch.isfinite(v).all() for v in load_file(os.path.join(named, "model.safetensors")).values())
    resumed = train(small_cfg(corpus, tok_dir, out, num_steps=5, save_every=1, resume=True))
    assert resumed["step"] == 5 and all(map(torch.isfinite, torch.tensor(resumed["final_losses"])))


def test_nonfinite_stop_in_the_cli_is_one_line_and_exit_2(corpus, tok_dir, tmp_path, monkeypatch, capsys):
    original = GPT.exit_logits
    monkeypatch.setattr(GPT, "exit_logits", lambda self, *a, **kw: original(self, *a, **kw) * float("nan"))
    args = ["train", "--preset", "tiny", "--sequence-len", "64", "--data", corpus, "--tokenizer", tok_dir,
            "--num-steps", "2", "--device-batch-size", "4", "--out-dir", str(tmp_path / "run"), "--no-progress",
            "--no-export", "--eval-tokens", "520"]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("cognica-poe train: error: non-finite loss at step 1")


@pytest.mark.parametrize("broken", ["model.safetensors", "state.pt"])
def test_truncated_latest_checkpoint_falls_back_to_the_previous(corpus, tok_dir, tmp_path, broken):
    out = tmp_path / "run"
    train(small_cfg(corpus, tok_dir, out, num_steps=4, save_every=1, keep_checkpoints=2))
    path = out / "checkpoints" / "step_000004" / broken
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    with pytest.warns(UserWarning, match="step_000004.*step_000003"):
        summary = train(small_cfg(corpus, tok_dir, out, num_steps=6, save_every=1, keep_checkpoints=2, resume=True))
    assert summary["step"] == 6
    steps = [json.loads(line)["step"] for line in open(out / "metrics.jsonl") if '"train"' in line]
    assert steps == [1, 2, 3, 4, 5, 6]
    assert sorted(os.listdir(out / "checkpoints")) == ["latest", "step_000005", "step_000006"]


# -----------------------------------------------------------------------------
# 5. calibrate writes only the bounds

def test_calibrate_writes_only_the_bounds(tok, tmp_path):
    folder = export_hf_folder(perturbed_model(vocab_size=len(tok)), tok, str(tmp_path / "hf"), dtype="bfloat16")
    config_path = os.path.join(folder, "config.json")
    before = json.load(open(config_path))
    others = {k: v for k, v in digest(folder).items() if k != "config.json"}
    text = tmp_path / "text.txt"
    with open(tdata.bundled_corpus(), encoding="utf-8") as f:
        text.write_text(f.read()[:20_000], encoding="utf-8")
    assert cli_main(["calibrate", folder, str(text), "--max-tokens", "300", "--seq-len", "32"]) == 0
    after = json.load(open(config_path))
    bounds = after.pop("wand_p99_bounds")
    before.pop("wand_p99_bounds", None)
    assert after == before and before["dtype"] == "bfloat16"  # every other field kept, dtype included
    assert len(bounds) == 3 and all(b > 0 for b in bounds)
    assert {k: v for k, v in digest(folder).items() if k != "config.json"} == others
    assert load_model(folder).gpt.lm_head.weight.dtype == torch.bfloat16


# -----------------------------------------------------------------------------
# 12. permissions follow the umask; temporary names left by a kill are cleaned at the next write

@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def assert_modes(folder) -> None:
    for root, _, files in os.walk(folder):
        assert stat.S_IMODE(os.stat(root).st_mode) == 0o755, root
        for name in files:
            path = os.path.join(root, name)
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o644, path


def test_written_files_follow_the_umask(corpus, tmp_path, umask_022):
    run = train(small_cfg(corpus, None, tmp_path / "run", vocab_size=300, num_steps=1, export=True,
                          export_dtype="float32"))  # tokenizer/, checkpoints/, hf/, metrics
    assert os.path.isdir(run["hf_dir"]) and os.path.isdir(tmp_path / "run" / "tokenizer")
    base = export(tmp_path, "base")
    new_stage_folder(base, str(tmp_path / "stage"), 1)
    for name in ("run", "base", "stage"):  # (tmp_path itself is pytest's, made private)
        assert_modes(tmp_path / name)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_stale_temporaries_of_a_killed_writer_are_cleaned(tmp_path, tok):
    from cognica_poe.atomic import temp_path

    dead = _dead_pid()
    out = str(tmp_path / "hf")
    stale_dir = temp_path(out, pid=dead)
    live_dir = temp_path(out, pid=os.getpid())  # a writer still running: kept
    os.makedirs(stale_dir)
    os.makedirs(live_dir)
    open(os.path.join(stale_dir, "model.safetensors"), "w").write("half")
    foreign = [tmp_path / ".export-mine", tmp_path / "notes.tmp", tmp_path / ".hf.tmp-notes"]
    foreign[0].mkdir()
    foreign[1].write_text("x")
    foreign[2].write_text("x")
    export_hf_folder(perturbed_model(vocab_size=len(tok)), tok, out, dtype="float32")
    assert not os.path.exists(stale_dir) and os.path.isdir(live_dir) and all(p.exists() for p in foreign)
    # a file's temporary (config.json written by calibrate) and a checkpoint's
    stale_file = temp_path(os.path.join(out, "config.json"), pid=dead)
    open(stale_file, "w").write("{")
    text = tmp_path / "text.txt"
    with open(tdata.bundled_corpus(), encoding="utf-8") as f:
        text.write_text(f.read()[:20_000], encoding="utf-8")
    assert cli_main(["calibrate", out, str(text), "--max-tokens", "300", "--seq-len", "32"]) == 0
    assert not os.path.exists(stale_file)
    ckpt_root = tmp_path / "checkpoints"
    ckpt_root.mkdir()
    stale_step = temp_path(str(ckpt_root / "step_000001"), pid=dead)
    os.makedirs(stale_step)
    gpt = GPT.from_config(perturbed_model().config, seed=0)
    loop.save_checkpoint(str(ckpt_root), 1, gpt, loop.MuonAdamW(gpt, 256), {"step": 1})
    assert sorted(os.listdir(ckpt_root)) == ["latest", "step_000001"]
    shutil.rmtree(live_dir)


def test_a_kill_between_the_swaps_renames_is_undone_at_the_next_write(tmp_path):
    """Killed after moving the old folder aside and before renaming the new one in: the old one comes back."""
    from cognica_poe.atomic import temp_path

    out = export(tmp_path, "hf")
    old = digest(out)
    os.rename(out, temp_path(out, pid=_dead_pid(), kind="old"))
    export(tmp_path, "other")  # any later write in that folder
    assert digest(out) == old and sorted(os.listdir(tmp_path)) == ["hf", "other"]


def test_a_refused_final_write_is_found_before_training(corpus, tok_dir, tok, tmp_path):
    """sft into the stage folder it trains (the source), train exporting over a folder not ours: refused up front,
    before a step is trained or a file is written."""
    from cognica_poe.train.sft import SFTConfig, sft

    run = tmp_path / "run"
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "thesis.tex").write_text("years of work")
    with pytest.raises(ValueError, match="did not write"):
        train(small_cfg(corpus, tok_dir, run, num_steps=1, export=True))
    assert sorted(os.listdir(run)) == ["hf"] and os.listdir(run / "hf") == ["thesis.tex"]
    base = export_hf_folder(perturbed_model(vocab_size=len(tok)), tok, str(tmp_path / "base"), dtype="float32")
    stage = new_stage_folder(base, str(tmp_path / "chat" / "stage"), 1)
    data = tmp_path / "chat.jsonl"
    conv = {"messages": [{"role": "user", "content": "Say red."}, {"role": "assistant", "content": "red"}]}
    data.write_text("\n".join(json.dumps(conv) for _ in range(4)) + "\n")
    before = digest(tmp_path / "chat")
    with pytest.raises(ValueError, match="source"):
        sft(SFTConfig(model=stage, data=str(data), out_dir=str(tmp_path / "chat"), steps=1, batch_size=2))
    assert digest(tmp_path / "chat") == before


def test_save_stage_folder_refuses_a_parent_relative_to_the_working_directory(tmp_path, monkeypatch):
    base = export(tmp_path, "models/base")
    spec = specialize(CognicaPoEForCausalLM.from_pretrained(base), 1, seed=0)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="relative to the working directory"):
        save_stage_folder(spec, str(tmp_path / "stages" / "x"), "models/base")
    assert not os.path.exists(tmp_path / "stages" / "x")


def test_a_parent_relative_to_the_new_stage_folder_is_accepted_from_any_working_directory(tmp_path, monkeypatch):
    """"../x" names the sibling stage folder x, read from the new folder's place: never refused because the working
    directory also happens to have a "../x" (the stage folder does not exist yet, so the path is resolved by name)."""
    base = export(tmp_path, "models/base")
    spec = specialize(CognicaPoEForCausalLM.from_pretrained(base), 1, seed=0)
    parent = save_stage_folder(spec, str(tmp_path / "stages" / "x"), os.path.relpath(base, tmp_path / "stages" / "x"))
    (tmp_path / "work" / "x").mkdir(parents=True)
    (tmp_path / "work" / "sub").mkdir()
    monkeypatch.chdir(tmp_path / "work" / "sub")  # here "../x" is work/x, another folder
    child = specialize(load_folder(parent), 1, seed=1)
    folder = save_stage_folder(child, str(tmp_path / "stages" / "y"), "../x")
    assert json.load(open(os.path.join(folder, "config.json")))["base_model_name_or_path"] == "../x"
    assert load_folder(folder).config.n_layer == child.config.n_layer


def test_calibrate_shows_progress_and_refuses_another_models_tokenizer(tok, tmp_path, capsys):
    """calibrate's windows are counted on a progress bar (stderr), and the folder's tokenizer is checked against the
    model's vocabulary before anything runs, as every other command does."""
    folder = export_hf_folder(perturbed_model(vocab_size=len(tok)), tok, str(tmp_path / "hf"), dtype="float32")
    text = tmp_path / "text.txt"
    with open(tdata.bundled_corpus(), encoding="utf-8") as f:
        text.write_text(f.read()[:20_000], encoding="utf-8")
    assert cli_main(["calibrate", folder, str(text), "--max-tokens", "300", "--seq-len", "32"]) == 0
    err = capsys.readouterr().err
    assert "calibrate" in err and "window" in err  # tqdm's bar: "calibrate: 100%|...| 9/9 [.. windows/s]"
    config = json.load(open(os.path.join(folder, "config.json")))
    config["vocab_size"] = len(tok) + 64
    with open(os.path.join(folder, "config.json"), "w") as f:
        json.dump(config, f)
    assert cli_main(["calibrate", folder, str(text)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"tokenizer has {len(tok)} ids" in err


# -----------------------------------------------------------------------------
# 5. the report, the curves and a trained tokenizer are written whole or not at all

def fake_report() -> dict:
    """A two-stage capability report with every field write_report and its plots read ("speed" last, so a NaN there
    comes after the rest of report.json has been written)."""
    from cognica_poe.eval.report import capability_table

    r = {"model": {"name": "fake", "n_stages": 2, "n_layer": 2, "stage_boundary_layers": [0, 1]},
         "machine": {"cpu": "cpu", "threads": 1, "torch": torch.__version__},
         "heldout": {"counted_tokens": 100}, "stage_bpb": [2.0, 1.5], "composition_bpb": {"0+1": 1.6},
         "agreement_matrix": [[1.0, 0.5], [0.5, 1.0]], "agreement_with_final": [0.5, 1.0],
         "margins": {"stages": [1.0, 2.0], "compositions": {"0+1": 3.0}}, "baseline": None,
         "wand": {"p99_bounds": [1.0], "bounds_source": "config", "safeties": [
             {"safety": 1.0, "tok_s": 10.0, "speedup": 1.2, "top1_agreement": 1.0, "exit_histogram": [3, 1]}]},
         "speculative": [{"draft_stage": 0, "k": 1, "speedup": 1.1, "cost_model_speedup": 1.3, "acceptance": 0.7,
                          "tok_s": 9.0, "lossless": True}],
         "speed": {"tokens_per_run": 8, "prompts": 1, "runs": 1, "full_tok_s": 8.0, "stage_tok_s": [12.0, 8.0],
                   "stage_speedup": [1.5, 1.0], "compose_all_tok_s": 7.0, "compose_all_speedup": 0.9}}
    r["capability_table"] = capability_table(r)
    return r


def _broken_savefig(self, fname, *args, **kwargs):
    """A savefig that dies half way (a full disk): some bytes reach its target, then an error."""
    f = open(fname, "wb") if isinstance(fname, (str, os.PathLike)) else fname
    f.write(b"\x89PNG half")
    f.flush()
    raise OSError("No space left on device")


def test_a_failed_report_write_keeps_the_previous_report_whole(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from cognica_poe.eval.report import write_report

    out = tmp_path / "report"
    files = write_report(fake_report(), str(out))
    assert sorted(os.listdir(out)) == ["report.json", "report.md", "report_quality.png", "report_speed.png"]
    assert all(open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n" for p in (files["quality_plot"], files["speed_plot"]))
    before = digest(out)
    bad = fake_report()
    bad["speed"]["compose_all_speedup"] = float("nan")  # json refuses it after writing most of the file
    with pytest.raises(ValueError):
        write_report(bad, str(out), plots=False)
    assert digest(out) == before
    monkeypatch.setattr(Figure, "savefig", _broken_savefig)
    with pytest.raises(OSError, match="No space"):
        write_report(fake_report(), str(out))
    assert digest(out) == before


def test_a_failed_curves_plot_keeps_the_previous_png(tmp_path, monkeypatch):
    from matplotlib.figure import Figure

    from cognica_poe.train.plot import plot_metrics

    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"type": "train", "step": 1, "losses": [2.0, 1.0]}\n'
                       '{"type": "eval", "step": 1, "bpb": [2.5, 2.0]}\n')
    png = tmp_path / "curves.png"
    assert plot_metrics(str(metrics), str(png)) == str(png)
    before = digest(tmp_path)
    monkeypatch.setattr(Figure, "savefig", _broken_savefig)
    with pytest.raises(OSError, match="No space"):
        plot_metrics(str(metrics), str(png))
    assert digest(tmp_path) == before


def test_plots_leave_matplotlibs_backend_and_pyplot_alone(tmp_path):
    """The curves and the report's plots are drawn on Figure objects: the caller's backend stays, no pyplot."""
    code = ("import json, sys, matplotlib\nmatplotlib.use('pdf')\n"
            "from cognica_poe.train.plot import plot_metrics\nfrom cognica_poe.eval.report import plot_report\n"
            "from test_hardening_writers import fake_report\n"
            "m = sys.argv[1] + '/metrics.jsonl'\n"
            "open(m, 'w').write(json.dumps({'type': 'train', 'step': 1, 'losses': [2.0, 1.0]}) + '\\n')\n"
            "paths = [plot_metrics(m, sys.argv[1] + '/curves.png')] + plot_report(fake_report(), sys.argv[1])\n"
            "pngs = [open(p, 'rb').read(8) == b'\\x89PNG\\r\\n\\x1a\\n' for p in paths]\n"
            "print(json.dumps([matplotlib.get_backend(), 'matplotlib.pyplot' in sys.modules, pngs]))\n")
    here = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([os.path.join(here, "..", "src"), here]),
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.splitlines()[-1]) == ["pdf", False, [True, True, True]]


def test_a_failed_tokenizer_train_leaves_no_folder(corpus, tmp_path, monkeypatch, capsys):
    from cognica_poe.tokenizer import CognicaPoETokenizer

    def broken_save(self, folder, *args, **kwargs):
        os.makedirs(folder, exist_ok=True)  # as transformers' save_pretrained does
        with open(os.path.join(folder, "tokenizer.tiktoken"), "w") as f:
            f.write("half")
        raise OSError("No space left on device")

    monkeypatch.setattr(CognicaPoETokenizer, "save_pretrained", broken_save)
    out = tmp_path / "tok"
    args = ["tokenizer", "train", "--data", corpus, "--vocab-size", "300", "--max-chars", "20000", "--out", str(out)]
    assert cli_main(args) == 2
    assert "No space" in capsys.readouterr().err
    assert os.listdir(tmp_path) == []  # neither the folder nor a temporary
    out.mkdir()  # an empty folder given as --out is still accepted
    monkeypatch.undo()
    assert cli_main(args) == 0
    assert CognicaPoETokenizer.from_pretrained(str(out)).encode("ROMEO:") == \
        train_bpe(tdata.iter_tokenizer_texts(corpus, 20000), 300).encode("ROMEO:")

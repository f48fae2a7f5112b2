"""lm-evaluation-harness on an exported folder, full depth and per stage (config.poe_exit_stage), all offline."""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import perturbed_model

from cognica_poe.checkpoint import export_hf_folder
from cognica_poe.hf import CognicaPoEForCausalLM
from cognica_poe.tokenizer import CognicaPoETokenizer
from cognica_poe.tokenizer_train import train_bpe

TEXT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "cognica_poe", "data",
                    "tinyshakespeare.txt")
TASK = "poe_tiny_mc"
DOCS = [
    {"question": "ROMEO: What light through yonder", "choices": ["window", "sword", "king"], "answer": 0},
    {"question": "First Citizen: We are accounted poor", "choices": ["citizens", "horses"], "answer": 0},
    {"question": "KING RICHARD: My kingdom for a", "choices": ["horse", "crown", "fool", "dog"], "answer": 0},
    {"question": "JULIET: O Romeo, Romeo, wherefore art", "choices": ["thou", "we"], "answer": 0},
    {"question": "HAMLET: To be, or not to", "choices": ["be", "sleep", "go"], "answer": 0},
    {"question": "MENENIUS: What work's, my countrymen, in", "choices": ["hand", "heart"], "answer": 0},
]


def ids(n: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.cat([torch.zeros(2, 1, dtype=torch.long), torch.randint(1, 500, (2, n - 1), generator=g)], 1)


# -----------------------------------------------------------------------------
# unit: the served exit follows config.poe_exit_stage

def test_exit_stage_serves_that_stage(tiny_model):
    x = ids()
    stages = tiny_model.gpt.forward_all_stages(x)
    n = tiny_model.poe_n_stages
    for s in list(range(n)) + [-1, -n]:
        tiny_model.config.poe_exit_stage = s
        assert torch.equal(tiny_model(x).logits, stages[s]), s
    tiny_model.config.poe_exit_stage = None
    assert torch.equal(tiny_model(x).logits, stages[-1])


def test_exit_stage_runs_only_layers_up_to_its_boundary(tiny_model):
    ran = []
    for i, block in enumerate(tiny_model.gpt.transformer.h):
        block.register_forward_hook(lambda *_, i=i: ran.append(i))
    tiny_model.config.poe_exit_stage = 1
    tiny_model(ids())
    assert ran == [0, 1]  # tiny: one layer per stage, boundaries [0, 1, 2, 3]


def test_bad_exit_stage_is_a_clear_error(tiny_model):
    for bad in (4, -5, True, 1.0, "1"):
        tiny_model.config.poe_exit_stage = bad
        with pytest.raises(ValueError, match=r"poe_exit_stage .* 0\.\.3"):
            tiny_model(ids())
    with pytest.raises(ValueError, match="poe_exit_stage"):
        perturbed_model(poe_exit_stage=4)


def test_generate_with_cache_serves_the_stage(tiny_model):
    """HF generate() (our preallocated cache, only the stage's layers filled) equals a no-cache greedy loop."""
    tiny_model.config.poe_exit_stage = 1
    x = ids(6)
    out = tiny_model.generate(x, max_new_tokens=6, do_sample=False, pad_token_id=0)
    ref = x
    for _ in range(6):
        nxt = tiny_model.gpt.forward_all_stages(ref)[1][:, -1].argmax(-1, keepdim=True)
        ref = torch.cat([ref, nxt], 1)
    assert torch.equal(out, ref)


def test_from_pretrained_kwarg_and_config_round_trip(tiny_model, tmp_path):
    tiny_model.save_pretrained(tmp_path / "full")
    x = ids()
    stages = tiny_model.gpt.forward_all_stages(x)
    model = CognicaPoEForCausalLM.from_pretrained(tmp_path / "full", poe_exit_stage=1)
    assert model.config.poe_exit_stage == 1
    torch.testing.assert_close(model(x).logits, stages[1], rtol=0, atol=1e-6)
    assert CognicaPoEForCausalLM.from_pretrained(tmp_path / "full").config.poe_exit_stage is None
    model.save_pretrained(tmp_path / "stage1")  # the choice is a config field: it survives config.json
    again = CognicaPoEForCausalLM.from_pretrained(tmp_path / "stage1")
    assert again.config.poe_exit_stage == 1
    bad = CognicaPoEForCausalLM.from_pretrained(tmp_path / "full", poe_exit_stage=7)
    with pytest.raises(ValueError, match=r"0\.\.3"):
        bad(x)


# -----------------------------------------------------------------------------
# end to end: the harness on an exported folder with a local multiple-choice task

@pytest.fixture(scope="module")
def harness_setup(tmp_path_factory) -> tuple[str, str]:
    """An exported fp32 folder (model + tokenizer + remote code) and a task folder whose data is a local JSONL."""
    root = tmp_path_factory.mktemp("lm_eval")
    with open(TEXT, encoding="utf-8") as f:
        tok = train_bpe(iter(f.read()[:60_000].split("\n\n")), vocab_size=512)
    folder = export_hf_folder(perturbed_model(seed=3, vocab_size=len(tok)), tok, str(root / "model"), dtype="float32")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "docs.jsonl").write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {tasks / 'docs.jsonl'}\n"
        f"  cache_dir: {root / 'hf_datasets'}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: '{{question}}'\n"
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        "metric_list:\n  - metric: acc\n"
    )
    return folder, str(tasks)


def reference_loglikelihoods(folder: str, stage: int) -> list[list[float]]:
    """Per doc, per choice: sum of log-softmax of forward_all_stages()[stage] over the continuation tokens."""
    tok = CognicaPoETokenizer.from_pretrained(folder)
    model = CognicaPoEForCausalLM.from_pretrained(folder).eval()
    out = []
    for doc in DOCS:
        ctx = [tok.bos_token_id] + tok.encode(doc["question"])
        row = []
        for choice in doc["choices"]:
            cont = tok.encode(" " + choice)  # the harness joins with its default target_delimiter " "
            assert ctx[1:] + cont == tok.encode(doc["question"] + " " + choice)  # and splits the same way
            x = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = model.gpt.forward_all_stages(x)[stage][0].log_softmax(-1)
            row.append(sum(logp[len(ctx) - 1 + j, t].item() for j, t in enumerate(cont)))
        out.append(row)
    return out


def harness_loglikelihoods(result: dict) -> list[list[float]]:
    samples = sorted(result["samples"][TASK], key=lambda s: s["doc_id"])
    return [[float(r[0]) for r in s["filtered_resps"]] for s in samples]


def accuracy(lls: list[list[float]]) -> float:
    return sum(max(range(len(r)), key=r.__getitem__) == d["answer"] for r, d in zip(lls, DOCS)) / len(DOCS)


@pytest.mark.parametrize("stage", [None, 0])
def test_simple_evaluate_matches_our_loglikelihoods(harness_setup, stage):
    lm_eval = pytest.importorskip("lm_eval")
    from lm_eval.tasks import TaskManager

    folder, tasks = harness_setup
    args = f"pretrained={folder},trust_remote_code=True,add_bos_token=True,dtype=float32"
    if stage is not None:
        args += f",poe_exit_stage={stage}"
    result = lm_eval.simple_evaluate(model="hf", model_args=args, tasks=[TASK], device="cpu", batch_size=4,
                                     task_manager=TaskManager(include_path=tasks, include_defaults=False),
                                     log_samples=True)
    got = harness_loglikelihoods(result)
    want = reference_loglikelihoods(folder, -1 if stage is None else stage)
    other = reference_loglikelihoods(folder, 0 if stage is None else -1)
    for g, w, o in zip(got, want, other):
        assert g == pytest.approx(w, abs=1e-4)
        assert g != pytest.approx(o, abs=1e-4)  # the stage choice really changes what is scored
    assert result["results"][TASK]["acc,none"] == pytest.approx(accuracy(want))


def test_cli_runs_offline_per_stage(harness_setup, tmp_path):
    pytest.importorskip("lm_eval")
    folder, tasks = harness_setup
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    cmd = [sys.executable, "-m", "lm_eval", "--model", "hf", "--model_args",
           f"pretrained={folder},trust_remote_code=True,add_bos_token=True,dtype=float32,poe_exit_stage=1",
           "--tasks", TASK, "--include_path", tasks, "--device", "cpu", "--batch_size", "4",
           "--output_path", str(tmp_path / "out")]
    r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    (path,) = [os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "out") for f in fs if f.startswith("results")]
    with open(path) as f:
        acc = json.load(f)["results"][TASK]["acc,none"]
    assert acc == pytest.approx(accuracy(reference_loglikelihoods(folder, 1)))

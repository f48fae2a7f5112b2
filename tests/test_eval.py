"""Evaluation: bits per byte by hand, CORE scoring of every task type on toy tasks with known answers."""

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

from cognica_poe.bpb import stage_bpb
from cognica_poe.eval.core import evaluate_core, load_bundle
from cognica_poe.tokenizer_train import train_bpe

HERE = os.path.dirname(os.path.abspath(__file__))


@pytest.fixture(scope="module")
def tok():
    with open(os.path.join(HERE, "..", "src", "cognica_poe", "data", "tinyshakespeare.txt"), encoding="utf-8") as f:
        return train_bpe(iter(f.read()[:300_000].split("\n\n")), vocab_size=700)


def test_bpb_equals_hand_computation(tiny_model):
    torch.manual_seed(0)
    stream = torch.randint(0, 512, (3 * 17 + 5,))
    stream[0] = 0
    token_bytes = torch.randint(0, 4, (512,), dtype=torch.int32)
    token_bytes[0] = 0  # BOS-like: excluded
    got = stage_bpb(tiny_model.gpt, stream, token_bytes, seq_len=16, batch_size=2)
    nats = [0.0] * 4
    n_bytes = 0
    for s in range(0, 3 * 16 + 1, 16):
        x, y = stream[s:s + 16], stream[s + 1:s + 17]
        if len(y) < 16:
            break
        with torch.no_grad():
            exits = tiny_model.gpt.forward_all_stages(x[None])
        for k, logits in enumerate(exits):
            logp = F.log_softmax(logits[0].double(), dim=-1)
            for t in range(16):
                if token_bytes[y[t]] > 0:
                    nats[k] -= float(logp[t, y[t]])
        n_bytes += int(token_bytes[y].sum())
    want = [n / (math.log(2) * n_bytes) for n in nats]
    assert got == pytest.approx(want, rel=1e-5)


class OracleGPT:
    """A stand-in model with known answers: at exit k, once a token of triggers[k] has appeared in the row, every
    token of prefer[k] scores high."""

    def __init__(self, vocab: int, triggers: list[set[int]], prefer: list[set[int]]):
        self.vocab, self.triggers, self.prefer = vocab, triggers, prefer
        self.config = SimpleNamespace(sequence_len=256)
        self.lm_head = SimpleNamespace(weight=torch.zeros(1))
        self.device = torch.device("cpu")

    def forward_all_stages(self, batch, boundaries):
        out = []
        for b in boundaries:
            seen = torch.isin(batch, torch.tensor(sorted(self.triggers[b]))).long().cummax(dim=1).values.bool()
            logits = torch.zeros(*batch.shape, self.vocab)
            boost = torch.zeros(self.vocab)
            boost[sorted(self.prefer[b])] = 8.0
            logits[seen] += boost
            out.append(logits)
        return out


def write_bundle(folder, tasks):
    os.makedirs(os.path.join(folder, "eval_data"), exist_ok=True)
    lines = ["icl_tasks:"]
    rows = ["Eval Task,Random baseline"]
    for label, kind, k, baseline, items in tasks:
        lines += [f"- label: {label}", f"  dataset_uri: {label}.jsonl", f"  num_fewshot: [{k}]",
                  f"  icl_task_type: {kind}", "  continuation_delimiter: ' '"]
        rows.append(f"{label},{baseline}")
        with open(os.path.join(folder, "eval_data", f"{label}.jsonl"), "w") as f:
            f.write("\n".join(json.dumps(it) for it in items) + "\n")
    with open(os.path.join(folder, "core.yaml"), "w") as f:
        f.write("\n".join(lines) + "\n")
    with open(os.path.join(folder, "eval_meta_data.csv"), "w") as f:
        f.write("\n".join(rows) + "\n")


def test_core_scoring_of_each_task_type(tok, tmp_path):
    good, love = tok.encoding.encode_ordinary(" good"), tok.encoding.encode_ordinary(" love")
    assert len(good) == 1 and len(love) == 1, "the toy answers must be single tokens"
    mc = [{"query": f"Question {i}: is it", "choices": ["love", "good"] if i % 2 else ["good", "love"],
           "gold": 1 if i % 2 else 0} for i in range(6)]
    schema = [{"context_options": ["It was love, it was", "It was good, it was"], "continuation": "good",
               "gold": 1} for _ in range(4)]
    lm = [{"context": f"Line {i} is", "continuation": "good"} for i in range(5)]
    write_bundle(str(tmp_path), [("toy_mc", "multiple_choice", 2, 50, mc), ("toy_schema", "schema", 0, 50, schema),
                                 ("toy_lm", "language_modeling", 0, 0, lm)])
    assert [t["type"] for t in load_bundle(str(tmp_path))] == ["multiple_choice", "schema", "language_modeling"]
    bos = {tok.bos_token_id}
    # MC and LM: exit 0 always prefers " love", exit 1 " good". Schema: exit 1 predicts " good" only after a
    # " good" in the row (so the right context wins); exit 0 only after " love" (so the wrong one wins)
    mc_lm = OracleGPT(len(tok), [bos, bos], [set(love), set(good)])
    model = SimpleNamespace(gpt=mc_lm, poe_n_stages=2, stage_boundary=lambda s: s)
    r = evaluate_core(model, tok, str(tmp_path))
    assert r["tasks"]["toy_mc"]["accuracy"] == [0.0, 1.0] and r["tasks"]["toy_lm"]["accuracy"] == [0.0, 1.0]
    assert r["tasks"]["toy_mc"]["centered"] == [-1.0, 1.0]  # (acc - 0.5) / (1 - 0.5)
    schema_oracle = OracleGPT(len(tok), [set(love), set(good)], [set(good), set(good)])
    r2 = evaluate_core(SimpleNamespace(gpt=schema_oracle, poe_n_stages=2, stage_boundary=lambda s: s), tok,
                       str(tmp_path))
    assert r2["tasks"]["toy_schema"]["accuracy"] == [0.0, 1.0]
    assert r["core"][1] == pytest.approx(sum(t["centered"][1] for t in r["tasks"].values()) / 3)
    assert r["tasks"]["toy_lm"]["centered"] == [0.0, 1.0]  # baseline 0


def test_cli_eval_core_on_a_real_model(d8_model, tmp_path, capsys):
    from cognica_poe.checkpoint import export_hf_folder
    from cognica_poe.cli import main as cli_main

    model, tok = d8_model
    folder = export_hf_folder(model, tok, str(tmp_path / "m"), dtype="float32")
    mc = [{"query": "ROMEO: O, she doth teach the torches to burn", "choices": ["bright!", "seventeen kilograms"],
           "gold": 0}] * 2
    write_bundle(str(tmp_path / "bundle"), [("mini", "multiple_choice", 0, 50, mc)])
    assert cli_main(["eval", "core", folder, str(tmp_path / "bundle"), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["stages"] == [0, 1, 2, 3] and len(r["core"]) == 4 and r["tasks"]["mini"]["n"] == 2
    assert all(-1.0 <= c <= 1.0 for c in r["core"])


def test_composition_bpb_by_hand_and_cli(d8_model, tmp_path, capsys):
    from cognica_poe.bpb import evaluate_bpb
    from cognica_poe.checkpoint import export_hf_folder
    from cognica_poe.cli import main as cli_main

    model, tok = d8_model
    text = "It was in July, 1805, and the speaker was the well-known Anna Pavlovna Scherer, maid of honor."
    stream = torch.tensor([tok.bos_token_id] + tok(text * 6)["input_ids"])[:66]  # exactly one 64-token window
    tb = tok.token_bytes()
    r = evaluate_bpb(model.gpt, stream, tb, seq_len=64, batch_size=2, compositions=[[0, 3], [3]])
    assert r["compositions"]["3"] == pytest.approx(r["stages"][3], rel=1e-6)  # a one-exit product is that exit
    x, y = stream[:64], stream[1:65]
    with torch.no_grad():
        exits = model.gpt.forward_all_stages(x[None])
    logp = torch.log_softmax(F.log_softmax(exits[0][0].double(), -1) + F.log_softmax(exits[3][0].double(), -1), -1)
    keep = tb[y] > 0
    want = float(-logp[torch.arange(64), y][keep].sum()) / (math.log(2) * int(tb[y].sum()))
    assert r["compositions"]["0+3"] == pytest.approx(want, rel=1e-5)
    # the same pass's agreement, accuracy and margins, by hand
    lp = [F.log_softmax(e[0].double(), -1)[keep] for e in exits]
    top1 = [p.argmax(-1) for p in lp]
    assert r["agreement"][0][3] == pytest.approx(float((top1[0] == top1[3]).double().mean()), abs=1e-9)
    assert r["agreement"][2][2] == 1.0 and r["counted_tokens"] == int(keep.sum())
    assert r["top1_accuracy"]["stages"][3] == pytest.approx(float((top1[3] == y[keep]).double().mean()), abs=1e-9)
    top2 = lp[3].topk(2, dim=-1).values
    assert r["margin"]["stages"][3] == pytest.approx(float((top2[:, 0] - top2[:, 1]).mean()), rel=1e-4)
    both = logp[keep].topk(2, dim=-1).values
    assert r["margin"]["compositions"]["0+3"] == pytest.approx(float((both[:, 0] - both[:, 1]).mean()), rel=1e-4)
    with pytest.raises(ValueError, match="exit indices"):
        evaluate_bpb(model.gpt, stream, tb, seq_len=64, compositions=[[0, 7]])
    # weighted: the geometric mean (weights 1/2), by hand
    w = evaluate_bpb(model.gpt, stream, tb, seq_len=64, compositions=[[0, 3]], composition_weights=[[0.5, 0.5]])
    mean = torch.log_softmax(0.5 * F.log_softmax(exits[0][0].double(), -1) + 0.5 * F.log_softmax(exits[3][0].double(),
                                                                                                  -1), -1)
    want = float(-mean[torch.arange(64), y][keep].sum()) / (math.log(2) * int(tb[y].sum()))
    assert w["compositions"]["0.5*0+0.5*3"] == pytest.approx(want, rel=1e-5)
    with pytest.raises(ValueError, match="weights"):
        evaluate_bpb(model.gpt, stream, tb, seq_len=64, compositions=[[0, 3]], composition_weights=[[1.0]])
    folder = export_hf_folder(model, tok, str(tmp_path / "m"), dtype="float32")
    assert cli_main(["eval", "bpb", folder, "--max-tokens", "3000", "--seq-len", "128", "--compose", "0,3",
                     "0,1,2,3", "0:0.5,3:0.5", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert len(out["stages"]) == 4 and set(out["compositions"]) == {"0+3", "0+1+2+3", "0.5*0+0.5*3"}
    assert all(1.0 < b < 5.0 for b in out["stages"])


def test_report_has_every_field_in_range(d8_model, tmp_path, capsys):
    """`cognica-poe report` on the trained reference model, shortened; the model is also its own baseline (gap 0)."""
    from cognica_poe.checkpoint import export_hf_folder
    from cognica_poe.cli import main as cli_main

    model, tok = d8_model
    folder = export_hf_folder(model, tok, str(tmp_path / "m"), dtype="float32")
    out = tmp_path / "rep"
    assert cli_main(["report", folder, "--out", str(out), "--runs", "1", "--new-tokens", "5", "--n-prompts", "2",
                     "--eval-tokens", "3000", "--draft-stages", "0", "1", "--baseline", folder]) == 0
    printed = capsys.readouterr().out
    assert "| Capability | This checkpoint | Measured how |" in printed and "WAND adaptive depth" in printed
    r = json.loads((out / "report.json").read_text())
    assert sorted(os.listdir(out)) == ["report.json", "report.md", "report_quality.png", "report_speed.png"]
    assert (out / "report_quality.png").stat().st_size > 10_000
    n = 4
    assert r["model"]["n_stages"] == n and r["model"]["stage_boundary_layers"] == [1, 3, 5, 7]
    assert r["machine"]["cpu"] and r["heldout"]["tokens"] == 3000
    assert len(r["stage_bpb"]) == n and all(0.5 < b < 8 for b in r["stage_bpb"])
    assert r["stage_bpb"][3] < r["stage_bpb"][0]  # deeper is better on a trained model
    combos = {"0+1+2+3", "0.25*0+0.25*1+0.25*2+0.25*3", "2+3"}
    assert set(r["composition_bpb"]) == set(r["margins"]["compositions"]) == combos
    # the geometric mean is a calibrated mixture: within the exits' BPB range, unlike the sharper product
    assert r["composition_bpb"]["0.25*0+0.25*1+0.25*2+0.25*3"] < r["composition_bpb"]["0+1+2+3"]
    assert r["composition_bpb"]["0.25*0+0.25*1+0.25*2+0.25*3"] < max(r["stage_bpb"]) + 0.05
    m = r["agreement_matrix"]
    assert all(m[i][i] == 1.0 and all(0 <= m[i][j] <= 1 and m[i][j] == m[j][i] for j in range(n)) for i in range(n))
    assert r["agreement_with_final"] == [row[3] for row in m] and r["agreement_with_final"][3] == 1.0
    assert all(0 <= a <= 1 for a in r["top1_accuracy"]["stages"]) and all(x > 0 for x in r["margins"]["stages"])
    # composing all exits multiplies distributions that mostly agree: a wider margin than the final exit's
    assert r["margins"]["compositions"]["0+1+2+3"] > r["margins"]["stages"][3]
    w = r["wand"]
    assert len(w["p99_bounds"]) == 3 and w["bounds_source"].startswith("calibrated")
    assert [x["safety"] for x in w["safeties"]] == [0.25, 0.5, 1.0, 2.0]
    for x in w["safeties"]:
        assert sum(x["exit_histogram"]) == 10 and 0 <= x["top1_agreement"] <= 1 and x["speedup"] > 0
        assert 0 < x["layer_fraction"] <= 1
    spec = r["speculative"]
    assert [(x["draft_stage"], x["k"]) for x in spec] == [(d, k) for d in (0, 1) for k in range(1, 7)]
    assert all(x["lossless"] and 0 <= x["acceptance"] <= 1 and x["cost_model_speedup"] > 0 for x in spec)
    assert all(x["divergence_margins"] == [] for x in spec)
    assert all(1 <= x["tokens_per_iteration"] <= x["k"] + 1 for x in spec)
    sp = r["speed"]
    assert sp["tokens_per_run"] == 10 and len(sp["stage_speedup"]) == n and sp["stage_speedup"][3] == 1.0
    assert all(t > 0 for t in sp["stage_tok_s"]) and sp["compose_all_tok_s"] > 0
    b = r["baseline"]  # the same model, the same documents and windows: exactly its final exit
    assert b["bpb"] == pytest.approx(r["stage_bpb"][3], rel=1e-9) and abs(b["gap"]) < 1e-9
    assert "PoE vs backprop baseline" in r["capability_table"]


def test_report_rejects_a_single_exit_model(tmp_path):
    from cognica_poe.eval.report import ReportSettings, build_report
    from tests.conftest import perturbed_model

    with pytest.raises(ValueError, match="single exit"):
        build_report(perturbed_model(poe_mode="none", poe_every=4), None)
    with pytest.raises(ValueError, match="draft stages"):
        build_report(perturbed_model(), None, settings=ReportSettings(draft_stages=(3,)))


def test_report_on_a_specialist_with_prompts_and_jsonl(tok, tmp_path):
    """A specialist's exits (base exits + its own) go through the whole report; prompts and JSONL data are read."""
    from cognica_poe.eval.report import ReportSettings, build_report, write_report
    from tests.conftest import perturbed_model, specialize

    model = specialize(perturbed_model(vocab_size=len(tok)), 1, seed=0).eval()
    with torch.no_grad():
        model.gpt.lm_head_stage.weight.normal_(0, 0.02)
    data = tmp_path / "held.jsonl"
    docs = [{"text": f"Line {i}: the quick brown fox jumps over the lazy dog, said the {i}th herald."}
            for i in range(60)]
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    st = ReportSettings(eval_tokens=1500, new_tokens=3, runs=1, ks=(1, 2), safeties=(1.0,), seq_len=32)
    r = build_report(model, tok, str(data), prompts=["ROMEO:", "The fox"], settings=st, name="spec")
    n = model.poe_n_stages
    assert n == 5 and len(r["stage_bpb"]) == n and len(r["agreement_matrix"]) == n
    assert r["model"]["specialist_ends"] == [4] and len(r["wand"]["p99_bounds"]) == n - 1
    assert r["speed"]["prompts"] == 2 and r["speed"]["tokens_per_run"] == 6
    assert sum(r["wand"]["safeties"][0]["exit_histogram"]) == 6 and all(x["lossless"] for x in r["speculative"])
    files = write_report(r, str(tmp_path / "out"), plots=False)
    assert json.loads(open(files["json"]).read())["model"]["name"] == "spec"
    assert "Stage 3 prefix pruning" in open(files["markdown"]).read()


def test_divergence_margin_reports_where_greedy_outputs_split(tiny_model):
    from cognica_poe.eval.speed import divergence_margin

    ids = torch.tensor([[0, 5, 9, 2]])
    ref = tiny_model.generate_stage(ids, stage=3, max_new_tokens=6, stop_tokens=[])
    assert divergence_margin(tiny_model, ref, ref) is None
    other = ref.clone()
    other[0, 6] = (ref[0, 6] + 1) % 512  # differs at position 6: the margin of the logits that predicted it
    with torch.no_grad():
        top2 = tiny_model.gpt(ref[:, :6])[0, -1].topk(2).values
    assert divergence_margin(tiny_model, other, ref) == pytest.approx(float(top2[0] - top2[1]), abs=1e-6)

"""Training: stage-wise flat-PoE gradients, activation freeing, resume, NaN stop, data loader, schedules, DDP, FSDP."""

import hashlib
import json
import os
import shutil
import subprocess
import sys
import weakref

import pytest
import torch
import torch.nn.functional as F

from cognica_poe.config import preset_config
from cognica_poe.model import GPT
from cognica_poe.train import data as tdata
from cognica_poe.train.checkpoints import load_checkpoint
from cognica_poe.train.loop import TrainConfig, train
from cognica_poe.train.losses import NonFiniteLossError, backward_step, joint_stage_losses, poe_loss_scale
from cognica_poe.train.optim import lr_multiplier, muon_momentum, muon_weight_decay

SRC = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src")


@pytest.fixture(scope="module")
def tok(tok_dir):
    from cognica_poe.tokenizer import CognicaPoETokenizer

    return CognicaPoETokenizer.from_pretrained(tok_dir)


def small_cfg(corpus: str, tok_dir: str, out_dir, **kw) -> TrainConfig:
    base = dict(preset="tiny", sequence_len=64, data=corpus, tokenizer=tok_dir, device_batch_size=4, num_steps=8,
                eval_every=1000, eval_tokens=8 * 65, out_dir=str(out_dir), progress=False, export=False,
                warmup_steps=2, batch_lr_scale=0.5, shuffle_block=64)
    return TrainConfig(**{**base, **kw})


def random_gpt(poe_every: int = 1, seed: int = 0, **kw) -> GPT:
    """A tiny GPT with every tensor moved off its init (zero c_proj / smear would hide gradient paths)."""
    cfg = preset_config("tiny", poe_every=poe_every, sequence_len=32, vocab_size=96, **kw)
    gpt = GPT.from_config(cfg, seed=seed)
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in gpt.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
        gpt.smear_lambda.fill_(0.6)
        gpt.backout_lambda.fill_(0.3)
    return gpt


def batch(seed: int = 0, B: int = 2, T: int = 32, V: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    rows = torch.randint(0, V, (B, T + 1), generator=g)
    return rows[:, :-1], rows[:, 1:]


def grads_of(gpt: GPT) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in gpt.named_parameters() if p.grad is not None}
    gpt.zero_grad(set_to_none=True)
    return out


# -----------------------------------------------------------------------------
# losses and gradients

@pytest.mark.parametrize("poe_every,alpha", [(1, 0.0), (2, 0.5), (3, 1.0)])
def test_flat_stagewise_grads_equal_single_graph(poe_every, alpha):
    gpt = random_gpt(poe_every)
    x, y = batch()
    losses = backward_step(gpt, x, y, "flat", alpha, grad_scale=0.5)
    stagewise = grads_of(gpt)
    ref = joint_stage_losses(gpt, x, y, detach=True)
    (sum(ref) * poe_loss_scale(len(ref), alpha) * 0.5).backward()
    joint = grads_of(gpt)
    assert losses == pytest.approx([float(v.detach()) for v in ref], abs=1e-6)
    assert set(stagewise) == set(joint) == {n for n, _ in gpt.named_parameters()}  # every parameter learns
    for name, g in joint.items():
        assert g.abs().sum() > 0, name
        torch.testing.assert_close(stagewise[name], g, atol=1e-6, rtol=1e-5, msg=name)


def test_flat_detach_semantics():
    """Flat: a stage's blocks learn only from its own loss; backout_lambda only from the last stage."""
    gpt = random_gpt(1)
    x, y = batch()
    losses = joint_stage_losses(gpt, x, y, detach=True)
    losses[0].backward()  # stage 0's loss alone
    g = grads_of(gpt)
    assert g["transformer.h.0.mlp.c_fc.weight"].abs().sum() > 0
    assert "transformer.h.1.mlp.c_fc.weight" not in g and "backout_lambda" not in g
    assert g["transformer.wte.weight"].abs().sum() > 0 and g["lm_head.weight"].abs().sum() > 0
    joint_stage_losses(gpt, x, y, detach=True)[-1].backward()  # last stage's loss: blocks 0..2 see nothing
    g = grads_of(gpt)
    assert g["backout_lambda"].abs().sum() > 0
    assert not any(n.startswith(f"transformer.h.{i}.") for n in g for i in range(3))


def test_hier_grads_equal_autograd_of_model_exits():
    """hier = deep supervision on the model's own exits (forward_all_stages: last exit with backout, no detach)."""
    alpha = 0.0
    gpt = random_gpt(2)
    x, y = batch(1)
    backward_step(gpt, x, y, "hier", alpha)
    hier = grads_of(gpt)
    logits = gpt.forward_all_stages(x)
    ref = [F.cross_entropy(lg.reshape(-1, lg.size(-1)), y.reshape(-1)) for lg in logits]
    (sum(ref) / len(ref)).backward()
    auto = grads_of(gpt)
    for name, g in auto.items():
        torch.testing.assert_close(hier[name], g, atol=1e-6, rtol=1e-5, msg=name)
    backward_step(gpt, x, y, "flat", alpha)
    flat = grads_of(gpt)  # the detach matters: stage 0's blocks get less gradient in flat mode
    assert not torch.allclose(flat["transformer.h.0.mlp.c_fc.weight"], hier["transformer.h.0.mlp.c_fc.weight"])


class LiveSaved:
    """Saved-tensor bookkeeping: bytes held by live autograd graphs (a tensor is freed when its graph is)."""

    def __init__(self):
        self.live = 0

    def pack(self, t: torch.Tensor):
        holder = _Holder(t)
        size = t.numel() * t.element_size()
        self.live += size
        weakref.finalize(holder, self._free, size)
        return holder

    def _free(self, size: int) -> None:
        self.live -= size

    @staticmethod
    def unpack(holder):
        return holder.t


class _Holder:
    def __init__(self, t):
        self.t = t


def test_stagewise_frees_each_stage_before_the_next():
    gpt = random_gpt(1)
    x, y = batch(B=2)
    firsts = {layers[0]: k for k, layers in enumerate(gpt.config.stage_layers())}
    book = LiveSaved()
    at_stage_start, peak_in_stage = {}, {}
    run_layer = gpt.run_layer

    def spy(i, *args):
        if i in firsts:
            at_stage_start[firsts[i]] = book.live
        out = run_layer(i, *args)
        k = max(k for f, k in firsts.items() if f <= i)
        peak_in_stage[k] = max(peak_in_stage.get(k, 0), book.live)
        return out

    gpt.run_layer = spy
    with torch.autograd.graph.saved_tensors_hooks(book.pack, book.unpack):
        backward_step(gpt, x, y, "flat", 0.0)
    base = at_stage_start[0]  # only x0's graph (embedding + smear) is alive when stage 0 starts
    assert all(at_stage_start[k] == base for k in at_stage_start), at_stage_start
    assert all(peak_in_stage[k] > base for k in peak_in_stage)
    assert book.live == 0  # x0's graph is freed too at the end
    # a joint (single-graph) pass keeps every stage alive at once
    book2 = LiveSaved()
    with torch.autograd.graph.saved_tensors_hooks(book2.pack, book2.unpack):
        losses = joint_stage_losses(gpt, x, y, detach=True)
        joint_live = book2.live
        sum(losses).backward()
    assert joint_live > max(peak_in_stage.values()) * 2


# -----------------------------------------------------------------------------
# schedules

def test_lr_schedule_points():
    N = 1000  # warmdown = 650 steps: constant until step 350
    assert lr_multiplier(0, N, 40) == pytest.approx(1 / 40)
    assert lr_multiplier(19, N, 40) == pytest.approx(0.5)
    assert lr_multiplier(39, N, 40) == pytest.approx(1.0)
    assert lr_multiplier(200, N, 40) == 1.0 and lr_multiplier(350, N, 40) == 1.0
    assert lr_multiplier(675, N, 40) == pytest.approx(0.5 + 0.5 * 0.05)
    assert lr_multiplier(N, N, 40) == pytest.approx(0.05)
    assert muon_momentum(0, N) == pytest.approx(0.85) and muon_momentum(200, N) == pytest.approx(0.91)
    assert muon_momentum(349, N) == pytest.approx(0.85 + 0.12 * 349 / 400)  # the ramp wins over the warmdown
    assert muon_momentum(400, N) == pytest.approx(0.97 - 0.07 * 50 / 650)
    assert muon_momentum(N, N) == pytest.approx(0.90)
    assert muon_momentum(300, 5000) == pytest.approx(0.94) and muon_momentum(1000, 5000) == 0.97
    assert muon_weight_decay(0, N, 0.2) == pytest.approx(0.2)
    assert muon_weight_decay(N // 2, N, 0.2) == pytest.approx(0.1)
    assert muon_weight_decay(N, N, 0.2) == pytest.approx(0.0)


def test_optimizer_groups():
    from cognica_poe.train.optim import MuonAdamW

    gpt = random_gpt(1)
    opt = MuonAdamW(gpt, batch_tokens=2**19)  # batch scale 1; dmodel = (64/768)^-0.5
    muon_ids = {id(p) for g in opt.muon.param_groups for p in g["params"]}
    assert muon_ids == {id(p) for p in gpt.transformer.h.parameters()}
    assert any(id(b.attn.ve_gate.weight) in muon_ids for b in gpt.transformer.h if b.attn.ve_gate is not None)
    dm = (64 / 768) ** -0.5
    lrs = {tuple(id(p) for p in g["params"]): g for g in opt.adamw.param_groups}
    assert lrs[(id(gpt.lm_head.weight),)]["lr"] == pytest.approx(0.008 * dm)
    assert lrs[(id(gpt.transformer.wte.weight),)]["lr"] == pytest.approx(0.3 * dm)
    assert lrs[(id(gpt.x0_lambdas),)]["betas"] == (0.96, 0.95)
    assert lrs[(id(gpt.smear_gate.weight), id(gpt.smear_lambda), id(gpt.backout_lambda))]["lr"] == 0.2
    opt.apply_schedule(0, 100, warmup_steps=10)
    assert opt.adamw.param_groups[0]["lr"] == pytest.approx(0.008 * dm / 10)
    c_fc = next(g for g in opt.muon.param_groups if g["params"][0].shape == (256, 64))
    assert c_fc["wd_scale"] == 2.0 and c_fc["adjust_lr_fn"] == "original"


# -----------------------------------------------------------------------------
# data

def test_text_documents_match_split(corpus):
    with open(corpus, encoding="utf-8") as f:
        text = f.read()
    expected = [d.strip() for d in text.split("\n\n") if d.strip()]
    assert list(tdata._text_docs(corpus, chunk_chars=97)) == expected
    c = tdata.Corpus(corpus)
    n_val = len(expected) // 20
    assert c.num_docs("val") == n_val and c.num_docs("train") == len(expected) - n_val
    assert list(c.docs("val")) == expected[-n_val:]
    assert list(c.docs("train", 5))[:3] == expected[5:8]


def test_loader_bos_determinism_and_resume(corpus, tok):
    c = tdata.Corpus(corpus)
    bos = tok.bos_token_id
    a = tdata.PackedLoader(c, tok, 4, 64, seed=1, shuffle_block=16)
    b = tdata.PackedLoader(c, tok, 4, 64, seed=1, shuffle_block=16)
    other = tdata.PackedLoader(c, tok, 4, 64, seed=2, shuffle_block=16)
    xa = [a.next_batch() for _ in range(5)]
    assert all(torch.equal(p[0], q[0]) for p, q in zip(xa, [b.next_batch() for _ in range(5)]))
    assert not torch.equal(xa[0][0], other.next_batch()[0])
    assert all(torch.equal(x[:, 1:], y[:, :-1]) for x, y in xa)  # targets are inputs shifted by one
    # every document starts with BOS: the packed stream is exactly [BOS] + doc tokens, doc after doc
    stream = torch.cat([torch.cat([x, y[:, -1:]], 1).reshape(-1) for x, y in xa]).tolist()
    docs = list(c.docs("train", 0))[:16]
    import random
    order = list(range(16))
    random.Random("1/0/0").shuffle(order)
    expected = [t for i in order for t in [bos] + tok.encoding.encode_ordinary(docs[i])]
    n = min(len(stream), len(expected))
    assert stream[:n] == expected[:n] and stream[0] == bos
    # resume: a fresh loader from a mid-stream state continues exactly (across block and epoch boundaries)
    state = a.state_dict()
    cont = [a.next_batch() for _ in range(130)]
    r = tdata.PackedLoader(c, tok, 4, 64, seed=1, shuffle_block=16)
    r.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(p[0], r.next_batch()[0]) for p in cont)
    assert a.epoch >= 1  # 135 x 4 x 65 tokens wrap this small corpus at least once


def test_loader_ranks_partition_the_global_batch(corpus, tok):
    c = tdata.Corpus(corpus)
    one = tdata.PackedLoader(c, tok, 4, 32, seed=3)
    two = [tdata.PackedLoader(c, tok, 2, 32, seed=3, rank=r, world_size=2) for r in range(2)]
    for _ in range(3):
        x, _ = one.next_batch()
        assert torch.equal(x, torch.cat([t.next_batch()[0] for t in two]))


def test_jsonl_and_parquet_sources(tmp_path, tok):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = [f"document number {i}: " + "word " * (i % 7) for i in range(60)]
    jl = tmp_path / "j" / "a.jsonl"
    jl.parent.mkdir()
    jl.write_text("".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(docs)))
    folder = tmp_path / "pq"
    folder.mkdir()
    for s in range(3):  # shards of 20 rows in row groups of 6: the last shard is validation
        pq.write_table(pa.table({"text": docs[20 * s:20 * s + 20]}), folder / f"shard_{s:05d}.parquet",
                       row_group_size=6)
    cj = tdata.Corpus(str(jl))
    assert list(cj.docs("train")) == docs[:57] and list(cj.docs("val")) == docs[57:]
    cp = tdata.Corpus(str(folder))
    assert list(cp.docs("train")) == docs[:40] and list(cp.docs("val")) == docs[40:]
    assert list(cp.docs("train", 27)) == docs[27:40]  # skips whole row groups and files
    loader = tdata.PackedLoader(cp, tok, 2, 16, seed=0, shuffle_block=8)
    x, _ = loader.next_batch()
    assert x[0, 0] == tok.bos_token_id
    stream = tdata.token_stream(cp, tok, "val")
    assert stream[0] == tok.bos_token_id and int((stream == tok.bos_token_id).sum()) == 20


# -----------------------------------------------------------------------------
# the loop

def read_metrics(out_dir, kind="train") -> list[dict]:
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["type"] == kind]


def weights(folder) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(os.path.join(folder, "model.safetensors"))


def test_resume_is_bitwise_identical(corpus, tok_dir, tmp_path):
    kw = dict(num_steps=8, grad_clip=1.0, total_batch_size=2 * 4 * 64)  # 2 micro-batches per step
    straight = train(small_cfg(corpus, tok_dir, tmp_path / "a", **kw))
    first = train(small_cfg(corpus, tok_dir, tmp_path / "b", stop_after=4, **kw))
    assert first["step"] == 4 and first["hf_dir"] is None
    resumed = train(small_cfg(corpus, tok_dir, tmp_path / "b", resume=True, **kw))
    assert resumed["step"] == 8
    la = [r["losses"] for r in read_metrics(tmp_path / "a")]
    lb = [r["losses"] for r in read_metrics(tmp_path / "b")]
    assert len(la) == len(lb) == 8 and la == lb  # bitwise: float equality of every stage's loss at every step
    wa, wb = weights(straight["checkpoint"]), weights(resumed["checkpoint"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nan_stops_and_keeps_last_checkpoint(corpus, tok_dir, tmp_path, monkeypatch):
    cfg = small_cfg(corpus, tok_dir, tmp_path, num_steps=10, stop_after=4)
    train(cfg)
    ckpt = os.path.join(tmp_path, "checkpoints", "step_000004")
    digest = {f: hashlib.sha256(open(os.path.join(ckpt, f), "rb").read()).hexdigest() for f in os.listdir(ckpt)}
    calls = {"n": 0}
    original = GPT.exit_logits

    def poisoned(self, h):
        logits = original(self, h)
        calls["n"] += 1
        if calls["n"] == 4 + 3:  # the 2nd step after resuming (step 6), stage 2 (4 exits per step)
            logits = logits * float("nan")
        return logits

    monkeypatch.setattr(GPT, "exit_logits", poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 6 \(stage 2"):
        train(small_cfg(corpus, tok_dir, tmp_path, num_steps=10, resume=True, save_every=1))
    monkeypatch.undo()
    assert sorted(os.listdir(os.path.join(tmp_path, "checkpoints"))) == ["latest", "step_000004", "step_000005"]
    good = os.path.join(tmp_path, "checkpoints", "step_000004")
    assert digest == {f: hashlib.sha256(open(os.path.join(good, f), "rb").read()).hexdigest() for f in digest}
    gpt = GPT.from_config(preset_config("tiny", sequence_len=64, vocab_size=512), seed=0)
    state = load_checkpoint(good, gpt)
    assert state["step"] == 4 and torch.equal(gpt.lm_head.weight, weights(good)["lm_head.weight"])


def test_every_stage_bpb_falls_and_bp_baseline_trains(corpus, tok_dir, tmp_path):
    flat = train(small_cfg(corpus, tok_dir, tmp_path / "flat", num_steps=30, eval_every=30, export=True,
                           export_dtype="float32"))
    evals = read_metrics(tmp_path / "flat", "eval")
    before, after = evals[0]["bpb"], evals[-1]["bpb"]
    assert len(before) == 4 and all(a < b - 0.3 for a, b in zip(after, before)), (before, after)
    assert os.path.isfile(os.path.join(flat["hf_dir"], "model.safetensors"))
    from cognica_poe.hf import CognicaPoEForCausalLM

    hf = CognicaPoEForCausalLM.from_pretrained(flat["hf_dir"])
    x = torch.randint(0, 500, (1, 16))
    gpt = GPT.from_config(hf.config, seed=0)
    load_checkpoint(flat["checkpoint"], gpt)
    torch.testing.assert_close(hf.gpt(x), gpt(x))  # the export is the trained model
    bp = train(small_cfg(corpus, tok_dir, tmp_path / "none", poe_mode="none", num_steps=30))
    losses = [r["losses"][0] for r in read_metrics(tmp_path / "none")]
    assert len(bp["final_losses"]) == 1 and losses[-1] < losses[0] - 0.5


def test_cli_flags(corpus, tok_dir, tmp_path):
    import argparse

    from cognica_poe.cli import add_train_args, cmd_train

    p = argparse.ArgumentParser()
    add_train_args(p)
    args = p.parse_args(["--preset", "tiny", "--sequence-len", "32", "--data", corpus, "--tokenizer", tok_dir,
                         "--num-steps", "2", "--device-batch-size", "2", "--out-dir", str(tmp_path), "--no-progress",
                         "--no-export", "--poe-mode", "hier", "--batch-lr-scale", "0.5", "--eval-tokens", "200"])
    assert args.poe_mode == "hier" and args.batch_lr_scale == 0.5 and args.progress is False
    summary = cmd_train(args)
    assert summary["step"] == 2 and len(summary["final_losses"]) == 4 and len(summary["stage_bpb"]) == 4


def test_ddp_two_processes_match_one(corpus, tok_dir, tmp_path):
    kw = dict(num_steps=3, total_batch_size=4 * 64)
    script = tmp_path / "run.py"
    script.write_text("import json, sys\nfrom cognica_poe.train.loop import TrainConfig, train\n"
                      "train(TrainConfig(**json.loads(sys.argv[1])))\n")
    cfg2 = small_cfg(corpus, tok_dir, tmp_path / "ddp", device_batch_size=2, **kw)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           json.dumps(cfg2.__dict__)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    single = train(small_cfg(corpus, tok_dir, tmp_path / "one", device_batch_size=4, **kw))
    l2 = [r["losses"] for r in read_metrics(tmp_path / "ddp")]
    l1 = [r["losses"] for r in read_metrics(tmp_path / "one")]
    assert len(l1) == len(l2) == 3
    for a, b in zip(l1, l2):
        assert a == pytest.approx(b, abs=2e-4)
    w1 = weights(single["checkpoint"])
    w2 = weights(os.path.join(tmp_path, "ddp", "checkpoints", "step_000003"))
    # Muon matrices agree closely. Not compared: AdamW scalars/embeddings whose first gradients are pure roundoff
    # (~1e-11 at nanochat's init, where every c_proj is zero), which Adam turns into full-size +-lr steps.
    rel = {k: float((w1[k] - w2[k]).norm() / w1[k].norm()) for k in w1 if k.startswith("transformer.h.")}
    assert max(rel.values()) < 0.1, rel


def torchrun(tmp_path, code: str, arg) -> None:
    """Run `code` (with json-decoded `arg` bound to ARG) in 2 CPU processes under torchrun; fail with its stderr."""
    script = tmp_path / "fsdp_run.py"
    script.write_text(f"import json, sys\nARG = json.loads(sys.argv[1])\n{code}\n")
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(script),
           json.dumps(arg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]


def test_fsdp_two_processes_match_one(corpus, tok_dir, tmp_path):
    """
    FSDP2 (fully_shard) on 2 CPU processes over gloo: the losses, BPB and weights of one process; a checkpoint in the
    one-process format that resumes bitwise; an HF export of the gathered weights.
    """
    kw = dict(num_steps=3, total_batch_size=4 * 64, grad_clip=1.0)
    fsdp = dict(device_batch_size=2, fsdp=True, **kw)
    cfgs = [small_cfg(corpus, tok_dir, tmp_path / "straight", **fsdp),
            small_cfg(corpus, tok_dir, tmp_path / "fsdp", stop_after=2, **fsdp),
            small_cfg(corpus, tok_dir, tmp_path / "fsdp", resume=True, export=True, export_dtype="float32", **fsdp)]
    torchrun(tmp_path, "from cognica_poe.train.loop import TrainConfig, train\n"
             "for c in ARG:\n    train(TrainConfig(**c))", [c.__dict__ for c in cfgs])
    single = train(small_cfg(corpus, tok_dir, tmp_path / "one", device_batch_size=4, **kw))
    l1 = [r["losses"] for r in read_metrics(tmp_path / "one")]
    l2 = [r["losses"] for r in read_metrics(tmp_path / "fsdp")]
    assert len(l1) == len(l2) == 3 and l2 == [r["losses"] for r in read_metrics(tmp_path / "straight")]
    for a, b in zip(l1, l2):
        assert a == pytest.approx(b, abs=2e-4)
    bpb1, bpb2 = (read_metrics(tmp_path / d, "eval")[-1]["bpb"] for d in ("one", "fsdp"))
    assert bpb1 == pytest.approx(bpb2, rel=1e-3)  # every rank took part in the evaluation's forward passes
    ckpt = os.path.join(tmp_path, "fsdp", "checkpoints", "step_000003")
    w1, w2 = weights(single["checkpoint"]), weights(ckpt)
    assert all(torch.equal(v, w2[k]) for k, v in weights(tmp_path / "straight" / "checkpoints" / "step_000003").items())
    assert {k: v.shape for k, v in w1.items()} == {k: v.shape for k, v in w2.items()}  # full tensors, same names
    rel = {k: float((w1[k] - w2[k]).norm() / w1[k].norm()) for k in w1 if k.startswith("transformer.h.")}
    assert max(rel.values()) < 0.1, rel  # as in the DDP test (AdamW turns roundoff-size first gradients into steps)
    o1, o2 = (torch.load(os.path.join(c, "optim.pt"), weights_only=True) for c in (single["checkpoint"], ckpt))
    for name in ("muon", "adamw"):
        s1, s2 = o1[name]["state"], o2[name]["state"]
        assert s1.keys() == s2.keys() and o1[name]["param_groups"] == o2[name]["param_groups"]
        assert all(torch.is_tensor(v) and v.shape == s1[i][k].shape for i in s2 for k, v in s2[i].items())
    from cognica_poe.hf import CognicaPoEForCausalLM

    hf = CognicaPoEForCausalLM.from_pretrained(os.path.join(tmp_path, "fsdp", "hf"))
    assert all(torch.equal(v, w2[k]) for k, v in hf.gpt.state_dict().items())


def test_fsdp_grads_equal_one_process(tmp_path):
    """shard_model + every poe_mode's backward (flat: K+1 backward calls) on half a batch per rank, two micro-batches
    accumulated: the gathered gradients equal one process's on the whole batch."""
    torchrun(tmp_path, """
import sys, torch, torch.distributed as dist
from torch.distributed.tensor import DTensor
sys.path.insert(0, ARG["tests"])
from test_train import batch, random_gpt
from cognica_poe.train.distributed import allreduce_mean_, shard_model
from cognica_poe.train.losses import backward_step
dist.init_process_group("gloo")
rank = dist.get_rank()
for mode in ("flat", "hier", "none"):
    ref, gpt = random_gpt(2), random_gpt(2)
    replicated = shard_model(gpt, torch.device("cpu"))
    for seed in (0, 1):
        x, y = batch(seed, B=4)
        backward_step(ref, x, y, mode, 0.5, grad_scale=0.5)
        backward_step(gpt, x.chunk(2)[rank], y.chunk(2)[rank], mode, 0.5, grad_scale=0.5)
    allreduce_mean_([p.grad for p in replicated])
    assert sum(isinstance(p, DTensor) for p in gpt.parameters()) == len(list(gpt.parameters())) - len(replicated)
    for (name, p), q in zip(gpt.named_parameters(), ref.parameters()):
        g = p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
        torch.testing.assert_close(g, q.grad, atol=1e-6, rtol=1e-4, msg=f"{mode} {name}")
""", {"tests": os.path.dirname(os.path.abspath(__file__))})


def test_sharded_muon_equals_torch_muon(tmp_path):
    """ShardedMuon on row shards (uneven, one rank empty) or on plain tensors == torch.optim.Muon, bit for bit."""
    torchrun(tmp_path, """
import torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from cognica_poe.train.optim import ShardedMuon
dist.init_process_group("gloo")
mesh = init_device_mesh("cpu", (2,))
g = torch.Generator().manual_seed(0)
full = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in ARG]
sharded = [torch.nn.Parameter(distribute_tensor(p.detach().clone(), mesh, [Shard(0)])) for p in full]
kw = dict(lr=0.05, weight_decay=0.1, momentum=0.9, nesterov=True, adjust_lr_fn="original")
ref, opt = torch.optim.Muon(full, **kw), ShardedMuon(sharded, **kw)
for step in range(3):
    for p, q in zip(full, sharded):
        p.grad = torch.randn(p.shape, generator=g)
        q.grad = distribute_tensor(p.grad.clone(), mesh, [Shard(0)])
    ref.step()
    opt.step()
for p, q in zip(full, sharded):
    assert torch.equal(p.detach(), q.detach().full_tensor()), p.shape
    assert torch.equal(ref.state[p]["momentum_buffer"], opt.state[q]["momentum_buffer"].full_tensor())
""", [[5, 3], [7, 12], [12, 7], [1, 4]])
    from cognica_poe.train.optim import ShardedMuon

    g = torch.Generator().manual_seed(0)
    full = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in [(5, 3), (3, 5)]]
    plain = [torch.nn.Parameter(p.detach().clone()) for p in full]
    ref, opt = torch.optim.Muon(full, lr=0.05, momentum=0.9), ShardedMuon(plain, lr=0.05, momentum=0.9)
    for _ in range(3):
        for p, q in zip(full, plain):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        ref.step()
        opt.step()
    assert all(torch.equal(p, q) for p, q in zip(full, plain))


def test_fsdp_needs_torchrun(corpus, tok_dir, tmp_path):
    with pytest.raises(ValueError, match="torchrun"):
        train(small_cfg(corpus, tok_dir, tmp_path, fsdp=True))


@pytest.mark.skipif(not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
                    reason="torch.compile's default (inductor) backend needs a C++ compiler on CPU; none is on PATH")
def test_compile_matches_eager(corpus, tok_dir, tmp_path):
    """--compile: the same losses as eager (compiled blocks inside the stage-wise backward)."""
    from torch._dynamo.utils import counters

    eager = train(small_cfg(corpus, tok_dir, tmp_path / "eager", num_steps=2))
    counters.clear()
    compiled = train(small_cfg(corpus, tok_dir, tmp_path / "compiled", num_steps=2, compile=True))
    assert counters["stats"]["unique_graphs"] > 0  # the blocks really went through torch.compile
    le = [r["losses"] for r in read_metrics(tmp_path / "eager")]
    lc = [r["losses"] for r in read_metrics(tmp_path / "compiled")]
    assert len(le) == len(lc) == 2
    for a, b in zip(le, lc):
        assert a == pytest.approx(b, abs=1e-4)
    assert compiled["stage_bpb"] == pytest.approx(eager["stage_bpb"], rel=1e-4)


def test_bf16_autocast_trains_like_fp32(corpus, tok_dir, tmp_path):
    """--autocast bf16 (the CPU here): bf16 matrix products with fp32 weights; every stage's loss at every step and
    the final per-stage BPB are within 0.2% of fp32's (same seed, same batches), and not bitwise equal (autocast
    really ran)."""
    kw = dict(num_steps=4, sequence_len=32, eval_tokens=4 * 33)
    fp32 = train(small_cfg(corpus, tok_dir, tmp_path / "fp32", autocast="none", **kw))
    bf16 = train(small_cfg(corpus, tok_dir, tmp_path / "bf16", autocast="bf16", **kw))
    lf = [r["losses"] for r in read_metrics(tmp_path / "fp32")]
    lb = [r["losses"] for r in read_metrics(tmp_path / "bf16")]
    assert len(lf) == len(lb) == 4 and lf != lb
    for a, b in zip(lf, lb):
        assert len(a) == 4 and b == pytest.approx(a, rel=2e-3)
    assert all(b < a for a, b in zip(lb[0], lb[-1]))  # every stage learns
    assert bf16["stage_bpb"] == pytest.approx(fp32["stage_bpb"], rel=2e-3)
    with pytest.raises(ValueError, match="autocast 'fp8' is not one of auto, bf16, none"):
        train(small_cfg(corpus, tok_dir, tmp_path / "bad", autocast="fp8"))
    assert not os.path.exists(tmp_path / "bad")  # refused before anything is written

"""
Stage-pipelined training (--pipeline-parallel) on CPU processes over gloo: the gradients of one process, training
that follows one process's over 20 steps, checkpoints that cross layouts (one process <-> pipeline), a killed rank
reported in one line and the run resumed to the same result. Two torchrun launches serve all the tests (their
start-up dominates the run time), plus one of 4 processes for pipeline x data.
"""

import glob
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from test_train import SRC, read_metrics, small_cfg, weights

from cognica_poe.train.loop import TrainConfig, train
from cognica_poe.train.pipeline import split_stages

TESTS = os.path.dirname(os.path.abspath(__file__))
STEPS = 20
# gentle enough that the run has no loss spike (a spike amplifies roundoff), 2 micro-batches per step
KW = dict(num_steps=STEPS, total_batch_size=2 * 4 * 64, grad_clip=1.0, warmup_steps=10, batch_lr_scale=0.3,
          save_every=5, keep_checkpoints=5)

# Run under torchrun: (1) the gradients of pipeline_backward + finish_step equal one process's backward_step on the
# same micro-batches, for every parameter this rank trains (the others keep no gradient); (2) training runs; (3) a
# run through the command line in which process ARG["kill"]["rank"] SIGKILLs itself at its kill["at"]-th step.
SCRIPT = """
import json, os, signal, sys
ARG = json.loads(sys.argv[1])
sys.path.insert(0, ARG["tests"])
import torch, torch.distributed as dist
from test_train import batch, random_gpt
from cognica_poe.train.losses import backward_step
from cognica_poe.train.loop import TrainConfig, train
from cognica_poe.train.optim import MuonAdamW
from cognica_poe.train.pipeline import finish_step, pipeline_backward, setup_pipeline

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
# 4 stages of one layer (backout inside the last rank), and 2 stages of 4 + 2 layers (the backout stream is sent)
for kw in (dict(poe_every=1), dict(poe_every=4, n_layer=6)):
    ref, gpt = random_gpt(**kw), random_gpt(**kw)
    pipe = setup_pipeline(gpt, ARG["pipe"], rank, world, "cpu")
    D, d, sends, sums, ref_losses = pipe.n_data, pipe.data_rank, [], 0, 0
    for seed in (0, 1):  # two micro-batches of 2 rows per data rank
        x, y = batch(seed, B=2 * D)
        ref_losses = ref_losses + torch.tensor(backward_step(ref, x, y, "flat", 0.5, grad_scale=0.5),
                                               dtype=torch.float64) / 2
        sums = sums + torch.tensor(pipeline_backward(gpt, pipe, x.chunk(D)[d], y.chunk(D)[d], 0.5, 0.5, sends),
                                   dtype=torch.float64) / 2
    for p in pipe.params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    losses = finish_step(pipe, sends, sums, torch.device("cpu"))
    torch.testing.assert_close(losses, ref_losses, atol=1e-5, rtol=0)
    trained = {id(p) for p in pipe.params}
    for (name, p), q in zip(gpt.named_parameters(), ref.parameters()):
        if id(p) in trained:
            torch.testing.assert_close(p.grad, q.grad, atol=1e-6, rtol=1e-4, msg=name)
        else:
            assert p.grad is None, name
print("GRADS EQUAL", rank, flush=True)
for c in ARG.get("refused", []):  # a layout that does not fit: refused on every rank before anything is written
    try:
        train(TrainConfig(**c))
    except ValueError as e:
        print("REFUSED", e, flush=True)
for c in ARG["runs"]:
    train(TrainConfig(**c))
kill = ARG.get("kill")
if kill:
    calls, step = [0], MuonAdamW.step
    def dying_step(self):
        calls[0] += 1
        if rank == kill["rank"] and calls[0] == kill["at"]:
            os.kill(os.getpid(), signal.SIGKILL)
        step(self)
    MuonAdamW.step = dying_step
    from cognica_poe.cli import main
    sys.exit(main(kill["argv"]))
"""


def torchrun(tmp_path, name: str, arg: dict, nproc: int = 2) -> tuple[int, dict[int, str], str]:
    """Run SCRIPT with `arg` in nproc CPU processes; returns (exit code, each rank's stdout + stderr, torchrun's)."""
    script, logs = tmp_path / f"{name}.py", tmp_path / f"{name}-logs"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    # --monitor-interval: torchrun stops the other processes within this time of a death; the killed-rank test
    # gives the survivor the time to notice the dropped connection and say so
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "--monitor-interval=3", f"--log-dir={logs}", "--redirects=3", str(script), json.dumps(arg)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    ranks = {}
    for r in range(nproc):
        files = sorted(glob.glob(str(logs / "*" / "attempt_0" / str(r) / "std*.log")))
        ranks[r] = "".join(open(f).read() for f in files)
    return proc.returncode, ranks, proc.stderr


def argv_of(cfg: TrainConfig) -> list[str]:
    """The `cognica-poe train` command line of cfg."""
    out = ["train"]
    for k, v in cfg.__dict__.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        elif v is not None:
            out += [flag, str(v)]
    return out


def copy_checkpoint(src_run, step: int, dst_run) -> None:
    """A new run folder whose only checkpoint is src_run's at `step`, with its metrics (to resume in another
    layout; the resumed run keeps the metrics up to `step`)."""
    name = f"step_{step:06d}"
    shutil.copytree(os.path.join(src_run, "checkpoints", name), os.path.join(dst_run, "checkpoints", name))
    (dst_run / "checkpoints" / "latest").write_text(name + "\n")
    shutil.copy(src_run / "metrics.jsonl", dst_run / "metrics.jsonl")


@pytest.fixture(scope="module")
def runs(corpus, tok_dir, tmp_path_factory):
    """
    one: one process, 20 steps. pipe: 2-stage pipeline, 20 steps. from_one: one's step 10 checkpoint resumed by the
    pipeline. to_one: pipe's step 10 resumed by one process. killed: pipeline run through the CLI whose process 1
    is SIGKILLed at its 13th step, then resumed by the pipeline (from step 10).
    """
    tmp = tmp_path_factory.mktemp("pipeline")

    def cfg(name: str, **kw) -> TrainConfig:
        return small_cfg(corpus, tok_dir, tmp / name, **{**KW, **kw})

    train(cfg("one"))
    copy_checkpoint(tmp / "one", 10, tmp / "from_one")
    pipe_runs = [cfg("pipe", pipeline_parallel=2).__dict__, cfg("from_one", pipeline_parallel=2, resume=True).__dict__]
    kill = dict(rank=1, at=13, argv=argv_of(cfg("killed", pipeline_parallel=2)))
    first = torchrun(tmp, "first", dict(tests=TESTS, pipe=2, runs=pipe_runs, kill=kill))
    refused = [cfg("refused", pipeline_parallel=3, n_layer=6).__dict__]  # 6 stages, but 3 does not divide 2
    second = torchrun(tmp, "second", dict(tests=TESTS, pipe=2, refused=refused,
                                          runs=[cfg("killed", pipeline_parallel=2, resume=True).__dict__]))
    assert second[0] == 0, second[1]
    copy_checkpoint(tmp / "pipe", 10, tmp / "to_one")
    train(cfg("to_one", resume=True))
    return dict(tmp=tmp, first=first, second=second)


def losses(run) -> list[list[float]]:
    return [r["losses"] for r in read_metrics(run)]


def assert_close_runs(a, b, steps: int = STEPS) -> None:
    """
    Per-stage losses within 5e-3 at every step (the shared gradients are float sums in another order, and Muon's
    bf16 Newton-Schulz amplifies that roundoff: they differ by up to about 1e-3 over these 20 steps); the final
    weights allclose (5e-3) but for the embedding tables, whose rare rows get roundoff-size gradients that AdamW
    turns into full-size steps: those within 5% in norm.
    """
    la, lb = losses(a), losses(b)
    assert len(la) == len(lb) == steps and all(len(r) == 4 for r in la)
    for step, (x, y) in enumerate(zip(la, lb), 1):
        assert x == pytest.approx(y, abs=5e-3), step
    wa, wb = (weights(os.path.join(r, "checkpoints", f"step_{steps:06d}")) for r in (a, b))
    assert wa.keys() == wb.keys()
    for k in wa:
        if k == "transformer.wte.weight" or k.startswith("value_embeds."):
            assert float((wa[k] - wb[k]).norm() / wa[k].norm()) < 0.05, k
        else:
            torch.testing.assert_close(wa[k], wb[k], atol=5e-3, rtol=0, msg=k)


def test_split_stages():
    assert split_stages(4, 2) == [range(0, 2), range(2, 4)]
    assert split_stages(5, 2) == [range(0, 2), range(2, 5)]
    assert split_stages(6, 4) == [range(0, 1), range(1, 3), range(3, 4), range(4, 6)]


def test_pipeline_gradients_equal_one_process(runs):
    _, ranks, err = runs["first"]
    for r in (0, 1):
        assert f"GRADS EQUAL {r}" in ranks[r], ranks[r][-3000:] + err[-2000:]


def test_pipeline_training_matches_one_process(runs):
    tmp = runs["tmp"]
    assert_close_runs(tmp / "one", tmp / "pipe")
    bpb_one, bpb_pipe = (read_metrics(tmp / d, "eval")[-1]["bpb"] for d in ("one", "pipe"))
    assert bpb_one == pytest.approx(bpb_pipe, abs=5e-3)  # rank 0 evaluated the whole model, gathered
    o1, o2 = (torch.load(os.path.join(tmp, d, "checkpoints", f"step_{STEPS:06d}", "optim.pt"), weights_only=True)
              for d in ("one", "pipe"))
    for name in ("muon", "adamw"):  # the single-process optimizer state: every parameter's, gathered on rank 0
        assert o1[name]["state"].keys() == o2[name]["state"].keys()
        assert o1[name]["param_groups"] == o2[name]["param_groups"]


def test_checkpoints_resume_across_layouts(runs):
    tmp = runs["tmp"]
    assert losses(tmp / "from_one")[:10] == losses(tmp / "one")[:10]  # the one-process steps were kept
    assert_close_runs(tmp / "one", tmp / "from_one")  # one process -> pipeline
    assert losses(tmp / "to_one")[:10] == losses(tmp / "pipe")[:10]
    assert_close_runs(tmp / "pipe", tmp / "to_one")  # pipeline -> one process


def test_killed_rank_is_reported_and_the_run_resumes(runs):
    tmp = runs["tmp"]
    code, ranks, err = runs["first"]
    assert code != 0
    lines = [line for line in ranks[0].splitlines() if line.startswith("cognica-poe train: error:")]
    assert len(lines) == 1 and "Traceback" not in ranks[0], ranks[0][-3000:]
    assert lines[0].startswith("cognica-poe train: error: process 0 (pipeline rank 0, data rank 0) lost process 1 "
                               "while "), lines[0]
    assert lines[0].endswith("continue it from its last checkpoint with --resume"), lines[0]
    assert "SIGKILL" in err  # torchrun's own summary names the killed rank and its signal
    # resumed from step 10 (the last checkpoint before the kill): the same run as one never interrupted, bit for bit
    assert losses(tmp / "killed") == losses(tmp / "pipe")
    wk, wp = (weights(os.path.join(tmp, d, "checkpoints", f"step_{STEPS:06d}")) for d in ("killed", "pipe"))
    assert all(torch.equal(wk[k], wp[k]) for k in wp)


@pytest.mark.slow
def test_pipeline_times_data_parallel(corpus, tok_dir, tmp_path):
    """
    4 processes = pipeline 2 x data 2: gradients equal one process's on the whole batch (each data rank holds half
    the rows), and 8 steps of training follow one process's (half the rows per data rank, the same global batch).
    """
    steps = 8

    def cfg(name: str, **kw) -> TrainConfig:
        return small_cfg(corpus, tok_dir, tmp_path / name, **{**KW, "num_steps": steps, **kw})

    run = cfg("pipe_dp", pipeline_parallel=2, device_batch_size=2, eval_every=4)
    code, ranks, err = torchrun(tmp_path, "pp_dp", dict(tests=TESTS, pipe=2, runs=[run.__dict__]), nproc=4)
    assert code == 0, "\n".join(ranks.values())[-4000:] + err[-2000:]
    assert all(f"GRADS EQUAL {r}" in ranks[r] for r in range(4))
    train(cfg("one", eval_every=4))
    assert_close_runs(tmp_path / "one", tmp_path / "pipe_dp", steps)
    bpb = [read_metrics(tmp_path / d, "eval")[-1]["bpb"] for d in ("one", "pipe_dp")]
    assert bpb[0] == pytest.approx(bpb[1], abs=5e-3)


def test_layout_that_does_not_fit_is_refused(runs):
    _, ranks, _ = runs["second"]
    for r in (0, 1):
        assert "REFUSED --pipeline-parallel 3 does not divide the 2 processes of this launch" in ranks[r], ranks[r]
    assert not os.path.exists(runs["tmp"] / "refused")


def test_pipeline_needs_torchrun_and_flat(corpus, tok_dir, tmp_path):
    with pytest.raises(ValueError, match="torchrun"):
        train(small_cfg(corpus, tok_dir, tmp_path, pipeline_parallel=2))
    with pytest.raises(ValueError, match="1 or more"):
        train(small_cfg(corpus, tok_dir, tmp_path, pipeline_parallel=0))
    with pytest.raises(ValueError, match="needs --poe-mode flat"):
        train(small_cfg(corpus, tok_dir, tmp_path, pipeline_parallel=2, poe_mode="hier"))
    with pytest.raises(ValueError, match="do not combine"):
        train(small_cfg(corpus, tok_dir, tmp_path, pipeline_parallel=2, fsdp=True))
    with pytest.raises(ValueError, match="more than the model's 4 stages"):
        train(small_cfg(corpus, tok_dir, tmp_path, pipeline_parallel=5))
    assert not os.path.exists(tmp_path / "checkpoints") and not os.path.exists(tmp_path / "metrics.jsonl")

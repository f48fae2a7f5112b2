"""Sibling branches run concurrently (devices of their own, processes of their own): the same logits and tokens as
one process, and a branch process that dies is named, never waited on forever."""

import multiprocessing as mp

import pytest
import torch
from conftest import perturbed_model
from test_branches import make_siblings, prompt_batch

from cognica_poe import CognicaPoEForCausalLM, load_siblings
from cognica_poe.checkpoint import export_hf_folder
from cognica_poe.dispatch import RankFailed, leave_group

NAMES = ["math", "code"]  # a dual-head and a spec-head branch (3 and 4 processes in all would cost more CPU)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("dispatch")
    base_dir = export_hf_folder(perturbed_model(seed=1), None, str(root / "base"), dtype="float32")
    stages = make_siblings(CognicaPoEForCausalLM.from_pretrained(base_dir).eval(), base_dir, root)
    return base_dir, [stages[name] for name in NAMES]


def same_everywhere(a, b, ids, mask) -> None:
    """Every exit's logits within 1e-5; the tokens of composition (greedy, seeded sampling) and of each exit alone."""
    for x, y in zip(a.forward_exits(ids, attention_mask=mask), b.forward_exits(ids, attention_mask=mask)):
        assert (x - y).abs().max() < 1e-5
    kw = dict(max_new_tokens=8, stop_tokens=[], attention_mask=mask)
    compose = dict(stages=[3, "math", "code"], stage_weights=[0.5, 1.0, 2.0], **kw)
    assert torch.equal(a.generate_parallel_composition(ids, **compose), b.generate_parallel_composition(ids, **compose))
    sampled = dict(compose, do_sample=True, temperature=1.5, top_k=50, seed=7)  # sampling stays with the trunk
    assert torch.equal(a.generate_parallel_composition(ids, **sampled), b.generate_parallel_composition(ids, **sampled))
    for stage in ("math", "code", 1):
        assert torch.equal(a.generate_stage(ids, stage, **kw), b.generate_stage(ids, stage, **kw))


def test_branches_on_devices_of_their_own_match_one_device(folders):
    """device_map places a branch on its own device: its own caches and copies of the tensors it reads; the same
    results (on CPU the placed path runs without streams, so only the placement itself is checked here)."""
    base_dir, stages = folders
    ref = load_siblings(base_dir, stages, names=NAMES)
    placed = load_siblings(base_dir, stages, names=NAMES, device_map={"trunk": "cpu", "math": "cpu"})
    trunk, math = placed.base.gpt, placed.branches[0].gpt
    assert math.transformer.wte is not trunk.transformer.wte and math.lm_head is not trunk.lm_head
    assert torch.equal(math.lm_head.weight, trunk.lm_head.weight) and math.transformer.h[0] is trunk.transformer.h[0]
    assert placed.branches[1].gpt.lm_head is trunk.lm_head  # code stays on the trunk's device, sharing it
    ids, mask, _ = prompt_batch(3, [6, 11])
    same_everywhere(placed, ref, ids, mask)
    with pytest.raises(ValueError, match=r"device_map names \['poetry'\].*'trunk' and the branch names"):
        load_siblings(base_dir, stages, names=NAMES, device_map={"poetry": "cpu"})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (the streams path)")
def test_branches_on_cuda_streams_match_one_stream(folders):
    """Each branch on a CUDA stream of its own (on the last GPU; with one GPU, the trunk's): the same results as the
    branches run one after another on the trunk's GPU."""
    base_dir, stages = folders
    last = f"cuda:{torch.cuda.device_count() - 1}"
    ref = load_siblings(base_dir, stages, names=NAMES, device_map={"trunk": "cuda:0"})
    placed = load_siblings(base_dir, stages, names=NAMES, device_map={"trunk": "cuda:0", "math": last, "code": last})
    assert set(placed.streams) == {0, 1}
    ids, mask, _ = prompt_batch(3, [6, 11])
    same_everywhere(placed, ref, ids.cuda(), mask.cuda())


def branch_rank(rank: int, init_method: str, base_dir: str, stages: list[str], loaded) -> None:
    """A branch process: load the same siblings, serve its branch until rank 0 closes."""
    torch.set_num_threads(1)
    sib = load_siblings(base_dir, stages, names=NAMES)
    loaded.release()
    assert sib.distribute(timeout_s=20, rank=rank, world_size=len(stages) + 1, init_method=init_method) is False


def test_one_process_per_branch_matches_one_process_and_names_a_dead_rank(folders, tmp_path):
    base_dir, stages = folders
    init_method = f"file://{tmp_path / 'group'}"
    ctx = mp.get_context("spawn")
    loaded = ctx.Semaphore(0)
    procs = [ctx.Process(target=branch_rank, args=(r, init_method, base_dir, stages, loaded), daemon=True)
             for r in (1, 2)]
    for p in procs:
        p.start()
    ref = load_siblings(base_dir, stages, names=NAMES)
    sib = load_siblings(base_dir, stages, names=NAMES)
    try:
        for _ in procs:  # slow starts (importing torch on a busy machine) are not the exchanges' timeout to catch
            assert loaded.acquire(timeout=120), "a branch process did not start"
        assert sib.distribute(timeout_s=20, rank=0, world_size=3, init_method=init_method) is True
        assert sib.branches[0].gpt.transformer.h[-1].mlp.c_fc.weight.is_meta  # rank 0 holds only the trunk
        ids, mask, _ = prompt_batch(4, [7, 12])
        same_everywhere(sib, ref, ids, mask)
        # the code branch's process dies mid-generation: one line naming it, no hang
        seen = []

        def kill_code_rank(row, token):
            seen.append(token)
            if len(seen) == 4:  # two steps done (two rows)
                procs[1].kill()
                procs[1].join()

        with pytest.raises(RankFailed, match=r"^rank 2 \(branch 'code'\) failed, exited or stopped answering: ") as e:
            sib.generate_parallel_composition(ids, stages=["math", "code"], max_new_tokens=8, stop_tokens=[],
                                              attention_mask=mask, streamer=kill_code_rank)
        assert "\n" not in str(e.value) and len(seen) == 4
        # the healthy rank answered that step and still serves
        assert torch.equal(sib.generate_stage(ids, "math", max_new_tokens=4, stop_tokens=[], attention_mask=mask),
                           ref.generate_stage(ids, "math", max_new_tokens=4, stop_tokens=[], attention_mask=mask))
        sib.close()  # rank 1 stops and leaves cleanly
        procs[0].join(timeout=30)
        assert procs[0].exitcode == 0
    finally:
        sib.close()
        leave_group()
        for p in procs:
            if p.is_alive():
                p.kill()


def test_distribute_needs_a_group_and_one_process_per_branch(folders, tmp_path, monkeypatch):
    import torch.distributed as dist

    base_dir, stages = folders
    sib = load_siblings(base_dir, stages, names=NAMES)
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ValueError, match="no process group to join: run under torchrun"):
        sib.distribute()
    with pytest.raises(ValueError, match=r"^1 processes for 2 branches: .*\(torchrun --nproc-per-node 3\)$"):
        sib.distribute(rank=0, world_size=1, init_method=f"file://{tmp_path / 'group'}")
    assert not dist.is_initialized()  # the group it joined for nothing is left again
    assert sib.generate_stage(torch.tensor([[0, 5]]), "code", max_new_tokens=2, stop_tokens=[]).shape == (1, 4)

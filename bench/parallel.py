"""
Stage-parallel benchmark. One part per run, chosen with --part:

(a) Sibling composition, sequential vs concurrent dispatch. A base and 3 sibling specialist stages (random weights
    of the given shape, written to a temporary folder) compose their 3 branch exits with the Log-OP, greedy:
    - sequential: one process runs the trunk, then the branches one after another (SiblingSpecialists as loaded);
    - concurrent: on CPU, 4 processes (rank 0 the trunk, ranks 1-3 one branch each, SiblingSpecialists.distribute
      over gloo), --threads threads each (default 1); on CUDA, each branch on its own stream (device_map, the
      branches spread over the visible GPUs).
    Reported: the decode step time of each (median over --runs of (time for --new-tokens - time for 1 token) /
    (new tokens - 1)), the per-part times measured in the sequential process (trunk, each branch), and the cost
    model: T_trunk + sum(T_branch) (sequential) vs T_trunk + max(T_branch) (concurrent). Both paths must produce
    the same tokens (checked). On CPU the concurrent figure needs a free core per branch process: with fewer
    cores the branch processes share them and the step costs more than the model says (`cores` in the JSON).
    Run time: the quick line below took about 1.5 minutes on 2 busy cores, mostly starting the 3 branch processes
    (each imports torch); the defaults add a few hundred larger decode steps to that.

(b) Training: single-process vs 2-stage pipeline: not written yet (its place is marked in PARTS below).

    python bench/parallel.py --part a                                  # defaults: 8 + 3 x 4 layers, n_embd 512
    python bench/parallel.py --part a --n-layer 4 --branch-layers 2 --n-embd 256 --new-tokens 8 --runs 1  # quick

The last line printed is one JSON document (the part, the shape, the figures, the machine, threads per process).
"""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "src"))

import torch  # noqa: E402

from cognica_poe import CognicaPoEForCausalLM, load_siblings  # noqa: E402
from cognica_poe.checkpoint import export_hf_folder, save_stage_folder  # noqa: E402
from cognica_poe.config import CognicaPoEConfig  # noqa: E402
from cognica_poe.eval.speed import machine  # noqa: E402
from cognica_poe.specialist import add_specialist  # noqa: E402

NAMES = ["math", "code", "tool"]

# -----------------------------------------------------------------------------
# (a) sibling composition: sequential vs concurrent dispatch


def make_family(root: str, args) -> tuple[str, list[str]]:
    """A base of the given shape and 3 sibling stage folders (fp32, random weights) under root."""
    cfg = CognicaPoEConfig(n_layer=args.n_layer, n_embd=args.n_embd, n_head=args.n_embd // 128,
                           n_kv_head=args.n_embd // 128, vocab_size=args.vocab, sequence_len=args.seq,
                           poe_every=args.poe_every, bos_token_id=0, eos_token_id=None, pad_token_id=0)
    base = CognicaPoEForCausalLM(cfg).eval()
    base_dir = export_hf_folder(base, None, os.path.join(root, "base"), dtype="float32")
    folders = []
    for k, name in enumerate(NAMES):
        spec = CognicaPoEForCausalLM.from_gpt(add_specialist(base.gpt, args.branch_layers, seed=k))
        with torch.no_grad():  # away from the identity init: each branch is a different exit
            for p in spec.gpt.lm_head_stage.parameters():
                p.normal_(0, 0.01)
        folders.append(save_stage_folder(spec, os.path.join(root, name), base_dir, dtype="float32"))
    return base_dir, folders


def step_time(sib, ids: torch.Tensor, args) -> tuple[float, torch.Tensor]:
    """Median decode step time of the 3-branch composition, and its tokens."""
    def generate(n):
        out = sib.generate_parallel_composition(ids, stages=NAMES, max_new_tokens=n, stop_tokens=[])
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return out

    generate(args.new_tokens)  # warm-up
    times = []
    for _ in range(args.runs):
        t0 = time.perf_counter()
        generate(1)
        t1 = time.perf_counter()
        out = generate(args.new_tokens)
        t2 = time.perf_counter()
        times.append(((t2 - t1) - (t1 - t0)) / (args.new_tokens - 1))
    return statistics.median(times), out


@torch.no_grad()
def part_times(sib, ids: torch.Tensor, args) -> dict:
    """Median per-step time of the trunk's layers and of each branch's layers + exit head (decode steps)."""
    exits = [sib.exit_index(name) for name in NAMES]
    gpt, n = sib.base.gpt, sib.base.config.n_layer
    cache = gpt.new_cache(ids.size(0), ids.size(1) + args.new_tokens)
    views = sib.attach(cache, exits)
    sib.run(cache, views, ids, None, exits)
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    trunk, branches = [], [[] for _ in NAMES]
    token = ids[:, -1:]
    for _ in range(args.new_tokens - 1):
        start = cache.claim(token)
        sync()
        t0 = time.perf_counter()
        gpt.run_slots(cache, start, start + 1, 0, n - 1, [n - 1], 1)
        sync()
        trunk.append(time.perf_counter() - t0)
        for b in views:
            t0 = time.perf_counter()
            sib.branch_logits(b, views[b], start, start + 1, 1)
            sync()
            branches[b].append(time.perf_counter() - t0)
    return {"trunk_s": statistics.median(trunk), "branch_s": [statistics.median(t) for t in branches]}


def branch_rank(rank: int, init_method: str, base_dir: str, folders: list[str], threads: int, loaded) -> None:
    torch.set_num_threads(threads)
    sib = load_siblings(base_dir, folders, names=NAMES)
    loaded.release()
    sib.distribute(timeout_s=600, rank=rank, world_size=len(folders) + 1, init_method=init_method)


def sibling_dispatch(args) -> dict:
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available() and not args.cpu
    ids = torch.randint(1, args.vocab, (args.batch, args.prompt_tokens), generator=torch.Generator().manual_seed(0))
    ids[:, 0] = 0  # BOS
    with tempfile.TemporaryDirectory() as root:
        base_dir, folders = make_family(root, args)
        trunk_map = {"trunk": "cuda:0"} if cuda else {}
        seq = load_siblings(base_dir, folders, names=NAMES, device_map=trunk_map)
        ids = ids.to(seq.base.gpt.device)
        seq_step, seq_out = step_time(seq, ids, args)
        parts = part_times(seq, ids, args)
        print(f"sequential: {seq_step * 1e3:.2f} ms/step; trunk {parts['trunk_s'] * 1e3:.2f} ms, branches "
              f"{[round(t * 1e3, 2) for t in parts['branch_s']]} ms", flush=True)
        del seq
        if cuda:  # each branch on its own stream, the branches spread over the visible GPUs
            n_gpu = torch.cuda.device_count()
            device_map = {**trunk_map, **{name: f"cuda:{(k + 1) % n_gpu}" for k, name in enumerate(NAMES)}}
            con = load_siblings(base_dir, folders, names=NAMES, device_map=device_map)
            con_step, con_out = step_time(con, ids, args)
            how = f"{len(NAMES)} CUDA streams on {n_gpu} GPU(s)"
        else:  # one process per branch
            init_method = f"file://{os.path.join(root, 'group')}"
            ctx = mp.get_context("spawn")
            loaded = ctx.Semaphore(0)
            procs = [ctx.Process(target=branch_rank, args=(r, init_method, base_dir, folders, args.threads, loaded),
                                 daemon=True) for r in range(1, len(NAMES) + 1)]
            for p in procs:
                p.start()
            con = load_siblings(base_dir, folders, names=NAMES)
            try:
                for _ in procs:
                    if not loaded.acquire(timeout=600):
                        raise SystemExit("a branch process did not start")
                con.distribute(timeout_s=600, rank=0, world_size=len(NAMES) + 1, init_method=init_method)
                con_step, con_out = step_time(con, ids, args)
            finally:
                con.close()
                for p in procs:
                    p.join(timeout=60)
                    if p.is_alive():
                        p.kill()
            how = f"{len(NAMES) + 1} processes (gloo), {args.threads} thread(s) each"
    if not torch.equal(seq_out.cpu(), con_out.cpu()):
        raise SystemExit("concurrent dispatch generated other tokens than the sequential run")
    t_trunk, t_branch = parts["trunk_s"], parts["branch_s"]
    model_seq, model_con = t_trunk + sum(t_branch), t_trunk + max(t_branch)
    print(f"concurrent ({how}): {con_step * 1e3:.2f} ms/step: {seq_step / con_step:.2f}x; cost model "
          f"T_trunk + sum(T_branch) = {model_seq * 1e3:.2f} ms vs T_trunk + max(T_branch) = {model_con * 1e3:.2f} ms "
          f"({model_seq / model_con:.2f}x)", flush=True)
    return {"sequential_step_s": seq_step, "concurrent_step_s": con_step, "speedup": seq_step / con_step,
            "concurrent": how, "trunk_s": t_trunk, "branch_s": t_branch, "model_sequential_s": model_seq,
            "model_concurrent_s": model_con, "model_speedup": model_seq / model_con, "same_tokens": True}


# (b) training: single-process vs 2-stage pipeline goes here (a function of args returning a dict, added to PARTS)

PARTS = {"a": sibling_dispatch}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=sorted(PARTS), required=True)
    p.add_argument("--n-layer", type=int, default=8, help="the base's layers (the trunk)")
    p.add_argument("--branch-layers", type=int, default=4, help="layers of each of the 3 branches")
    p.add_argument("--n-embd", type=int, default=512)
    p.add_argument("--vocab", type=int, default=8192)
    p.add_argument("--poe-every", type=int, default=4)
    p.add_argument("--seq", type=int, default=512)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process")
    p.add_argument("--cpu", action="store_true", help="stay on CPU when a GPU is present")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the step time is the difference to one token)")
    t0 = time.perf_counter()
    result = PARTS[args.part](args)
    shape = {k: getattr(args, k) for k in ("n_layer", "branch_layers", "n_embd", "vocab", "poe_every", "batch",
                                           "prompt_tokens", "new_tokens", "runs")}
    print(json.dumps({"part": args.part, "shape": shape, **result, "threads_per_process": args.threads,
                      "cores": os.cpu_count(), "machine": machine(), "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

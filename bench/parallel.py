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
    cores the branch processes share them, so the model is also given for this machine (`model_concurrent_here_s`:
    T_trunk + max(max(T_branch), sum(T_branch) / B) with B = cores // threads branches at once).
    Run time: the quick line below took about 1.5 minutes on 2 busy cores, mostly starting the 3 branch processes
    (each imports torch); the defaults add a few hundred larger decode steps to that.

(b) Training throughput of stage-pipelined flat PoE (`cognica-poe train --pipeline-parallel`): one process vs a 2-rank
    pipeline, and pipeline 2 x data 2 where the machine has 4 cores; one thread per process; the same model, data
    and global batch (tokens per optimizer step) everywhere.

    Each variant is a real training run (train(), under torchrun for the parallel ones) on the bundled corpus with one
    tokenizer trained here first; tokens/s = tokens per optimizer step / median step time (metrics.jsonl's `dt`,
    after --warmup steps; evaluation and checkpoints are outside the timed steps). With M micro-batches per step and P
    pipeline ranks, the forward-only pipeline's ideal speed-up over one process is P * M / (M + P - 1) (P - 1
    micro-batches of fill and drain per step), less what each rank repeats or adds: the embedding (every rank
    recomputes x0), the all-reduce of the shared gradients (embeddings, lm_head, scalars), and stages that split
    unevenly. Reported with the measured figures.
    Run time: --train-preset tiny --steps 3 took 2-3 minutes on 2 busy cores.

    python bench/parallel.py                                           # both parts, default shapes
    python bench/parallel.py --part a                                  # defaults: 8 + 3 x 4 layers, n_embd 512
    python bench/parallel.py --part a --n-layer 4 --branch-layers 2 --n-embd 256 --new-tokens 8 --runs 1  # quick
    python bench/parallel.py --part b --train-preset tiny --steps 3    # quick

The last line printed is one JSON document (the part, the shape, the figures, the machine, threads per process).
"""

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
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
from cognica_poe.tokenizer_train import train_bpe  # noqa: E402
from cognica_poe.train.data import iter_tokenizer_texts  # noqa: E402

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
    # what this machine can give: on CPU at most cores // threads branch processes run at once, so the branches
    # take at least sum(T_branch) / that many (on GPUs, one device per branch where there are enough)
    slots = torch.cuda.device_count() if cuda else max(1, len(os.sched_getaffinity(0)) // args.threads)
    model_here = t_trunk + max(max(t_branch), sum(t_branch) / min(slots, len(t_branch)))
    print(f"concurrent ({how}): {con_step * 1e3:.2f} ms/step: {seq_step / con_step:.2f}x; cost model "
          f"T_trunk + sum(T_branch) = {model_seq * 1e3:.2f} ms vs T_trunk + max(T_branch) = {model_con * 1e3:.2f} ms "
          f"({model_seq / model_con:.2f}x); with {slots} branch(es) at once here: {model_here * 1e3:.2f} ms "
          f"({model_seq / model_here:.2f}x)", flush=True)
    return {"sequential_step_s": seq_step, "concurrent_step_s": con_step, "speedup": seq_step / con_step,
            "concurrent": how, "trunk_s": t_trunk, "branch_s": t_branch, "model_sequential_s": model_seq,
            "model_concurrent_s": model_con, "model_speedup": model_seq / model_con,
            "branches_at_once_here": min(slots, len(t_branch)), "model_concurrent_here_s": model_here,
            "model_speedup_here": model_seq / model_here, "same_tokens": True}


# -----------------------------------------------------------------------------
# (b) training: single-process vs 2-stage pipeline (+ data parallel where cores allow)

SRC = os.path.join(HERE, "..", "src")
RUN = ("import json, sys\nfrom cognica_poe.train.loop import TrainConfig, train\n"
       "train(TrainConfig(**json.loads(sys.argv[1])))\n")


def run_variant(work: str, name: str, nproc: int, pipeline: int, cfg: dict, warmup: int) -> dict:
    """One training run in nproc processes (one thread each); its tokens/s from the median timed step."""
    script = os.path.join(work, "run.py")
    with open(script, "w") as f:
        f.write(RUN)
    cfg = dict(cfg, out_dir=os.path.join(work, name), pipeline_parallel=pipeline)
    launch = [sys.executable] if nproc == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                  f"--nproc-per-node={nproc}"]
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(launch + [script, json.dumps(cfg)], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{name} failed:\n{proc.stderr[-3000:]}")
    with open(os.path.join(cfg["out_dir"], "metrics.jsonl")) as f:
        rows = [r for r in map(json.loads, f) if r["type"] == "train"]
    dt = statistics.median(r["dt"] for r in rows[warmup:])
    return dict(processes=nproc, pipeline=pipeline, data=nproc // pipeline, step_s=dt,
                tok_per_s=cfg["total_batch_size"] / dt, final_losses=rows[-1]["losses"])


def measure_training(args: argparse.Namespace, work: str) -> dict:
    """Every variant's run in `work` (a tokenizer first); the summary."""
    tok_dir = os.path.join(work, "tok")
    train_bpe(iter_tokenizer_texts(None), args.train_vocab).save_pretrained(tok_dir)
    cfg = dict(preset=args.train_preset, sequence_len=args.train_seq, tokenizer=tok_dir,
               device_batch_size=args.train_batch,
               total_batch_size=args.micro * args.train_batch * args.train_seq, num_steps=args.warmup + args.steps,
               eval_every=10**9, eval_tokens=4 * (args.train_seq + 1), progress=False, export=False, seed=0)
    results = {"single": run_variant(work, "single", 1, 1, cfg, args.warmup)}
    print(f"single process: {results['single']['tok_per_s']:,.0f} tok/s", flush=True)
    results["pipeline_2"] = run_variant(work, "pipeline_2", 2, 2, cfg, args.warmup)
    print(f"pipeline 2: {results['pipeline_2']['tok_per_s']:,.0f} tok/s", flush=True)
    if args.data_parallel == "yes" or (args.data_parallel == "auto" and (os.cpu_count() or 1) >= 4):
        if args.micro % 2:
            raise SystemExit("--micro must be even to split the batch over 2 data ranks")
        results["pipeline_2_x_data_2"] = run_variant(work, "pipeline_2_x_data_2", 4, 2, cfg, args.warmup)
        print(f"pipeline 2 x data 2: {results['pipeline_2_x_data_2']['tok_per_s']:,.0f} tok/s", flush=True)
    single = results["single"]["tok_per_s"]
    summary = dict(preset=args.train_preset, seq=args.train_seq, rows_per_micro_batch=args.train_batch,
                   micro_batches=args.micro, tokens_per_step=cfg["total_batch_size"], timed_steps=args.steps,
                   variants=results, speedup={k: v["tok_per_s"] / single for k, v in results.items()},
                   ideal_pipeline_2_speedup=2 * args.micro / (args.micro + 1))
    return summary


def pipeline_training(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="parallel_train_") as work:
        return measure_training(args, work)


PARTS = {"a": sibling_dispatch, "b": pipeline_training}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", choices=sorted(PARTS) + ["all"], default="all")
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
    p.add_argument("--train-preset", default="small", help="(b) model size (train --preset)")
    p.add_argument("--train-seq", type=int, default=256, help="(b) sequence length")
    p.add_argument("--train-batch", type=int, default=4, help="(b) rows per micro-batch")
    p.add_argument("--micro", type=int, default=8, help="(b) micro-batches per optimizer step (one process)")
    p.add_argument("--train-vocab", type=int, default=2048, help="(b) ids of the tokenizer trained for the runs")
    p.add_argument("--steps", type=int, default=6, help="(b) timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="(b) untimed steps first")
    p.add_argument("--data-parallel", choices=["auto", "yes", "no"], default="auto",
                   help="(b) also run pipeline 2 x data 2 (auto: when the machine has 4 or more cores)")
    args = p.parse_args()
    if args.new_tokens < 2:
        p.error("--new-tokens must be at least 2 (the step time is the difference to one token)")
    t0 = time.perf_counter()
    out = {"bench": "parallel", "part": args.part}
    if args.part in ("a", "all"):
        shape = {k: getattr(args, k) for k in ("n_layer", "branch_layers", "n_embd", "vocab", "poe_every", "batch",
                                               "prompt_tokens", "new_tokens", "runs")}
        out["sibling_dispatch"] = {"shape": shape, **sibling_dispatch(args), "threads_per_process": args.threads}
    if args.part in ("b", "all"):
        out["pipeline_training"] = {**pipeline_training(args), "threads_per_process": 1}
    print(json.dumps({**out, "cores": os.cpu_count(), "machine": machine(),
                      "seconds": round(time.perf_counter() - t0, 1)}))


if __name__ == "__main__":
    main()

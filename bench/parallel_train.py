"""
Training throughput of stage-pipelined flat PoE (`cognica-poe train --pipeline-parallel`): one process vs a 2-rank
pipeline, and pipeline 2 x data 2 where the machine has 4 cores; one thread per process; the same model, data
and global batch (tokens per optimizer step) everywhere.

Each variant is a real training run (train(), under torchrun for the parallel ones) on the bundled corpus with one
tokenizer trained here first; tokens/s = tokens per optimizer step / median step time (metrics.jsonl's `dt`,
after --warmup steps; evaluation and checkpoints are outside the timed steps). With M micro-batches per step and P
pipeline ranks, the forward-only pipeline's ideal speed-up over one process is P * M / (M + P - 1) (P - 1
micro-batches of fill and drain per step), less what each rank repeats or adds: the embedding (every rank
recomputes x0), the all-reduce of the shared gradients (embeddings, lm_head, scalars), and stages that split
unevenly. Reported with the measured figures.

    python bench/parallel_train.py                          # preset small (8 layers, 4 stages), T 256, 8 x 4 rows
    python bench/parallel_train.py --preset tiny --steps 3  # a quick check: 2-3 minutes on 2 busy cores

The last line printed is one JSON object with every figure and the machine.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

import torch

from cognica_poe.eval.speed import machine
from cognica_poe.tokenizer_train import train_bpe
from cognica_poe.train.data import iter_tokenizer_texts

HERE = os.path.dirname(os.path.abspath(__file__))
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


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="small", help="model size (train --preset)")
    p.add_argument("--seq", type=int, default=256, help="sequence length")
    p.add_argument("--batch", type=int, default=4, help="rows per micro-batch")
    p.add_argument("--micro", type=int, default=8, help="micro-batches per optimizer step (one process)")
    p.add_argument("--vocab", type=int, default=2048, help="ids of the tokenizer trained for the runs")
    p.add_argument("--steps", type=int, default=6, help="timed steps per variant")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first")
    p.add_argument("--data-parallel", choices=["auto", "yes", "no"], default="auto",
                   help="also run pipeline 2 x data 2 (auto: when the machine has 4 or more cores)")
    args = p.parse_args()
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="parallel_train_") as work:
        print(json.dumps(measure(args, work)))


def measure(args: argparse.Namespace, work: str) -> dict:
    """Every variant's run in `work` (a tokenizer first); the summary."""
    tok_dir = os.path.join(work, "tok")
    train_bpe(iter_tokenizer_texts(None), args.vocab).save_pretrained(tok_dir)
    cfg = dict(preset=args.preset, sequence_len=args.seq, tokenizer=tok_dir, device_batch_size=args.batch,
               total_batch_size=args.micro * args.batch * args.seq, num_steps=args.warmup + args.steps,
               eval_every=10**9, eval_tokens=4 * (args.seq + 1), progress=False, export=False, seed=0)
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
    summary = dict(bench="parallel_train", preset=args.preset, seq=args.seq, rows_per_micro_batch=args.batch,
                   micro_batches=args.micro, tokens_per_step=cfg["total_batch_size"], timed_steps=args.steps,
                   variants=results, speedup={k: v["tok_per_s"] / single for k, v in results.items()},
                   ideal_pipeline_2_speedup=2 * args.micro / (args.micro + 1), machine=machine())
    return summary


if __name__ == "__main__":
    main()

"""
Serving benchmark: `cognica-poe serve` under a bounded load on loopback, driven by a minimal streaming HTTP client
(http.client and json, one connection per request, as vLLM's serving benchmark drives servers with aiohttp): the
load generator shares the machine's cores with the server, so its own per-chunk cost is kept small (the openai
client's typed chunks cost several times more per token; the tests drive the server with the openai client).

The server runs as its own process (`cognica-poe serve`, 127.0.0.1, a free port) on the trained reference model
(../shared/models/poe-d8-classics, converted here) or any --model folder. For each mode (full, speculative) and each
concurrency (1, 4, 16), C client threads send streaming greedy completions (the starts of the bundled corpus's
last documents as prompts; ignore_eos, so each generates --max-tokens) until --requests have been sent or
--time-limit seconds have passed; every level stops by itself. Reported per level: throughput (generated
tokens / wall seconds), TTFT and inter-token latency p50 / p99 (client side), errors (the server's queue bound is
above the concurrency, so there must be none). batching_gain = throughput at the highest
concurrency / at 1.

Then the same load, full mode only, against transformers' own OpenAI-compatible server (`transformers serve`, its
own process on 127.0.0.1 and a free port) on the same folder, side by side in the JSON under `transformers_serve`.
It needs a shim, here in the bench only (`transformers_server`): transformers serve looks the model class up as an
attribute of the `transformers` module and streams through a Rust `tokenizers` tokenizer, so the shim registers our
classes with the Auto classes, sets `CognicaPoEForCausalLM` on that module and loads the folder's tokenizer.json as
a PreTrainedTokenizerFast. Its prompts carry `<|bos|>` (our server prepends BOS to completions) and, in place of
`ignore_eos`, a generation_config with min_new_tokens = max_new_tokens, so both generate the same token counts.
It runs without `--continuous-batching`: with it, the first step fails (the model's forward is handed transformers'
PagedAttentionCache, not its own cache), so requests are served one generate() call at a time.

The last line printed is one JSON document; it is also saved under bench/results/.

    python bench/serve.py                                  # d8, full + speculative at 1, 4, 16
    python bench/serve.py --requests 16 --max-tokens 16    # quicker
"""

import argparse
import collections
import datetime
import http.client
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)


def percentile(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def free_port() -> int:
    """A free loopback port (the CLI takes no port 0: a user would not learn which port it bound)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(folder: str, args) -> tuple[subprocess.Popen, str]:
    """`cognica-poe serve` on 127.0.0.1 and a free port; returns (process, base URL) once /health answers."""
    cmd = [sys.executable, "-m", "cognica_poe.cli", "serve", folder, "--host", "127.0.0.1", "--port", str(free_port()),
           "--max-batch", str(max(args.concurrency)), "--max-queue", str(4 * max(args.concurrency)),
           "--threads", str(args.threads)]
    if args.dtype:
        cmd += ["--dtype", args.dtype]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 300
    url = None
    while url is None:
        line = proc.stderr.readline()
        if not line and proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        m = re.search(r"on (http://127\.0\.0\.1:\d+)/v1", line)
        url = m.group(1) if m else None
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("the server did not start within 300 s")
    threading.Thread(target=proc.stderr.read, daemon=True).start()  # keep draining its stderr
    try:
        urllib.request.urlopen(url + "/health", timeout=60).read()
    except Exception:
        proc.kill()
        raise
    return proc, url


def transformers_server(folder: str, port: int, threads: int) -> None:
    """
    The shim that lets `transformers serve` load and stream our model, then its server (blocks; run as a process).

    Its model manager builds the model as `getattr(transformers, config.architectures[0])` and its streamer decodes
    with the processor's Rust tokenizer, so: our classes go into the Auto classes and onto the module it reads, and
    the processor is the folder's tokenizer.json as a PreTrainedTokenizerFast (our tokenizer is tiktoken-backed).
    """
    from transformers import PreTrainedTokenizerFast
    from transformers.cli.serve import Serve
    from transformers.cli.serving import model_manager

    import cognica_poe
    from cognica_poe.cpu import set_threads
    from cognica_poe.hf import CognicaPoEForCausalLM

    set_threads(threads)
    cognica_poe.register_auto_classes()
    model_manager.transformers.CognicaPoEForCausalLM = CognicaPoEForCausalLM  # the module it reads
    model_manager.ModelManager._load_processor = lambda self, mid, gguf_file=None: (
        PreTrainedTokenizerFast.from_pretrained(mid))
    Serve(force_model=folder, host="127.0.0.1", port=port, device="cpu", dtype="float32", log_level="error")


def start_transformers_server(folder: str, args) -> tuple[subprocess.Popen, str, collections.deque]:
    """`transformers serve` (through the shim) on 127.0.0.1 and a free port; (process, base URL, its stderr tail)."""
    port = free_port()
    code = f"import sys; sys.path.insert(0, {HERE!r}); import serve; serve.transformers_server({folder!r}, {port}, " \
           f"{args.threads})"
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    tail = collections.deque(maxlen=20)
    drain = threading.Thread(target=lambda: tail.extend(proc.stderr), daemon=True)  # drain, keep the last lines
    drain.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        try:
            urllib.request.urlopen(url + "/health", timeout=10).read()
            return proc, url, tail
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                proc.wait()
                drain.join(timeout=10)
                raise RuntimeError("transformers serve did not start: " +
                                   " | ".join(x.strip() for x in tail)) from None
            time.sleep(0.5)


def run_level(url: str, prompts: list[str], mode: dict, concurrency: int, args, request: dict | None = None) -> dict:
    """
    C threads, each sending streaming completions until the request count or the time limit is reached.
    `request` replaces our server's fields (model id, `poe` mode, ignore_eos) for another server.
    """
    request = request or {"model": args.model_id, "extra_body": {"poe": mode, "ignore_eos": True}}
    body = {k: v for k, v in request.items() if k != "extra_body"} | request.get("extra_body", {})
    host, port = url.removeprefix("http://").split(":")
    lock = threading.Lock()
    sent = [0]
    ttft, itl, tokens, errors = [], [], [0], []
    t0 = time.monotonic()

    def worker():
        while True:
            with lock:
                if sent[0] >= args.requests or time.monotonic() - t0 > args.time_limit:
                    return
                i = sent[0]
                sent[0] += 1
            start = time.monotonic()
            first = last = None
            try:
                conn = http.client.HTTPConnection(host, int(port), timeout=args.time_limit + 60)
                conn.request("POST", "/v1/completions", json.dumps(
                    {**body, "prompt": prompts[i % len(prompts)], "max_tokens": args.max_tokens, "temperature": 0,
                     "stream": True, "stream_options": {"include_usage": True}}),
                    {"Content-Type": "application/json", "Authorization": "Bearer none"})
                response = conn.getresponse()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {response.read()[:200]!r}")
                n = 0
                for line in response:  # server-sent events: `data: {chunk}` lines, then `data: [DONE]`
                    if not line.startswith(b"data: {"):
                        continue
                    now = time.monotonic()
                    chunk = json.loads(line[6:])
                    if chunk.get("choices") and chunk["choices"][0].get("text"):
                        first = first or now
                        last = now
                    if chunk.get("usage"):
                        n = chunk["usage"]["completion_tokens"]
                conn.close()
            except Exception as e:  # counted, never fatal: the figure is "zero errors"
                with lock:
                    errors.append(f"{type(e).__name__}: {e}")
                continue
            with lock:
                tokens[0] += n
                if first is not None:
                    ttft.append(first - start)
                    if n > 1:
                        itl.append((last - first) / (n - 1))

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    r = lambda x: None if x is None else round(x, 4)
    return {"mode": mode["mode"], "concurrency": concurrency, "requests": sent[0], "errors": len(errors),
            "error_samples": errors[:3], "tokens": tokens[0], "seconds": round(wall, 3),
            "tokens_per_s": round(tokens[0] / wall, 2), "ttft_p50_s": r(percentile(ttft, 0.5)),
            "ttft_p99_s": r(percentile(ttft, 0.99)), "itl_p50_s": r(percentile(itl, 0.5)),
            "itl_p99_s": r(percentile(itl, 0.99))}


def batching_gain(levels: list[dict], mode: str) -> float | None:
    """Throughput at the highest concurrency / at the lowest."""
    rows = {lv["concurrency"]: lv["tokens_per_s"] for lv in levels if lv["mode"] == mode}
    lo, hi = min(rows), max(rows)
    return round(rows[hi] / rows[lo], 2) if rows[lo] else None


def run_transformers(folder: str, prompts: list[str], args) -> dict:
    """The full-mode load against `transformers serve`; a server that cannot start is recorded with its reason."""
    import transformers

    request = {"model": folder, "extra_body": {"generation_config": json.dumps(
        {"max_new_tokens": args.max_tokens, "min_new_tokens": args.max_tokens, "do_sample": False})}}
    bos_prompts = ["<|bos|>" + p for p in prompts]  # tokenizer.json reads special-token text as the token
    server = f"transformers serve {transformers.__version__} (127.0.0.1, sequential generate(), " \
             f"{args.threads} thread, shim in bench/serve.py)"
    try:
        proc, url, tail = start_transformers_server(folder, args)
    except RuntimeError as e:
        return {"server": server, "error": str(e)}
    levels = []
    try:
        mode = {"mode": "full"}
        run_level(url, bos_prompts, mode, 1, argparse.Namespace(**{**vars(args), "requests": 2}), request)
        for c in args.concurrency:
            levels.append(run_level(url, bos_prompts, mode, c, args, request))
            print(json.dumps({"server": "transformers serve", **levels[-1]}), file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return {"server": server, "levels": levels, "batching_gain": {"full": batching_gain(levels, "full")},
            "errors": sum(lv["errors"] for lv in levels),
            "continuous_batching": "not usable: with --continuous-batching the first step fails (AttributeError: "
                                   "'PagedAttentionCache' object has no attribute 'claim': the model's forward "
                                   "takes its own cache, not transformers' paged one)"}


def main() -> None:
    from cognica_poe.cpu import set_threads
    from cognica_poe.eval.speed import machine

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="an HF folder (default: the converted d8 reference model)")
    p.add_argument("--dtype", default=None)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    p.add_argument("--requests", type=int, default=64, help="requests per level")
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--time-limit", type=float, default=120.0, help="seconds per level before no new request starts")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads of each server (default: the "
                                                            "physical cores)")
    p.add_argument("--no-transformers", action="store_true", help="skip the run against `transformers serve`")
    p.add_argument("--note", default=None, help="a line saved in the JSON (e.g. what else ran on the machine)")
    p.add_argument("--out", default=None, help="result JSON (default: bench/results/serve-cpu-<cpu>-<date>.json)")
    args = p.parse_args()
    args.threads = set_threads(args.threads)  # the servers' count; machine() below states it too

    from inference import D8

    folder = args.model
    name = None if folder is None else os.path.basename(os.path.normpath(folder))
    if folder is None:
        from cognica_poe.nanochat import convert_nanochat

        folder = convert_nanochat(D8, os.path.join(tempfile.mkdtemp(prefix="bench-serve-"), "poe-d8-classics"),
                                  dtype="float32", allow_pickle=True)
        name = "poe-d8-classics (8 layers, 256 wide, 4 exits)"
    args.model_id = os.path.basename(os.path.normpath(folder))
    corpus = os.path.join(HERE, "..", "src", "cognica_poe", "data", "tinyshakespeare.txt")
    with open(corpus, encoding="utf-8") as f:  # the starts of the bundled corpus's last documents
        prompts = [d.strip()[:100] for d in f.read().split("\n\n") if len(d.strip()) > 100][-64:]
    load_start = os.getloadavg()
    proc, url = start_server(folder, args)
    levels = []
    try:
        for mode in ({"mode": "full"}, {"mode": "speculative", "draft_stage": 0, "k_draft": 3}):
            run_level(url, prompts, mode, 1, argparse.Namespace(**{**vars(args), "requests": 2}))  # warm-up
            for c in args.concurrency:
                levels.append(run_level(url, prompts, mode, c, args))
                print(json.dumps(levels[-1]), file=sys.stderr, flush=True)
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    tf = "not run (--no-transformers)" if args.no_transformers else run_transformers(folder, prompts, args)
    result = {"bench": "serve", "model": name, "server": "cognica-poe serve (127.0.0.1, max-batch "
              f"{max(args.concurrency)}, {args.threads} thread)", "max_tokens": args.max_tokens,
              "requests_per_level": args.requests, "levels": levels,
              "batching_gain": {m: batching_gain(levels, m) for m in ("full", "speculative")},
              "errors": sum(lv["errors"] for lv in levels), "transformers_serve": tf, "note": args.note,
              "loadavg_1m": {"start": round(load_start[0], 2), "end": round(os.getloadavg()[0], 2)},
              "machine": machine(), "date": datetime.date.today().isoformat()}
    out = args.out
    if out is None:  # a new file per run: an earlier result is never overwritten
        slug = re.sub(r"[^a-z0-9]+", "-", result["machine"]["cpu"].lower()).strip("-")[:40]
        stem, n = os.path.join(HERE, "results", f"serve-cpu-{slug}-{result['date']}"), 1
        while os.path.exists(out := stem + (f"-run{n}" if n > 1 else "") + ".json"):
            n += 1
    with open(out + ".tmp", "w") as f:
        json.dump(result, f, indent=1)
    os.replace(out + ".tmp", out)
    print(json.dumps(result))


if __name__ == "__main__":
    main()

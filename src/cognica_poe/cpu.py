"""
The CPU a model runs on: how many threads to give torch, and whether prepacked weights decode faster here.

Threads. A matrix-vector product is limited by memory bandwidth, and two hardware threads of one core share its
vector units and caches: one torch thread per physical core is the useful maximum. `physical_cores` counts the
cores of the CPUs this process may run on (its affinity mask), SMT siblings once, capped by a cgroup CPU quota
(a container limited to 2 CPUs of a 64-core host gets 2); `set_threads` is what the CLI, the server and the
benches call, with that count by default unless $OMP_NUM_THREADS says otherwise (torchrun sets it to 1 for
several processes per machine, so they do not oversubscribe the cores).

Weight layout. Prepacked oneDNN weights (packed.py) make decoding much faster on some CPUs and slower on others
(the packed kernel's speed depends on the CPU's vector extensions), so whether to pack is measured, not assumed:
`probe_packing` times matrix-vector products of one representative shape, plain F.linear against packed,
alternating. The answer depends on the CPU, the torch build (its oneDNN), the dtype and the thread count, and is
cached under those in a small JSON file in the user's cache folder ($XDG_CACHE_HOME/cognica-poe, else
~/.cache/cognica-poe), so a load measures once per machine and setting. A cache file that cannot be read is ignored
and rewritten; one that cannot be written leaves the probe's answer for this process only. `apply_packing(model,
"auto")` packs when the probe says it pays; True and False force it.
"""

import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

from .atomic import write_json
from .packed import PackedWeights, packing_supported

PACK_CHOICES = (True, False, "auto")
CACHE_NAME = "packing.json"
# the probe: y = W x over a few (4 C, C) matrices (an MLP up-projection at C = 1024), 16M weights in all, more than
# most L2 caches hold, so the product streams its weights as a decode step does
PROBE_SHAPE = (4096, 1024)
PROBE_MATRICES = 4
PROBE_RUNS = 5
# pack only when it saves at least this fraction: the packed copy costs memory, and a tie is noise
PACK_MARGIN = 0.05


# -----------------------------------------------------------------------------
# threads

def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def cgroup_cpu_limit() -> float | None:
    """CPUs the process's cgroup may use per period (cgroup v2 cpu.max, else v1 cfs quota); None when unlimited."""
    cg = _read("/proc/self/cgroup") or ""
    own = next((line.split(":", 2)[2] for line in cg.splitlines() if line.startswith("0::")), "/")
    for folder in (os.path.join("/sys/fs/cgroup", own.lstrip("/")), "/sys/fs/cgroup"):
        fields = (_read(os.path.join(folder, "cpu.max")) or "").split()
        if len(fields) == 2 and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
    quota, period = _read("/sys/fs/cgroup/cpu/cpu.cfs_quota_us"), _read("/sys/fs/cgroup/cpu/cpu.cfs_period_us")
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def physical_cores() -> int:
    """Physical cores this process may run on: its affinity mask's CPUs with SMT siblings counted once (Linux
    sysfs topology), at most the cgroup's CPU quota (rounded down: a throttled thread stalls every parallel
    region), at least 1. Without sysfs (macOS, Windows) the OS's physical core count where it says, else every
    logical CPU."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # no affinity masks on this OS
        cpus = []
    cores = set()
    for cpu in cpus:
        topology = f"/sys/devices/system/cpu/cpu{cpu}/topology"
        siblings = _read(f"{topology}/core_cpus_list") or _read(f"{topology}/thread_siblings_list")
        cores.add(siblings or str(cpu))  # one entry per core: the list of its hardware threads
    n = len(cores) or _os_physical_cores() or os.cpu_count() or 1
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, math.floor(limit))
    return max(n, 1)


def _os_physical_cores() -> int | None:
    if sys.platform == "darwin":
        import subprocess

        try:
            out = subprocess.run(["sysctl", "-n", "hw.physicalcpu"], capture_output=True, text=True, timeout=5)
            return int(out.stdout.strip())
        except (OSError, ValueError, subprocess.SubprocessError):
            return None
    return None


def default_threads() -> int:
    """OMP_NUM_THREADS when set (the user's explicit choice, which torch honours too), else physical_cores()."""
    env = os.environ.get("OMP_NUM_THREADS", "")
    return int(env) if env.isdigit() and int(env) > 0 else physical_cores()


def set_threads(n: int | None = None) -> int:
    """torch's CPU threads: n, or default_threads() for None. Returns the count now in effect."""
    if n is not None and n < 1:
        raise ValueError(f"--threads must be a positive number of threads, got {n}")
    torch.set_num_threads(n or default_threads())
    return torch.get_num_threads()


# -----------------------------------------------------------------------------
# weight layout: packed or plain

def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux, else what platform knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown CPU"


def cache_path() -> str:
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, "cognica-poe", CACHE_NAME)


def probe_key(dtype: torch.dtype, threads: int | None = None) -> str:
    """What a probe's answer depends on: CPU model, torch build, dtype, threads."""
    threads = torch.get_num_threads() if threads is None else threads
    return f"{cpu_name()} | torch {torch.__version__} | {str(dtype).removeprefix('torch.')} | {threads} threads"


def probe_packing(dtype: torch.dtype, runs: int = PROBE_RUNS) -> dict:
    """
    Time y = W x over PROBE_MATRICES matrices of PROBE_SHAPE with plain F.linear and with packed copies, the two
    alternating so a slow spell hits both; the fastest of `runs` passes each (the one least disturbed by other
    processes: the answer is cached, so it should describe the machine, not the moment), after a warm-up pass.
    pack: whether packed is at least PACK_MARGIN faster. GB/s = weight bytes read per second.
    """
    rows, cols = PROBE_SHAPE
    with torch.no_grad():
        mats = [torch.full((rows, cols), 0.01 * (i + 1), dtype=dtype) for i in range(PROBE_MATRICES)]
        packed = [PackedWeights(w) for w in mats]
        x = torch.full((1, cols), 0.5, dtype=dtype)
        layouts = {"plain": lambda: [F.linear(x, w) for w in mats], "packed": lambda: [p(x) for p in packed]}
        times = {k: [] for k in layouts}
        for fn in layouts.values():
            fn()
        for _ in range(runs):
            for k, fn in layouts.items():
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    nbytes = PROBE_MATRICES * rows * cols * mats[0].element_size()
    plain, pack = min(times["plain"]), min(times["packed"])
    try:  # how busy the machine was while it measured, for whoever reads the cache
        load = round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # no load average on Windows
        load = None
    return {"pack": pack <= (1 - PACK_MARGIN) * plain, "plain_GBps": round(nbytes / plain / 1e9, 2),
            "packed_GBps": round(nbytes / pack / 1e9, 2), "shape": [PROBE_MATRICES, rows, cols], "load_1m": load}


def read_cache(path: str) -> dict:
    """The cache's entries; {} when it is missing or unreadable (it is then rewritten whole)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def packing_choice(dtype: torch.dtype) -> dict:
    """
    Whether to pack weights of `dtype` on this CPU at the current thread count: the cached probe answer, else a
    probe now (and cached). {"pack": False, "why": ...} without a probe where packing is impossible.
    """
    if not packing_supported(torch.empty(0, dtype=dtype)):
        return {"pack": False, "why": f"this torch build or CPU cannot pack {str(dtype).removeprefix('torch.')}"}
    path, key = cache_path(), probe_key(dtype)
    entries = read_cache(path)
    entry = entries.get(key)
    if isinstance(entry, dict) and isinstance(entry.get("pack"), bool):
        return entry
    entry = probe_packing(dtype)
    entries[key] = entry
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_json(path, entries)
    except OSError:
        pass  # a read-only home: the answer serves this process only
    return entry


def packs(model: torch.nn.Module) -> bool:
    """What "auto" decides for this model: on CPU, the probe's answer for its floating-point dtype."""
    p = next((p for p in model.parameters() if p.is_floating_point()), None)
    return p is not None and p.device.type == "cpu" and packing_choice(p.dtype)["pack"]


def apply_packing(model, pack: bool | str, like: torch.nn.Module | None = None) -> int:
    """
    Pack model's large matrices for CPU inference (model.pack_weights()) as asked: True always, False never,
    "auto" when packing_choice says it pays for the dtype of `like` (default: the model itself; a SiblingSpecialists
    family, not a module, passes its base) here. Returns how many matrices are packed.
    """
    if pack not in PACK_CHOICES:
        raise ValueError(f"pack must be True, False or 'auto', got {pack!r}")
    if pack == "auto":
        pack = packs(model if like is None else like)
    return model.pack_weights() if pack else 0


def layouts() -> dict:
    """The weight layout "auto" picks on this machine for fp32 and bf16, with the probe's figures (bench JSONs)."""
    return {str(dt).removeprefix("torch."): {"layout": "packed" if c["pack"] else "plain", **c}
            for dt in (torch.float32, torch.bfloat16) for c in [packing_choice(dt)]}

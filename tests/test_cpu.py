"""cpu.py: torch threads (physical cores by default, --threads honoured) and the probed choice of weight layout."""

import json
import os

import pytest
import torch
from conftest import bundled_text, perturbed_model

from cognica_poe import cpu
from cognica_poe.checkpoint import export_hf_folder, load_model
from cognica_poe.cli import build_parser, main
from cognica_poe.packed import count_packed, packing_supported
from cognica_poe.tokenizer_train import train_bpe

needs_packing = pytest.mark.skipif(not packing_supported(torch.zeros(1)), reason="this torch build has no oneDNN")


@pytest.fixture(scope="module")
def wide_folder(tmp_path_factory) -> str:
    """An fp32 model folder wide enough (256) that its matrices are packed when asked, with a tokenizer."""
    tok = train_bpe(iter(bundled_text(20_000).split("\n\n")), vocab_size=300)
    model = perturbed_model(n_layer=2, n_embd=256, n_head=2, n_kv_head=1, poe_every=1, vocab_size=len(tok))
    return export_hf_folder(model, tok, str(tmp_path_factory.mktemp("wide") / "m"), dtype="float32")


@pytest.fixture
def cache(tmp_path, monkeypatch) -> str:
    """A fresh probe cache for one test; returns the cache file's path."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return cpu.cache_path()


@pytest.fixture
def restore_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def fake_probe(monkeypatch, pack: bool) -> list:
    """Replace the measurement by a fixed answer; returns the list of dtypes it was asked about."""
    calls = []

    def probe(dtype, runs=cpu.PROBE_RUNS):
        calls.append(dtype)
        return {"pack": pack, "plain_GBps": 1.0, "packed_GBps": 2.0 if pack else 0.5}

    monkeypatch.setattr(cpu, "probe_packing", probe)
    return calls


# -----------------------------------------------------------------------------
# threads

def fake_topology(monkeypatch, affinity: set[int], siblings: dict[int, str], cpu_max: str | None = None) -> None:
    """A Linux host seen through os.sched_getaffinity and sysfs/cgroup files: siblings[cpu] = its core's CPU list."""
    files = {f"/sys/devices/system/cpu/cpu{c}/topology/core_cpus_list": s for c, s in siblings.items()}
    if cpu_max is not None:
        files["/proc/self/cgroup"] = "0::/\n"
        files["/sys/fs/cgroup/cpu.max"] = cpu_max
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: affinity, raising=False)
    monkeypatch.setattr(cpu, "_read", files.get)


def test_physical_cores_counts_smt_siblings_once_within_affinity_and_quota(monkeypatch):
    smt = {0: "0,2", 1: "1,3", 2: "0,2", 3: "1,3"}  # 2 cores x 2 hardware threads
    fake_topology(monkeypatch, {0, 1, 2, 3}, smt)
    assert cpu.physical_cores() == 2
    fake_topology(monkeypatch, {0, 2}, smt)  # pinned to one core's two threads
    assert cpu.physical_cores() == 1
    eight = {c: str(c) for c in range(8)}
    fake_topology(monkeypatch, set(range(8)), eight, cpu_max="250000 100000")  # a 2.5-CPU container quota
    assert cpu.physical_cores() == 2
    fake_topology(monkeypatch, set(range(8)), eight, cpu_max="max 100000")
    assert cpu.physical_cores() == 8
    fake_topology(monkeypatch, set(range(8)), eight, cpu_max="50000 100000")  # half a CPU: still one thread
    assert cpu.physical_cores() == 1


def test_threads_flag_is_honoured_and_defaults_to_physical_cores(wide_folder, monkeypatch, capsys, restore_threads):
    args = [wide_folder, "to be", "--max-new-tokens", "1", "--no-pack"]
    assert main(["generate", *args, "--threads", "1"]) == 0
    assert torch.get_num_threads() == 1
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cpu, "physical_cores", lambda: 3)  # not what torch would pick by itself here
    assert main(["generate", *args]) == 0
    assert torch.get_num_threads() == 3 == cpu.default_threads()
    monkeypatch.setenv("OMP_NUM_THREADS", "2")  # the user's explicit environment wins over the core count
    assert main(["generate", *args]) == 0
    assert torch.get_num_threads() == 2
    capsys.readouterr()


# -----------------------------------------------------------------------------
# weight layout

def test_pack_flags(capsys):
    parse = build_parser().parse_args
    assert parse(["generate", "m", "p"]).pack == "auto"
    assert parse(["generate", "m", "p", "--pack"]).pack is True
    assert parse(["serve", "m", "--no-pack"]).pack is False
    with pytest.raises(SystemExit):
        parse(["report", "m", "--pack", "--no-pack"])
    assert "not allowed with" in capsys.readouterr().err
    with pytest.raises(ValueError, match="pack must be True, False or 'auto'"):
        load_model("tiny", pack="yes")


@needs_packing
def test_auto_layout_follows_the_probe_and_both_give_the_same_logits(wide_folder, cache, monkeypatch):
    calls = fake_probe(monkeypatch, pack=True)
    packed = load_model(wide_folder, pack="auto")
    ids = torch.tensor([[packed.config.bos_token_id, 5, 9, 17, 33, 2, 71]])
    assert count_packed(packed) > 0 and calls == [torch.float32]
    fake_probe(monkeypatch, pack=False)
    os.remove(cache)  # forget the first answer
    plain = load_model(wide_folder, pack="auto")
    assert count_packed(plain) == 0
    with torch.no_grad():
        torch.testing.assert_close(packed.gpt(ids), plain.gpt(ids), rtol=1e-5, atol=1e-5)
    kw = dict(max_new_tokens=8, stop_tokens=[])
    assert torch.equal(packed.generate_stage(ids, stage=0, **kw), plain.generate_stage(ids, stage=0, **kw))
    # forcing either way skips the probe
    assert count_packed(load_model(wide_folder, pack=True)) == count_packed(packed)
    assert count_packed(load_model(wide_folder, pack=False)) == 0


@needs_packing
def test_probe_cache_is_per_cpu_and_dtype_and_survives_corruption(cache, monkeypatch):
    calls = fake_probe(monkeypatch, pack=True)
    assert cpu.packing_choice(torch.float32)["pack"] is True
    assert cpu.packing_choice(torch.float32)["pack"] is True  # from the cache
    assert calls == [torch.float32]
    monkeypatch.setattr(cpu, "cpu_name", lambda: "Another CPU")
    cpu.packing_choice(torch.float32)  # another CPU model: measured again
    assert len(calls) == 2
    with open(cache) as f:
        keys = list(json.load(f))
    assert len(keys) == 2 and keys[1] == f"Another CPU | torch {torch.__version__} | float32 | " \
                                         f"{torch.get_num_threads()} threads"
    if packing_supported(torch.zeros(1, dtype=torch.bfloat16)):
        cpu.packing_choice(torch.bfloat16)  # another dtype: measured again
        assert calls[-1] == torch.bfloat16 and len(calls) == 3
    for corrupt in ("{not json", "[1, 2]", '{"x": '):
        with open(cache, "w") as f:
            f.write(corrupt)
        n = len(calls)
        assert cpu.packing_choice(torch.float32)["pack"] is True  # measured again, file rewritten whole
        assert len(calls) == n + 1
        with open(cache) as f:
            assert list(json.load(f)) == [cpu.probe_key(torch.float32)]


@needs_packing
def test_the_real_probe_measures_both_layouts(cache):
    r = cpu.probe_packing(torch.float32, runs=1)
    assert isinstance(r["pack"], bool) and r["plain_GBps"] > 0 and r["packed_GBps"] > 0
    layouts = cpu.layouts()  # what the bench JSONs carry: one entry per dtype, "packed" or "plain"
    assert layouts["float32"]["layout"] in ("packed", "plain") and set(layouts) == {"float32", "bfloat16"}


@needs_packing
def test_auto_layout_of_a_sibling_family_follows_the_probe(cache, monkeypatch):
    """A SiblingSpecialists family (not a module) is packed as its base's dtype says."""
    from cognica_poe.branches import SiblingSpecialists

    base = perturbed_model(n_layer=2, n_embd=256, n_head=2, n_kv_head=1, poe_every=1)
    fake_probe(monkeypatch, pack=False)
    assert cpu.apply_packing(SiblingSpecialists(base, [], []), "auto", like=base) == 0 == count_packed(base)
    os.remove(cache)
    fake_probe(monkeypatch, pack=True)
    assert cpu.apply_packing(SiblingSpecialists(base, [], []), "auto", like=base) == count_packed(base) > 0

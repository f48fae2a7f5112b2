"""Stage placement: device maps in one process, and stages split over CPU processes (gloo) with rank 0 driving."""

import json
import multiprocessing
import os
import signal
import socket
import traceback

import pytest
import torch
from conftest import bundled_text, perturbed_model, specialize

from cognica_poe.checkpoint import export_hf_folder, load_model
from cognica_poe.cli import main
from cognica_poe.hf import CognicaPoEForCausalLM
from cognica_poe.placement import Placement, place_device_map, split_stages, stage_devices
from cognica_poe.tokenizer_train import train_bpe

ALL_CPU = {f"stage:{s}": "cpu" for s in range(4)}
PROMPTS = torch.tensor([[0, 0, 5, 9, 11, 3], [0, 7, 2, 8, 1, 4]])
MASK = torch.tensor([[0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]])
BOUNDS = [0.05, 0.05, 0.05]  # small WAND bounds: tokens exit at different stages


def every_mode(model: CognicaPoEForCausalLM) -> dict:
    """Logits and greedy tokens of every mode, on a padded batch of two."""
    gpt = model.gpt
    kw = dict(attention_mask=MASK, max_new_tokens=6)
    wand, used = model.generate_wand(PROMPTS, p99_bounds=BOUNDS, return_stages_used=True, **kw)
    cache = gpt.new_cache(2, 32, keep_hidden=True)
    cached = gpt.forward_all_stages(PROMPTS, kv_cache=cache, attention_mask=MASK)[2]
    cache.invalidate(torch.tensor([0, 1]), torch.tensor([2, 3]), 4)  # holes, as a row's rejected drafts leave
    cache.compact()  # the holes are squeezed out of every layer, wherever it lives
    return {
        "logits": gpt(PROMPTS, attention_mask=MASK),
        "stages": torch.stack(gpt.forward_all_stages(PROMPTS, attention_mask=MASK)),
        "cached": cached,
        "compacted": gpt(torch.tensor([[3], [4]]), kv_cache=cache),
        "stage1": model.generate_stage(PROMPTS, stage=1, **kw),
        "wand": wand, "used": torch.tensor(used),
        "speculative": model.generate_speculative(PROMPTS, draft_stage=0, k_draft=3, **kw),
        "compose": model.generate_parallel_composition(PROMPTS, stages=[0, 3], **kw),
        "sampled": model.generate_speculative(PROMPTS, draft_stage=1, do_sample=True, seed=0, **kw),
        "hidden": torch.stack(model(PROMPTS, attention_mask=MASK, output_hidden_states=True).hidden_states),
        "hf": model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=6, do_sample=False, pad_token_id=0),
        "beams": model.generate(PROMPTS, attention_mask=MASK, max_new_tokens=4, num_beams=2, do_sample=False,
                                pad_token_id=0),  # beam search reorders the cache's rows
    }


def assert_same(got: dict, want: dict) -> None:
    for name, w in want.items():
        g = got[name]
        if w.is_floating_point():
            torch.testing.assert_close(g, w, atol=1e-5, rtol=0, msg=lambda m, name=name: f"{name}: {m}")
        else:
            assert torch.equal(g, w), (name, g, w)


# -----------------------------------------------------------------------------
# one process: device maps


def test_device_map_all_cpu_keeps_every_mode_exact():
    want = every_mode(perturbed_model())
    model = perturbed_model()
    place_device_map(model.gpt, ALL_CPU)
    assert isinstance(model.gpt.placement, Placement)
    assert_same(every_mode(model), want)


def test_a_specialist_takes_a_device_map_over_its_own_stages_too():
    spec = specialize(perturbed_model(), 2, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # a fresh specialist is the identity with a zero head: move every tensor off its init
        for p in spec.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    kw = dict(attention_mask=MASK, max_new_tokens=6)
    want = (torch.stack(spec.gpt.forward_all_stages(PROMPTS, attention_mask=MASK)),
            spec.generate_speculative(PROMPTS, draft_stage=1, **kw))
    place_device_map(spec.gpt, {f"stage:{s}": "cpu" for s in range(5)})
    got = (torch.stack(spec.gpt.forward_all_stages(PROMPTS, attention_mask=MASK)),
           spec.generate_speculative(PROMPTS, draft_stage=1, **kw))
    torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=0)
    assert torch.equal(got[1], want[1])
    with pytest.raises(ValueError, match="no device for stage:4"):
        stage_devices(spec.gpt, ALL_CPU)


def test_an_extended_cache_still_compacts_and_reorders():
    """A sibling branch's cache view (built without CognicaKVCache.__init__) has no placement to mirror to."""
    base = perturbed_model()
    cache = base.gpt.new_cache(2, 8)
    view = cache.extended(specialize(base, 2, seed=0).config)
    base.gpt(PROMPTS[:, :3], kv_cache=cache)
    for layer in view.layers[4:]:
        layer.length = 3
    cache.invalidate(torch.tensor([0]), torch.tensor([1]), 2)
    assert view.compact() == 3 and view.layer_len == [3] * 6
    view.reorder_cache(torch.tensor([1, 0]))
    assert view.batch_size == 2


def test_device_map_parsing_and_errors():
    gpt = perturbed_model().gpt
    cpu = torch.device("cpu")
    assert stage_devices(gpt, ALL_CPU) == [cpu] * 4
    assert stage_devices(gpt, '{"stage:0": "cpu", "stage:1": "cpu", "stage:2": "cpu", "stage:3": "cpu"}') == [cpu] * 4
    assert stage_devices(gpt, "cpu") == [cpu] * 4
    if not torch.cuda.is_available():
        assert stage_devices(gpt, "auto") == [cpu] * 4
    bad = [({**ALL_CPU, "layer:2": "cpu"}, "'layer:2' is not 'stage:N'"),
           ({**ALL_CPU, "stage:4": "cpu"}, "'stage:4': this model has stages 0..3"),
           ({"stage:0": "cpu", "stage:1": "cpu"}, "no device for stage:2, stage:3"),
           ({**ALL_CPU, "stage:1": "gpu7"}, "device_map['stage:1'] = 'gpu7' is not a device"),
           ({**ALL_CPU, "stage:1": "meta"}, "'meta' holds no weights"),
           ('{"stage:0": cpu}', "device_map is not valid JSON"),
           ("gpu7", "device_map = 'gpu7' is not a device")]
    if not torch.cuda.is_available():
        bad.append(({**ALL_CPU, "stage:2": "cuda:1"}, "CUDA is not available here"))
    for device_map, message in bad:
        with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
            stage_devices(gpt, device_map)


def test_auto_splits_the_stages_over_gpus_by_free_memory(monkeypatch):
    """What "auto" and a CUDA map do with two GPUs' facts (this machine's torch.cuda answers replaced)."""
    free = {0: 3 * 2**20, 1: 2**20}
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda d: (free[d], 2**30))
    gpt = perturbed_model().gpt
    cuda = [torch.device("cuda", 0), torch.device("cuda", 1)]
    assert stage_devices(gpt, "auto") == [cuda[0]] * 3 + [cuda[1]]
    assert stage_devices(gpt, {**ALL_CPU, "stage:1": "cuda", "stage:2": "cuda:1"})[1:3] == cuda
    with pytest.raises(ValueError, match=r"device_map\['stage:3'\] = 'cuda:2' but this machine has 2 CUDA device"):
        stage_devices(gpt, {**ALL_CPU, "stage:3": "cuda:2"})
    free = {0: 1000, 1: 1000}
    with pytest.raises(ValueError, match="device_map='auto': the stages need"):
        stage_devices(gpt, "auto")


def test_split_stages_is_contiguous_and_proportional():
    assert split_stages([1, 1, 1, 1], [1, 1]) == [0, 0, 1, 1]
    assert split_stages([1, 1, 1, 1], [1, 1, 1]) == [0, 1, 1, 2]
    assert split_stages([1, 1, 1, 1], [3, 1]) == [0, 0, 0, 1]
    assert split_stages([1, 1, 1, 1], [1, 0]) == [0, 0, 0, 0]
    with pytest.raises(ValueError, match="5 parts but only 4 stages"):
        split_stages([1, 1, 1, 1], [1] * 5)


def test_cache_layers_live_on_their_layer_device():
    model = perturbed_model()
    place_device_map(model.gpt, ALL_CPU)
    cache = model.gpt.new_cache(1, 16)
    assert [layer.keys.device for layer in cache.layers] == model.gpt.placement.devices


def test_load_model_and_from_pretrained_take_a_device_map(tmp_path):
    model = perturbed_model()
    model.save_pretrained(tmp_path)
    want = model.gpt(PROMPTS)
    for loaded in (load_model(str(tmp_path), device_map=ALL_CPU),
                   CognicaPoEForCausalLM.from_pretrained(tmp_path, device_map=ALL_CPU)):
        assert isinstance(loaded.gpt.placement, Placement)
        torch.testing.assert_close(loaded.gpt(PROMPTS), want, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="'stage:9': this model has stages 0..3"):
        load_model(str(tmp_path), device_map={"stage:9": "cpu"})


def test_transformers_whole_model_map_is_one_device(tmp_path):
    """{"": device} is transformers' and accelerate's map for a whole model on one device (lm-eval passes it)."""
    model = perturbed_model()
    model.save_pretrained(tmp_path)
    loaded = CognicaPoEForCausalLM.from_pretrained(tmp_path, device_map={"": "cpu"})
    torch.testing.assert_close(loaded.gpt(PROMPTS), model.gpt(PROMPTS), atol=1e-5, rtol=0)
    assert stage_devices(model.gpt, {"": "cpu"}) == [torch.device("cpu")] * 4


def test_cli_generate_takes_a_device_map(tmp_path, capsys):
    tok = train_bpe(iter(bundled_text(20_000).split("\n\n")), vocab_size=300)
    folder = export_hf_folder(perturbed_model(vocab_size=len(tok)), tok, str(tmp_path / "m"), dtype="float32")

    def generate(*extra: str) -> tuple[int, str, str]:
        rc = main(["generate", folder, "To be", "--max-new-tokens", "6", "--no-pack", *extra])
        out, err = capsys.readouterr()
        return rc, out, err

    for mode in ("full", "wand", "speculative", "compose"):
        want = generate("--mode", mode)
        assert want[0] == 0, want[2]
        assert generate("--mode", mode, "--device-map", json.dumps(ALL_CPU))[:2] == want[:2], mode
    rc, _, err = generate("--device-map", '{"stage:7": "cpu"}')
    assert rc == 2 and err.strip().splitlines() == [
        "cognica-poe generate: error: device_map key 'stage:7': this model has stages 0..3"], err
    if "WORLD_SIZE" not in os.environ:
        rc, _, err = generate("--device-map", "ranks")
        assert rc == 2 and err.startswith("cognica-poe generate: error: stages over ranks need torch.distributed: "
                                          "run under torchrun") and len(err.strip().splitlines()) == 1, err


# -----------------------------------------------------------------------------
# several processes: rank 0 drives, the others hold their stages


def rank_main(rank: int, world: int, port: int, ready, kill_done, results) -> None:
    """One process: every mode on rank 0 against its own unplaced copy; then a dead rank must be named."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    from cognica_poe.placement import STOP, distribute_stages

    try:
        want = every_mode(perturbed_model()) if rank == 0 else None
        model = perturbed_model()
        placement = distribute_stages(model.gpt, timeout_s=120)  # ranks start at their own pace here
        if rank != 0:
            placement.serve(model.gpt)
            return
        held = [b.attn.c_q.weight.device.type for b in model.gpt.transformer.h]
        assert held.count("cpu") < 4 and held[0] == "cpu", held  # rank 0 holds only its own stages
        assert_same(every_mode(model), want)
        results.put(("modes", "ok"))
        # a rank dies: the next call names it, within the timeout
        ready.set()
        kill_done.wait(30)
        try:
            model.generate_stage(PROMPTS, stage=3, max_new_tokens=2)
            results.put(("killed", "no error"))
        except RuntimeError as e:
            results.put(("killed", str(e)))
        for r in placement.workers[:-1]:  # the others still serve: release them
            placement.send(r, [STOP], [])
    except BaseException:
        results.put(("error", f"rank {rank}: {traceback.format_exc()}"))
        raise


@pytest.mark.parametrize("world", [2, pytest.param(3, marks=pytest.mark.slow)])
def test_stage_ranks_match_one_process_and_name_a_dead_rank(world):
    ctx = multiprocessing.get_context("spawn")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ready, kill_done, results = ctx.Event(), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=rank_main, args=(r, world, port, ready, kill_done, results)) for r in range(world)]
    for p in procs:
        p.start()
    try:
        key, value = results.get(timeout=120)
        assert key == "modes", value
        assert ready.wait(30)
        os.kill(procs[-1].pid, signal.SIGKILL)  # the last rank dies mid-run
        procs[-1].join(10)
        kill_done.set()
        key, value = results.get(timeout=60)
        assert key == "killed", value
        assert value.startswith(f"stage placement: rank {world - 1} (layers ") and "\n" not in value, value
        for p in procs[:-1]:
            p.join(30)
            assert p.exitcode == 0, p.exitcode
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()

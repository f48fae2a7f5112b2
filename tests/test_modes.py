"""The stage-level inference modes: exact against uncached references, work really skipped, clear errors."""

import pytest
import torch
from conftest import perturbed_model

from cognica_poe import speculative as speculative_module
from cognica_poe.compose import log_op
from cognica_poe.speculative import run_speculative
from cognica_poe.wand import run_wand


def prompts(tok, texts):
    return [[tok.bos_token_id] + tok(t)["input_ids"] for t in texts]


def left_pad(rows, pad):
    n = max(len(r) for r in rows)
    ids = torch.full((len(rows), n), pad, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):] = torch.tensor(r)
        mask[i, n - len(r):] = 1
    return ids, mask


class BlockCounter:
    """Counts Block.forward calls per layer and the number of positions each call ran."""

    def __init__(self, model):
        self.calls = []  # (layer, batch, positions)
        self.hooks = [b.register_forward_pre_hook(lambda m, a, i=i: self.calls.append((i, *a[0].shape[:2])))
                      for i, b in enumerate(model.gpt.transformer.h)]

    def close(self):
        for h in self.hooks:
            h.remove()


def record_exit_logits(model, monkeypatch):
    """Every exit_logits output, in call order."""
    seen = []
    original = model.gpt.exit_logits

    def spy(h, layer=None):
        out = original(h, layer)
        seen.append(out)
        return out

    monkeypatch.setattr(model.gpt, "exit_logits", spy)
    return seen


# -----------------------------------------------------------------------------
# prefix pruning and composition


def test_stage_mode_is_prefix_of_full_model(long_model, monkeypatch):
    ids = torch.randint(1, 512, (2, 12))
    ids[:, 0] = 0
    for stage in range(4):
        seen = record_exit_logits(long_model, monkeypatch)
        out = long_model.generate_stage(ids, stage=stage, max_new_tokens=150, stop_tokens=[])
        monkeypatch.undo()
        with torch.no_grad():
            ref = long_model.gpt.forward_all_stages(out)[stage]  # uncached, whole sequence
        cached = torch.cat([s[:, -1:] if s.dim() == 3 else s[:, None] for s in seen], dim=1)
        assert (cached[:, :150] - ref[:, 11:-1]).abs().max() < 1e-5
        assert torch.equal(out[:, 12:], ref[:, 11:-1].argmax(-1))


def test_stage_mode_runs_no_deeper_block(tiny_model):
    counter = BlockCounter(tiny_model)
    tiny_model.generate_stage(torch.tensor([[0, 5, 6]]), stage=1, max_new_tokens=10, stop_tokens=[])
    counter.close()
    assert {layer for layer, _, _ in counter.calls} == {0, 1}
    assert len(counter.calls) == 2 * 10  # prompt + 9 decode steps, two layers each


def test_composition_equals_uncached_log_op(tiny_model, monkeypatch):
    ids = torch.tensor([[0, 7, 8, 9], [0, 1, 2, 3]])
    stages, weights = [0, 2, 3], [0.5, 1.0, 2.0]
    out = tiny_model.generate_parallel_composition(ids, stages=stages, stage_weights=weights, max_new_tokens=20,
                                                   stop_tokens=[])
    with torch.no_grad():
        exits = tiny_model.gpt.forward_all_stages(out)
    score = log_op([exits[s] for s in stages], weights)
    assert torch.equal(out[:, 4:], score[:, 3:-1].argmax(-1))
    single = tiny_model.generate_parallel_composition(ids, stages=[3], max_new_tokens=20, stop_tokens=[])
    assert torch.equal(single, tiny_model.generate_stage(ids, stage=3, max_new_tokens=20, stop_tokens=[]))


def test_composition_widens_margin_where_exits_agree(d8_model):
    model, tok = d8_model
    ids = torch.tensor(prompts(tok, ["The old prince said that"]))
    with torch.no_grad():
        exits = [e[0, -1] for e in model.gpt.forward_all_stages(ids)]
    def margin(x):
        top = torch.topk(x, 2).values
        return float(top[0] - top[1])
    composed = log_op(exits, [1.0] * 4)
    if len({int(e.argmax()) for e in exits}) == 1:
        assert margin(composed) > margin(torch.log_softmax(exits[-1], -1))


# -----------------------------------------------------------------------------
# WAND


def test_wand_huge_safety_is_full_greedy(long_model):
    ids = torch.randint(1, 512, (3, 9))
    ids[:, 0] = 0
    ref = long_model.generate(ids, max_new_tokens=60, min_new_tokens=60, do_sample=False)
    out, used = long_model.generate_wand(ids, max_new_tokens=60, safety=1e9, p99_bounds=[1, 1, 1],
                                         return_stages_used=True, stop_tokens=[])
    assert torch.equal(out, ref) and all(s == 3 for row in used for s in row)


def test_wand_cached_logits_and_catch_up_are_exact(long_model, monkeypatch):
    """Exit logits equal the uncached exits; after a final catch-up every layer equals a fresh prefill."""
    ids = torch.randint(1, 512, (1, 9))
    ids[:, 0] = 0
    from cognica_poe import wand as wand_module

    seen = []  # the exit logits the rule looked at, in order: stages 0..exit for each generated token
    original = wand_module.top2_margin
    monkeypatch.setattr(wand_module, "top2_margin", lambda logits: (seen.append(logits), original(logits))[1])
    res = run_wand(long_model.gpt, ids, max_new_tokens=200, safety=0.03, p99_bounds=[1, 1, 1], stop_tokens=[],
                   complete_cache=True)
    monkeypatch.undo()
    used = res.stages_used[0]
    assert len(set(used)) >= 3  # the run really mixes exits
    with torch.no_grad():
        ref = long_model.gpt.forward_all_stages(res.sequences)
    calls = iter(seen)
    for t, s in enumerate(used):
        for stage in range(s + 1):  # every exit computed for this token equals the uncached exit
            assert (next(calls)[0] - ref[stage][0, 8 + t]).abs().max() < 1e-5
        # and the token is the argmax of its exit stage
        assert int(res.sequences[0, 9 + t]) == int(ref[s][0, 8 + t].argmax())
    # the cache after the final catch-up equals a fresh full-depth prefill of everything forwarded
    n = res.cache.n_slots
    assert res.cache.layer_len == [n] * 4
    fresh = long_model.new_cache(1, n)
    with torch.no_grad():
        long_model.gpt(res.cache.token_ids[:, :n], kv_cache=fresh)
    for a, b in zip(res.cache.layers, fresh.layers):
        assert (a.keys[:, :, :n] - b.keys[:, :, :n]).abs().max() < 1e-5
        assert (a.values[:, :, :n] - b.values[:, :, :n]).abs().max() < 1e-5


def test_wand_exited_token_runs_no_deeper_block_until_catch_up(long_model):
    ids = torch.tensor([[0, 3, 4, 5]])
    counter = BlockCounter(long_model)
    res = run_wand(long_model.gpt, ids, max_new_tokens=60, safety=0.03, p99_bounds=[1, 1, 1], stop_tokens=[])
    counter.close()
    used = res.stages_used[0]
    calls = counter.calls[4:]  # after the prompt's full-depth prefill (4 layers, one call each)
    # replay: a step whose exit is s runs layers 0..s once each; a deeper layer's chunk covers every pending slot
    pending = [0] * 4  # tokens forwarded since each layer last ran
    i = 0
    for step in range(len(used) - 1):
        nxt = used[step + 1]  # the token chosen at step+1 is computed in the forward of token step
        for layer in range(4):
            pending[layer] += 1
        for layer in range(nxt + 1):
            lay, batch, positions = calls[i]
            assert lay == layer and positions == pending[layer], (step, layer, positions, pending)
            pending[layer] = 0
            i += 1
    assert i == len(calls)


def test_wand_bounds_resolution_and_errors(tiny_model, d8_model):
    ids = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="3 values"):
        tiny_model.generate_wand(ids, p99_bounds=[1.0, 2.0])
    model, tok = d8_model
    # 4 exits and no calibration: the card's defaults apply
    out, used = model.generate_wand(torch.tensor(prompts(tok, ["Pierre"])), max_new_tokens=5, return_stages_used=True)
    assert len(used) == out.shape[1] - 2
    three = perturbed_model(n_layer=3, poe_every=1)
    with pytest.raises(ValueError, match="calibrate"):
        three.generate_wand(ids)


def test_wand_calibration(d8_model):
    from cognica_poe.wand import calibrate_wand_bounds

    model, tok = d8_model
    text = "It was in July, 1805, and the speaker was the well-known Anna Pavlovna. " * 8
    stream = torch.tensor(prompts(tok, [text])[0])
    bounds = calibrate_wand_bounds(model.gpt, stream, seq_len=64, batch_size=4)
    assert len(bounds) == 3 and all(0 < b < 30 for b in bounds)


# -----------------------------------------------------------------------------
# speculative decoding


@pytest.mark.parametrize("k", [1, 3, 5])
def test_speculative_greedy_is_lossless_on_trained_model(d8_model, k):
    model, tok = d8_model
    texts = ["Prince Andrew", "ROMEO:", "The French army", "Natasha looked at", "KING HENRY:\nWhat", "He said"]
    for batch in ([texts[0]], texts[1:4], texts[3:6]):
        ids, mask = left_pad(prompts(tok, batch), tok.pad_token_id)
        # plain greedy at full depth (generate_stage of the last stage is HF generate's loop without EOS handling)
        ref = model.generate_stage(ids, stage=3, attention_mask=mask, max_new_tokens=40, stop_tokens=[])
        out, acc = model.generate_speculative(ids, attention_mask=mask, max_new_tokens=40, k_draft=k,
                                              return_acceptance=True, stop_tokens=[])
        assert 0.0 <= acc <= 1.0
        if not torch.equal(out, ref):  # only a near-tie of the full model may differ
            full_mask = torch.cat([mask, torch.ones(len(batch), 40, dtype=torch.long)], dim=1)
            with torch.no_grad():
                logits = model.gpt(ref, attention_mask=full_mask)
            T = ids.size(1)
            for row in range(len(batch)):
                diff = (out[row, T:] != ref[row, T:]).nonzero()
                if len(diff):
                    t = int(diff[0])
                    top = torch.topk(logits[row, T - 1 + t], 2).values
                    assert float(top[0] - top[1]) < 1e-4, (k, row, t)


def test_speculative_reuses_draft_work(tiny_model):
    """Per iteration: k draft steps of the shallow layers (1 position each), 1 more shallow position, then the deep
    layers over k + 1 positions; the shallow layers never rerun the drafted positions. No draft past the budget."""
    k = 3
    ids = torch.tensor([[0, 9, 8], [0, 7, 6]])
    counter = BlockCounter(tiny_model)
    res = run_speculative(tiny_model.gpt, ids, max_new_tokens=12, draft_stage=1, k_draft=k, stop_tokens=[])
    counter.close()
    calls = counter.calls[4:]  # after the prompt
    ks = []
    while calls:
        shallow = 0
        while calls[shallow][0] <= 1:  # layers 0, 1 for each draft and for the last draft
            shallow += 1
        chunk, calls = calls[:shallow + 2], calls[shallow + 2:]  # then layers 2, 3 verify
        ks.append(shallow // 2 - 1)
        assert all(pos == 1 for layer, _, pos in chunk[:shallow]) and [c[0] for c in chunk[:shallow]] == [0, 1] * (
            shallow // 2)
        assert [(layer, pos) for layer, _, pos in chunk[shallow:]] == [(2, ks[-1] + 1), (3, ks[-1] + 1)]
        assert all(batch == 2 for _, batch, _ in chunk)
    assert len(ks) == res.iterations and sum(ks) == res.draft_steps
    assert all(x == k for x in ks[:-1]) and 1 <= ks[-1] <= k
    # a budget smaller than k + 1: only the drafts that can still be used (the prefill gave 1 of the 5 tokens)
    short = run_speculative(tiny_model.gpt, ids, max_new_tokens=5, draft_stage=1, k_draft=6, stop_tokens=[])
    assert short.draft_steps <= 3 * short.iterations and short.sequences.size(1) == 3 + 5


def test_speculative_cache_equals_fresh_prefill_per_row(d8_model):
    model, tok = d8_model
    ids, mask = left_pad(prompts(tok, ["Prince Andrew", "ROMEO: what", "The French"]), tok.pad_token_id)
    res = run_speculative(model.gpt, ids, attention_mask=mask, max_new_tokens=30, k_draft=3, stop_tokens=[])
    cache = res.cache
    n = cache.n_slots
    assert cache.layer_len == [n] * 8
    for row in range(3):
        keep = cache.valid[row, :n].nonzero()[:, 0]
        fresh = model.new_cache(1, len(keep))
        with torch.no_grad():
            model.gpt(cache.token_ids[row:row + 1, keep], kv_cache=fresh)
        for a, b in zip(cache.layers, fresh.layers):
            assert (a.keys[row, :, keep] - b.keys[0, :, :len(keep)]).abs().max() < 1e-5
            assert (a.values[row, :, keep] - b.values[0, :, :len(keep)]).abs().max() < 1e-5


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's test, pooling cells with expected count < 5; p from the regularized upper gamma function."""
    n = counts.sum()
    expected = probs * n
    small = expected < 5
    obs = torch.cat([counts[~small], counts[small].sum()[None]]) if small.any() else counts
    exp = torch.cat([expected[~small], expected[small].sum()[None]]) if small.any() else expected
    keep = exp > 0
    stat = float(((obs[keep] - exp[keep]) ** 2 / exp[keep]).sum())
    dof = int(keep.sum()) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64),
                                         torch.tensor(stat / 2, dtype=torch.float64)))


def speculative_joint_test(model, monkeypatch=None, broken=False) -> float:
    """p-value of 20k seeded speculative samples of two tokens against the full model's exact joint distribution."""
    V = model.config.vocab_size
    rows = 20_000
    prompt = torch.tensor([[0, 3, 5, 2]]).repeat(rows, 1)
    if broken:  # a negative control that skips accept/resample: every draft is taken as is
        def accept_all(p, q, drafts, do_sample, generator=None):
            B, k = drafts.shape
            return torch.full((B,), k), torch.multinomial(p[:, k], 1, generator=generator)[:, 0]
        monkeypatch.setattr(speculative_module, "speculative_accept", accept_all)
    res = run_speculative(model.gpt, prompt, max_new_tokens=2, draft_stage=0, k_draft=2, do_sample=True,
                          temperature=1.0, seed=1234, stop_tokens=[])
    pairs = res.sequences[:, 4:6]
    counts = torch.bincount(pairs[:, 0] * V + pairs[:, 1], minlength=V * V).double()
    with torch.no_grad():
        first = model.gpt(prompt[:1])[0, -1].softmax(-1).double()  # (V,)
        seconds = torch.cat([prompt[:1].repeat(V, 1), torch.arange(V)[:, None]], dim=1)
        second = model.gpt(seconds)[:, -1].softmax(-1).double()  # (V, V)
    joint = (first[:, None] * second).flatten()
    return chi_square_p_value(counts, joint)


def sharp_tiny_model():
    """vocab 16 and weights far from init, so the stage-0 drafter and the full model disagree markedly."""
    torch.manual_seed(5)
    model = perturbed_model(vocab_size=16, pad_vocab_size_to=16)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    return model


def test_speculative_sampling_matches_full_distribution():
    model = sharp_tiny_model()
    assert speculative_joint_test(model) > 1e-4


def test_speculative_sampling_negative_control_is_rejected(monkeypatch):
    model = sharp_tiny_model()
    assert speculative_joint_test(model, monkeypatch, broken=True) < 1e-4


# -----------------------------------------------------------------------------
# everything every mode shares


MODES = {
    "stage": lambda m, ids, **kw: m.generate_stage(ids, stage=2, **kw),
    "compose": lambda m, ids, **kw: m.generate_parallel_composition(ids, stages=[1, 3], **kw),
    "wand": lambda m, ids, **kw: m.generate_wand(ids, safety=0.05, p99_bounds=[1, 1, 1], **kw),
    "speculative": lambda m, ids, **kw: m.generate_speculative(ids, draft_stage=1, k_draft=2, **kw),
}


@pytest.mark.parametrize("mode", MODES)
def test_mode_padded_batch_equals_rows_alone(tiny_model, mode):
    run = MODES[mode]
    a, b = [0, 11, 12, 13, 14, 15], [0, 21, 22]
    ids, mask = left_pad([a, b], 0)
    batch = run(tiny_model, ids, attention_mask=mask, max_new_tokens=15, stop_tokens=[])
    alone_a = run(tiny_model, torch.tensor([a]), max_new_tokens=15, stop_tokens=[])
    alone_b = run(tiny_model, torch.tensor([b]), max_new_tokens=15, stop_tokens=[])
    assert torch.equal(batch[0, 6:], alone_a[0, 6:]) and torch.equal(batch[1, 6:], alone_b[0, 3:])


@pytest.mark.parametrize("mode", MODES)
def test_mode_sampling_seed_stop_and_stream(tiny_model, mode):
    run = MODES[mode]
    ids = torch.tensor([[0, 4, 5], [0, 6, 7]])
    kw = dict(max_new_tokens=25, do_sample=True, temperature=0.9, top_k=40, top_p=0.9, stop_tokens=[])
    one, two = run(tiny_model, ids, seed=3, **kw), run(tiny_model, ids, seed=3, **kw)
    assert torch.equal(one, two) and one.shape == (2, 28)
    streamed = {0: [], 1: []}
    out = run(tiny_model, ids, seed=3, streamer=lambda r, t: streamed[r].append(t), **kw)
    assert streamed[0] == out[0, 3:].tolist() and streamed[1] == out[1, 3:].tolist()
    stop = int(one[0, 5])  # the third generated token of row 0 becomes a stop token
    stopped = run(tiny_model, ids, seed=3, **{**kw, "stop_tokens": [stop]})
    first_stop = one[0, 3:].tolist().index(stop)
    assert stopped[0, 3:3 + first_stop + 1].tolist() == one[0, 3:3 + first_stop + 1].tolist()
    assert torch.all(stopped[0, 3 + first_stop + 1:] == tiny_model.config.pad_token_id)


@pytest.mark.parametrize("mode", MODES)
def test_mode_forward_calls_do_not_depend_on_batch(tiny_model, mode):
    run = MODES[mode]
    counts = []
    for B in (1, 3):
        counter = BlockCounter(tiny_model)
        run(tiny_model, torch.tensor([[0, 1, 2]] * B), max_new_tokens=10, stop_tokens=[])
        counter.close()
        counts.append(len(counter.calls))
    assert counts[0] == counts[1]


def test_mode_errors(tiny_model):
    ids = torch.tensor([[0, 1, 2]])
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.generate_stage(ids, stage=4)
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.generate_speculative(ids, draft_stage=-5)
    with pytest.raises(ValueError, match="last stage"):
        tiny_model.generate_speculative(ids, draft_stage=3)
    with pytest.raises(ValueError, match="k_draft"):
        tiny_model.generate_speculative(ids, k_draft=0)
    with pytest.raises(ValueError, match="stage_weights"):
        tiny_model.generate_parallel_composition(ids, stages=[0, 1], stage_weights=[1.0])
    with pytest.raises(ValueError, match="out of range"):
        tiny_model.generate_parallel_composition(ids, stages=[0, 9])
    with pytest.raises(ValueError, match="exceeds the context"):
        tiny_model.generate_stage(ids, stage=0, max_new_tokens=254)
    assert tiny_model.generate_stage(ids, stage=0, max_new_tokens=254, max_length=512).shape == (1, 257)
    with pytest.raises(ValueError, match="10 x sequence_len"):
        tiny_model.generate_stage(ids, stage=0, max_new_tokens=5, max_length=10 * 256 + 1)
    with pytest.raises(ValueError, match="max_new_tokens"):
        tiny_model.generate_wand(ids, max_new_tokens=0, p99_bounds=[1, 1, 1])


def test_compose_scores_equal_uncached(tiny_model, monkeypatch):
    from cognica_poe import compose as compose_module

    seen = []
    original = compose_module.log_op

    def spy(logits, weights):
        out = original(logits, weights)
        seen.append(out)
        return out

    monkeypatch.setattr(compose_module, "log_op", spy)
    ids = torch.tensor([[0, 7, 8, 9]])
    out = tiny_model.generate_parallel_composition(ids, stages=[0, 3], stage_weights=[1.0, 0.5], max_new_tokens=30,
                                                   stop_tokens=[])
    monkeypatch.undo()
    with torch.no_grad():
        exits = tiny_model.gpt.forward_all_stages(out)
    ref = log_op([exits[0], exits[3]], [1.0, 0.5])[0, 3:-1]
    assert (torch.cat(seen) - ref).abs().max() < 1e-5


def test_speculative_verify_logits_equal_uncached(d8_model, monkeypatch):
    """Each verify forward (deep layers over k + 1 slots from the kept stream) == the uncached full model."""
    model, tok = d8_model
    gpt = model.gpt
    checked = []
    original = gpt.run_slots

    def spy(cache, start, end, first, last, exits=(), logits_to_keep=0, shared=None, **kwargs):
        out = original(cache, start, end, first, last, exits, logits_to_keep, shared, **kwargs)
        if first > 0:
            with torch.no_grad():
                ref = gpt(cache.token_ids[:, :end])[:, start:end]
            checked.append((gpt.exit_logits(out[last]) - ref).abs().max().item())
        return out

    monkeypatch.setattr(gpt, "run_slots", spy)
    run_speculative(model.gpt, torch.tensor(prompts(tok, ["Prince Andrew looked"])), max_new_tokens=30, k_draft=4,
                    stop_tokens=[])
    assert len(checked) >= 5 and max(checked) < 1e-5


def test_cli_generate_modes_and_calibrate(d8_model, tmp_path, capsys):
    import json

    from cognica_poe.checkpoint import export_hf_folder
    from cognica_poe.cli import main as cli_main

    model, tok = d8_model
    folder = export_hf_folder(model, tok, str(tmp_path / "m"), dtype="float32")
    text = tmp_path / "calib.txt"
    text.write_text("\n\n".join(["It was in July, 1805, and the speaker was the well-known Anna Pavlovna."] * 40))
    assert cli_main(["calibrate", folder, str(text), "--seq-len", "64"]) == 0
    with open(f"{folder}/config.json") as f:
        bounds = json.load(f)["wand_p99_bounds"]
    assert len(bounds) == 3 and all(b > 0 for b in bounds)
    for mode, extra in (("full", []), ("stage", ["--stage", "1"]), ("wand", ["--safety", "1.0"]),
                        ("speculative", ["--k-draft", "2"]), ("compose", ["--stages", "0", "3"])):
        assert cli_main(["generate", folder, "The old prince", "--mode", mode, "--max-new-tokens", "8",
                         "--stop"] + extra) == 0
        err = capsys.readouterr().err
        assert f"[{mode}: 8 tokens" in err
    assert cli_main(["generate", folder, "x", "--mode", "stage", "--stage", "7"]) == 2
    assert "out of range" in capsys.readouterr().err

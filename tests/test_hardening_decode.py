"""Decoding modes, hardened: one checked SamplingParams, the batch speculative cache sized by use (compacted when
rows leave holes), WAND's stages_used as lists, transformers' logits processors / generation_config / streamers."""

import os
import re

import numpy as np
import pytest
import torch
from conftest import perturbed_model
from test_checkpoint import _fresh_python
from transformers import GenerationConfig, LogitsProcessorList, TextIteratorStreamer
from transformers.generation.logits_process import (
    NoRepeatNGramLogitsProcessor,
    RepetitionPenaltyLogitsProcessor,
    SuppressTokensLogitsProcessor,
)
from transformers.generation.streamers import BaseStreamer

from cognica_poe.compose import log_op
from cognica_poe.speculative import run_speculative
from cognica_poe.wand import exit_thresholds, top2_margin

README = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "README.md")

MODES = {
    "stage": lambda m, ids, **kw: m.generate_stage(ids, stage=2, **kw),
    "compose": lambda m, ids, **kw: m.generate_parallel_composition(ids, stages=[1, 3], **kw),
    "wand": lambda m, ids, **kw: m.generate_wand(ids, safety=0.05, p99_bounds=[1, 1, 1], **kw),
    "speculative": lambda m, ids, **kw: m.generate_speculative(ids, draft_stage=1, k_draft=2, **kw),
}


def left_pad(rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    n = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), n, dtype=torch.long)
    mask = torch.zeros(len(rows), n, dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, n - len(r):], mask[i, n - len(r):] = torch.tensor(r), 1
    return ids, mask


# -----------------------------------------------------------------------------
# item 8: every argument checked in one place, with a clear error


BAD_ARGUMENTS = [
    (dict(temperature=-1.0), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(do_sample=True, temperature=0.0), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=float("nan")), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(top_k=True), "top_k"),
    (dict(min_p=1.5), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(repetition_penalty=float("nan")), "repetition_penalty"),
    (dict(no_repeat_ngram_size=-1), "no_repeat_ngram_size"),
    (dict(stop_tokens="\n"), "stop_tokens"),
    (dict(stop_tokens=[1.5]), "stop_tokens"),
    (dict(stop_tokens=[True]), "stop_tokens"),
    (dict(stop_tokens=[600]), "stop_tokens"),
    (dict(stop_tokens=-1), "stop_tokens"),
    (dict(max_new_tokens=True), "max_new_tokens"),
    (dict(seed=1.5), "seed"),
    (dict(streamer="stdout"), "streamer"),
    (dict(logits_processor=[42]), "logits_processor"),
]


@pytest.mark.parametrize("kwargs,name", BAD_ARGUMENTS, ids=[f"{k}" for k, _ in BAD_ARGUMENTS])
def test_bad_sampling_arguments_are_refused_by_every_mode(tiny_model, kwargs, name):
    ids = torch.tensor([[0, 1, 2]])
    for run in MODES.values():
        with pytest.raises(ValueError, match=name):
            run(tiny_model, ids, **{"max_new_tokens": 4, **kwargs})


def test_sampling_params_checks_its_fields():
    from cognica_poe.sampling import SamplingParams

    assert SamplingParams().max_new_tokens == 32
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-0.5)
    p = SamplingParams(stop_tokens=np.int64(7), top_k=np.int32(5), seed=np.int64(3))
    assert p.stop_tokens == [7] and p.top_k == 5 and type(p.top_k) is int and p.seed == 3


BAD_REQUESTS = [
    (torch.tensor([[0.0, 1.0, 2.0]]), None, "integer"),
    (torch.tensor([[True, False]]), None, "integer"),
    ([[0, 1, 2], [0, 1]], None, "input_ids"),
    (torch.tensor([[0, 1, 600]]), None, r"600.*vocabulary"),
    (torch.tensor([[0, -3, 2]]), None, r"-3.*vocabulary"),
    (torch.tensor([[0, 5, 6, 7], [0, 5, 6, 7]]), torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]]), "left padding"),
    (torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 1, 0, 1]]), "left padding"),
    (torch.tensor([[0, 5, 6, 7]]), torch.tensor([[0, 1, 2, 1]]), "attention_mask"),
    (torch.tensor([[0, 5], [0, 5]]), torch.tensor([[1, 1], [0, 0]]), "attention_mask"),
]


@pytest.mark.parametrize("ids,mask,match", BAD_REQUESTS)
def test_bad_ids_and_masks_are_refused_by_every_mode(tiny_model, ids, mask, match):
    for run in MODES.values():
        with pytest.raises(ValueError, match=match):
            run(tiny_model, ids, attention_mask=mask, max_new_tokens=4)


def test_mode_arguments_are_checked(tiny_model):
    ids = torch.tensor([[0, 1, 2]])
    for weights in ([1.0, float("nan")], [1.0, float("inf")], [1.0, -0.5], [0.0, 0.0]):
        with pytest.raises(ValueError, match="stage_weights"):
            tiny_model.generate_parallel_composition(ids, stages=[0, 3], stage_weights=weights, max_new_tokens=3)
    for safety in (-1.0, float("nan"), "1"):
        with pytest.raises(ValueError, match="safety"):
            tiny_model.generate_wand(ids, safety=safety, p99_bounds=[1, 1, 1], max_new_tokens=3)
    for bounds in ([1.0, float("nan"), 1.0], [1.0, float("inf"), 1.0]):
        with pytest.raises(ValueError, match="p99_bounds"):
            tiny_model.generate_wand(ids, p99_bounds=bounds, max_new_tokens=3)
    with pytest.raises(ValueError, match="k_draft"):
        tiny_model.generate_speculative(ids, k_draft=2.0, max_new_tokens=3)


def test_numpy_integers_are_accepted_as_stages(tiny_model):
    ids = torch.tensor([[0, 4, 5, 6]])
    kw = dict(max_new_tokens=6, stop_tokens=[])
    assert torch.equal(tiny_model.generate_stage(ids, stage=np.int64(2), **kw),
                       tiny_model.generate_stage(ids, stage=2, **kw))
    assert torch.equal(tiny_model.generate_parallel_composition(ids, stages=np.array([1, 3]), **kw),
                       tiny_model.generate_parallel_composition(ids, stages=[1, 3], **kw))
    assert torch.equal(tiny_model.generate_speculative(ids, draft_stage=np.int64(1), k_draft=np.int64(2), **kw),
                       tiny_model.generate_speculative(ids, draft_stage=1, k_draft=2, **kw))
    assert torch.equal(tiny_model.forward_stage(ids, np.int32(1)), tiny_model.forward_stage(ids, 1))
    assert torch.equal(tiny_model.generate_stage(ids.numpy(), stage=2, **kw), tiny_model.generate_stage(ids, stage=2,
                                                                                                       **kw))


def test_context_limit_follows_the_rotary_multiplier():
    model = perturbed_model(rotary_multiplier=4)
    ids = torch.tensor([[0, 1, 2]])
    assert model.generate_stage(ids, stage=0, max_new_tokens=4, max_length=4 * 256).shape == (1, 7)
    with pytest.raises(ValueError, match="4 x sequence_len"):
        model.generate_stage(ids, stage=0, max_new_tokens=4, max_length=4 * 256 + 1)


# -----------------------------------------------------------------------------
# item 9: the batch speculative cache is sized by what rows use, and compacts


def test_cache_compact_keeps_what_later_tokens_compute(tiny_model):
    """Holes (pads, rejected drafts) squeezed out per row: the next token's logits and the kept streams unchanged."""
    gpt = tiny_model.gpt
    ids, mask = left_pad([[0, 5, 6, 7, 8], [0, 9]])
    cache = tiny_model.new_cache(2, 16, keep_hidden=True)
    with torch.no_grad():
        gpt(ids, kv_cache=cache, attention_mask=mask)
        gpt(torch.tensor([[3, 4, 5], [6, 7, 8]]), kv_cache=cache)  # slots 5..7
    cache.invalidate(torch.tensor([0]), torch.tensor([6]), 8)  # row 0 rejects its last two tokens
    rows = [[0, 5, 6, 7, 8, 3], [0, 9, 6, 7, 8]]  # what each row holds
    hidden_before = {k: [h[r, cache.valid[r]] for r in range(2)] for k, h in cache.hidden.items()}
    assert cache.compact() == 6 and cache.n_slots == 6 and cache.layer_len == [6] * 4
    assert cache.valid[:, :6].sum(1).tolist() == [6, 5] and not bool(cache.valid[1, 0])
    for k, h in cache.hidden.items():
        for r in range(2):
            assert torch.equal(h[r, cache.valid[r, :6].nonzero()[:, 0]], hidden_before[k][r])
    nxt = torch.tensor([[11], [12]])
    with torch.no_grad():
        logits = gpt(nxt, kv_cache=cache)[:, -1]
        for r, row in enumerate(rows):
            alone = gpt(torch.tensor([row + [int(nxt[r])]]))[0, -1]
            assert (logits[r] - alone).abs().max() < 1e-5


def test_speculative_batch_cache_is_sized_by_use_and_compacts(tiny_model, monkeypatch):
    from cognica_poe.cache import CognicaKVCache

    calls = []
    original = CognicaKVCache.compact
    monkeypatch.setattr(CognicaKVCache, "compact", lambda self: calls.append(self.n_slots) or original(self))
    ids, mask = left_pad([[0, 11, 12, 13, 14, 15], [0, 21, 22], [0, 31, 32, 33]])
    n, k = 40, 3
    res = run_speculative(tiny_model.gpt, ids, attention_mask=mask, max_new_tokens=n, draft_stage=1, k_draft=k,
                          stop_tokens=[])
    assert res.cache.max_len == ids.size(1) + n + k + 1
    assert calls, "holes from rejected drafts should have needed a compaction"
    plain = tiny_model.generate_stage(ids, stage=3, attention_mask=mask, max_new_tokens=n, stop_tokens=[])
    assert torch.equal(res.sequences, plain)
    # afterwards each row's cache holds its prompt and every output token but the last, as plain decoding leaves it
    for r in range(3):
        real = ids[r, mask[r].bool()].tolist() + res.sequences[r, ids.size(1):-1].tolist()
        n_slots = res.cache.n_slots
        kept = res.cache.token_ids[r, :n_slots][res.cache.valid[r, :n_slots]]
        assert kept.tolist() == real


def test_speculative_batch_reaches_the_context_limit():
    """A batch may use all of max_length (here 50; the rotary table holds 320): the cache no longer needs k + 1
    slots per token, and a request over the limit names the limit. Past 32 tokens the sliding windows act."""
    model = perturbed_model(sequence_len=32)
    ids, mask = left_pad([[0, 11, 12, 13], [0, 21], [0, 31, 32]])
    kw = dict(attention_mask=mask, max_length=50, stop_tokens=[])
    out = model.generate_speculative(ids, max_new_tokens=46, draft_stage=1, k_draft=7, **kw)
    assert torch.equal(out, model.generate_stage(ids, stage=3, max_new_tokens=46, **kw))
    with pytest.raises(ValueError, match="exceeds the context of 50 tokens"):
        model.generate_speculative(ids, max_new_tokens=47, draft_stage=1, k_draft=7, **kw)


# -----------------------------------------------------------------------------
# item 14: stages_used is what the model card's usage formats


def test_wand_stages_used_are_plain_lists(tiny_model):
    one = torch.tensor([[0, 3, 4]])
    out, used = tiny_model.generate_wand(one, max_new_tokens=12, safety=0.05, p99_bounds=[1, 1, 1],
                                         return_stages_used=True, stop_tokens=[])
    assert isinstance(used, list) and len(used) == 12 and all(type(s) is int and 0 <= s <= 3 for s in used)
    assert f"{sum(used) / len(used):.2f}"
    ids, mask = left_pad([[0, 3, 4], [0, 5]])
    full, _ = tiny_model.generate_wand(ids, attention_mask=mask, max_new_tokens=12, safety=0.05,
                                       p99_bounds=[1, 1, 1], return_stages_used=True, stop_tokens=[])
    stop = int(full[1, 3 + 2])  # row 1's third token stops it
    out, used = tiny_model.generate_wand(ids, attention_mask=mask, max_new_tokens=12, safety=0.05,
                                         p99_bounds=[1, 1, 1], return_stages_used=True, stop_tokens=[stop])
    first = [out[r, 3:].tolist().index(stop) + 1 if stop in out[r, 3:].tolist() else 12 for r in range(2)]
    assert [len(u) for u in used] == first and all(0 <= s <= 3 for u in used for s in u)


def readme_use_block() -> str:
    with open(README, encoding="utf-8") as f:
        text = f.read()
    return re.search(r"```python\n(.*?)```", text, flags=re.DOTALL).group(1)


@pytest.fixture
def exported(tmp_path) -> str:
    """A tiny model and a BPE tokenizer (trained on the README's text) exported with remote code, in bf16."""
    from cognica_poe.checkpoint import export_hf_folder
    from cognica_poe.tokenizer_train import train_bpe

    with open(README, encoding="utf-8") as f:
        tok = train_bpe(iter(f.read().split("\n\n")), vocab_size=512)
    return export_hf_folder(perturbed_model(vocab_size=len(tok)), tok, str(tmp_path / "exported"), dtype="bfloat16")


def test_readme_use_block_runs_verbatim_with_remote_code(exported, tmp_path):
    """The README's first python block (our copy of the model card's usage), every line and print, with only the
    model path (and any .cuda()) swapped, in a fresh interpreter that loads the exported folder's remote code."""
    code = readme_use_block()
    assert "return_stages_used=True" in code and "sum(stages_used) / len(stages_used):.2f}" in code
    paths = re.findall(r'"(path/to/[^"]+)"', code)
    assert len(paths) == 1
    r = _fresh_python(code.replace(paths[0], exported).replace(".cuda()", ""), str(tmp_path))
    assert r.returncode == 0, r.stderr[-3000:]
    assert re.search(r"mean exit stage \d\.\d\d", r.stdout), r.stdout


# -----------------------------------------------------------------------------
# item 19: transformers' logits processors, generation_config and streamers in every mode


def processors() -> LogitsProcessorList:
    return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.8), NoRepeatNGramLogitsProcessor(2)])


def reference(model, mode: str, row: list[int], n: int, procs: LogitsProcessorList) -> list[int]:
    """Greedy by full recomputation each step, the processors applied to the mode's scores with the row's tokens."""
    seq = torch.tensor([row])
    thresholds = exit_thresholds([1.0, 1.0, 1.0], 0.05)
    for _ in range(n):
        with torch.no_grad():
            exits = [e[:, -1] for e in model.gpt.forward_all_stages(seq)]
        if mode == "stage":
            scores = procs(seq, exits[2])
        elif mode == "compose":
            scores = procs(seq, log_op([exits[1], exits[3]], [1.0, 1.0]))
        elif mode == "speculative":
            scores = procs(seq, exits[3])
        else:  # WAND: the first exit whose processed margin clears its threshold
            for s in range(4):
                scores = procs(seq, exits[s])
                if float(top2_margin(scores)[0]) > thresholds[s]:
                    break
        seq = torch.cat([seq, scores.argmax(-1, keepdim=True)], dim=1)
    return seq[0, len(row):].tolist()


@pytest.mark.parametrize("how", ["kwargs", "generation_config", "logits_processor"])
@pytest.mark.parametrize("mode", MODES)
def test_processors_in_every_mode_equal_a_reference_loop(tiny_model, mode, how):
    rows = [[0, 11, 12, 13, 14, 15], [0, 21, 22]]
    ids, mask = left_pad(rows)
    n = 16
    given = {"kwargs": dict(repetition_penalty=1.8, no_repeat_ngram_size=2),
             "generation_config": dict(generation_config=GenerationConfig(repetition_penalty=1.8,
                                                                          no_repeat_ngram_size=2)),
             "logits_processor": dict(logits_processor=processors())}[how]
    out = MODES[mode](tiny_model, ids, attention_mask=mask, max_new_tokens=n, stop_tokens=[], **given)
    for r, row in enumerate(rows):
        assert out[r, ids.size(1):].tolist() == reference(tiny_model, mode, row, n, processors()), (mode, r)
    plain = MODES[mode](tiny_model, ids, attention_mask=mask, max_new_tokens=n, stop_tokens=[])
    assert not torch.equal(out, plain)  # the processors changed something


def test_speculative_with_processors_is_plain_greedy_with_them_and_generate(tiny_model):
    ids = torch.tensor([[0, 3, 4, 5], [0, 6, 7, 8], [0, 9, 9, 9]])
    kw = dict(max_new_tokens=30, repetition_penalty=1.3, no_repeat_ngram_size=3)
    ban = LogitsProcessorList([SuppressTokensLogitsProcessor([7, 11])])
    spec = tiny_model.generate_speculative(ids, draft_stage=0, k_draft=3, stop_tokens=[], logits_processor=ban, **kw)
    plain = tiny_model.generate_stage(ids, stage=3, stop_tokens=[], logits_processor=ban, **kw)
    hf = tiny_model.generate(ids, do_sample=False, min_new_tokens=30, logits_processor=ban, **kw)
    assert torch.equal(spec, plain) and torch.equal(plain, hf)
    assert not bool(torch.isin(spec[:, 4:], torch.tensor([7, 11])).any())


def test_min_p_sampling_draws_what_generate_draws(tiny_model):
    ids = torch.tensor([[0, 3, 4, 5]])
    ours = tiny_model.generate_stage(ids, stage=3, max_new_tokens=20, do_sample=True, temperature=0.9, min_p=0.05,
                                     repetition_penalty=1.2, seed=7, stop_tokens=[])
    torch.manual_seed(7)
    hf = tiny_model.generate(ids, max_new_tokens=20, min_new_tokens=20, do_sample=True, temperature=0.9, top_k=0,
                             min_p=0.05, repetition_penalty=1.2)
    assert torch.equal(ours, hf)


def test_generation_config_fills_unpassed_arguments_and_refuses_the_rest(tiny_model):
    ids = torch.tensor([[0, 3, 4, 5]])
    gc = GenerationConfig(max_new_tokens=7, do_sample=True, temperature=0.7, top_k=20, eos_token_id=[5])
    a = tiny_model.generate_stage(ids, stage=3, generation_config=gc, seed=1)
    b = tiny_model.generate_stage(ids, stage=3, max_new_tokens=7, do_sample=True, temperature=0.7, top_k=20,
                                  stop_tokens=[5], seed=1)
    assert torch.equal(a, b)
    c = tiny_model.generate_stage(ids, stage=3, generation_config=gc, max_new_tokens=3, do_sample=False)  # kwargs win
    assert torch.equal(c, tiny_model.generate_stage(ids, stage=3, max_new_tokens=3, stop_tokens=[5]))
    with pytest.raises(ValueError, match="num_beams"):
        tiny_model.generate_stage(ids, stage=3, generation_config=GenerationConfig(num_beams=2))
    with pytest.raises(TypeError, match="num_beams"):
        tiny_model.generate_stage(ids, stage=3, num_beams=2)


class Recorder(BaseStreamer):
    def __init__(self):
        self.puts, self.ended = [], 0

    def put(self, value):
        self.puts.append(value.tolist())

    def end(self):
        self.ended += 1


class IdsText:
    """Decodes ids as text (TextIteratorStreamer only calls decode)."""

    def decode(self, ids, **kwargs):
        return "".join(f"<{i}> " for i in ([ids] if isinstance(ids, int) else ids))


@pytest.mark.parametrize("mode", MODES)
def test_transformers_streamers_receive_the_tokens(tiny_model, mode):
    ids = torch.tensor([[0, 4, 5]])
    rec = Recorder()
    out = MODES[mode](tiny_model, ids, max_new_tokens=9, stop_tokens=[], streamer=rec)
    assert rec.puts[0] == [[0, 4, 5]] and rec.puts[1:] == [[t] for t in out[0, 3:].tolist()] and rec.ended == 1
    text = TextIteratorStreamer(IdsText(), skip_prompt=True)
    out = MODES[mode](tiny_model, ids, max_new_tokens=9, stop_tokens=[], streamer=text, do_sample=True, seed=2)
    assert "".join(text) == IdsText().decode(out[0, 3:].tolist())
    with pytest.raises(ValueError, match="streamer"):
        MODES[mode](tiny_model, torch.tensor([[0, 4, 5], [0, 6, 7]]), max_new_tokens=3, streamer=Recorder())


def test_padded_prompt_streams_its_real_tokens(tiny_model):
    rec = Recorder()
    tiny_model.generate_stage(torch.tensor([[0, 0, 4, 5]]), stage=1, attention_mask=torch.tensor([[0, 1, 1, 1]]),
                              max_new_tokens=2, stop_tokens=[], streamer=rec)
    assert rec.puts[0] == [[0, 4, 5]] and len(rec.puts) == 3

"""
The OpenAI-compatible server, driven by the official `openai` client (and raw HTTP where the client hides the wire) on
127.0.0.1 against a tiny model: every mode equals the library's own decoding, streaming equals non-streaming, n,
logprobs, stop strings, seeds, siblings, every bad input's 400, 401, 429, disconnects, timeouts, and continuous
batching that never changes a greedy row's tokens.
"""

import http.client
import json
import os
import random
import socket
import threading
import time
from contextlib import contextmanager

import pytest
import torch

openai = pytest.importorskip("openai")
uvicorn = pytest.importorskip("uvicorn")

from conftest import perturbed_model  # noqa: E402

from cognica_poe.cli import main as cli_main  # noqa: E402
from cognica_poe.scheduler import Engine  # noqa: E402
from cognica_poe.server import create_app  # noqa: E402

CORPUS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "src", "cognica_poe", "data",
                      "tinyshakespeare.txt")
BOUNDS = [0.02, 0.02, 0.02]  # small WAND bounds: the tiny model's tokens exit early at every stage


@pytest.fixture(scope="module")
def tok():
    from cognica_poe.tokenizer_train import train_bpe

    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()[:100_000]
    return train_bpe(iter(text.split("\n\n")), vocab_size=512)


@pytest.fixture(scope="module")
def model(tok):
    return perturbed_model(sequence_len=256, bos_token_id=tok.bos_token_id, pad_token_id=tok.bos_token_id)


@contextmanager
def running(engine: Engine, tok, name: str = "tiny", **kw):
    """The app on a free loopback port, served by uvicorn in a thread; yields the base URL, shuts down after."""
    app = create_app(engine, tok, name, **kw)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="error"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()


def client(url: str, key: str = "none") -> "openai.OpenAI":
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=60)


def raw(url: str, method: str, path: str, body=None, headers: dict | None = None) -> tuple[int, dict, bytes]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    data = body if isinstance(body, (bytes, str)) or body is None else json.dumps(body)
    conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    r = conn.getresponse()
    out = (r.status, dict(r.getheaders()), r.read())
    conn.close()
    return out


@pytest.fixture(scope="module")
def server(model, tok):
    with running(Engine(model, max_batch=16, prefill_chunk=8), tok) as url:
        yield url


def bos_ids(tok, text: str) -> list[int]:
    return [tok.bos_token_id] + tok.encode(text, add_special_tokens=False)


PROMPTS = ["ROMEO:\nWhat light", "First Citizen:\nBefore we proceed any further, hear me speak.", "KING", "O, she"]
MODES = [{"mode": "full"}, {"mode": "stage", "stage": 1}, {"mode": "compose", "stages": [0, 3]},
         {"mode": "wand", "p99_bounds": BOUNDS}, {"mode": "speculative", "k_draft": 2},
         {"mode": "speculative", "draft_stage": 1, "k_draft": 3}]


def library(model, tok, prompt_ids: list[int], poe: dict, n: int) -> list[int]:
    """The same greedy decoding through the library's own mode functions."""
    ids = torch.tensor([prompt_ids])
    kw = dict(max_new_tokens=n, stop_tokens=[tok.bos_token_id])
    mode = poe["mode"]
    if mode == "full":
        out = model.generate_stage(ids, stage=model.poe_n_stages - 1, **kw)
    elif mode == "stage":
        out = model.generate_stage(ids, stage=poe["stage"], **kw)
    elif mode == "compose":
        out = model.generate_parallel_composition(ids, stages=poe["stages"], **kw)
    elif mode == "wand":
        out = model.generate_wand(ids, p99_bounds=poe["p99_bounds"], **kw)
    else:
        out = model.generate_speculative(ids, draft_stage=poe.get("draft_stage", 0), k_draft=poe["k_draft"], **kw)
    return [t for t in out[0, len(prompt_ids):].tolist() if t != tok.bos_token_id]


# -----------------------------------------------------------------------------
# every mode, through the openai client


@pytest.mark.parametrize("poe", MODES, ids=lambda p: f"{p['mode']}{p.get('draft_stage', p.get('stage', ''))}")
def test_completion_every_mode_equals_library(server, model, tok, poe):
    c = client(server)
    r = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=24, temperature=0, extra_body={"poe": poe})
    expected = library(model, tok, bos_ids(tok, PROMPTS[1]), poe, 24)
    assert r.choices[0].text == tok.decode(expected)
    assert r.usage.completion_tokens == len(expected)
    assert r.usage.prompt_tokens == len(bos_ids(tok, PROMPTS[1]))
    stats = r.model_extra["poe"]
    assert stats["mode"] == poe["mode"]
    if poe["mode"] == "wand":
        hist = stats["exit_stages"]
        stopped = r.choices[0].finish_reason == "stop"  # the stop token was decided too
        assert sum(hist.values()) == len(expected) + stopped and set(hist) - {"3"}, hist  # early exits happened
        assert stats["layers_per_token"] < model.config.n_layer
    if poe["mode"] == "speculative":
        assert 0 <= stats["accepted"] <= stats["drafted"] and stats["acceptance"] == round(
            stats["accepted"] / stats["drafted"], 4)
    if poe["mode"] in ("stage", "full", "compose"):  # stage 1 of the tiny model ends at layer 1
        assert stats["layers_per_token"] == {"stage": 2, "full": 4, "compose": 4}[poe["mode"]]


@pytest.mark.parametrize("poe", [MODES[0], MODES[3], MODES[4]], ids=["full", "wand", "speculative"])
def test_chat_stream_equals_non_stream(server, tok, poe):
    c = client(server)
    msgs = [{"role": "user", "content": "Speak, my lord."}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0,
                                      extra_body={"poe": poe})
    chunks = list(c.chat.completions.create(model="tiny", messages=msgs, max_tokens=20, temperature=0, stream=True,
                                            stream_options={"include_usage": True}, extra_body={"poe": poe}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finish = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finish == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].model_extra["poe"]["mode"] == poe["mode"]
    # the chat prompt is the model's chat template
    ids = tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True, return_dict=False)
    assert whole.usage.prompt_tokens == len(ids)


def test_sse_wire_format_ends_with_done(server):
    status, headers, body = raw(server, "POST", "/v1/completions", {
        "model": "tiny", "prompt": PROMPTS[0], "max_tokens": 5, "temperature": 0, "stream": True})
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events) and events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "text_completion"


def test_completion_stream_echo_and_multiple_prompts(server, tok):
    c = client(server)
    whole = c.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=12, temperature=0, echo=True)
    assert [ch.index for ch in whole.choices] == [0, 1]
    for ch, p in zip(whole.choices, PROMPTS[:2]):
        assert ch.text.startswith(p)
    streamed = ["", ""]
    for ch in c.completions.create(model="tiny", prompt=PROMPTS[:2], max_tokens=12, temperature=0, echo=True,
                                   stream=True):
        for choice in ch.choices:
            streamed[choice.index] += choice.text
    assert streamed == [ch.text for ch in whole.choices]
    ids = bos_ids(tok, PROMPTS[0])[1:]  # token-id prompts work too
    again = c.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert again.choices[0].text == whole.choices[0].text[len(PROMPTS[0]):]


def test_n_seed_and_logprobs(server):
    c = client(server)
    kw = dict(model="tiny", prompt=PROMPTS[2], max_tokens=16, temperature=1.0, n=3, seed=7)
    a = c.completions.create(**kw)
    b = c.completions.create(**kw)
    assert [ch.text for ch in a.choices] == [ch.text for ch in b.choices]  # the seed reproduces every choice
    assert len({ch.text for ch in a.choices}) > 1  # and each choice draws its own tokens
    other = c.completions.create(**{**kw, "seed": 8})
    assert [ch.text for ch in other.choices] != [ch.text for ch in a.choices]
    g = c.completions.create(model="tiny", prompt=PROMPTS[2], max_tokens=8, temperature=0, logprobs=3)
    lp = g.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == g.usage.completion_tokens
    for chosen, top in zip(lp.token_logprobs, lp.top_logprobs):
        # keyed by token text (two byte-fragment tokens may share one): greedy picks the top alternative
        assert 1 <= len(top) <= 3 and chosen <= 0 and abs(chosen - max(top.values())) < 1e-5
    chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Hi"}], max_tokens=6,
                                     temperature=0, logprobs=True, top_logprobs=2)
    content = chat.choices[0].logprobs.content
    assert len(content) == chat.usage.completion_tokens and all(len(x.top_logprobs) == 2 for x in content)
    assert all(abs(x.logprob - x.top_logprobs[0].logprob) < 1e-5 for x in content)


def test_ignore_eos_generates_max_tokens(server, tok):
    c = client(server)
    r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=60, temperature=0, logprobs=0,
                             extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 60 and r.choices[0].finish_reason == "length"


def test_stop_strings_trim_and_stop(server):
    c = client(server)
    full = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0).choices[0].text
    stop = full[10:13]
    assert len(stop) == 3 and stop.strip()
    cut = full.index(stop)
    r = c.completions.create(model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=[stop, "\x00zz"])
    assert r.choices[0].text == full[:cut] and r.choices[0].finish_reason == "stop"
    streamed = "".join(ch.choices[0].text for ch in c.completions.create(
        model="tiny", prompt=PROMPTS[0], max_tokens=40, temperature=0, stop=stop, stream=True) if ch.choices)
    assert streamed == full[:cut]  # the stop string is never streamed, not even its first characters


def test_penalties(server, model):
    """OpenAI's formula on the scores: minus frequency x count, minus presence where count > 0."""
    from cognica_poe.scheduler import Decoding, PoeSpec, Request, Row

    engine = Engine(model)
    req = Request([[1]], 1, Decoding(8, 0.0, presence_penalty=0.5, frequency_penalty=0.25), PoeSpec("full"),
                  lambda ev: None)
    row = Row(req, 0, 1, torch.device("cpu"))
    row.tokens = [5, 5, 7]
    out = engine._penalized(row, torch.zeros(10))
    assert out.tolist() == [0, 0, 0, 0, 0, -1.0, 0, -0.75, 0, 0]
    c = client(server)
    kw = dict(model="tiny", prompt=PROMPTS[3], max_tokens=30, temperature=0, logprobs=1)
    plain = c.completions.create(**kw).choices[0]
    pen = c.completions.create(**kw, frequency_penalty=2.0).choices[0]
    n = len(plain.logprobs.tokens)
    assert pen.logprobs.token_logprobs[0] == pytest.approx(plain.logprobs.token_logprobs[0])  # nothing to penalize yet
    assert n < 2 or pen.logprobs.token_logprobs[1:] != plain.logprobs.token_logprobs[1:n]


def test_models_health_metrics_tokenize(server, tok):
    c = client(server)
    assert [m.id for m in c.models.list().data] == ["tiny"]
    assert raw(server, "GET", "/health")[0] == 200
    status, _, body = raw(server, "POST", "/tokenize", {"prompt": "KING"})
    ids = json.loads(body)["tokens"]
    assert status == 200 and ids == bos_ids(tok, "KING")
    status, _, body = raw(server, "POST", "/detokenize", {"tokens": ids[1:]})
    assert json.loads(body)["prompt"] == "KING"
    c.completions.create(model="tiny", prompt="KING", max_tokens=3, temperature=0, extra_body={"poe": MODES[4]})
    text = raw(server, "GET", "/metrics")[2].decode()
    for name in ("cognica_poe_requests_total", "cognica_poe_mode_requests_total{mode=\"speculative\"}",
                 "cognica_poe_generation_tokens_total", "cognica_poe_queue_depth", "cognica_poe_running_rows",
                 "cognica_poe_batch_size_bucket", "cognica_poe_time_to_first_token_seconds_bucket",
                 "cognica_poe_inter_token_latency_seconds_bucket"):
        assert name in text, name


# -----------------------------------------------------------------------------
# bad input: one 400 per case, OpenAI's error body naming the field


BAD = {
    "bad_json": (b'{"model": "tiny", "prompt": ', None),
    "wrong_type": ({"model": "tiny", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
    "unknown_mode": ({"model": "tiny", "prompt": "x", "poe": {"mode": "turbo"}}, "poe.mode"),
    "stage_out_of_range": ({"model": "tiny", "prompt": "x", "poe": {"mode": "stage", "stage": 9}}, "poe.stage"),
    "prompt_too_long": ({"model": "tiny", "prompt": "KING " * 400}, "prompt"),
    "max_tokens_zero": ({"model": "tiny", "prompt": "x", "max_tokens": 0}, "max_tokens"),
    "max_tokens_negative": ({"model": "tiny", "prompt": "x", "max_tokens": -3}, "max_tokens"),
    "too_many_stops": ({"model": "tiny", "prompt": "x", "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    "unknown_poe_field": ({"model": "tiny", "prompt": "x", "poe": {"mode": "wand", "safty": 1}}, "poe.safty"),
    "draft_stage_last": ({"model": "tiny", "prompt": "x", "poe": {"mode": "speculative", "draft_stage": 3}},
                         "poe.draft_stage"),
    "wand_bounds_count": ({"model": "tiny", "prompt": "x", "poe": {"mode": "wand", "p99_bounds": [1.0]}},
                          "poe.p99_bounds"),
    "compose_weights": ({"model": "tiny", "prompt": "x", "poe": {"mode": "compose", "stages": [0, 1],
                                                                   "stage_weights": [1.0]}}, "poe.stage_weights"),
    "token_id_out_of_vocab": ({"model": "tiny", "prompt": [5, 100000]}, "prompt"),
    "completion_past_context": ({"model": "tiny", "prompt": "x", "max_tokens": 5000}, "max_tokens"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_400_naming_the_field(server, case):
    body, param = BAD[case]
    status, _, out = raw(server, "POST", "/v1/completions", body)
    err = json.loads(out)["error"]
    assert status == 400, out
    assert set(err) == {"message", "type", "param", "code"} and err["type"] == "invalid_request_error"
    assert err["param"] == param and err["message"]
    assert raw(server, "GET", "/health")[0] == 200  # the server lives on


def test_bad_chat_input_and_unknown_model(server):
    status, _, out = raw(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "assistant", "content": "first"}]})
    assert status == 400 and json.loads(out)["error"]["param"] == "messages"
    status, _, out = raw(server, "POST", "/v1/chat/completions", {"model": "tiny", "messages": [
        {"role": "user", "content": "x"}], "max_completion_tokens": 0})
    assert status == 400 and json.loads(out)["error"]["param"] == "max_completion_tokens"
    with pytest.raises(openai.NotFoundError) as e:
        client(server).completions.create(model="gpt-9", prompt="x")
    assert e.value.body["param"] == "model"


def test_api_key(model, tok, monkeypatch):
    with running(Engine(model), tok, api_key="sesame") as url:
        with pytest.raises(openai.AuthenticationError) as e:
            client(url, "wrong").completions.create(model="tiny", prompt="x", max_tokens=2)
        assert e.value.status_code == 401 and e.value.body["code"] == "invalid_api_key"
        assert raw(url, "GET", "/v1/models")[0] == 401
        assert raw(url, "GET", "/health")[0] == 200
        r = client(url, "sesame").completions.create(model="tiny", prompt="x", max_tokens=2, temperature=0)
        assert r.usage.completion_tokens <= 2


# -----------------------------------------------------------------------------
# overload and faults


def slowed(engine: Engine, monkeypatch, seconds: float = 0.02) -> Engine:
    """Every onepass step takes at least `seconds`, so a long request is reliably still running."""
    step = engine._step_onepass

    def slow(group):
        time.sleep(seconds)
        step(group)

    monkeypatch.setattr(engine, "_step_onepass", slow)
    return engine


def wait_for(cond, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.002)


def open_stream(url: str, body: dict) -> http.client.HTTPConnection:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=60)
    conn.request("POST", "/v1/completions", body=json.dumps({**body, "stream": True}),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200
    assert r.readline().startswith(b"data: ")  # the first token arrived: the row is running
    return conn


def test_queue_full_429_then_disconnect_frees_the_row(model, tok, monkeypatch):
    engine = slowed(Engine(model, max_batch=1, max_queue=1), monkeypatch)
    with running(engine, tok) as url:
        long = {"model": "tiny", "prompt": PROMPTS[0], "max_tokens": 200, "temperature": 0}
        conn = open_stream(url, long)
        waiting = {}
        t = threading.Thread(target=lambda: waiting.update(r=raw(url, "POST", "/v1/completions", {
            "model": "tiny", "prompt": "x", "max_tokens": 2, "temperature": 0})))
        t.start()
        wait_for(lambda: engine.queue_depth == 1)
        t0 = time.monotonic()
        status, headers, out = raw(url, "POST", "/v1/completions", {"model": "tiny", "prompt": "y", "max_tokens": 2})
        assert status == 429 and headers["retry-after"] == "1" and time.monotonic() - t0 < 2.0
        assert json.loads(out)["error"]["code"] == "queue_full"
        # the client of the long stream leaves: its row is freed within an iteration, the queued request runs
        wait_for(lambda: ("onepass",) in engine.groups)  # its first token is sent just before it joins its group
        row = engine.groups[("onepass",)].rows[0]
        conn.close()
        wait_for(lambda: row.request.cancelled)
        at = engine.iterations
        wait_for(lambda: row.finish is not None)
        assert row.finish == "cancelled" and engine.iterations - at <= 2 and len(row.tokens) < 200
        t.join(timeout=30)
        assert waiting["r"][0] == 200
        wait_for(lambda: engine.running_rows == 0)
        metrics = raw(url, "GET", "/metrics")[2].decode()
        assert "cognica_poe_freed_rows 1.0" in metrics and "cognica_poe_rejected_total 1.0" in metrics


def test_request_timeout(model, tok, monkeypatch):
    engine = slowed(Engine(model), monkeypatch)
    with running(engine, tok, request_timeout=0.3) as url:
        t0 = time.monotonic()
        with pytest.raises(openai.APIStatusError) as e:
            client(url).completions.create(model="tiny", prompt="x", max_tokens=200, temperature=0)
        assert e.value.status_code == 408 and e.value.body["code"] == "timeout"
        assert time.monotonic() - t0 < 3.0
        wait_for(lambda: engine.running_rows == 0)


# -----------------------------------------------------------------------------
# continuous batching


def test_batching_never_changes_greedy_tokens(model, tok):
    """K requests of mixed lengths and modes, concurrent and staggered: each equals the same request served alone."""
    engine = Engine(model, max_batch=8, prefill_chunk=8)
    engine.room = 8  # small caches: repacks happen mid-flight too
    jobs = [(PROMPTS[i % 4] * (1 + i % 3), MODES[i % len(MODES)], 10 + 3 * (i % 5)) for i in range(12)]
    with open(CORPUS, encoding="utf-8") as f:
        long = f.read()[:400]  # past the 128-token sliding window: repacked rows keep their rotary positions
    assert 140 < len(tok.encode(long)) < 200
    jobs += [(long, MODES[0], 40), (long[100:], MODES[3], 40), (long[50:], MODES[4], 40)]
    with running(engine, tok) as url:
        c = client(url)

        def ask(job):
            prompt, poe, n = job
            return c.completions.create(model="tiny", prompt=prompt, max_tokens=n, temperature=0,
                                        extra_body={"poe": poe}).choices[0].text

        alone = [ask(job) for job in jobs]
        busy = [None] * len(jobs)
        steps = []

        def worker(i):
            time.sleep(random.Random(i).uniform(0, 0.3))  # staggered: most join a batch already running
            busy[i] = ask(jobs[i])

        engine.on_step = lambda group, size: steps.append(size)
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    assert busy == alone
    assert max(steps) > 1  # rows really shared steps


def test_siblings_served_from_one_trunk(model, tok, tmp_path):
    from cognica_poe.branches import load_siblings
    from cognica_poe.checkpoint import export_hf_folder, new_stage_folder

    base = export_hf_folder(model, tok, str(tmp_path / "base"), dtype="float32")
    folders = [new_stage_folder(base, str(tmp_path / name), 1) for name in ("math", "code")]
    family = load_siblings(base, folders)
    with torch.no_grad():  # make the branches differ from their parent
        for b in family.branches:
            b.gpt.lm_head_stage.weight.normal_(0, 0.5)
    with running(Engine(family.base, family, prefill_chunk=8), tok, "base") as url:
        c = client(url)
        assert [m.id for m in c.models.list().data] == ["base", "math", "code"]
        ids = torch.tensor([bos_ids(tok, PROMPTS[0])])
        eos = family.base.config.eos_token_id
        stops = [tok.bos_token_id] + (eos if isinstance(eos, list) else [eos])  # the exported config's eos too
        for name in ("base", "math", "code"):
            r = c.completions.create(model=name, prompt=PROMPTS[0], max_tokens=12, temperature=0)
            stage = family.n_base_exits - 1 if name == "base" else name
            ref = family.generate_stage(ids, stage=stage, max_new_tokens=12, stop_tokens=stops)
            assert r.choices[0].text == tok.decode([t for t in ref[0, ids.size(1):].tolist() if t not in stops])
        r = c.completions.create(model="math", prompt=PROMPTS[0], max_tokens=12, temperature=0,
                                 extra_body={"poe": {"mode": "compose", "stages": [1, "math"]}})
        ref = family.generate_parallel_composition(ids, stages=[1, "math"], max_new_tokens=12, stop_tokens=stops)
        assert r.choices[0].text == tok.decode([t for t in ref[0, ids.size(1):].tolist() if t not in stops])
        status, _, out = raw(url, "POST", "/v1/completions", {"model": "math", "prompt": "x",
                                                                "poe": {"mode": "wand"}})
        assert status == 400 and json.loads(out)["error"]["param"] == "poe.mode"


def test_cli_serve_bad_arguments(capsys, tmp_path):
    assert cli_main(["serve", str(tmp_path / "missing")]) == 2
    assert "cognica-poe serve: error:" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path), "--port", "70000"]) == 2
    assert "--port" in capsys.readouterr().err


def engine_outputs(engine: Engine, jobs: list[tuple], arrivals: list[int]) -> list[list[int]]:
    """Drive the engine by hand: job i (prompt ids, model exit, poe, max_tokens) is submitted at iteration
    arrivals[i]; returns each job's greedy tokens."""
    from cognica_poe.scheduler import Decoding, Request

    out = [[] for _ in jobs]
    done = set()

    def emitter(i):
        def emit(ev):
            out[i].extend(ev.tokens)
            if ev.finish:
                done.add(i)
        return emit

    it = 0
    with torch.no_grad():
        while len(done) < len(jobs):
            for i, (ids, exit_, poe, n) in enumerate(jobs):
                if arrivals[i] == it:
                    engine.submit(Request([ids], 1, Decoding(max_tokens=n, temperature=0.0),
                                          engine.resolve(exit_, poe), emitter(i)))
            engine.iteration()
            it += 1
            assert it < 2000
    return out


def test_sibling_rows_joining_and_leaving_a_batch_keep_their_tokens(model, tok, tmp_path):
    """Rows of the base and of two sibling branches (one trunk, branch KV hanging off it) join a running batch and
    leave it at different iterations: every row's greedy tokens equal the same request decoded alone."""
    from cognica_poe.branches import load_siblings
    from cognica_poe.checkpoint import export_hf_folder, new_stage_folder

    base = export_hf_folder(model, tok, str(tmp_path / "base"), dtype="float32")
    folders = [new_stage_folder(base, str(tmp_path / name), 1) for name in ("math", "code")]
    family = load_siblings(base, folders)
    with torch.no_grad():
        for b in family.branches:
            b.gpt.lm_head_stage.weight.normal_(0, 0.5)
    nb = family.n_base_exits
    jobs = []
    for i in range(9):
        prompt = bos_ids(tok, PROMPTS[i % 4] * (1 + i % 2))
        exit_ = [None, nb, nb + 1][i % 3]
        poe = [{"mode": "full"}, {"mode": "compose", "stages": [1, "math", "code"]},
               {"mode": "stage", "stage": 0}][i % 3]
        jobs.append((prompt, exit_, poe, 6 + 3 * (i % 4)))
    engine = Engine(family.base, family, max_batch=8, prefill_chunk=8)
    engine.room = 8  # small caches: repacks happen mid-flight too
    alone = [engine_outputs(engine, [job], [0])[0] for job in jobs]
    steps = []
    engine.on_step = lambda group, size: steps.append(size)
    busy = engine_outputs(engine, jobs, [0, 0, 1, 3, 4, 4, 9, 12, 20])
    assert busy == alone
    assert max(steps) > 2


def test_short_prompts_prefilled_together_keep_their_tokens(model, tok):
    """Prompts that arrive together and fit one chunk are prefilled in one left-padded pass, in every mode; each
    row's greedy tokens equal the same request decoded alone."""
    engine = Engine(model, max_batch=16, prefill_chunk=64)
    jobs = [(bos_ids(tok, PROMPTS[i % 4]), None, MODES[i % len(MODES)], 5 + 2 * (i % 4)) for i in range(12)]
    alone = [engine_outputs(engine, [job], [0])[0] for job in jobs]
    passes = []
    exit_logits = engine._exit_logits

    def record(cache, views, ids, exits, valid=None):
        if ids.size(1) > 1:
            passes.append(ids.size(0))
        return exit_logits(cache, views, ids, exits, valid)

    engine._exit_logits = record
    busy = engine_outputs(engine, jobs, [0, 0, 0, 0, 0, 0, 3, 3, 3, 5, 5, 5])
    assert busy == alone
    assert max(passes) > 2  # several prompts really shared a prefill pass


# -----------------------------------------------------------------------------
# --device-map: stages, or the trunk and each sibling branch, on devices of their own (all "cpu" here: the placed code
# paths still run, with the branches' own caches and copies of the tensors they read)

SIBLINGS_CPU = json.dumps({"trunk": "cpu", "math": "cpu", "code": "cpu"})
STAGES_CPU = json.dumps({f"stage:{s}": "cpu" for s in range(4)})


@pytest.fixture(scope="module")
def folders(model, tok, tmp_path_factory):
    """The tiny model's folder and two 'trained' sibling stage folders of it (math: dual head, code: spec head)."""
    from test_branches import make_siblings

    from cognica_poe.checkpoint import export_hf_folder
    from cognica_poe.hf import CognicaPoEForCausalLM

    root = tmp_path_factory.mktemp("placed")
    base = export_hf_folder(model, tok, str(root / "base"), dtype="float32")
    stages = make_siblings(CognicaPoEForCausalLM.from_pretrained(base).eval(), base, root)
    return base, [stages["math"], stages["code"]]


def scored_outputs(engine: Engine, jobs: list[tuple], arrivals: list[int]) -> tuple[list[list[int]], list]:
    """engine_outputs, and the scores of every token choice in the order the engine made them."""
    scores = []
    choose = engine._choose

    def record(row, s):
        scores.append(s.detach().clone())
        choose(row, s)

    engine._choose = record
    return engine_outputs(engine, jobs, arrivals), scores


def test_placed_siblings_keep_every_score_while_rows_join_and_leave(folders, tok):
    """The scheduler over branches on devices of their own: rows of every model id join a running batch, leave it
    and are repacked mid-flight (the branches' caches take the trunk cache's slots after every row operation), and
    every token is chosen from the same scores as over unplaced siblings."""
    from cognica_poe.server import build

    base, stages = folders
    full, compose = {"mode": "full"}, {"mode": "compose", "stages": [1, "math", "code"]}
    # (prompt, model exit, poe, tokens, arrival): a branch sits out the steps no row needs it in, then a row needing
    # it joins; a long prompt joins later (a repack)
    plan = [(2, None, {"mode": "stage", "stage": 1}, 40, 0), (3, 4, full, 8, 0), (2, 5, full, 8, 4),
            (0, 4, compose, 10, 12), (3, None, full, 6, 14), (1, 4, full, 8, 20), (2, 5, compose, 8, 22)]
    jobs = [(bos_ids(tok, PROMPTS[p]), exit_, poe, n) for p, exit_, poe, n, _ in plan]
    runs = []
    for device_map in (None, SIBLINGS_CPU):
        engine, _, _ = build(base, stages, pack=False, max_batch=8, prefill_chunk=8, device_map=device_map)
        engine.room = 8  # small caches: repacks happen mid-flight too
        runs.append(scored_outputs(engine, jobs, [arrival for *_, arrival in plan]))
    cpu = torch.device("cpu")
    assert engine.siblings.devices == {0: cpu, 1: cpu}  # the placed path really ran
    assert runs[1][0] == runs[0][0]
    assert len(runs[1][1]) == len(runs[0][1])
    for placed, plain in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(placed, plain, atol=1e-5, rtol=0)


def concurrent_texts(engine: Engine, tok, asks: list[tuple]) -> tuple[list[str | None], int]:
    """The greedy completion of every (model id, poe, prompt), all sent at once to a server over this engine, and
    the largest batch a step ran."""
    out, sizes = [None] * len(asks), [0]
    with running(engine, tok, "base") as url:
        c = client(url)
        metrics = engine.on_step
        engine.on_step = lambda group, size: (sizes.append(size), metrics(group, size))

        def ask(i):
            name, poe, prompt = asks[i]
            out[i] = c.completions.create(model=name, prompt=prompt, max_tokens=10, temperature=0,
                                          extra_body={"poe": poe}).choices[0].text

        threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(asks))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
    return out, max(sizes)


def test_server_with_placed_siblings_serves_them_concurrently(folders, tok):
    """`serve --siblings ... --device-map`: requests for every model id at once, in stage and compose modes, get the
    same greedy tokens as from the unplaced server."""
    from cognica_poe.server import build

    base, stages = folders
    modes = [lambda name: {"mode": "stage", "stage": 2 if name == "base" else name}, lambda name: {"mode": "compose"},
             lambda name: {"mode": "compose", "stages": [0, "math", "code"], "stage_weights": [0.5, 1.0, 2.0]}]
    asks = [(name, mode(name), PROMPTS[i % 4]) for i, (name, mode) in enumerate(
        (name, mode) for name in ("base", "math", "code") for mode in modes)]
    (plain, _), (placed, batch) = [
        concurrent_texts(build(base, stages, pack=False, prefill_chunk=8, device_map=device_map)[0], tok, asks)
        for device_map in (None, SIBLINGS_CPU)]
    assert None not in placed and placed == plain
    assert batch > 1  # rows of several model ids shared steps


def test_server_with_placed_stages_equals_library_in_every_mode(folders, model, tok):
    """`serve MODEL --device-map '{"stage:0": ..., ...}'`: every mode's greedy tokens equal the library's, and rows
    of every mode that join, leave and are repacked choose from the same scores as on the unplaced model."""
    from cognica_poe.placement import Placement
    from cognica_poe.server import build

    base, _ = folders
    engine, _, _ = build(base, pack=False, prefill_chunk=8, device_map=STAGES_CPU)
    assert isinstance(engine.gpt.placement, Placement)
    with running(engine, tok) as url:
        c = client(url)
        for poe in MODES:
            r = c.completions.create(model="tiny", prompt=PROMPTS[1], max_tokens=12, temperature=0,
                                     extra_body={"poe": poe})
            assert r.choices[0].text == tok.decode(library(model, tok, bos_ids(tok, PROMPTS[1]), poe, 12)), poe
    jobs = [(bos_ids(tok, PROMPTS[i % 4] * (1 + i % 2)), None, MODES[i % len(MODES)], 5 + 2 * (i % 4))
            for i in range(8)]
    arrivals = [0, 0, 1, 2, 4, 4, 7, 9]
    runs = []
    for device_map in (None, STAGES_CPU):
        engine, _, _ = build(base, pack=False, max_batch=8, prefill_chunk=8, device_map=device_map)
        engine.room = 8
        runs.append(scored_outputs(engine, jobs, arrivals))
    assert runs[1][0] == runs[0][0]
    for placed, plain in zip(runs[1][1], runs[0][1]):
        torch.testing.assert_close(placed, plain, atol=1e-5, rtol=0)


def test_cli_serve_bad_device_maps(folders, capsys):
    """A bad --device-map is one line naming the map's fault and the fix (exit 2), before anything serves."""
    base, stages = folders

    def error(*args: str) -> str:
        assert cli_main(["serve", base, "--no-pack", *args]) == 2  # each fails before it listens
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and err.startswith("cognica-poe serve: error: "), err
        return err

    assert "--device-map ranks splits the stages over torchrun processes" in error("--device-map", "ranks")
    assert "leave out --ray" in error("--device-map", STAGES_CPU, "--ray")
    assert "device_map key 'stage:7': this model has stages 0..3" in error("--device-map", '{"stage:7": "cpu"}')
    assert "device_map is not valid JSON" in error("--device-map", '{"stage:0": cpu}')
    sib = ["--siblings", *stages]
    assert "device_map names ['poetry']: its keys are 'trunk' and the branch names ['math', 'code']" in error(
        *sib, "--device-map", '{"trunk": "cpu", "poetry": "cpu"}')
    assert "sibling specialists take a map of the trunk and the branches to devices, e.g. '{\"trunk\": \"cuda:0\", " \
           "\"math\": \"cuda:1\", \"code\": \"cuda:2\"}'" in error(*sib, "--device-map", "auto")
    assert "device_map['math'] = 'gpu7' is not a device" in error(*sib, "--device-map", '{"math": "gpu7"}')
    if not torch.cuda.is_available():
        assert "device_map['trunk'] = 'cuda:0' but CUDA is not available here" in error(
            *sib, "--device-map", '{"trunk": "cuda:0"}')

"""
Ray Serve scale-out on a local Ray instance: 2 replicas of the server behind one loopback endpoint both answer, and a
greedy request's output through them equals the single-process server's and the library's.

Not collected by itself (no test_ prefix): tests/test_ray_serve.py runs this file inside a private network namespace
that has only a loopback interface, since Ray's own processes talk to each other over the machine's network
address, which a test must not use.
"""

import os
import socket
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from conftest import perturbed_model  # noqa: E402
from test_serve import CORPUS, PROMPTS, bos_ids, client, library, running  # noqa: E402

from cognica_poe.ray_serve import REPLICA_HEADER, build_app  # noqa: E402
from cognica_poe.server import build  # noqa: E402


def export_tiny(out_dir: str):
    """A tiny model and its tokenizer exported to out_dir/tiny: (folder, tokenizer)."""
    from cognica_poe.checkpoint import export_hf_folder
    from cognica_poe.tokenizer_train import train_bpe

    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()[:100_000]
    tok = train_bpe(iter(text.split("\n\n")), vocab_size=512)
    model = perturbed_model(sequence_len=256, bos_token_id=tok.bos_token_id, pad_token_id=tok.bos_token_id)
    return export_hf_folder(model, tok, os.path.join(out_dir, "tiny"), dtype="float32"), tok


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    return export_tiny(str(tmp_path_factory.mktemp("ray")))


@pytest.fixture(scope="module")
def folder(exported):
    return exported[0]


@pytest.fixture(scope="module")
def tok(exported):
    return exported[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ray_url(folder):
    """2 replicas on a fresh local Ray instance (2 CPUs, no dashboard), served on 127.0.0.1; shut down after."""
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        port = free_port()
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(folder, max_batch=4, prefill_chunk=8, replicas=2), name="cognica-poe", route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def test_two_replicas_answer_and_equal_single_process_and_library(ray_url, folder, tok):
    from cognica_poe.checkpoint import load_model

    c = client(ray_url)
    kw = dict(model="tiny", prompt=PROMPTS[1], max_tokens=16, temperature=0)
    seen, texts = set(), set()
    deadline = time.monotonic() + 120
    while len(seen) < 2:  # Ray's router spreads requests over the replicas: ask until both have answered
        assert time.monotonic() < deadline, f"only replicas {seen} answered"
        r = c.completions.with_raw_response.create(**kw)
        seen.add(r.headers[REPLICA_HEADER])
        texts.add(r.parse().choices[0].text)
    assert len(texts) == 1  # every replica decodes the same greedy tokens
    model = load_model(folder)  # what each replica loaded
    expected = tok.decode(library(model, tok, bos_ids(tok, PROMPTS[1]), {"mode": "full"}, 16))
    assert texts == {expected}
    engine, tok2, _ = build(folder, prefill_chunk=8)
    with running(engine, tok2) as url:
        assert client(url).completions.create(**kw).choices[0].text == expected
    # every PoE mode goes through the replicas: the speculative mode's output is the full model's
    r = c.completions.create(**kw, extra_body={"poe": {"mode": "speculative", "k_draft": 2}})
    assert r.choices[0].text == expected and r.model_extra["poe"]["mode"] == "speculative"
    # the streamed chat equals the non-streamed one
    msgs = [{"role": "user", "content": "Speak, my lord."}]
    whole = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0)
    parts = c.chat.completions.create(model="tiny", messages=msgs, max_tokens=12, temperature=0, stream=True)
    assert "".join(ch.choices[0].delta.content or "" for ch in parts if ch.choices) == whole.choices[0].message.content

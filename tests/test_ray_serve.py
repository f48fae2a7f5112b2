"""
Ray Serve scale-out on a local Ray instance: 2 replicas of the server behind one loopback endpoint both answer, and a
greedy request's output through them equals the single-process server's and the library's.
"""

import socket
import sys
import time

import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")
openai = pytest.importorskip("openai")

from conftest import perturbed_model  # noqa: E402
from test_serve import CORPUS, PROMPTS, bos_ids, client, library, running  # noqa: E402

from cognica_poe.cli import main as cli_main  # noqa: E402
from cognica_poe.ray_serve import REPLICA_HEADER, build_app  # noqa: E402
from cognica_poe.server import build  # noqa: E402

pytestmark = pytest.mark.slow  # a Ray instance takes a while to start


@pytest.fixture(scope="module")
def tok():
    from cognica_poe.tokenizer_train import train_bpe

    with open(CORPUS, encoding="utf-8") as f:
        text = f.read()[:100_000]
    return train_bpe(iter(text.split("\n\n")), vocab_size=512)


@pytest.fixture(scope="module")
def model(tok):
    return perturbed_model(sequence_len=256, bos_token_id=tok.bos_token_id, pad_token_id=tok.bos_token_id)


@pytest.fixture(scope="module")
def folder(model, tok, tmp_path_factory):
    from cognica_poe.checkpoint import export_hf_folder

    return export_hf_folder(model, tok, str(tmp_path_factory.mktemp("ray") / "tiny"), dtype="float32")


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


def test_build_app_bad_arguments(tmp_path, folder):
    with pytest.raises(FileNotFoundError, match="missing is not a model folder"):
        build_app(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="--replicas must be >= 1, got 0"):
        build_app(folder, replicas=0)
    with pytest.raises(ValueError, match="--max-model-len must be in 1..") as e:
        build_app(folder, max_model_len=10**6)
    assert "got 1000000" in str(e.value)


def test_cli_serve_ray_bad_arguments(capsys, tmp_path, folder, monkeypatch):
    assert cli_main(["serve", str(tmp_path / "missing"), "--ray", "--replicas", "2"]) == 2
    assert "cognica-poe serve: error:" in capsys.readouterr().err
    assert cli_main(["serve", str(tmp_path), "--replicas", "2"]) == 2  # --replicas without --ray
    assert "--replicas" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "ray", None)  # Ray not installed: one line naming the extra
    monkeypatch.delitem(sys.modules, "cognica_poe.ray_serve")
    assert cli_main(["serve", folder, "--ray"]) == 2
    err = capsys.readouterr().err
    assert "--ray needs Ray Serve" in err and "cognica-poe[ray]" in err and "Traceback" not in err

"""
Ray Serve scale-out: the 2-replica run (tests/ray_cases.py) inside a private network namespace, and the argument
checks that need no Ray instance.
"""

import os
import shutil
import subprocess
import sys

import pytest

pytest.importorskip("ray")
pytest.importorskip("ray.serve")
pytest.importorskip("openai")

from ray_cases import export_tiny  # noqa: E402

from cognica_poe.cli import main as cli_main  # noqa: E402
from cognica_poe.ray_serve import build_app  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> str:
    return export_tiny(str(tmp_path_factory.mktemp("ray")))[0]


@pytest.mark.slow  # a Ray instance takes a while to start
def test_two_replicas_in_a_private_network():
    """Ray's processes connect to each other on the machine's network address; in a namespace of our own with only a
    loopback interface every connection stays on this machine's loopback."""
    if not (hasattr(os, "geteuid") and os.geteuid() == 0 and shutil.which("unshare") and shutil.which("ip")):
        pytest.skip("the Ray instance runs in a private network namespace: needs root, unshare and ip (iproute2)")
    script = 'ip link set lo up && exec "$0" -m pytest -q -p no:cacheprovider tests/ray_cases.py'
    proc = subprocess.run(["unshare", "--net", "sh", "-c", script, sys.executable], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "1 passed" in proc.stdout, proc.stdout[-2000:]


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

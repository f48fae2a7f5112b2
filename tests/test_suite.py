"""The test suite itself: it passes from a clone of this repository alone, and prints pytest's summary line."""

import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def test_no_test_reads_outside_the_repository():
    """Reference files come only through conftest.shared_path (COGNICA_POE_SHARED), never a path beside the clone."""
    for name in sorted(os.listdir(HERE)):
        if name.endswith(".py") and name not in ("conftest.py", "test_suite.py"):
            with open(os.path.join(HERE, name), encoding="utf-8") as f:
                src = f.read()
            assert not re.search(r"""["']\.\.["']\s*,\s*["']shared["']""", src), name
            assert "../shared" not in src, name


def test_reference_tests_skip_with_the_fix_without_the_variable():
    env = {k: v for k, v in os.environ.items() if k != "COGNICA_POE_SHARED"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider",
                           "tests/test_tokenizer.py", "-k", "legacy or layout"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "set COGNICA_POE_SHARED" in proc.stdout
    # the summary line the README's command prints (pytest's own, not hidden by a doubled -q)
    assert re.search(r"^\d+ passed, 2 skipped(, \d+ deselected)? in ", proc.stdout, re.MULTILINE), proc.stdout[-2000:]

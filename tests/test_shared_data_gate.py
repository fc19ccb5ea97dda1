"""Tests that need ../shared/data say so when it is missing, and CI (TAR_LIGHTNING_REQUIRE_DATA=1) refuses to run.

The real tests/conftest.py is copied into a folder with no ../shared/data beside it and runs a two-test file there.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

PROBE = '''
import pytest


def test_data_free():
    assert 1 + 1 == 2


@pytest.mark.shared_data("wmdp/wmdp-bio-questions.json")
def test_needs_questions():
    assert False, "must not run without the data"
'''


def _pytest(tmp_path: Path, require: bool) -> subprocess.CompletedProcess:
    tests = tmp_path / "repo" / "tests"  # ../shared/data of this "repo" is tmp_path/shared/data: absent
    tests.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), tests / "conftest.py")
    (tests / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TAR_LIGHTNING_REQUIRE_DATA"}
    if require:
        env["TAR_LIGHTNING_REQUIRE_DATA"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", str(tests)],
                          capture_output=True, text=True, env=env, cwd=tmp_path / "repo")


def test_missing_shared_data_is_a_reported_skip(tmp_path):
    proc = _pytest(tmp_path, require=False)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 passed, 1 skipped" in out
    missing = str(tmp_path / "shared" / "data" / "wmdp" / "wmdp-bio-questions.json")
    assert "SKIPPED [1] tests/test_probe.py" in out and f"needs ../shared/data ({missing} not found)" in out, out
    assert "DATA-FREE SUBSET: 1 test(s) skipped" in out, out


def test_missing_shared_data_is_an_error_when_required(tmp_path):
    proc = _pytest(tmp_path, require=True)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "TAR_LIGHTNING_REQUIRE_DATA=1 but 1 selected test(s) need data that is not there" in out, out
    assert "wmdp-bio-questions.json" in out and "passed" not in out

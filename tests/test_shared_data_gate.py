"""Tests that need ../shared/data say so when it is missing, and CI (TAR_LIGHTNING_REQUIRE_DATA=1) refuses to run.

The real tests/conftest.py is copied into a folder with no ../shared/data beside it and runs a two-test file there.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PROBE = '''
import pytest


def test_data_free():
    assert 1 + 1 == 2


@pytest.mark.shared_data("wmdp/wmdp-bio-questions.json")
def test_needs_questions():
    assert False, "must not run without the data"
'''


def _pytest(tmp_path: Path, require: bool, extra: list[str]) -> subprocess.CompletedProcess:
    tests = tmp_path / "repo" / "tests"  # ../shared/data of this "repo" is tmp_path/shared/data: absent
    tests.mkdir(parents=True)
    shutil.copy(Path(__file__).with_name("conftest.py"), tests / "conftest.py")
    (tests / "test_probe.py").write_text(PROBE)
    env = {k: v for k, v in os.environ.items() if k != "TAR_LIGHTNING_REQUIRE_DATA"}
    if require:
        env["TAR_LIGHTNING_REQUIRE_DATA"] = "1"
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider", *extra, str(tests)],
                          capture_output=True, text=True, env=env, cwd=tmp_path / "repo")


# plain, and as the README runs the suites: in two xdist workers (collection then happens in the workers)
RUNNERS = pytest.mark.parametrize("extra", [[], ["-n", "2", "--dist", "loadgroup"]], ids=["plain", "xdist"])


@RUNNERS
def test_missing_shared_data_is_a_reported_skip(tmp_path, extra):
    proc = _pytest(tmp_path, require=False, extra=extra)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "1 passed, 1 skipped" in out
    missing = str(tmp_path / "shared" / "data" / "wmdp" / "wmdp-bio-questions.json")
    assert "SKIPPED [1] tests/test_probe.py" in out and f"needs ../shared/data ({missing} not found)" in out, out
    assert "DATA-FREE SUBSET: 1 test(s) skipped" in out, out


@RUNNERS
def test_missing_shared_data_is_an_error_when_required(tmp_path, extra):
    proc = _pytest(tmp_path, require=True, extra=extra)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    if extra:  # the xdist controller checks the data folder before any worker starts
        assert f"TAR_LIGHTNING_REQUIRE_DATA=1 but the data folder {tmp_path / 'shared' / 'data'} does not exist" in out
        assert "INTERNALERROR" not in out and "passed" not in out, out
        return
    assert "TAR_LIGHTNING_REQUIRE_DATA=1 but 1 selected test(s) need data that is not there" in out, out
    assert "wmdp-bio-questions.json" in out and "passed" not in out


def test_partly_missing_shared_data_fails_the_tests_that_need_it_under_xdist(tmp_path):
    (tmp_path / "shared" / "data").mkdir(parents=True)  # the folder is there, the file is not
    proc = _pytest(tmp_path, require=True, extra=["-n", "2", "--dist", "loadgroup"])
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "1 passed, 1 error" in out and "INTERNALERROR" not in out, out
    missing = tmp_path / "shared" / "data" / "wmdp" / "wmdp-bio-questions.json"
    assert f"TAR_LIGHTNING_REQUIRE_DATA=1 but this test needs data that is not there: {missing}" in out, out
    assert "must not run without the data" not in out

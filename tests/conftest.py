import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import json  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]

# Tiny models run several times faster on one thread than on two on this kind of shared 2-core machine.
torch.set_num_threads(1)


def random_bundle(vocab_size: int, steps: dict[str, int], batch: int = 2, length: int = 12, seed: int = 0,
                  pad_last: int = 3) -> dict:
    """A TAR batch of random token streams ``{name: {input_ids, attention_mask, labels}: [n, b, L]}``.

    The last sequence of every micro-batch ends with ``pad_last`` padding positions (labels -100).
    """
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, n in steps.items():
        ids = torch.randint(3, vocab_size, (n, batch, length), generator=g)
        mask = torch.ones_like(ids)
        if pad_last:
            mask[:, -1, -pad_last:] = 0
            ids[:, -1, -pad_last:] = 0
        labels = ids.masked_fill(mask == 0, -100)
        out[name] = {"input_ids": ids, "attention_mask": mask, "labels": labels}
    return out


@pytest.fixture
def bundle_factory():
    return random_bundle


# -- launching our commands in fresh processes ------------------------------------------------------------------
#: what a launcher (torchrun, srun, Lightning) sets per process; a leftover value would make a child join the wrong job
RANK_VARIABLES = ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "RANK", "PL_GLOBAL_SEED")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(*, drop_slurm: bool = False, **extra: str) -> dict[str, str]:
    """The environment for one fresh local launch of a command (one or several gloo processes on this machine).

    ``os.environ`` without the rank variables (and, with ``drop_slurm``, without ``SLURM_*``/``PL_*`` apart from
    ``SLURM_CONF``), with a free ``MASTER_PORT`` on 127.0.0.1, one OMP thread per process, the hub offline and
    unbuffered output; ``extra`` is set last.
    """
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1",
               HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for key in list(env):
        if key in RANK_VARIABLES or (drop_slurm and key.startswith(("SLURM_", "PL_")) and key != "SLURM_CONF"):
            del env[key]
    env.update(extra)
    return env


def fit_under_fsdp2_overlay(recipe: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """``tar-lightning fit --config RECIPE`` under recipes/launch/fsdp2_8gpu.yaml with only its hardware keys changed
    for 2 gloo CPU processes (tests/rehearsal), run from ``tmp_path`` into ``tmp_path/run``; asserts it succeeded."""
    sys.path.insert(0, str(REPO / "tests" / "rehearsal"))
    from rehearsal_recipes import derive_fsdp2, dump

    overlay = dump(derive_fsdp2(), tmp_path / "fsdp2_cpu.yaml")
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "tar-lightning"), "fit", "--config", str(recipe), "--config", str(overlay),
         "--trainer.default_root_dir", str(tmp_path / "run"), *args],
        env=launch_env(), cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc


# -- tests/dist_scripts/tar_ddp_equivalence.py: TAR on 1 or 2 gloo CPU processes (tests/test_distributed.py) ---------
SCRIPT = REPO / "tests" / "dist_scripts" / "tar_ddp_equivalence.py"


def run_script(devices: int, out: Path, outer: str, *extra: str) -> tuple[list[dict], list[list[float]]]:
    """The script on ``devices`` processes (3 outer steps unless ``extra`` sets ``--steps``) into ``out``; asserts it
    succeeded and returns every rank's final (full) parameters and the clip norms it logged."""
    env = launch_env()
    steps = [] if "--steps" in extra else ["--steps", "3"]
    cmd = [sys.executable, str(SCRIPT), "--devices", str(devices), "--global-batch", "4", *steps,
           "--outer", outer, "--out", str(out), *extra]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return script_outputs(devices, out)


def script_outputs(devices: int, out: Path) -> tuple[list[dict], list[list[float]]]:
    params = [torch.load(out / f"params.rank{r}.pt") for r in range(devices)]
    norms = [json.loads((out / f"norms.rank{r}.json").read_text()) for r in range(devices)]
    return params, norms


#: on tests that share :func:`shared_run` runs: under ``-n N --dist loadgroup`` each xdist worker has its own
#: session, so only tests on one worker can share a run
SHARED_RUNS = pytest.mark.xdist_group("tar_ddp_equivalence_runs")


@pytest.fixture(scope="session")
def shared_run(tmp_path_factory):
    """``shared_run(devices, outer, *extra) -> (params, norms, out)``: :func:`run_script` with exactly these
    arguments, launched once per pytest session (worker) and argument list, for the reference runs several tests
    would otherwise repeat identically; every call re-reads the outputs from ``out`` (fresh tensors). Tests only
    read ``out``; a failed launch is not remembered (the next test asking for it launches it again)."""
    done: dict[tuple, Path] = {}

    def run(devices: int, outer: str, *extra: str) -> tuple[list[dict], list[list[float]], Path]:
        key = (devices, outer, *extra)
        if key not in done:
            out = tmp_path_factory.mktemp(f"shared_{devices}p_{outer}")
            run_script(devices, out, outer, *extra)
            done[key] = out
        params, norms = script_outputs(devices, done[key])
        return params, norms, done[key]

    return run


# -- Slurm: tests marked `slurm` need a reachable Slurm (bash .ci/slurm.sh up; .ci/run starts one) -------------
_CI_SLURM_CONF = os.path.join(os.environ.get("TAR_SLURM_DIR", os.path.join(os.environ.get("TMPDIR", "/tmp"),
                                                                          "tar_lightning_slurm")), "slurm.conf")


def slurm_problem() -> str | None:
    """Why no Slurm is reachable (None when ``sinfo`` answers). Uses .ci/slurm.sh's config when SLURM_CONF is unset."""
    import shutil
    import subprocess

    if "SLURM_CONF" not in os.environ and os.path.isfile(_CI_SLURM_CONF):
        os.environ["SLURM_CONF"] = _CI_SLURM_CONF
    if shutil.which("sinfo") is None:
        return "sinfo not found"
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not os.path.isfile(conf):  # sinfo would spend ~30 s on DNS lookups before failing
        return f"no Slurm config at {conf}"
    try:
        proc = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "sinfo did not answer within 30 s"
    if proc.returncode != 0:
        return f"sinfo failed: {proc.stderr.strip()[:200]}"
    if not proc.stdout.strip():
        return "sinfo lists no node"
    return None


# -- shared data: tests marked `shared_data` read ../shared/data (WMDP, MMLU, refusal sets ...) beside the repo ------
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
_DATA_SKIP_REASON = "needs ../shared/data"


def pytest_configure(config):
    config.pluginmanager.register(_SlurmTestsOnOneWorker(), "tar_lightning_slurm_group")
    config.addinivalue_line(
        "markers",
        "shared_data(*paths): reads these paths under ../shared/data (default: the folder); skipped with the reason "
        "when absent, an error when TAR_LIGHTNING_REQUIRE_DATA=1 (.ci/run sets it)",
    )


class _SlurmTestsOnOneWorker:
    """Under ``-n N --dist loadgroup`` (the README's command) the real-Slurm tests run one after another on one
    worker: the CI Slurm has one 2-CPU node, and their waits have deadlines."""

    @pytest.hookimpl(tryfirst=True)  # before xdist's own hook turns group markers into node ids
    def pytest_collection_modifyitems(self, config, items):
        for item in items:
            if item.get_closest_marker("slurm"):
                item.add_marker(pytest.mark.xdist_group("slurm"))


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: `pytest -m "not slow"` never asks for Slurm
def pytest_collection_modifyitems(config, items):
    _skip_without_shared_data(config, items)
    _deselect_without_slurm(config, items)


def _skip_without_shared_data(config, items):
    """Skips (with the missing path as the reason) or, under TAR_LIGHTNING_REQUIRE_DATA=1, refuses the run."""
    missing_by_item = {}
    for item in items:
        marker = item.get_closest_marker("shared_data")
        if marker is None:
            continue
        missing = [SHARED_DATA / p for p in (marker.args or ("",)) if not (SHARED_DATA / p).exists()]
        if missing:
            missing_by_item[item] = missing[0]
    if not missing_by_item:
        return
    if os.environ.get("TAR_LIGHTNING_REQUIRE_DATA") == "1":
        if hasattr(config, "workerinput"):  # an xdist worker cannot stop the run cleanly: each such test fails
            for item, path in missing_by_item.items():
                item.tar_missing_data = path
            return
        first = sorted({str(p) for p in missing_by_item.values()})
        raise pytest.UsageError(
            f"TAR_LIGHTNING_REQUIRE_DATA=1 but {len(missing_by_item)} selected test(s) need data that is not there: "
            f"{first[:3]}{' ...' if len(first) > 3 else ''}; put the data set at {SHARED_DATA}")
    for item, path in missing_by_item.items():
        item.add_marker(pytest.mark.skip(
            reason=f"{_DATA_SKIP_REASON} ({path} not found): data-free run, this test did not run"))


def pytest_sessionstart(session):
    # The xdist controller collects nothing, so it checks the data folder as a whole before starting workers.
    config = session.config
    if (os.environ.get("TAR_LIGHTNING_REQUIRE_DATA") == "1" and config.pluginmanager.hasplugin("dsession")
            and not SHARED_DATA.is_dir()):
        raise pytest.UsageError(f"TAR_LIGHTNING_REQUIRE_DATA=1 but the data folder {SHARED_DATA} does not exist; "
                                "put the data set there")


def pytest_runtest_setup(item):
    path = getattr(item, "tar_missing_data", None)
    if path is not None:
        pytest.fail(f"TAR_LIGHTNING_REQUIRE_DATA=1 but this test needs data that is not there: {path}", pytrace=False)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    # counted from the test reports, not from collection: under xdist the collection runs in the workers
    skipped = sum(1 for report in terminalreporter.stats.get("skipped", [])
                  if isinstance(report.longrepr, tuple) and _DATA_SKIP_REASON in str(report.longrepr[-1]))
    if skipped:
        terminalreporter.write_line(
            f"DATA-FREE SUBSET: {skipped} test(s) skipped because ../shared/data is missing at {SHARED_DATA} "
            "(pytest -ra lists them); these results do not cover the tests that read it",
            yellow=True, bold=True)


def _deselect_without_slurm(config, items):
    slurm_items = [item for item in items if item.get_closest_marker("slurm")]
    if not slurm_items:
        return
    problem = slurm_problem()
    if problem is None:
        return
    if os.environ.get("TAR_LIGHTNING_REQUIRE_SLURM") == "1":
        raise pytest.UsageError(f"TAR_LIGHTNING_REQUIRE_SLURM=1 but no Slurm is reachable ({problem}); "
                                "start one with: bash .ci/slurm.sh up")
    items[:] = [item for item in items if not item.get_closest_marker("slurm")]
    config.hook.pytest_deselected(items=slurm_items)
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    line = (f"deselected {len(slurm_items)} slurm test(s): no Slurm reachable ({problem}); "
            "start one with: bash .ci/slurm.sh up")
    if reporter is not None:
        reporter.write_line(line)
    else:
        print(line)

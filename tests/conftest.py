import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

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


@pytest.hookimpl(trylast=True)  # after `-m` has deselected: `pytest -m "not slow"` never asks for Slurm
def pytest_collection_modifyitems(config, items):
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

"""Sharded (FSDP2) checkpoints that are safe: rotation removes folders, a save killed mid-way leaves a complete
checkpoint, nothing in a checkpoint runs code, and what we write honours the umask.

The multi-process runs are subprocesses of tests/dist_scripts/checkpoint_safety.py (2 gloo processes on CPU).
"""

import json
import os
import shlex
import shutil
import signal
import stat
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from conftest import launch_env

from tar_lightning.checkpoint import (
    AtomicCheckpointIO,
    CheckpointWriteError,
    atomic_save,
    load_sharded_state,
    read_dcp_metadata,
)
from tar_lightning.errors import ModelLoadError
from tar_lightning.export import export_checkpoint

SCRIPT = Path(__file__).parent / "dist_scripts" / "checkpoint_safety.py"


class _WritesMarker:
    """Unpickling this runs a shell command that creates ``marker`` (what a crafted checkpoint could do)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {shlex.quote(str(self.marker))}",))


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _dcp_save(state: dict, folder: Path) -> None:
    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.simplefilter("ignore", UserWarning)
        dcp.save(state, checkpoint_id=str(folder))


def _real_state() -> dict:
    """A model in bf16 and fp32 with an AdamW state (tensor ``step``s, hyperparameters) and other plain values."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2).to(torch.bfloat16))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x = torch.ones(2, 4)
    model[1](model[0](x).to(torch.bfloat16)).float().sum().backward()
    opt.step()
    return {"state_dict": model.state_dict(), "optimizer_0": opt.state_dict(),
            "extra": {"ints": torch.arange(5), "half": torch.ones(2, dtype=torch.float16), "text": "x", "n": 3}}


# ------------------------------------------------------------------------------------------------ rotation
def test_remove_checkpoint_removes_a_sharded_folder_and_nothing_else(tmp_path):
    """``ModelCheckpoint(save_top_k=1)`` rotation under FSDP2 removes a checkpoint *folder* (os.remove raised
    IsADirectoryError); a folder that is not a checkpoint is refused and kept; a missing path is fine."""
    io = AtomicCheckpointIO()
    sharded = tmp_path / "epoch=0-step=50.ckpt"
    sharded.mkdir()
    for name in (".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp", "rank_local.0.pt"):
        (sharded / name).write_bytes(b"x")
    io.remove_checkpoint(sharded)
    assert not sharded.exists()
    io.remove_checkpoint(sharded)  # already gone

    single = tmp_path / "last.ckpt"
    atomic_save({"a": torch.ones(1)}, single)
    io.remove_checkpoint(single)
    assert not single.exists()

    foreign = tmp_path / "notes.ckpt"
    foreign.mkdir()
    (foreign / "README.md").write_text("mine")
    with pytest.raises(CheckpointWriteError, match="not a sharded checkpoint"):
        io.remove_checkpoint(foreign)
    assert (foreign / "README.md").read_text() == "mine"


# ------------------------------------------------------------------ FSDP2Strategy saves (one process, no group)
def _sharded_checkpoint(value: float) -> dict:
    return {"state_dict": {"w": torch.full((4,), value)}, "optimizer_states": [], "global_step": 1}


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process, no group: intended
def test_sharded_save_replaces_the_folder_whole_and_refuses_nan(tmp_path):
    """Without a process group the strategy's save is the one-rank case of the same protocol: the new folder is
    written aside and swapped in; a NaN refuses the save before anything is written, the old checkpoint intact."""
    from tar_lightning.checkpoint import NonFiniteError
    from tar_lightning.strategy import FSDP2Strategy

    strategy = FSDP2Strategy()
    path = tmp_path / "last.ckpt"
    strategy.save_checkpoint(_sharded_checkpoint(1.0), path)
    strategy.save_checkpoint(_sharded_checkpoint(2.0), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(load_sharded_state(path)["state_dict"]["w"], torch.full((4,), 2.0))
    with pytest.raises(NonFiniteError, match="NaN/Inf"):
        strategy.save_checkpoint(_sharded_checkpoint(float("nan")), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(load_sharded_state(path)["state_dict"]["w"], torch.full((4,), 2.0))


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")  # one process, no group: intended
@pytest.mark.parametrize("window", ["between_renames", "after_swap", "during_write"])
def test_recovery_after_a_kill_keeps_one_complete_checkpoint(tmp_path, window):
    """The states a kill can leave (partial new folder; old set aside and nothing in place; both old and new)
    resolve to one complete checkpoint, also when ``--ckpt_path last`` found the set-aside name."""
    from tar_lightning.strategy import (
        FSDP2Strategy,
        partial_checkpoint_path,
        previous_checkpoint_path,
        recover_interrupted_save,
    )

    strategy = FSDP2Strategy()
    path = tmp_path / "last.ckpt"
    strategy.save_checkpoint(_sharded_checkpoint(1.0), path)
    if window == "between_renames":
        os.replace(path, previous_checkpoint_path(path))
        expected, asked = 1.0, previous_checkpoint_path(path)  # what `last` resolution finds
    elif window == "after_swap":
        shutil.copytree(path, previous_checkpoint_path(path))
        strategy.save_checkpoint(_sharded_checkpoint(2.0), tmp_path / "new.ckpt")
        shutil.rmtree(path)
        os.replace(tmp_path / "new.ckpt", path)
        expected, asked = 2.0, previous_checkpoint_path(path)  # even if named: the swapped-in one is newer
    else:
        partial = partial_checkpoint_path(path)
        partial.mkdir()
        (partial / "__0_0.distcp").write_bytes(b"half")
        expected, asked = 1.0, path
    assert recover_interrupted_save(asked) == path
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]
    assert torch.equal(load_sharded_state(path)["state_dict"]["w"], torch.full((4,), expected))


# --------------------------------------------------------------------------------- safe reading of DCP folders
def test_real_dcp_checkpoint_reads_with_the_restricted_unpickler(tmp_path):
    """What torch writes (bf16/fp16/fp32/int64 tensors, an AdamW state, plain values) passes the allow-list and
    reads back equal."""
    state = _real_state()
    _dcp_save(state, tmp_path / "ckpt")
    metadata = read_dcp_metadata(tmp_path / "ckpt")
    assert "state_dict.1.weight" in metadata.state_dict_metadata
    loaded = load_sharded_state(tmp_path / "ckpt")
    for k, v in state["state_dict"].items():
        assert torch.equal(loaded["state_dict"][k], v) and loaded["state_dict"][k].dtype == v.dtype, k
    assert loaded["optimizer_0"]["param_groups"] == state["optimizer_0"]["param_groups"]
    loaded_state = {str(i): s for i, s in loaded["optimizer_0"]["state"].items()}  # DCP keys them by str
    for i, s in state["optimizer_0"]["state"].items():
        for k, v in s.items():
            assert torch.equal(loaded_state[str(i)][k], v), (i, k)
    assert loaded["extra"]["text"] == "x" and loaded["extra"]["n"] == 3
    assert torch.equal(loaded["extra"]["ints"], torch.arange(5))


def _crafted_metadata_checkpoint(folder: Path, marker: Path) -> Path:
    """A sharded checkpoint folder (meta.pt, shards) whose ``.metadata`` pickle runs a command."""
    _dcp_save(_real_state(), folder)
    torch.save({"tar_lightning": {"hf_config": {}}}, folder / "meta.pt")
    import pickle

    (folder / ".metadata").write_bytes(pickle.dumps(_WritesMarker(marker)))
    return folder


def test_export_refuses_a_metadata_pickle_that_runs_code(tmp_path):
    marker = tmp_path / "pwned"
    ckpt = _crafted_metadata_checkpoint(tmp_path / "last.ckpt", marker)
    with pytest.raises(ModelLoadError, match=r"\.metadata.*refers to posix\.system.*refusing to unpickle"):
        export_checkpoint(ckpt, tmp_path / "hf")
    assert not marker.exists()
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("target", ["absolute", "parent"])
def test_a_storage_path_outside_the_folder_is_refused(tmp_path, target):
    """DCP opens ``folder / relative_path`` for every storage record: a crafted ``.metadata`` naming an absolute path
    or a ``..`` would read any host file into a tensor (and an export would write it into model.safetensors)."""
    import pickle

    folder = tmp_path / "last.ckpt"
    _dcp_save(_real_state(), folder)
    secret = tmp_path / "secret.distcp"
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # our own file, to craft the attack
    first = next(iter(metadata.storage_data.values()))
    secret.write_bytes((folder / first.relative_path).read_bytes())  # a readable "host file"
    for info in metadata.storage_data.values():
        info.relative_path = str(secret) if target == "absolute" else "../secret.distcp"
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    with pytest.raises(ModelLoadError, match=r"points outside its folder"):
        load_sharded_state(folder)


def test_export_refuses_a_non_tensor_item_that_runs_code(tmp_path):
    """DCP stores non-tensor values (optimizer hyperparameters) as pickles inside the shard files, which torch's
    default planner loads with weights_only=False."""
    marker = tmp_path / "pwned"
    state = _real_state()
    state["optimizer_0"]["param_groups"][0]["lr"] = _WritesMarker(marker)
    folder = tmp_path / "last.ckpt"
    _dcp_save(state, folder)
    torch.save({"tar_lightning": {"hf_config": {}}}, folder / "meta.pt")
    with pytest.raises(ModelLoadError, match=r"optimizer_0\.param_groups.*weights_only"):
        export_checkpoint(folder, tmp_path / "hf")
    assert not marker.exists()


# ------------------------------------------------------------------------------------------------- permissions
@pytest.mark.parametrize("umask,file_mode,dir_mode", [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700)])
def test_written_files_and_folders_honour_the_umask(tmp_path, umask, file_mode, dir_mode):
    """Checkpoints, exports and red-team result files get the umask's modes, not mkstemp/mkdtemp's 0600/0700."""
    from tar_lightning.evaluation.redteam.io import write_text as _atomic_write
    from tar_lightning.models import export_pretrained, tiny_llama

    previous = os.umask(umask)
    try:
        AtomicCheckpointIO().save_checkpoint({"state_dict": {"w": torch.ones(2)}}, tmp_path / "last.ckpt")
        model, tok = tiny_llama()
        out = export_pretrained(model, tok, tmp_path / "hf")
        _atomic_write(tmp_path / "redteam" / "result.json", "{}")
    finally:
        os.umask(previous)
    assert _mode(tmp_path / "last.ckpt") == file_mode
    assert _mode(Path(out)) == dir_mode
    files = [p for p in Path(out).iterdir()]
    assert files and all(_mode(p) == file_mode for p in files), {p.name: oct(_mode(p)) for p in files}
    assert _mode(tmp_path / "redteam" / "result.json") == file_mode


# ------------------------------------------------------------------------------- 2-process FSDP2 runs (slow)

def _run(out: Path, *extra: str, devices: int = 2, umask: int = 0o022, expect_ok: bool = True):
    env = launch_env()
    cmd = [sys.executable, str(SCRIPT), "--devices", str(devices), "--steps", "4", "--out", str(out), *extra]
    # own session, output to a file: once rank 0 has exited (a run killed on purpose), a rank left behind is
    # killed instead of being waited for
    log = out.with_name(out.name + f".{len(list(out.parent.glob(out.name + '.*.log')))}.log")
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, env=env, cwd=SCRIPT.parent, stdout=fh, stderr=subprocess.STDOUT, umask=umask,
                                start_new_session=True)
        try:
            proc.wait(timeout=900)
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    output = log.read_text()
    if expect_ok:
        assert proc.returncode == 0, output[-4000:]
    return proc.returncode, output


def _params(out: Path, rank: int = 0) -> dict:
    return torch.load(out / f"params.rank{rank}.pt")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4 outer steps, FSDP2Strategy, a sharded checkpoint every step (rotation: keep 1) plus last.ckpt."""
    out = tmp_path_factory.mktemp("uninterrupted")
    _run(out)
    return out


@pytest.mark.slow
def test_periodic_sharded_checkpoints_rotate_and_honour_the_umask(uninterrupted):
    """Rotation removed the step-1..3 folders (it crashed at the second rotation), the folders and files are
    0755/0644 under umask 022, and each rank's state came back from rank_local.<rank>.pt."""
    ckpts = uninterrupted / "ckpts"
    assert sorted(p.name for p in ckpts.iterdir()) == ["epoch=0-step=4.ckpt", "last.ckpt"]
    last = ckpts / "last.ckpt"
    assert {p.name for p in last.iterdir()} == {".metadata", "meta.pt", "__0_0.distcp", "__1_0.distcp",
                                                 "rank_local.0.pt", "rank_local.1.pt"}
    assert _mode(ckpts) == 0o755 and _mode(last) == 0o755
    assert all(_mode(p) == 0o644 for p in last.iterdir()), {p.name: oct(_mode(p)) for p in last.iterdir()}
    rank_local = torch.load(last / "rank_local.1.pt", weights_only=True)
    assert rank_local["value"].item() == 104


@pytest.mark.slow
@pytest.mark.parametrize("kill,resume", [("shards", "path"), ("swap", "last")])
def test_sigkill_inside_a_sharded_save_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted, kill, resume):
    """SIGKILL inside the save of last.ckpt at step 2 (the 4th shard write of rank 1, or rank 0 between the two
    renames of the swap); the resumed run (explicit path, or ``last``) starts from step 1's complete checkpoint and
    ends bit-identical to the uninterrupted run (max |Δθ| = 0). Lightning's in-place save, killed the same way,
    resumed from a half-written folder: max |Δθ| 3.8e-3."""
    out = tmp_path / "run"
    rc, output = _run(out, "--kill", kill, "--kill-at", "4", umask=0o077, expect_ok=False)
    assert rc != 0, output[-3000:]
    ckpts = out / "ckpts"
    if kill == "swap":  # killed between the renames: the previous checkpoint is set aside, complete
        assert not (ckpts / "last.ckpt").exists() and (ckpts / "last.tar-previous.ckpt").is_dir()
    else:  # killed while writing: the new one is partial and aside, the old one in place
        assert (ckpts / ".last.ckpt.tar-partial").is_dir() and (ckpts / "last.ckpt").is_dir()
    ckpt_path = str(ckpts / "last.ckpt") if resume == "path" else "last"
    _run(out, "--resume", ckpt_path, umask=0o077)
    assert not (ckpts / ".last.ckpt.tar-partial").exists() and not (ckpts / "last.tar-previous.ckpt").exists()
    expected = _params(uninterrupted)
    for rank in (0, 1):
        got = _params(out, rank)
        for k in expected:
            assert torch.equal(got[k], expected[k]), (rank, k)
        # the rank-local state of step 1 (rank*100 + 1) was handed back to each rank
        assert json.loads((out / f"rank_local.rank{rank}.json").read_text()) == rank * 100 + 1
    assert _mode(ckpts / "last.ckpt") == 0o700
    assert all(_mode(p) == 0o600 for p in (ckpts / "last.ckpt").iterdir())


@pytest.mark.slow
def test_resume_refuses_a_metadata_pickle_that_runs_code(tmp_path, uninterrupted):
    marker = tmp_path / "pwned"
    ckpt = tmp_path / "last.ckpt"
    shutil.copytree(uninterrupted / "ckpts" / "last.ckpt", ckpt)
    import pickle

    (ckpt / ".metadata").write_bytes(pickle.dumps(_WritesMarker(marker)))
    rc, output = _run(tmp_path / "run", "--resume", str(ckpt), devices=1, expect_ok=False)
    assert rc != 0
    assert "ModelLoadError" in output and "refers to posix.system" in output, output[-3000:]
    assert not marker.exists()


@pytest.mark.slow
def test_export_of_a_periodic_sharded_checkpoint_is_the_trained_model(tmp_path, uninterrupted):
    """Export (one process, no process group) reads the FSDP2Strategy checkpoint with the safe reader; the HF
    folder holds the gathered final weights and is 0755/0644 under umask 022."""
    from safetensors.torch import load_file

    from tar_lightning.cli import main

    out = tmp_path / "hf"
    previous = os.umask(0o022)
    try:
        assert main(["export", "--ckpt", str(uninterrupted / "ckpts" / "last.ckpt"), "--out", str(out)]) == 0
    finally:
        os.umask(previous)
    expected = _params(uninterrupted)
    exported = load_file(out / "model.safetensors")
    for k, v in exported.items():
        assert torch.equal(v, expected[k]), k
    assert _mode(out) == 0o755 and all(_mode(p) == 0o644 for p in out.iterdir())


def test_optimizer_mode_switches_leave_no_empty_state_for_dcp():
    """schedule-free train()/eval() read ``optimizer.state[p]`` (a defaultdict) and leave an empty entry per
    parameter; torch.distributed.checkpoint then takes the optimizer for initialised and its template for a resume
    holds no per-parameter state, so none of the checkpoint's moments are loaded (found by the rehearsal test)."""
    import schedulefree
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from tar_lightning.base_module import _drop_empty_state

    lin = torch.nn.Linear(3, 2)
    opt = schedulefree.AdamWScheduleFree(lin.parameters(), lr=1e-3)
    opt.train()
    assert len(opt.state) == 2 and not any(opt.state.values())  # what the library leaves behind
    assert not any(get_optimizer_state_dict(lin, opt)["state"].values())  # ... and what DCP then makes of it
    _drop_empty_state(opt)
    assert len(opt.state) == 0
    template = get_optimizer_state_dict(lin, opt)["state"]
    assert sorted(template) == ["bias", "weight"] and sorted(template["weight"]) == ["exp_avg_sq", "z"]

"""SlurmRequeue: a checkpoint at the next outer-step boundary on SIGUSR1, and our sbatch template on a real Slurm.

In-process tests (always run): a real SIGUSR1 sent from inside the adversary's inner loop; the checkpoint must
hold the weights an uninterrupted run has at that global step (restored, not attacked), and resuming from it must
end bit-identical to the uninterrupted run.

Tests marked ``slurm`` submit recipes/launch/slurm_1node_8gpu.sbatch, scaled to 1 node x 2 CPU tasks (DDP on
gloo), to the one-node Slurm of ``.ci/slurm.sh up`` (tests/conftest.py deselects them when no Slurm answers).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Callback

from tar_lightning import AdversaryConfig, DataSource, TARConfig, TARDataModule, TARModule
from tar_lightning.callbacks import SlurmRequeue
from tar_lightning.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "recipes" / "launch" / "slurm_1node_8gpu.sbatch"


# ------------------------------------------------------------------------------------------- in process
def _module() -> TARModule:
    cfg = TARConfig(
        inner_steps=3, tr_every=1, trajectories=1, seed=3, clip_grad_norm=1.0,
        adversaries=[AdversaryConfig(name="adamw", data="forget", optimizer="adamw", lr=[1e-3, 3e-3])],
    )
    torch.manual_seed(0)
    return TARModule("tiny-llama", cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))


def _data() -> TARDataModule:
    forget = {"path": "synthetic:forget", "synthetic": {"n": 64, "seed": 1}}
    return TARDataModule(
        streams={"retain": DataSource("synthetic:retain", synthetic={"n": 64}),
                 "forget": DataSource(**forget, select="0:80%"), "tr": DataSource(**forget, select="80%:")},
        seq_len=32, batch_size=2, seed=0,
    )


def _trainer(root: Path, max_steps: int, callbacks: list) -> L.Trainer:
    return L.Trainer(accelerator="cpu", devices=1, max_steps=max_steps, logger=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=root, callbacks=callbacks)


def _weights(module: TARModule) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.model.state_dict().items()}


def _ckpt_weights(path: Path) -> dict[str, torch.Tensor]:
    state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
    return {k[len("model."):]: v for k, v in state.items() if k.startswith("model.")}


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


class RecordWeights(Callback):
    """The policy's weights after every outer step (global_step -> state)."""

    def __init__(self):
        self.by_step = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.by_step[trainer.global_step] = _weights(pl_module)


class SignalMidInnerLoop(Callback):
    """Sends a real SIGUSR1 to this process from inside forward call ``at_forward`` of the policy (counted from
    the start of fit), i.e. while the adversary's attacked weights are live, and records those weights."""

    def __init__(self, at_forward: int):
        self.at_forward, self.calls, self.attacked = at_forward, 0, None

    def on_fit_start(self, trainer, pl_module):
        def hook(module, args, kwargs, output):
            self.calls += 1
            if self.calls == self.at_forward:
                self.attacked = _weights(pl_module)
                os.kill(os.getpid(), signal.SIGUSR1)

        pl_module.model.register_forward_hook(hook, with_kwargs=True)


def test_sigusr1_mid_inner_loop_saves_restored_weights_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    for var in ("SLURM_JOB_ID", "SLURM_ARRAY_JOB_ID", "SLURM_NTASKS", "SLURM_JOB_NAME"):
        monkeypatch.delenv(var, raising=False)
    steps = 4
    # uninterrupted reference
    ref = RecordWeights()
    _trainer(tmp_path / "ref", steps, [ref]).fit(_module(), _data())
    assert sorted(ref.by_step) == [1, 2, 3, 4]

    # Per outer step: 3 adversary forwards + 3 TR forwards + 1 retain forward = 7. Forward 11 is the second
    # adversary step of outer step 2 (global_step 1 -> 2): the weights are attacked at that moment.
    requeue = SlurmRequeue(dirpath=str(tmp_path / "ckpt"))
    sig = SignalMidInnerLoop(at_forward=11)
    previous = signal.getsignal(signal.SIGUSR1)
    trainer = _trainer(tmp_path / "run", steps, [sig, requeue])
    trainer.fit(_module(), _data())
    assert signal.getsignal(signal.SIGUSR1) is previous  # handler restored at teardown
    assert sig.attacked is not None
    assert trainer.global_step == 2 and requeue.saved_step == 2  # stopped at the end of that outer step
    saved = Path(requeue.saved_path)
    assert saved == tmp_path / "ckpt" / "last.ckpt" and saved.is_file()
    weights = _ckpt_weights(saved)
    assert _equal(weights, ref.by_step[2])  # the uninterrupted run's weights at global_step 2 ...
    assert not _equal(weights, sig.attacked)  # ... not the attacked ones live when the signal arrived
    assert not _equal(ref.by_step[1], sig.attacked)

    # resume (what the requeued job does with --ckpt_path last): ends bit-identical to the uninterrupted run
    resumed = RecordWeights()
    module = _module()
    _trainer(tmp_path / "run", steps, [resumed]).fit(module, _data(), ckpt_path=str(saved))
    assert sorted(resumed.by_step) == [3, 4]
    assert _equal(resumed.by_step[3], ref.by_step[3])
    assert _equal(_weights(module), ref.by_step[4])


def test_lightning_auto_requeue_is_refused(tmp_path, monkeypatch):
    from lightning.pytorch.plugins.environments import SLURMEnvironment

    for key, value in {"SLURM_NTASKS": "1", "SLURM_NTASKS_PER_NODE": "1", "SLURM_JOB_NAME": "tar",
                       "SLURM_PROCID": "0", "SLURM_LOCALID": "0", "SLURM_NODEID": "0", "SLURM_JOB_ID": "7",
                       "SLURM_NODELIST": "localhost"}.items():
        monkeypatch.setenv(key, value)
    trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path,
                        plugins=[SLURMEnvironment(auto_requeue=True)], callbacks=[SlurmRequeue()])
    with pytest.raises(ConfigError, match=r"auto-requeue enabled.*auto_requeue=false"):
        trainer.fit(_module(), _data())


def test_unknown_signal_is_a_clear_error():
    with pytest.raises(ConfigError, match="SIGFOO"):
        SlurmRequeue(signum="SIGFOO")
    assert SlurmRequeue(signum=10).signum == signal.SIGUSR1


def test_sbatch_templates_match_the_overlays():
    for name, nodes, overlay in (("slurm_1node_8gpu.sbatch", 1, "fsdp2_8gpu.yaml"),
                                 ("slurm_2node_8gpu.sbatch", 2, "fsdp2_2node.yaml")):
        text = (REPO / "recipes" / "launch" / name).read_text()
        directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
        assert directives["nodes"] == str(nodes) and directives["ntasks-per-node"] == "8", name
        assert directives["gpus-per-node"] == "8" and directives["signal"] == "SIGUSR1@120", name
        assert "requeue" in directives and directives["open-mode"] == "append", name
        assert f"recipes/launch/{overlay}" in text and "callbacks/slurm_requeue.yaml" in text, name
        assert re.search(r"^srun .*fit .*--ckpt_path last$", text, flags=re.M), name
        import yaml

        trainer = yaml.safe_load((REPO / "recipes" / "launch" / overlay).read_text())["trainer"]
        assert trainer["devices"] == 8 and trainer["num_nodes"] == nodes, overlay
        assert trainer["strategy"]["init_args"]["data_parallel_size"] == 8 * nodes, overlay


# ------------------------------------------------------------------------------------------- real Slurm
MAX_STEPS = 8


def _scontrol_job(job: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    """One job of the tiny TAR recipe through our sbatch template (1 node x 2 CPU tasks, DDP on gloo), sent
    SIGUSR1 once step 2 is checkpointed; it requeues itself and the requeued run resumes and finishes."""
    tmp = tmp_path_factory.mktemp("slurm")
    ckpt_dir = tmp / "checkpoints"
    overlay = tmp / "ci_overlay.yaml"
    overlay.write_text(f"""
trainer:
  devices: 2
  strategy: ddp
  max_steps: {MAX_STEPS}
  default_root_dir: {tmp}/run
  logger: false
  enable_progress_bar: false
  callbacks:
    - class_path: lightning.pytorch.callbacks.ModelCheckpoint
      init_args:
        dirpath: {ckpt_dir}
        filename: "{{step}}"
        save_last: true
        save_top_k: -1
        every_n_train_steps: 1
""")
    name = f"tar-ci-{os.getpid()}"
    env = dict(os.environ, TAR_LIGHTNING=f"{sys.executable} -m tar_lightning.cli",
               TAR_CONFIGS=f"recipes/tiny/tar.yaml {overlay}", HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))
    for key in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS", "LOCAL_RANK", "RANK", "WORLD_SIZE", "MASTER_PORT"):
        env.pop(key, None)
    log = tmp / "job.out"
    start = time.monotonic()
    proc = subprocess.Popen(
        ["sbatch", "--wait", f"--job-name={name}", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
         "--cpus-per-task=1", "--time=30", f"--output={log}", f"--chdir={REPO}", str(TEMPLATE)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )

    def job_log() -> str:
        return log.read_text() if log.exists() else "(no job output)"

    def alive_or_fail(what: str) -> None:
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"sbatch ended (rc {proc.returncode}) while waiting for {what}:\n{out}{err}\n{job_log()[-4000:]}")

    job = ""
    while not job:
        alive_or_fail("the job id")
        job = subprocess.run(["squeue", "-h", "-n", name, "-o", "%i"], capture_output=True, text=True).stdout.strip()
        time.sleep(0.2)
    while not (ckpt_dir / "step=2.ckpt").exists():
        alive_or_fail("step=2.ckpt")
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR1", job], check=True)
    # SlurmRequeue saves last.ckpt at the next outer-step boundary and requeues: the job goes back to PENDING
    while True:
        alive_or_fail("the requeue")
        info = _scontrol_job(job)
        if info.get("JobState") == "PENDING" and info.get("Restarts") == "1":
            break
        time.sleep(0.2)
    requeue_ckpt = tmp / "requeue.ckpt"
    shutil.copyfile(ckpt_dir / "last.ckpt", requeue_ckpt)  # before the requeued run overwrites it
    first_run_files = sorted(p.name for p in ckpt_dir.iterdir())
    # Slurm holds a requeued batch job ~2 min before it may start again; release it now
    subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True)
    out, err = proc.communicate()
    return {"rc": proc.returncode, "out": out + err, "log": job_log(), "ckpt_dir": ckpt_dir,
            "requeue_ckpt": requeue_ckpt, "first_run_files": first_run_files, "job": job,
            "seconds": time.monotonic() - start}


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_template_runs_the_tiny_recipe_to_completion(slurm_run):
    assert slurm_run["rc"] == 0, slurm_run["out"] + slurm_run["log"][-4000:]
    ckpt_dir = slurm_run["ckpt_dir"]
    assert (ckpt_dir / f"step={MAX_STEPS}.ckpt").is_file()
    last = torch.load(ckpt_dir / "last.ckpt", map_location="cpu", weights_only=True)
    assert last["global_step"] == MAX_STEPS
    assert _equal(_ckpt_weights(ckpt_dir / "last.ckpt"), _ckpt_weights(ckpt_dir / f"step={MAX_STEPS}.ckpt"))
    print(f"slurm job {slurm_run['job']}: submit -> signal -> requeue -> finish in {slurm_run['seconds']:.0f} s")


@pytest.mark.slurm
@pytest.mark.slow
def test_sigusr1_requeues_with_restored_weights_and_the_job_resumes(slurm_run):
    log = slurm_run["log"]
    assert slurm_run["rc"] == 0, slurm_run["out"] + log[-4000:]
    saved = re.findall(r"SlurmRequeue: SIGUSR1 received; saved (\S+) at global_step (\d+)", log)
    assert len(saved) == 1, log[-4000:]
    path, step = saved[0][0], int(saved[0][1])
    assert Path(path) == slurm_run["ckpt_dir"] / "last.ckpt"
    assert 2 <= step < MAX_STEPS
    assert f"requeued Slurm job {slurm_run['job']}" in log
    # the checkpoint holds the weights at the end of outer step `step`: those ModelCheckpoint wrote at that
    # batch end (weights restored), which the attacked weights of the next step's inner loop are not
    requeue = torch.load(slurm_run["requeue_ckpt"], map_location="cpu", weights_only=True)
    assert requeue["global_step"] == step
    assert f"step={step + 1}.ckpt" not in slurm_run["first_run_files"]
    assert _equal(_ckpt_weights(slurm_run["requeue_ckpt"]), _ckpt_weights(slurm_run["ckpt_dir"] / f"step={step}.ckpt"))
    # the same job ran again (restart 1) and resumed from that checkpoint
    assert re.search(rf"job {slurm_run['job']} restart 1 ", log), log[-4000:]
    assert f"Restoring states from the checkpoint path at {path}" in log
    assert "`Trainer.fit` stopped: `max_steps=8` reached." in log

"""SlurmRequeue: a checkpoint at the next outer-step boundary on SIGUSR1, and our sbatch template on a real Slurm.

In-process tests (always run): a real SIGUSR1 sent from inside the adversary's inner loop; the checkpoint must
hold the weights an uninterrupted run has at that global step (restored, not attacked), and resuming from it must
end bit-identical to the uninterrupted run.

The SIGUSR1 handler restarts an interrupted system call (a C-level read(2) blocked when the signal arrives
returns its data, not EINTR), and every rank of a two-process run destroys its process group before it exits
(after ``tar-lightning fit`` returns; at exit for ``Trainer.fit`` with SlurmRequeue).

Tests marked ``slurm`` submit recipes/launch/slurm_1node_8gpu.sbatch, scaled to 1 node x 2 CPU tasks (DDP on
gloo), to the one-node Slurm of ``.ci/slurm.sh up`` (tests/conftest.py deselects them when no Slurm answers), and
decide from Slurm's record of the job (``scontrol show job``: JobState, Restarts, ExitCode), with a deadline on
every wait; and start two-rank ``tar-lightning fit`` runs with srun, every task of which must exit 0.
"""

from __future__ import annotations

import json
import os
import platform
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
from conftest import launch_env
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


#: the read(2) system call number, as /proc/<pid>/task/<tid>/syscall shows it
_READ_SYSCALL = {"x86_64": 0, "aarch64": 63}


def _thread_in_read(tid: int) -> bool:
    fields = Path(f"/proc/self/task/{tid}/syscall").read_text().split()
    return bool(fields) and fields[0] == str(_READ_SYSCALL[platform.machine()])


def _signal_pending(tid: int, signum: int) -> bool:
    status = Path(f"/proc/self/task/{tid}/status").read_text()
    pending = int(re.search(r"^SigPnd:\s*([0-9a-f]+)", status, flags=re.M).group(1), 16)
    return bool(pending >> (signum - 1) & 1)


def _wait_for(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {seconds:.0f} s waiting for {what}")
        time.sleep(0.01)


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.machine() not in _READ_SYSCALL,
                    reason="reads the blocked system call from Linux's /proc")
def test_sigusr1_does_not_interrupt_a_blocking_system_call(tmp_path):
    """Slurm's warning signal arriving while a rank is blocked in a system call (a socket read of a collective, a
    checkpoint write) must restart that call, not fail it with EINTR: a C-level read(2) on a pipe, in the main
    thread, gets SIGUSR1 and must still return the bytes written after the signal was handled."""
    import ctypes
    import threading

    trainer = L.Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, default_root_dir=tmp_path)
    requeue = SlurmRequeue(requeue=False)
    previous = signal.getsignal(signal.SIGUSR1)
    requeue.setup(trainer, None, "fit")
    libc = ctypes.CDLL(None, use_errno=True)
    read_fd, write_fd = os.pipe()
    main_tid, main_ident = threading.get_native_id(), threading.get_ident()
    errors: list[BaseException] = []

    def signal_then_write() -> None:
        try:
            _wait_for(lambda: _thread_in_read(main_tid), "the main thread to block in read(2)")
            signal.pthread_kill(main_ident, signal.SIGUSR1)
            _wait_for(lambda: not _signal_pending(main_tid, signal.SIGUSR1), "SIGUSR1 to be delivered")
        except BaseException as err:  # reported by the main thread
            errors.append(err)
        finally:
            os.write(write_fd, b"restart!")

    helper = threading.Thread(target=signal_then_write)
    try:
        helper.start()
        buf = ctypes.create_string_buffer(8)
        n = libc.read(read_fd, buf, 8)
        errno = ctypes.get_errno()
        helper.join()
    finally:
        requeue.teardown(trainer, None, "fit")
        os.close(read_fd)
        os.close(write_fd)
    assert not errors, errors
    assert n == 8 and buf.raw == b"restart!", f"read(2) returned {n} (errno {errno}: {os.strerror(errno)})"
    assert requeue.flag  # the handler still ran (once the call returned)
    assert signal.getsignal(signal.SIGUSR1) is previous


#: the templates' SIGUSR1 warning margin, as docs/SCALING.md (Slurm) derives it
WARNING_MARGIN_S = 480


def test_sbatch_warning_margin_is_the_one_scaling_md_derives():
    """docs/SCALING.md's arithmetic: 1.5 x (one outer step + two sharded saves of the fp32 weights and outer
    optimizer state at the stated filesystem bandwidth + exit), rounded up to a minute, is the templates' margin."""
    text = (REPO / "docs" / "SCALING.md").read_text(encoding="utf-8")
    section = text[text.index("## Slurm"):]
    step_s = int(re.search(r"outer step: t_step = (\d+) s", section).group(1))
    state_gb = float(re.search(r"state saved: S = ([\d.]+) GB", section).group(1))
    bandwidth = float(re.search(r"bandwidth: B = ([\d.]+) GB/s", section).group(1))
    exit_s = int(re.search(r"exit: t_exit = (\d+) s", section).group(1))
    need = 1.5 * (step_s + 2 * state_gb / bandwidth + exit_s)
    assert WARNING_MARGIN_S == 60 * -(-int(need) // 60), need
    assert f"SIGUSR1@{WARNING_MARGIN_S}" in section
    # the saved state: fp32 weights (4 bytes/param) + schedule-free AdamW's two fp32 buffers (8) of Llama-3-8B
    assert abs(state_gb - 12 * 8.030261248) < 0.1


def test_sbatch_templates_match_the_overlays():
    for name, nodes, overlay in (("slurm_1node_8gpu.sbatch", 1, "fsdp2_8gpu.yaml"),
                                 ("slurm_2node_8gpu.sbatch", 2, "fsdp2_2node.yaml")):
        text = (REPO / "recipes" / "launch" / name).read_text()
        directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", text, flags=re.M))
        assert directives["nodes"] == str(nodes) and directives["ntasks-per-node"] == "8", name
        assert directives["gpus-per-node"] == "8" and directives["signal"] == f"SIGUSR1@{WARNING_MARGIN_S}", name
        # whole nodes: every rank's share of the fp32 state passes through host memory
        assert directives["mem"] == "0" and "exclusive" in directives, name
        assert "requeue" in directives and directives["open-mode"] == "append", name
        assert f"recipes/launch/{overlay}" in text and "callbacks/slurm_requeue.yaml" in text, name
        # only a requeued job resumes; a fresh submission goes through the run-folder guard
        assert 'if [ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]; then resume=(--ckpt_path last); fi' in text, name
        assert re.search(r'^srun .*fit .*"\$\{resume\[@\]\}"$', text, flags=re.M), name
        import yaml

        trainer = yaml.safe_load((REPO / "recipes" / "launch" / overlay).read_text())["trainer"]
        assert trainer["devices"] == 8 and trainer["num_nodes"] == nodes, overlay
        assert trainer["strategy"]["init_args"]["data_parallel_size"] == 8 * nodes, overlay


# ------------------------------------------------------------------------------------ process-group shutdown
#: Run as ``python SCRIPT OUT MODE`` by 2 processes (Lightning's DDP launcher re-runs it for rank 1, or srun runs
#: it twice); each rank writes OUT/<mode>_rank<r>.json saying whether its process group is still initialized.
_EXIT_SCRIPT = """
import atexit, json, os, sys

import torch
import torch.distributed as dist

out, mode = sys.argv[1], sys.argv[2]
rank = int(os.environ.get("SLURM_PROCID", os.environ.get("LOCAL_RANK", "0")))
torch.set_num_threads(1)
if mode == "cli":
    from tar_lightning.cli import main

    rc = main(["fit", "--config", "recipes/tiny/tar.yaml", "--trainer.devices", "2", "--trainer.strategy", "ddp",
               "--trainer.max_steps", "1", "--trainer.default_root_dir", os.path.join(out, f"run_{mode}"),
               "--trainer.logger", "false", "--trainer.callbacks", "null", "--trainer.enable_checkpointing", "false",
               "--trainer.enable_progress_bar", "false"])
    state = {"rc": rc, "initialized": dist.is_initialized()}
else:  # Trainer.fit with SlurmRequeue: the process group outlives fit and is destroyed when the process exits
    import lightning as L

    from tar_lightning import AdversaryConfig, DataSource, TARConfig, TARDataModule, TARModule
    from tar_lightning.callbacks import SlurmRequeue

    cfg = TARConfig(inner_steps=2, tr_every=1, adversaries=[AdversaryConfig(name="a", data="forget", lr=1e-3)])
    module = TARModule("tiny-llama", cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3))
    data = TARDataModule(streams={"retain": DataSource("synthetic:retain", synthetic={"n": 16}),
                                  "forget": DataSource("synthetic:forget", synthetic={"n": 16}),
                                  "tr": DataSource("synthetic:forget", synthetic={"n": 16, "seed": 1})},
                         seq_len=16, batch_size=2, seed=0)
    trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=1, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=os.path.join(out, f"run_{mode}"), callbacks=[SlurmRequeue(requeue=False)])
    trainer.fit(module, data)
    after_fit = dist.is_initialized()
    atexit._run_exitfuncs()  # what the interpreter runs at exit, before it tears the rest down
    state = {"rc": 0, "initialized_after_fit": after_fit, "initialized": dist.is_initialized()}
with open(os.path.join(out, f"{mode}_rank{rank}.json"), "w") as fh:
    json.dump(state, fh)
"""


def _exit_env() -> dict[str, str]:
    return launch_env(drop_slurm=True, PYTHONPATH=os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")]))


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["cli", "trainer"])
def test_every_rank_destroys_its_process_group(tmp_path, mode):
    """Two DDP ranks (gloo): after ``tar-lightning fit`` returns, and when a ``Trainer.fit`` process with
    SlurmRequeue exits, no process group is left for the interpreter's shutdown (where gloo aborts: rc 134)."""
    script = tmp_path / "exit_script.py"
    script.write_text(_EXIT_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(tmp_path), mode], cwd=REPO, env=_exit_env(),
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    states = [json.loads((tmp_path / f"{mode}_rank{rank}.json").read_text()) for rank in (0, 1)]
    for rank, state in enumerate(states):
        assert state["rc"] == 0, (rank, state)
        if mode == "trainer":
            assert state["initialized_after_fit"], (rank, state)  # fit keeps it (a later trainer.test needs it)
        assert not state["initialized"], (rank, state)


ATTEMPTS = 3


@pytest.mark.slurm
@pytest.mark.slow
def test_two_rank_srun_exits_are_all_clean(tmp_path):
    """``tar-lightning fit`` on 2 ranks started by srun, several times: every task exits 0 (without the shutdown,
    gloo aborted about one two-rank exit in three here: ``terminate called without an active exception``; three
    attempts catch that rate 70% of the time, and the single-process tests above check the shutdown itself)."""
    script = tmp_path / "exit_script.py"
    script.write_text(_EXIT_SCRIPT)
    results = []
    for attempt in range(ATTEMPTS):
        out = tmp_path / f"attempt{attempt}"
        out.mkdir()
        proc = subprocess.run(
            ["srun", "--nodes=1", "--ntasks=2", "--ntasks-per-node=2", "--cpus-per-task=1", "--kill-on-bad-exit=1",
             f"--job-name=tar-exit-{os.getpid()}", sys.executable, str(script), str(out), "cli"],
            cwd=REPO, env=_exit_env(), capture_output=True, text=True, timeout=900,
        )
        results.append(proc.returncode)
        assert proc.returncode == 0, (attempt, results, proc.stdout[-2000:] + proc.stderr[-4000:])
        for rank in (0, 1):
            state = json.loads((out / f"cli_rank{rank}.json").read_text())
            assert state == {"rc": 0, "initialized": False}, (attempt, rank, state)
    assert results == [0] * ATTEMPTS


# ------------------------------------------------------------------------------------------- real Slurm
MAX_STEPS = 8


#: job states after which a job never runs again by itself (scontrol's JobState)
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}
#: deadlines of the waits (seconds): generous for a loaded 2-core machine, finite so that a stuck job fails the test
DEADLINE_START, DEADLINE_REQUEUE, DEADLINE_FINISH = 900, 600, 900


def _scontrol_job(job: str) -> dict[str, str]:
    """``scontrol show job``'s fields (JobState, Restarts, ExitCode, ...). The job stays listed MinJobAge (600 s,
    .ci/slurm.sh) after it ends; Slurm accounting is off there, so ``sacct`` cannot be asked."""
    proc = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        raise AssertionError(f"scontrol show job {job} failed ({proc.returncode}): {proc.stderr.strip()}")
    return dict(re.findall(r"(\w+)=(\S*)", proc.stdout))


def _daemon_log_lines(job: str) -> str:
    """The lines of slurmctld's and slurmd's logs about ``job`` (a failed launch is explained only there). Never
    raises: it only adds to the message of a failure that is already being reported."""
    try:
        proc = subprocess.run(["scontrol", "show", "config"], capture_output=True, text=True, timeout=60)
        if proc.returncode != 0:
            return f"(scontrol show config failed ({proc.returncode}): {proc.stderr.strip()})"
        files = dict(re.findall(r"^(Slurm(?:ctld|d)LogFile)\s*=\s*(\S+)", proc.stdout, flags=re.M))
        pattern = re.compile(rf"JobId={job}\b|StepId={job}\.|[Jj]ob {job}\b|\[{job}\.")
        out = []
        for key, path in sorted(files.items()):
            if path == "(null)":
                out.append(f"{key}: not a file (syslog)")
                continue
            try:
                text = Path(path).read_text(errors="replace")
            except OSError as err:
                out.append(f"{key} {path}: cannot read: {err}")
                continue
            lines = [line for line in text.splitlines() if pattern.search(line)]
            out.append(f"{key} {path}:\n" + ("\n".join(lines[-40:]) or "(no lines about this job)"))
        return "\n".join(out) or "(scontrol show config names no Slurm daemon log file)"
    except Exception as err:  # noqa: BLE001 - a diagnostic must not replace the failure it explains
        return f"(Slurm daemon logs unavailable: {err!r})"


@pytest.fixture(scope="module")
def slurm_run(tmp_path_factory):
    """One job of the tiny TAR recipe through our sbatch template (1 node x 2 CPU tasks, DDP on gloo), sent
    SIGUSR1 once step 2 is checkpointed; it requeues itself and the requeued run resumes and finishes.

    The outcome is read from Slurm's own record of the job (``scontrol show job``: JobState, Restarts, ExitCode),
    never from ``sbatch --wait``'s exit code (which across a requeue reports one of the runs, not the job), and
    every wait has a deadline after which the job is cancelled and the test fails with the job's log."""
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
    submitted = subprocess.run(
        ["sbatch", "--parsable", f"--job-name={name}", "--nodes=1", "--ntasks-per-node=2", "--gpus-per-node=0",
         "--cpus-per-task=1", "--time=30", f"--output={log}", f"--chdir={REPO}", str(TEMPLATE)],
        env=env, capture_output=True, text=True, timeout=120,
    )
    assert submitted.returncode == 0, f"sbatch failed ({submitted.returncode}): {submitted.stderr}"
    job = submitted.stdout.strip().split(";")[0]
    assert job.isdigit(), submitted.stdout

    def job_log() -> str:
        return log.read_text() if log.exists() else "(no job output)"

    def wait(what: str, seconds: float, done) -> dict[str, str]:
        """Polls scontrol until ``done(info)``; fails (cancelling the job) past the deadline or when the job
        ended for good before that."""
        deadline = time.monotonic() + seconds
        while True:
            info = _scontrol_job(job)
            if done(info):
                return info
            ended = info.get("JobState") in TERMINAL
            if ended or time.monotonic() > deadline:
                subprocess.run(["scancel", "--full", "--signal=KILL", job], capture_output=True, timeout=60)
                why = f"the job ended ({info.get('JobState')})" if ended else f"no {what} within {seconds} s"
                pytest.fail(f"slurm job {job}: {why} while waiting for {what}; JobState={info.get('JobState')} "
                            f"Restarts={info.get('Restarts')} ExitCode={info.get('ExitCode')} "
                            f"Reason={info.get('Reason')}\n{job_log()[-4000:]}\n{_daemon_log_lines(job)}")
            time.sleep(0.5)

    try:
        wait("step=2.ckpt", DEADLINE_START, lambda info: (ckpt_dir / "step=2.ckpt").exists())
        subprocess.run(["scancel", "--signal=USR1", job], check=True, timeout=60)
        # SlurmRequeue saves last.ckpt at the next outer-step boundary and requeues: the job goes back to PENDING
        requeued = wait("the requeue", DEADLINE_REQUEUE,
                        lambda info: info.get("JobState") == "PENDING" and info.get("Restarts") == "1")
        requeue_ckpt = tmp / "requeue.ckpt"
        shutil.copyfile(ckpt_dir / "last.ckpt", requeue_ckpt)  # before the requeued run overwrites it
        first_run_files = sorted(p.name for p in ckpt_dir.iterdir())
        # Slurm holds a requeued batch job ~2 min before it may start again, so that the restart's job credential
        # is newer than the revocation of the first run's: slurmd compares them in whole seconds, and a restart
        # allocated in the second of the requeue is killed at launch ("Job credential revoked": JobState=FAILED,
        # ExitCode=1:0, no output; seen in CI). Release it now, but only once that second is over: the revocation
        # was stamped before the job showed PENDING, so 1.1 s after that is in a later second on any clock.
        time.sleep(1.1)
        subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], check=True, timeout=60)
        final = wait("the end of the job", DEADLINE_FINISH, lambda info: info.get("JobState") in TERMINAL)
    finally:
        if _scontrol_job(job).get("JobState") not in TERMINAL:  # an error above: leave no job behind
            subprocess.run(["scancel", "--full", "--signal=KILL", job], capture_output=True, timeout=60)
    return {"final": final, "requeued": requeued, "log": job_log(), "ckpt_dir": ckpt_dir,
            "requeue_ckpt": requeue_ckpt, "first_run_files": first_run_files, "job": job,
            "seconds": time.monotonic() - start}


def _assert_completed_once_requeued(run: dict) -> None:
    final = run["final"]
    summary = (f"slurm job {run['job']}: JobState={final.get('JobState')} Restarts={final.get('Restarts')} "
               f"ExitCode={final.get('ExitCode')}")
    assert (final.get("JobState"), final.get("Restarts"), final.get("ExitCode")) == ("COMPLETED", "1", "0:0"), (
        summary + "\n" + run["log"][-4000:] + "\n" + _daemon_log_lines(run["job"]))


@pytest.mark.slurm
@pytest.mark.slow
def test_sbatch_template_runs_the_tiny_recipe_to_completion(slurm_run):
    _assert_completed_once_requeued(slurm_run)
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
    _assert_completed_once_requeued(slurm_run)
    saved = re.findall(r"SlurmRequeue: SIGUSR1 received; saved (\S+) at global_step (\d+)", log)
    assert len(saved) == 1, log[-4000:]
    path, step = saved[0][0], int(saved[0][1])
    assert Path(path) == slurm_run["ckpt_dir"] / "last.ckpt"
    assert 2 <= step < MAX_STEPS
    assert f"requeueing Slurm job {slurm_run['job']}" in log
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

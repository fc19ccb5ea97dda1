"""TAR's training path under FSDP2: validation between steps, LoRA and persistent adversaries on sharded weights,
schedule-free adversaries scored at their evaluation point, and the train-time adversary settings TAR refuses.

The multi-process tests run tests/dist_scripts/tar_ddp_equivalence.py on 2 gloo CPU processes (see
tests/test_distributed.py); the tiny recipe runs through ``tar-lightning fit`` under the real FSDP2 launch overlay
with only its hardware keys changed (tests/rehearsal/rehearsal_recipes.py).
"""

import copy
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import SCRIPT, SHARED_RUNS, fit_under_fsdp2_overlay, launch_env, random_bundle, run_script
from test_tar_module import fit, micro

from tar_lightning import AdversaryConfig, ConfigError, TARConfig, TARModule
from tar_lightning.adversaries import AdversaryRun
from tar_lightning.losses import max_entropy_loss
from tar_lightning.models import tiny_llama
from tar_lightning.persistent import AdversaryPool

REPO = Path(__file__).resolve().parents[1]


# -- schedule-free train-time adversaries: TR and persistent deltas at the evaluation point x ----------------------


def test_schedule_free_adversary_scores_tr_and_records_its_delta_at_the_evaluation_point():
    """One outer step, one schedule-free adversary (K=3, TR after the last step), persistent pool on: the logged TR
    loss is the one at the adversary's evaluation point x (``optimizer.eval()``), not at its training point y, and
    the stored delta is x − θ. Both are recomputed here on an independent copy of the model."""
    model, tok = tiny_llama()
    start = copy.deepcopy(model)
    K = 3
    adversary = AdversaryConfig(name="sf", data="forget", optimizer="schedule_free_adamw", lr=3e-2,
                                weight_decay=0.0)
    cfg = TARConfig(inner_steps=K, tr_every=K, tr_loss="max_entropy", adversaries=[adversary], persistent_pool=2,
                    persistent_horizon=8)
    module = TARModule(model, cfg, optimizer=lambda p: torch.optim.SGD(p, lr=0.0), tokenizer=tok)
    bundle = random_bundle(len(tok), cfg.stream_steps(), batch=2, length=10, seed=3)
    trainer = fit(module, [bundle])

    def tr_loss(m):
        with torch.no_grad():
            mb = micro(bundle, "tr", 0)
            out = m(input_ids=mb["input_ids"], attention_mask=mb["attention_mask"], use_cache=False)
            return float(max_entropy_loss(out.logits, mb["attention_mask"], mb["labels"], positions="attention"))

    attacked = copy.deepcopy(start)
    theta = [p.detach().clone() for p in attacked.parameters()]
    run = AdversaryRun(attacked, adversary, lr=3e-2, steps=K)
    for k in range(K):
        run.step(micro(bundle, "forget", k))
    at_y = tr_loss(attacked)
    run.optimizer.eval()
    at_x = tr_loss(attacked)
    x_delta = [p.detach() - t for p, t in zip(attacked.parameters(), theta, strict=True)]
    run.close()

    assert abs(at_x - at_y) > 1e-3  # the two points are far enough apart for the test to tell them apart
    logged = float(trainer.callback_metrics["train/tr_loss"])
    assert logged == pytest.approx(at_x, abs=1e-5), (logged, at_x, at_y)
    (entry,) = module.adversary_pool.entries
    assert max((d - e).abs().max().item() for d, e in zip(entry.delta, x_delta, strict=True)) < 1e-6


def test_schedule_free_warmup_not_shorter_than_the_attack_is_refused():
    adversary = AdversaryConfig(name="sf", optimizer="schedule_free_adamw", warmup_steps=4)
    with pytest.raises(ConfigError, match=r"adversaries\[0\] \('sf'\): warmup_steps=4 .*schedule-free.* inner_steps=4"):
        TARConfig(inner_steps=4, tr_every=2, adversaries=[adversary]).validate()
    TARConfig(inner_steps=5, tr_every=1, adversaries=[adversary]).validate()  # 4 < 5: a valid attack


def test_quantized_lora_base_in_a_train_time_adversary_is_refused():
    adversary = AdversaryConfig(name="qlora", method="lora", lora={"quantize_base": "nf4"})
    with pytest.raises(ConfigError, match=r"adversaries\[0\] \('qlora'\): lora.quantize_base='nf4' is not supported"):
        TARConfig(inner_steps=2, tr_every=1, adversaries=[adversary]).validate()
    with pytest.raises(ConfigError, match="quantize_base"):  # the module validates its config on construction
        TARModule(tiny_llama()[0], {"inner_steps": 2, "tr_every": 1, "adversaries": [
            {"name": "qlora", "method": "lora", "lora": {"quantize_base": "int8"}}]})


def test_pool_state_of_other_shards_is_refused_on_load():
    """A checkpointed pool whose deltas do not fit this run's (local) parameters, e.g. saved with another number of
    FSDP2 ranks, is a clear error, not a silent broadcast or a shape error mid-training."""
    params = [torch.zeros(4, 3), torch.zeros(5)]
    pool = AdversaryPool(size=2, horizon=8)
    state = {"entries": [{"delta": [torch.ones(2, 3), torch.ones(5)], "adversary": 0, "lr": 1e-3, "steps": 2}]}
    with pytest.raises(ConfigError, match="entry 0: its 2 deltas do not match the 2 trainable parameters"):
        pool.load_state_dict(state, params)
    state["entries"][0]["delta"][0] = torch.ones(4, 3)
    pool.load_state_dict(state, params)
    assert len(pool) == 1


# -- FSDP2 on 2 processes --------------------------------------------------------------------------------------


def write_mcq(path: Path) -> Path:
    items = [{"question": f"Question {i}: which one?", "choices": ["alpha", "beta", "gamma", "delta"], "answer": i % 4}
             for i in range(4)]
    path.write_text(json.dumps(items), encoding="utf-8")
    return path


def info(out: Path, rank: int = 0) -> dict:
    return json.loads((out / f"info.rank{rank}.json").read_text())


@pytest.mark.slow  # 2 two-process runs (AdamW: the one without validation shared with tests/test_distributed.py)
@pytest.mark.parametrize("outer", [pytest.param("adamw", marks=SHARED_RUNS), "schedule_free"])
def test_fsdp2_validation_between_steps_neither_crashes_nor_changes_training(tmp_path, shared_run, outer):
    """Sanity check, a validation stream after every step (val_check_interval=1) and MCQValidation under FSDP2: no
    crash (before the fix: SIGSEGV in the first training step after validation), and the weights equal those of the
    same run without validation, bit for bit. Schedule-free outer (the library's default): validation evaluates at
    x and then restores the training point y exactly (before that fix its eval()/train() lerp there and back moved
    a few weights by an ulp: max |Δθ| 2.0e-7 after 3 steps). AdamW: an outer optimizer without train/eval modes.
    Both runs save a sharded checkpoint at the end (after the weights are recorded), so the AdamW run without
    validation is the FSDP2 run tests/test_distributed.py makes with the same arguments (launched once)."""
    fsdp2 = ("--strategy", "fsdp2", "--checkpoint")
    (plain0, _), (plain_norms, _), _ = shared_run(2, outer, *fsdp2)
    mcq = write_mcq(tmp_path / "mcq.json")
    (val0, val1), (val_norms, _) = run_script(2, tmp_path / "val", outer, *fsdp2, "--validation", "--mcq", str(mcq))
    for r in range(2):
        got = info(tmp_path / "val", r)
        assert got["validations"] == 4  # the sanity check + after each of the 3 steps
        assert got["mcq_logged"] == ["val/mcq/forget/accuracy"]
    for k in plain0:
        assert torch.equal(val0[k], val1[k]), k
    diff = max((plain0[k] - val0[k]).abs().max().item() for k in plain0)
    assert diff == 0.0 and val_norms == plain_norms, diff


@pytest.mark.slow  # 3 two-process runs
def test_fsdp2_lora_adversary_two_processes_equal_one_process(tmp_path):
    """A LoRA adversary next to a full-parameter one under FSDP2: adapters replicated on both ranks (same init from
    the trajectory's seed), their gradients averaged before every adversary step. Measured max |Δθ| vs one process
    ~6e-8 (SGD outer); without the averaging (negative control) ~3e-4."""
    (single,), (single_norms,) = run_script(1, tmp_path / "one", "sgd", "--lora")
    (rank0, rank1), (norms0, norms1) = run_script(2, tmp_path / "two", "sgd", "--lora", "--strategy", "fsdp2")
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    assert norms0 == norms1
    assert norms0 == pytest.approx(single_norms, rel=1e-5)
    diff = max((single[k] - rank0[k]).abs().max().item() for k in single)
    assert diff < 1e-6, diff
    (unaveraged, _), _ = run_script(2, tmp_path / "control", "sgd", "--lora", "--strategy", "fsdp2", "--no-average")
    assert max((single[k] - unaveraged[k]).abs().max().item() for k in single) > 1e-5


@pytest.mark.slow  # 2 two-process runs
def test_fsdp2_persistent_pool_two_processes_equal_one_process(tmp_path):
    """Persistent adversaries under FSDP2: each rank stores its shards of the deltas; 4 outer steps with
    continuations equal one process (measured max |Δθ| ~1.2e-7, SGD outer)."""
    (single,), (single_norms,) = run_script(1, tmp_path / "one", "sgd", "--pool", "2", "--steps", "4")
    (rank0, rank1), (norms0, _) = run_script(2, tmp_path / "two", "sgd", "--pool", "2", "--steps", "4",
                                              "--strategy", "fsdp2")
    one, two = info(tmp_path / "one"), info(tmp_path / "two")
    assert two["pool_sizes"] == one["pool_sizes"] and two["pool_continued"] == one["pool_continued"]
    assert sum(two["pool_continued"][1:]) > 0  # stored trajectories were continued
    for k in rank0:
        assert torch.equal(rank0[k], rank1[k]), k
    assert norms0 == pytest.approx(single_norms, rel=1e-5)
    diff = max((single[k] - rank0[k]).abs().max().item() for k in single)
    assert diff < 1e-6, diff


@pytest.mark.slow  # 3 two-process runs
def test_fsdp2_persistent_pool_sharded_resume_equals_uninterrupted(tmp_path):
    """FSDP2Strategy: 2 steps -> sharded checkpoint (each rank's pool shards in its rank-local file) -> resume to 4
    steps is bit-identical to 4 uninterrupted steps (measured max |Δθ| 0.0), continuations included."""
    tar = ("--strategy", "tar_fsdp2", "--pool", "2")
    (full0, full1), _ = run_script(2, tmp_path / "full", "adamw", *tar, "--steps", "4")
    run_script(2, tmp_path / "first", "adamw", *tar, "--steps", "2", "--data-steps", "4", "--checkpoint")
    ckpt = tmp_path / "first" / "last.ckpt"
    assert sorted(p.name for p in ckpt.glob("rank_local.*")) == ["rank_local.0.pt", "rank_local.1.pt"]
    (res0, res1), _ = run_script(2, tmp_path / "resumed", "adamw", *tar, "--steps", "4", "--resume", str(ckpt))
    assert info(tmp_path / "first")["pool_sizes"][-1] > 0
    assert info(tmp_path / "resumed")["pool_continued"] == info(tmp_path / "full")["pool_continued"][2:]
    for k in full0:
        assert torch.equal(res0[k], full0[k]) and torch.equal(res1[k], full1[k]), k


@pytest.mark.slow
def test_fsdp2_persistent_pool_checkpoint_under_stock_model_parallel_is_refused(tmp_path):
    """Lightning's ModelParallelStrategy writes non-weight entries from rank 0 only: a checkpoint would silently lose
    rank 1's pool shards, so saving one is refused with the fix named."""
    env = launch_env()
    cmd = [sys.executable, str(SCRIPT), "--devices", "2", "--steps", "1", "--pool", "2", "--strategy", "fsdp2",
           "--checkpoint", "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent)
    assert proc.returncode != 0
    assert "persistent_pool=2 under ModelParallelStrategy with 2 ranks" in proc.stderr
    assert "tar_lightning.strategy.FSDP2Strategy" in proc.stderr
    assert not (tmp_path / "out" / "last.ckpt").exists()


@pytest.mark.slow  # one 2-process CLI run (~40 s)
def test_tiny_recipe_runs_under_the_fsdp2_launch_overlay(tmp_path):
    """recipes/tiny/tar.yaml (full, retain→forget and LoRA adversaries, representation retain term) under
    recipes/launch/fsdp2_8gpu.yaml with only the hardware keys changed for 2 CPU processes, through
    ``tar-lightning fit``; before, TARModule refused its LoRA adversary under FSDP2."""
    import yaml

    from tar_lightning.adversaries.config import sample_adversary
    from tar_lightning.tar_module import step_generator

    recipe = yaml.safe_load((REPO / "recipes" / "tiny" / "tar.yaml").read_text())
    cfg = TARConfig.from_dict(recipe["model"]["init_args"]["config"])
    steps = recipe["trainer"]["max_steps"]
    drawn = {cfg.adversaries[sample_adversary(cfg.adversaries, step_generator(cfg.seed, s, t))].method
             for s in range(steps) for t in range(cfg.trajectories)}
    assert drawn == {"full", "lora"}  # the run attacks with LoRA on the sharded model
    # run from tmp_path: the tiny recipe's relative run folders land there
    proc = fit_under_fsdp2_overlay(REPO / "recipes/tiny/tar.yaml", tmp_path)
    assert f"max_steps={steps}` reached" in proc.stdout + proc.stderr
    checkpoints = list(tmp_path.rglob("last.ckpt"))
    assert len(checkpoints) == 1 and checkpoints[0].is_dir()  # a sharded checkpoint folder


@pytest.mark.slow  # one FSDP2 process
def test_fsdp2_outer_step_refuses_unsharded_parameters(tmp_path):
    """The invariant behind the validation fix: a no-grad forward outside validation (here a user callback after
    each step) leaves the root unsharded; the next outer step stops with a clear error instead of handing FSDP's
    temporary full tensors to the snapshot, the TR buffer and the adversary optimizer."""
    env = launch_env()
    cmd = [sys.executable, str(SCRIPT), "--devices", "1", "--steps", "2", "--strategy", "fsdp2", "--stray-forward",
           "--out", str(tmp_path / "out")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600, cwd=SCRIPT.parent)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert ("outer step 1 under FSDP2 found 3 trainable parameters that are not sharded DTensors (first: "
            "['model.embed_tokens.weight', 'model.norm.weight', 'lm_head.weight'])") in proc.stderr

"""The rehearsal's recipes, derived at test time from the real ones so that the rehearsal follows them as they evolve.

:func:`derive_configs` loads ``recipes/tar/bio_llama3_8b.yaml``, ``recipes/launch/fsdp2_8gpu.yaml`` and the four
callback overlays (``callbacks/{mcq_validation,retain_monitor,tamper_probe,slurm_requeue}.yaml``) and changes only
what cannot run on 2 CPU processes in a few minutes:

- the model: ``tiny-llama`` (and ``reference_model: tiny-llama``, the same seeded weights as the policy, in place of
  the original instruct model; the key and the ``tokenizer: ${..reference_model}`` link are kept);
- sizes: K, tr_every, max_steps, checkpoint cadence (every 2 steps, ``save_top_k: 1`` + last), seq_len, batch
  sizes, loader workers (0), the callbacks' probe/validation sizes;
- the data sources: every stream keeps its name and its ``select`` split, but reads a built-in synthetic corpus;
  the MCQ tasks read a tiny question file written here;
- hardware: ``accelerator: cpu``, ``devices: 2``, ``data_parallel_size: 2``; precision stays the recipe's
  ``bf16-mixed`` (FSDP2's bf16 parameter policy works on CPU);
- the ``SLURMEnvironment`` plugin of the launch overlay and of ``callbacks/slurm_requeue.yaml`` is removed: given
  explicitly, Lightning uses it whether or not the process runs under Slurm, and outside Slurm it fails reading
  ``SLURM_NODEID`` (KeyError); under Slurm the overlays are used unchanged. Lightning's default environment
  (``LightningEnvironment``) launches the second process instead. SlurmRequeue itself stays (inert: no signal).

Everything else (losses, weights, adversary family with its three adversaries and switch, optimizer, seeds,
stream names, callbacks' classes and remaining settings) is the real recipe's.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import yaml

REPO = Path(__file__).resolve().parents[2]
BIO = REPO / "recipes" / "tar" / "bio_llama3_8b.yaml"
FSDP2 = REPO / "recipes" / "launch" / "fsdp2_8gpu.yaml"
CALLBACKS = REPO / "callbacks"

MAX_STEPS = 8
CHECKPOINT_EVERY = 2

# stream name -> synthetic corpus (forget streams share one generator so that the recipe's 80/20 selects split it)
SYNTHETIC = {
    "retain": {"path": "synthetic:retain", "synthetic": {"n": 24, "seed": 0}},
    "tr": {"path": "synthetic:forget", "synthetic": {"n": 40, "seed": 1}},
    "pile_bio": {"path": "synthetic:forget", "synthetic": {"n": 40, "seed": 1}},
    "camel_bio": {"path": "synthetic:forget", "synthetic": {"n": 40, "seed": 3}},
}

MCQ_QUESTIONS = [
    {"question": "Which organelle makes ATP?", "choices": ["Mitochondrion", "Ribosome", "Nucleus", "Vacuole"],
     "answer": 0},
    {"question": "What carries genetic information?", "choices": ["Lipids", "DNA", "Starch", "Keratin"], "answer": 1},
    {"question": "Which city is a capital?", "choices": ["Paris", "Lyon", "Nice", "Lille"], "answer": 0},
    {"question": "How many legs has a spider?", "choices": ["Six", "Four", "Eight", "Ten"], "answer": 2},
]


def load(path: Path) -> dict[str, Any]:
    with open(path, encoding="utf-8") as fh:
        return yaml.safe_load(fh)


def dump(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def derive_bio(max_steps: int = MAX_STEPS) -> dict[str, Any]:
    """The Bio paper recipe with the tiny model, tiny sizes and synthetic streams."""
    cfg = copy.deepcopy(load(BIO))
    trainer = cfg["trainer"]
    trainer["max_steps"] = max_steps
    trainer["enable_progress_bar"] = False
    trainer["enable_model_summary"] = False
    (checkpoint,) = [c for c in trainer["callbacks"] if c["class_path"].endswith("ModelCheckpoint")]
    checkpoint["init_args"]["every_n_train_steps"] = CHECKPOINT_EVERY
    checkpoint["init_args"]["save_top_k"] = 1  # rotation: one periodic checkpoint + last.ckpt

    init = cfg["model"]["init_args"]
    init["model"]["source"] = "tiny-llama"
    init["reference_model"] = "tiny-llama"
    tar = init["config"]
    tar["inner_steps"] = 4
    tar["tr_every"] = 2
    init["optimizer"]["init_args"]["warmup_steps"] = 2

    data = cfg["data"]["init_args"]
    data["seq_len"] = 32
    data["batch_size"] = 2
    data["stream_batch_sizes"] = {name: 2 for name in data["stream_batch_sizes"]}
    data["num_workers"] = 0
    streams = data["streams"]
    for name, source in streams.items():
        if isinstance(source, str):  # an interpolation such as adv_retain: ${.retain} stays as it is
            continue
        if name not in SYNTHETIC:
            raise KeyError(f"the Bio recipe has a new stream {name!r}: give it a synthetic source in {__file__}")
        new = copy.deepcopy(SYNTHETIC[name])
        if "select" in source:
            new["select"] = source["select"]
        streams[name] = new
    return cfg


def derive_fsdp2() -> dict[str, Any]:
    """The FSDP2 launch overlay with only the hardware keys changed for 2 CPU processes."""
    cfg = copy.deepcopy(load(FSDP2))
    trainer = cfg["trainer"]
    trainer["accelerator"] = "cpu"
    trainer["devices"] = 2
    trainer["strategy"]["init_args"]["data_parallel_size"] = 2
    trainer.pop("plugins", None)  # SLURMEnvironment: see the module docstring
    return cfg


def derive_callbacks(mcq_file: Path) -> dict[str, dict[str, Any]]:
    """The four callback overlays, with tiny sizes and the tiny MCQ file."""
    out = {}
    mcq = copy.deepcopy(load(CALLBACKS / "mcq_validation.yaml"))
    (cb,) = mcq["trainer"]["callbacks+"]
    cb["init_args"]["tasks"] = {name: str(mcq_file) for name in cb["init_args"]["tasks"]}
    cb["init_args"]["limit"] = len(MCQ_QUESTIONS)
    cb["init_args"]["batch_size"] = 4
    for val in mcq["data"]["init_args"]["val_streams"].values():
        val["synthetic"] = dict(SYNTHETIC["tr"]["synthetic"])
        val["limit"] = 4
    out["mcq_validation"] = mcq

    out["retain_monitor"] = copy.deepcopy(load(CALLBACKS / "retain_monitor.yaml"))

    probe = copy.deepcopy(load(CALLBACKS / "tamper_probe.yaml"))
    (cb,) = probe["trainer"]["callbacks+"]
    args = cb["init_args"]
    args["attack"]["data"] = "pile_bio"  # the Bio recipe's forget stream (the overlay's default names the tiny one)
    args["steps"] = 2
    args["batch_size"] = 2
    args["eval_batch_size"] = 4
    args["eval_limit"] = 4
    out["tamper_probe"] = probe

    requeue = copy.deepcopy(load(CALLBACKS / "slurm_requeue.yaml"))
    requeue["trainer"].pop("plugins", None)  # SLURMEnvironment: see the module docstring
    out["slurm_requeue"] = requeue
    return out


def derive_configs(folder: Path, max_steps: int = MAX_STEPS) -> list[Path]:
    """Writes the derived recipe, overlays and MCQ file into ``folder``; returns the --config files in order."""
    folder.mkdir(parents=True, exist_ok=True)
    mcq_file = folder / "mcq.json"
    mcq_file.write_text(json.dumps(MCQ_QUESTIONS), encoding="utf-8")
    paths = [dump(derive_bio(max_steps), folder / "bio_tiny.yaml"), dump(derive_fsdp2(), folder / "fsdp2_cpu.yaml")]
    for name, cfg in derive_callbacks(mcq_file).items():
        paths.append(dump(cfg, folder / f"{name}.yaml"))
    return paths

"""The shared base rules (tar_lightning.common, tar_lightning.errors): one "is this a local path" rule, one int/number
check, one model fingerprint, every error class in errors.py; and what each former caller relied on."""

import copy
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from tar_lightning.common import config_hash, is_int, is_number, json_default, looks_local, model_fingerprint
from tar_lightning.errors import ConfigError, DataError, ModelLoadError, TARLightningError

# ------------------------------------------------------------------------------------------------ local paths
LOCAL = [
    # models.py relied on these
    "/abs/folder", "./rel/folder", "~/folder", "a/b/c", "a//b", "org/", "C:\\models\\m", "..", ".hidden",
    # evaluation/mcq.py
    "nope.json", "data/wmdp.jsonl", "mmlu/test/x_test.csv", "X.CSV",
    # data/sources.py
    "../data", ".\\data", "train.txt", "corpus.parquet", "x.jsonl.gz", "x.parquet.gz",
    # evaluation/refusal.py
    "/nonexistent/judge-model",
    # model files, and names no hub id can have
    "weights/model.safetensors", "m.gguf", "my folder/model", "C:/models/m",
]
HUB = ["gpt2", "wikitext", "cais/wmdp", "cais/mmlu", "org/corpus", "HuggingFaceTB/SmolLM2-135M-Instruct",
       "meta-llama/Llama-3.1-8B", "Qwen/Qwen2.5-0.5B", "tiny-unknown"]


@pytest.mark.parametrize("ref", LOCAL)
def test_paths_are_local(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing exists here: only the form of the name decides
    assert looks_local(ref)


@pytest.mark.parametrize("ref", HUB)
def test_hub_ids_are_not_local(ref, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local(ref)


def test_existing_paths_are_local(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert not looks_local("org/name") and not looks_local("gpt2")
    (tmp_path / "gpt2").mkdir()
    (tmp_path / "outputs").mkdir()
    assert looks_local("gpt2")  # an existing folder named like a hub id wins
    assert looks_local("outputs/run1")  # its first part exists: a path whose last part is not written yet
    assert not looks_local("cais/wmdp")


def test_data_source_missing_deep_path_says_not_found(tmp_path, monkeypatch):
    """A three-part path without a file suffix was tried as a hub dataset; it is a missing folder."""
    import datasets

    from tar_lightning.data.sources import load_records

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be asked for a local path")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="not found"):
        load_records("runs/data/forget")


def test_mcq_missing_path_under_an_existing_folder_says_does_not_exist(tmp_path, monkeypatch):
    """``outputs/mcq`` where ``outputs`` exists was tried as the hub dataset ``outputs/mcq``."""
    import datasets

    from tar_lightning.evaluation.mcq import load_mcq

    def no_hub(*args, **kwargs):
        raise AssertionError("the hub must not be asked for a local path")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "outputs").mkdir()
    with pytest.raises(DataError, match="does not exist"):
        load_mcq("outputs/mcq")


def test_model_weight_file_is_a_local_source(tmp_path, monkeypatch):
    from tar_lightning.models import ModelSource

    monkeypatch.chdir(tmp_path)
    assert ModelSource("model.safetensors").kind == "local"  # was "hub"
    assert ModelSource("weights/model.Q4_1.gguf").kind == "gguf"
    assert ModelSource("HuggingFaceTB/SmolLM2-135M-Instruct").kind == "hub"


# ------------------------------------------------------------------------------------------------ numbers
@pytest.mark.parametrize(
    "value, integer, number",
    [
        (3, True, True),
        (0, True, True),
        (-2, True, True),
        (True, False, False),
        (False, False, False),
        (3.0, False, True),
        (0.5, False, True),
        (float("nan"), False, False),
        (float("inf"), False, False),
        ("3", False, False),
        (None, False, False),
        (np.int64(3), False, False),
        (np.bool_(True), False, False),
        (np.float64(0.5), False, True),  # a float subclass
        (np.float32(0.5), False, False),
        (torch.tensor(3), False, False),
    ],
)
def test_is_int_and_is_number(value, integer, number):
    assert is_int(value) is integer
    assert is_number(value) is number


def test_config_checks_refuse_bools_and_numpy_integers():
    from tar_lightning.adversaries.config import LoRAConfig
    from tar_lightning.data.knowledge import check_world_kwargs
    from tar_lightning.tar_config import TARConfig

    with pytest.raises(ConfigError, match="lora.rank must be an integer"):
        LoRAConfig(rank=True).validate()
    with pytest.raises(ConfigError, match="'seed' must be an integer"):
        check_world_kwargs({"seed": np.int64(1)})  # would reach JSON records and cache keys as a string
    with pytest.raises(ConfigError, match="dpo_beta"):
        TARConfig(dpo_beta=True).validate()
    assert check_world_kwargs({"seed": 1})["seed"] == 1


# ------------------------------------------------------------------------------------------------ fingerprint
def _linear(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(256, 256), nn.LayerNorm(256))
    model.register_buffer("scale", torch.ones(3))
    return model


def test_fingerprint_is_deterministic_and_covers_every_value():
    model = _linear()
    fp = model_fingerprint(model)
    assert len(fp) == 24 and fp == model_fingerprint(model) == model_fingerprint(copy.deepcopy(model))
    assert model_fingerprint(_linear(seed=1)) != fp

    nudged = copy.deepcopy(model)
    with torch.no_grad():
        w = nudged[0].weight.view(-1)
        w[12345] = torch.nextafter(w[12345], torch.tensor(1.0))  # one element, one ulp
    assert model_fingerprint(nudged) != fp

    swapped = copy.deepcopy(model)
    with torch.no_grad():  # integer values: sums are exact and a strided sample misses elements 1 and 2
        swapped[0].weight.copy_(torch.arange(65536, dtype=torch.float32).view(256, 256))
        before = model_fingerprint(swapped)
        w = swapped[0].weight.view(-1)
        w[1], w[2] = w[2].clone(), w[1].clone()
    assert model_fingerprint(swapped) != before

    buffered = copy.deepcopy(model)
    buffered.scale[0] = 2.0  # buffers are weights too (running statistics, scales)
    assert model_fingerprint(buffered) != fp

    assert model_fingerprint(copy.deepcopy(model).to(torch.bfloat16)) != fp  # dtype


def test_fingerprint_of_meta_and_integer_tensors():
    model = _linear()
    model.register_buffer("packed", torch.arange(10, dtype=torch.uint8))
    fp = model_fingerprint(model)
    model.packed[3] = 0
    assert model_fingerprint(model) != fp  # integer tensors (packed quantized weights) count
    with torch.device("meta"):
        meta = nn.Linear(4, 4)
    fp_meta = model_fingerprint(meta)  # names, shapes and dtypes only: there are no values
    assert fp_meta == model_fingerprint(copy.deepcopy(meta))
    assert model_fingerprint(copy.deepcopy(meta).to(torch.float16)) != fp_meta


def test_fingerprint_is_the_same_in_another_process_with_other_threads():
    code = (
        "import torch, json; from torch import nn; torch.set_num_threads(1)\n"
        "from tar_lightning.models import tiny_llama\n"
        "from tar_lightning.common import model_fingerprint\n"
        "print(json.dumps(model_fingerprint(tiny_llama()[0])))\n"
    )
    from tar_lightning.models import tiny_llama

    torch.set_num_threads(2)
    here = model_fingerprint(tiny_llama()[0])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == here


def test_one_fingerprint_keys_the_red_team_and_the_reference_cache():
    from tar_lightning.data import preference
    from tar_lightning.evaluation.redteam import runner as redteam

    assert preference.model_fingerprint is model_fingerprint  # the DPO reference log-prob cache key
    assert redteam.model_fingerprint is model_fingerprint  # run records and pre-attack evaluations


# ------------------------------------------------------------------------------------------------ configuration hash
def test_config_hash_is_sha256_of_key_sorted_json_and_refuses_unstable_values(tmp_path):
    """One hash keys red-team runs and demo stages: the SHA-256 of the key-sorted compact JSON, recomputed here by
    hand; paths, tuples, numpy numbers and dataclasses take their plain JSON form; an object whose only form is its
    ``str`` (a memory address, different in every process) is refused instead of silently keying the cache."""
    import dataclasses
    import hashlib

    value = {"b": [1, 2.5, None], "a": {"z": "x", "y": True}}
    by_hand = hashlib.sha256(b'{"a": {"y": true, "z": "x"}, "b": [1, 2.5, null]}').hexdigest()[:20]
    assert config_hash(value) == by_hand
    assert config_hash({"a": {"z": "x", "y": True}, "b": [1, 2.5, None]}) == by_hand  # key order does not matter

    @dataclasses.dataclass
    class Point:
        x: int
        y: float

    plain = {"path": str(tmp_path), "pair": [1, 2], "n": 3, "f": 0.5, "p": {"x": 1, "y": 2.0}}
    typed = {"path": tmp_path, "pair": (1, 2), "n": np.int64(3), "f": np.float32(0.5), "p": Point(1, 2.0)}
    assert config_hash(typed) == config_hash(plain)
    assert json_default(np.int64(3)) == 3 and type(json_default(np.int64(3))) is int
    with pytest.raises(TypeError, match="not JSON serializable: object"):
        config_hash({"key": object()})
    with pytest.raises(TypeError, match="not JSON serializable: type"):
        config_hash({"key": Point})  # a dataclass type is not a dataclass value


def test_one_config_hash_keys_red_team_runs_and_demo_stages():
    from tar_lightning.demo import evaluator, pipeline
    from tar_lightning.evaluation.redteam import io, run

    assert run.config_hash is config_hash and pipeline.config_hash is config_hash
    assert evaluator.config_hash is config_hash and io.json_default is json_default


# ------------------------------------------------------------------------------------------------ errors
def test_every_error_class_lives_in_errors_and_keeps_its_old_import_path():
    from tar_lightning import checkpoint, errors, models

    assert checkpoint.CheckpointWriteError is errors.CheckpointWriteError
    assert checkpoint.NonFiniteError is errors.NonFiniteError
    assert models.ExportError is errors.ExportError
    for cls in (errors.CheckpointWriteError, errors.NonFiniteError, errors.ExportError, ModelLoadError):
        assert issubclass(cls, TARLightningError) and cls.__module__ == "tar_lightning.errors"
    assert issubclass(errors.CheckpointWriteError, OSError)
    assert issubclass(errors.NonFiniteError, RuntimeError)
    assert issubclass(errors.ExportError, ValueError)


def test_a_malformed_nonfinite_guard_state_in_a_checkpoint_is_a_data_error():
    from tar_lightning.guards import NonFiniteGuard

    guard = NonFiniteGuard(max_in_a_row=3)
    for bad in ({"in_a_row": "x", "total": 0}, {"in_a_row": -1}, {"total": True}, ["in_a_row"]):
        with pytest.raises(DataError, match="tar_nonfinite"):
            guard.load_state_dict(bad)
    guard.load_state_dict({"in_a_row": 2, "total": 5})
    assert (guard.in_a_row, guard.total) == (2, 5)

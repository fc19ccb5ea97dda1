"""Strategy selection, FSDP1 refusal, and the manual gradient averaging helper (single process)."""

from types import SimpleNamespace

import lightning as L
import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

from tar_lightning import ConfigError, TARConfig, TARModule
from tar_lightning.models import tiny_llama
from tar_lightning.strategy import (
    TAR_STATE_FACTOR,
    average_gradients,
    check_strategy,
    data_parallel_world_size,
    select_strategy,
    tar_state_bytes,
)

GiB = 2**30


def test_tar_state_bytes_is_eight_times_parameter_bytes():
    model = torch.nn.Linear(10, 10)  # 110 fp32 parameters
    assert TAR_STATE_FACTOR == 8
    assert tar_state_bytes(model) == 8 * 110 * 4
    model.bias.requires_grad_(False)
    assert tar_state_bytes(model) == 8 * 100 * 4
    assert tar_state_bytes(1000) == 8000


def test_auto_one_device_is_single_device():
    assert select_strategy("auto", devices=1) == "auto"
    assert select_strategy("auto", devices=[0], accelerator="cpu") == "auto"
    assert select_strategy("auto", devices=1, num_nodes=1, model=10 * GiB, device_memory_bytes=GiB) == "auto"


def test_auto_several_devices_ddp_when_it_fits():
    assert select_strategy("auto", devices=2, model=GiB // 10, device_memory_bytes=GiB) == "ddp"
    assert select_strategy("auto", devices="0,1", model=GiB // 10, device_memory_bytes=GiB) == "ddp"
    # 8 × 0.1 GiB = 0.8 GiB fits in 80% of 1 GiB; 8 × 0.11 GiB does not
    assert select_strategy("auto", devices=1, num_nodes=2, model=GiB // 10, device_memory_bytes=GiB) == "ddp"
    model = torch.nn.Linear(4, 4)
    assert select_strategy("auto", devices=2, model=model, accelerator="cpu") == "ddp"


def test_auto_sharding_needed_is_fsdp2():
    for strategy in (
        select_strategy("auto", devices=2, model=int(0.11 * GiB), device_memory_bytes=GiB),
        select_strategy("fsdp2", devices=2),
        select_strategy("model_parallel", devices=1, num_nodes=2),
    ):
        assert isinstance(strategy, ModelParallelStrategy)
        assert strategy._data_parallel_size == 2 and strategy._tensor_parallel_size == 1
        check_strategy(strategy)


def test_auto_several_devices_needs_model():
    with pytest.raises(ConfigError, match="needs the model"):
        select_strategy("auto", devices=2)


def test_explicit_names():
    assert select_strategy("ddp", devices=2) == "ddp"
    assert select_strategy("ddp_spawn", devices=2) == "ddp_spawn"
    assert select_strategy("single_device") == "auto"
    with pytest.raises(ConfigError, match="expected one of"):
        select_strategy("deepspeed")


@pytest.mark.parametrize("name", ["fsdp", "FSDP1"])
def test_fsdp1_refused_with_reason(name):
    with pytest.raises(ConfigError, match=r"FSDP1.*#19626.*ddp"):
        select_strategy(name, devices=2)


def test_check_strategy_objects():
    with pytest.raises(ConfigError, match="#19685"):
        check_strategy(FSDPStrategy())
    with pytest.raises(ConfigError, match="tensor_parallel_size=1"):
        check_strategy(ModelParallelStrategy())  # tensor_parallel_size="auto" is tensor parallelism
    with pytest.raises(ConfigError, match="tensor_parallel_size=1"):
        check_strategy(ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2))
    check_strategy(ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1))
    check_strategy(L.pytorch.strategies.SingleDeviceStrategy(device=torch.device("cpu")))


@pytest.mark.parametrize("strategy,match", [(FSDPStrategy, "FSDP1"), (ModelParallelStrategy, "tensor_parallel")])
def test_tar_module_refuses_fsdp_trainer(strategy, match):
    # Lightning refuses FSDP1 on CPU before the module sees it; a stand-in trainer reaches TARModule's own check.
    model, tok = tiny_llama()
    module = TARModule(model, TARConfig(inner_steps=1, tr_every=1), tokenizer=tok)
    module._trainer = SimpleNamespace(strategy=strategy(), gradient_clip_val=None, accumulate_grad_batches=1,
                                      precision="32-true")
    with pytest.raises(ConfigError, match=match):
        module.configure_callbacks()


def test_average_gradients_is_a_noop_on_one_process():
    assert data_parallel_world_size() == 1
    g = [torch.randn(3), None, torch.randn(2, dtype=torch.float64)]
    before = [t.clone() if t is not None else None for t in g]
    average_gradients(g)
    assert torch.equal(g[0], before[0]) and g[1] is None and torch.equal(g[2], before[2])


# -- ShardingConfig: mixed-precision policy resolution, activation checkpointing ------------------------------
def test_sharding_config_policy_dtypes():
    from tar_lightning.sharding import ShardingConfig

    auto = ShardingConfig()
    assert auto.policy_dtypes("bf16-mixed") == (torch.bfloat16, torch.float32)  # the paper's bf16 mixed precision
    assert auto.policy_dtypes("32-true") == (None, None)  # no policy: the module's dtype throughout
    assert ShardingConfig(param_dtype="bfloat16", reduce_dtype="none").policy_dtypes("32-true") == (torch.bfloat16, None)
    assert ShardingConfig(param_dtype="none").policy_dtypes("bf16-mixed") == (None, None)
    assert ShardingConfig.from_value({"activation_checkpointing": True}).activation_checkpointing is True


@pytest.mark.parametrize("value,match", [
    ({"param_dtype": "float16"}, "fp16 needs a gradient scaler"),
    ({"reduce_dtype": "int8"}, r"sharding.reduce_dtype='int8': expected one of"),
    ({"activation_checkpointing": "yes"}, "sharding.activation_checkpointing='yes'"),
    ({"param_dtyp": "bfloat16"}, r"unknown keys \['param_dtyp'\]"),
])
def test_sharding_config_bad_values(value, match):
    from tar_lightning.sharding import ShardingConfig

    with pytest.raises(ConfigError, match=match):
        ShardingConfig.from_value(value)
    with pytest.raises(ConfigError, match=match):
        TARModule(tiny_llama()[0], TARConfig(inner_steps=1, tr_every=1), sharding=value)


def _saved_tensor_count(model, ids) -> int:
    count = 0

    def pack(t):
        nonlocal count
        count += 1
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(input_ids=ids, labels=ids, use_cache=False).loss
    loss.backward()
    return count


def test_activation_checkpointing_is_applied_and_changes_no_number(bundle_factory):
    """Same TAR steps with and without activation checkpointing: bit-identical weights (CPU recomputation is
    deterministic); with it, the decoder layers keep far fewer tensors for backward."""
    from torch.distributed._composable import checkpoint

    from tar_lightning import AdversaryConfig

    cfg = TARConfig(inner_steps=2, tr_every=1, seed=1,
                    adversaries=[AdversaryConfig(name="a", data="forget", optimizer="adamw", lr=1e-3)])
    results, counts = [], []
    for ac in (False, True):
        torch.manual_seed(0)
        model, tok = tiny_llama()
        module = TARModule(model, cfg, optimizer=lambda p: torch.optim.AdamW(p, lr=1e-3), tokenizer=tok,
                           sharding={"activation_checkpointing": ac})
        batches = [bundle_factory(len(tok), cfg.stream_steps(), seed=s) for s in range(2)]
        trainer = L.Trainer(accelerator="cpu", devices=1, max_steps=2, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        trainer.fit(module, torch.utils.data.DataLoader(batches, batch_size=None))
        assert [checkpoint.state(layer) is not None for layer in model.model.layers] == [ac, ac]
        results.append({k: v.clone() for k, v in model.state_dict().items()})
        counts.append(_saved_tensor_count(model, batches[0]["forget"]["input_ids"][0]))
    assert all(torch.equal(results[0][k], results[1][k]) for k in results[0])
    assert counts[1] < counts[0] / 2, counts

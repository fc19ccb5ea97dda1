"""Adversary configuration, sampling, and the optimizer/schedule factory."""

import math

import pytest
import torch
from torch import nn

from tar_lightning.adversaries.config import (
    OPTIMIZERS,
    SCHEDULES,
    AdversaryConfig,
    LoRAConfig,
    SwitchConfig,
    sample_adversary,
)
from tar_lightning.adversaries.optim import build_adversary_optimizer, build_optimizer, build_scheduler
from tar_lightning.errors import ConfigError

BASE_LR = 0.1


def _generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _lr_curve(name: str, total_steps: int, warmup_steps: int = 0, **kwargs) -> list[float]:
    """LR used by optimizer steps 0..total_steps (the scheduler is stepped after each)."""
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=BASE_LR)
    scheduler = build_scheduler(name, optimizer, total_steps, warmup_steps, **kwargs)
    lrs = []
    for _ in range(total_steps + 1):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()  # no gradients: a no-op that keeps the scheduler's step-order check quiet
        scheduler.step()
    return lrs


def _train_one_step(optimizer: torch.optim.Optimizer, layer: nn.Linear) -> None:
    loss = layer(torch.ones(2, 4)).pow(2).sum()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()


# ----------------------------------------------------------------------------- optimizers


@pytest.mark.parametrize("name", OPTIMIZERS)
def test_every_optimizer_builds_and_steps(name):
    torch.manual_seed(0)
    layer = nn.Linear(4, 3)
    before = [p.detach().clone() for p in layer.parameters()]
    config = AdversaryConfig(name=name, optimizer=name, lr=1e-2)
    optimizer, scheduler = build_adversary_optimizer(config, layer.parameters(), lr=1e-2, total_steps=10)
    assert scheduler is None
    _train_one_step(optimizer, layer)
    assert all(not torch.equal(b, p) for b, p in zip(before, layer.parameters(), strict=True)), name


def test_optimizer_classes_and_defaults():
    params = [nn.Parameter(torch.zeros(2))]
    sgd = build_optimizer("sgd", params, lr=1e-4)
    assert type(sgd) is torch.optim.SGD
    assert sgd.defaults["momentum"] == 0.9 and sgd.defaults["nesterov"] is False
    nesterov = build_optimizer("sgd_nesterov", params, lr=1e-4)
    assert nesterov.defaults["momentum"] == 0.9 and nesterov.defaults["nesterov"] is True
    assert build_optimizer("sgd", params, lr=1e-4, momentum=0.5).defaults["momentum"] == 0.5
    adamw = build_optimizer("adamw", params, lr=2e-5, weight_decay=0.01, betas=(0.9, 0.95))
    assert type(adamw) is torch.optim.AdamW and adamw.defaults["betas"] == (0.9, 0.95)
    assert adamw.defaults["weight_decay"] == 0.01
    assert type(build_optimizer("adam", params, lr=1e-3)) is torch.optim.Adam
    assert type(build_optimizer("adagrad", params, lr=1e-3)) is torch.optim.Adagrad
    assert type(build_optimizer("adadelta", params, lr=1.0)) is torch.optim.Adadelta
    assert type(build_optimizer("adamw_8bit", params, lr=1e-3)).__name__ == "AdamW8bit"


def test_schedule_free_gets_warmup_and_train_mode():
    layer = nn.Linear(4, 3)
    config = AdversaryConfig(optimizer="schedule_free_adamw", warmup_steps=5, lr=1e-2)
    optimizer, scheduler = build_adversary_optimizer(config, layer.parameters(), lr=1e-2, total_steps=10)
    assert scheduler is None
    assert type(optimizer).__name__ == "AdamWScheduleFree"
    assert optimizer.param_groups[0]["warmup_steps"] == 5
    assert optimizer.param_groups[0]["train_mode"] is True
    before = layer.weight.detach().clone()
    _train_one_step(optimizer, layer)
    assert not torch.equal(before, layer.weight)


def test_build_optimizer_errors():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(ConfigError, match="optimizer 'adamww' is unknown"):
        build_optimizer("adamww", params, lr=1e-3)
    with pytest.raises(ConfigError, match="'betaz' is not accepted"):
        build_optimizer("adamw", params, lr=1e-3, betaz=(0.9, 0.9))
    with pytest.raises(ConfigError, match="'adam'"):
        build_optimizer("adam", params, lr=1e-3, betas=(2.0, 0.9))  # torch's ValueError, re-raised


# ----------------------------------------------------------------------------- schedules


def test_constant_schedule():
    assert _lr_curve("constant", 20) == pytest.approx([BASE_LR] * 21)
    config = AdversaryConfig(schedule="constant")
    _, scheduler = build_adversary_optimizer(config, [nn.Parameter(torch.zeros(1))], lr=1e-3, total_steps=5)
    assert scheduler is None


def test_linear_warmup_then_constant():
    lrs = _lr_curve("linear_warmup", 30, warmup_steps=10)
    assert lrs[:11] == pytest.approx([BASE_LR * k / 10 for k in range(11)])
    assert lrs[10:] == pytest.approx([BASE_LR] * 21)  # constant after warmup, not decaying


def test_warmup_cosine():
    lrs = _lr_curve("warmup_cosine", 110, warmup_steps=10)
    assert lrs[5] == pytest.approx(BASE_LR * 0.5)
    assert lrs[10] == pytest.approx(BASE_LR)
    assert lrs[60] == pytest.approx(BASE_LR * 0.5)  # half-way through the decay
    assert lrs[35] == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi * 0.25)))
    assert lrs[110] == pytest.approx(0.0, abs=1e-12)
    floored = _lr_curve("warmup_cosine", 110, warmup_steps=10, min_lr_ratio=0.1)
    assert floored[60] == pytest.approx(BASE_LR * 0.55)
    assert floored[110] == pytest.approx(BASE_LR * 0.1)
    absolute = _lr_curve("warmup_cosine", 110, warmup_steps=10, min_lr=0.005)
    assert absolute[110] == pytest.approx(0.005)
    # The reference's CosineAnnealingLR(T_max = 4 * steps) ends a quarter of the way down the cosine.
    eighth = _lr_curve("warmup_cosine", 100, num_cycles=0.125)
    assert eighth[100] == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi / 4)))


def test_cosine_restarts():
    lrs = _lr_curve("cosine_restarts", 200)  # default: 2 cycles of 100 steps
    assert lrs[0] == pytest.approx(BASE_LR)
    assert lrs[50] == pytest.approx(BASE_LR * 0.5)
    assert lrs[99] < 0.001 * BASE_LR
    assert lrs[100] == pytest.approx(BASE_LR)  # hard restart
    assert lrs[150] == pytest.approx(BASE_LR * 0.5)
    with_warmup = _lr_curve("cosine_restarts", 130, warmup_steps=30, num_cycles=4)
    assert with_warmup[15] == pytest.approx(BASE_LR * 0.5)
    assert with_warmup[30] == pytest.approx(BASE_LR)
    assert with_warmup[55] == pytest.approx(BASE_LR)  # 4 cycles of 25 steps
    assert with_warmup[42] == pytest.approx(BASE_LR * 0.5 * (1 + math.cos(math.pi * 12 / 25)))
    short = _lr_curve("cosine_restarts", 16)  # at least one cycle
    assert short[8] == pytest.approx(BASE_LR * 0.5)


def test_exponential_warmup():
    lrs = _lr_curve("exponential_warmup", 20, warmup_steps=10)
    expected = [BASE_LR * (1 - math.exp(-0.5 * k)) / (1 - math.exp(-5)) for k in range(10)]
    assert lrs[:10] == pytest.approx(expected)
    assert lrs[10:] == pytest.approx([BASE_LR] * 11)
    assert all(a < b for a, b in zip(lrs[:10], lrs[1:11], strict=True))


@pytest.mark.parametrize("name", ["linear_warmup", "warmup_cosine", "cosine_restarts", "exponential_warmup"])
def test_warmup_ends_at_the_base_lr(name):
    # The reference returned absolute LRs as LambdaLR multipliers (effective LR ~ lr**2): guard against it.
    lrs = _lr_curve(name, 100, warmup_steps=20)
    assert lrs[20] == pytest.approx(BASE_LR, rel=0.01)
    assert max(lrs) <= BASE_LR * (1 + 1e-9)


def test_build_adversary_optimizer_with_schedule():
    config = AdversaryConfig(schedule="warmup_cosine", warmup_steps=4, schedule_kwargs={"min_lr_ratio": 0.5})
    layer = nn.Linear(4, 3)
    optimizer, scheduler = build_adversary_optimizer(config, layer.parameters(), lr=1e-3, total_steps=8)
    assert optimizer.param_groups[0]["lr"] == 0.0
    for _ in range(8):
        _train_one_step(optimizer, layer)
        scheduler.step()
    assert optimizer.param_groups[0]["lr"] == pytest.approx(5e-4)


def test_build_scheduler_errors():
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    with pytest.raises(ConfigError, match="schedule 'cosine' is unknown"):
        build_scheduler("cosine", optimizer, 10)
    with pytest.raises(ConfigError, match="'eta_min' is not accepted by schedule 'warmup_cosine'"):
        build_scheduler("warmup_cosine", optimizer, 10, 2, eta_min=0.0)
    with pytest.raises(ConfigError, match="warmup_steps \\(10\\) must be smaller than total_steps"):
        build_scheduler("linear_warmup", optimizer, 10, 10)
    with pytest.raises(ConfigError, match="num_cycles"):
        build_scheduler("cosine_restarts", optimizer, 10, 0, num_cycles=0.5)
    config = AdversaryConfig(name="long_warmup", schedule="linear_warmup", warmup_steps=100)
    with pytest.raises(ConfigError, match="adversary 'long_warmup'.*warmup_steps \\(100\\)"):
        build_adversary_optimizer(config, [nn.Parameter(torch.zeros(1))], lr=1e-3, total_steps=64)


# ----------------------------------------------------------------------------- sampling


def test_sample_lr():
    config = AdversaryConfig(lr=[2e-6, 2e-5, 4e-5])
    generator = _generator(1)
    draws = [config.sample_lr(generator) for _ in range(300)]
    assert set(draws) == {2e-6, 2e-5, 4e-5}
    a, b = _generator(7), _generator(7)
    assert [config.sample_lr(a) for _ in range(50)] == [config.sample_lr(b) for _ in range(50)]
    assert AdversaryConfig(lr=3e-5).sample_lr(_generator()) == 3e-5


def test_switch_point():
    assert AdversaryConfig().switch_point(64, _generator()) is None
    fixed = AdversaryConfig(switch=SwitchConfig(fraction=0.6))
    assert fixed.switch_point(1000, _generator()) == 600
    assert fixed.switch_point(10, _generator()) == 6
    assert AdversaryConfig(switch=SwitchConfig(fraction=0.29)).switch_point(100, _generator()) == 29
    beta = AdversaryConfig(switch=SwitchConfig())  # Beta(6, 3): mean 2/3
    generator = _generator(3)
    points = [beta.switch_point(64, generator) for _ in range(2000)]
    assert all(0 <= m <= 64 for m in points)
    assert sum(points) / len(points) == pytest.approx(
        64 * 2 / 3 - 0.5, abs=1.0
    )  # floor lowers the mean by ~0.5
    a, b = _generator(11), _generator(11)
    assert [beta.switch_point(64, a) for _ in range(50)] == [beta.switch_point(64, b) for _ in range(50)]
    assert len({beta.switch_point(64, _generator(s)) for s in range(50)}) > 5


def test_sample_adversary():
    family = [AdversaryConfig(name="rare", probability=1.0), AdversaryConfig(name="common", probability=3.0)]
    generator = _generator(5)
    draws = [sample_adversary(family, generator) for _ in range(4000)]
    share = draws.count(1) / len(draws)
    # Binomial(4000, 0.75) has a standard deviation of ~0.7 percentage points; allow ~3.5 of them.
    assert share == pytest.approx(0.75, abs=0.025)
    a, b = _generator(9), _generator(9)
    assert [sample_adversary(family, a) for _ in range(100)] == [
        sample_adversary(family, b) for _ in range(100)
    ]
    with pytest.raises(ConfigError, match="empty"):
        sample_adversary([], generator)


# ----------------------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"name": "w08", "optimizer": "adamww"}, "optimizer 'adamww' is unknown"),
        ({"name": "w08", "schedule": "cosine"}, "schedule 'cosine' is unknown"),
        ({"name": "w08", "lr": []}, "lr is an empty list"),
        ({"name": "w08", "lr": 0.0}, "lr must be a number > 0"),
        ({"name": "w08", "lr": [1e-5, -1e-5]}, "lr must be a number > 0"),
        ({"name": "w08", "warmup_steps": -1}, "warmup_steps must be an integer >= 0"),
        (
            {"name": "w08", "schedule": "linear_warmup", "warmup_steps": 10, "steps": 10},
            "warmup_steps \\(10\\)",
        ),
        ({"name": "w08", "warmup_steps": 10}, "no effect with schedule 'constant'"),
        ({"name": "w08", "probability": 0}, "probability must be a number > 0"),
        ({"name": "w08", "method": "qlora"}, "method"),
        ({"name": "w08", "lora": {"rank": 0}}, "lora.rank"),
        ({"name": "w08", "lora": {"targets": "q_proj"}}, "lora.targets"),
        ({"name": "w08", "switch": {"beta": [2.0, 2.0], "fraction": 0.5}}, "exactly one of switch.beta"),
        ({"name": "w08", "switch": {"beta": None}}, "exactly one of switch.beta"),
        ({"name": "w08", "switch": {"fraction": 1.0}}, "switch.fraction must be in \\(0, 1\\)"),
        ({"name": "w08", "switch": {"beta": [6.0, 0.0]}}, "switch.beta must be two numbers > 0"),
        ({"name": "w08", "optimizer_kwargs": {"betaz": [0.9, 0.9]}}, "optimizer_kwargs key 'betaz'"),
        ({"name": "w08", "optimizer": "sgd", "optimizer_kwargs": {"betas": [0.9, 0.9]}}, "key 'betas'"),
        ({"name": "w08", "optimizer_kwargs": {"lr": 1.0}}, "optimizer_kwargs key 'lr' is not allowed"),
        ({"name": "w08", "optimizer": "sgd", "optimizer_kwargs": {"nesterov": True}}, "'sgd_nesterov'"),
        (
            {"name": "w08", "optimizer": "schedule_free_adamw", "optimizer_kwargs": {"warmup_steps": 5}},
            "set the adversary's warmup_steps",
        ),
        (
            {
                "name": "w08",
                "optimizer": "schedule_free_adamw",
                "schedule": "warmup_cosine",
                "warmup_steps": 5,
            },
            "cannot be combined with optimizer 'schedule_free_adamw'",
        ),
        ({"name": "w08", "schedule": "warmup_cosine", "schedule_kwargs": {"eta_min": 0}}, "key 'eta_min'"),
        ({"name": "w08", "steps": 0}, "steps must be an integer >= 1"),
        ({"name": "w08", "batch_size": 0}, "batch_size"),
    ],
)
def test_validate_names_the_field(data, field):
    with pytest.raises(ConfigError, match=f"adversary 'w08'.*{field}"):
        AdversaryConfig.from_dict(data).validate()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"name": "w08", "optimzer": "adamw"}, "unknown key 'optimzer'; valid keys: \\[.*'optimizer'"),
        ({"name": "w08", "lora": {"rnk": 8}}, "unknown key 'rnk' in lora; valid keys: \\['rank'"),
        ({"name": "w08", "switch": {"fractoin": 0.5}}, "unknown key 'fractoin' in switch"),
        ({"name": "w08", "lr": "fast"}, "lr must be of type"),
        ({"name": "w08", "steps": "many"}, "steps must be an integer"),
        ({"name": "w08", "method": "partial"}, "method must be one of \\['full', 'lora', 'embedding', 'latent', 'refusal_ablation'\\]"),
        ({"name": "w08", "lora": 16}, "lora must be a mapping"),
    ],
)
def test_from_dict_errors_name_key_and_place(data, message):
    with pytest.raises(ConfigError, match=f"adversary 'w08' \\(suite.yaml, attacks\\[7\\]\\): {message}"):
        AdversaryConfig.from_dict(data, where="suite.yaml, attacks[7]")


def test_from_dict_builds_nested_and_converts_yaml_numbers():
    config = AdversaryConfig.from_dict(
        {
            "name": "x",
            "lr": ["2e-6", 2e-5],  # PyYAML reads 2e-6 (no dot) as a string
            "method": "lora",
            "lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]},
            "switch": {"retain_stream": "retain_domain", "fraction": 0.6},
            "steps": 1000.0,
        }
    ).validate()
    assert config.lr == [2e-6, 2e-5]
    assert isinstance(config.lora, LoRAConfig) and config.lora.rank == 8 and config.lora.alpha == 16.0
    assert config.switch == SwitchConfig(retain_stream="retain_domain", beta=None, fraction=0.6)
    assert config.steps == 1000 and isinstance(config.steps, int)
    assert AdversaryConfig.from_dict({}).validate() == AdversaryConfig()
    assert SwitchConfig(beta=[2, 5]).beta == (2, 5)


def test_parses_through_jsonargparse():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--adversaries", type=list[AdversaryConfig])
    config = parser.parse_args(
        [
            '--adversaries=[{"name": "a", "lr": [2.0e-6, 4.0e-5], "switch": {"fraction": 0.6}},'
            ' {"name": "b", "method": "lora", "lora": {"rank": 8, "targets": ["q_proj"]},'
            ' "schedule": "warmup_cosine", "warmup_steps": 10}]'
        ]
    )
    adversaries = parser.instantiate(config).adversaries
    assert [type(a) for a in adversaries] == [AdversaryConfig, AdversaryConfig]
    for adversary in adversaries:
        adversary.validate()
    assert adversaries[0].switch.fraction == 0.6 and adversaries[0].switch.beta is None
    assert adversaries[1].lora.rank == 8


# ----------------------------------------------------------------------------- the red-team suites (recipes/redteam)

_R2F = {"retain_stream": "retain_domain", "fraction": 0.6}
_LORA_ALL = {"rank": 16, "alpha": 32.0, "targets": "all-linear"}
_LORA_PROJ = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]

REDTEAM_ROWS = {
    "w01": {"data": "ood_forget", "lr": 2e-5, "steps": 5000},
    "w02": {"data": "ood_forget", "lr": 4e-5, "steps": 5000},
    "w03": {"lr": 2e-5},
    "w04": {"lr": 4e-5},
    "w05": {"lr": 2e-6},
    "w06": {"lr": 2e-5, "schedule": "linear_warmup", "warmup_steps": 100},
    "w07": {"lr": 4e-5, "schedule": "linear_warmup", "warmup_steps": 30},
    "w08": {"lr": 2e-5, "schedule": "warmup_cosine", "warmup_steps": 100},
    "w09": {"optimizer": "adam", "lr": 2e-5, "weight_decay": 0.0},
    "w10": {"optimizer": "sgd", "lr": 1e-4, "weight_decay": 0.0, "optimizer_kwargs": {"momentum": 0.9}},
    "w11": {"optimizer": "sgd_nesterov", "lr": 1e-4, "weight_decay": 0.0},
    "w12": {"optimizer": "adagrad", "lr": 1e-4, "weight_decay": 0.0},
    "w13": {"optimizer": "adadelta", "lr": 1.0, "weight_decay": 0.0},
    "w14": {"optimizer": "schedule_free_adamw", "lr": 2e-5, "warmup_steps": 100},
    "w15": {"lr": 2e-5, "batch_size": 32},
    "w16": {"method": "lora", "lora": _LORA_ALL, "lr": 2e-5},
    "w17": {"method": "lora", "lora": _LORA_ALL, "lr": 4e-5},
    "w18": {"data": "retain_domain", "lr": 2e-5},
    "w19": {"data": "retain_domain", "lr": 4e-5},
    "w20": {"data": "retain_domain", "lr": 2e-5, "schedule": "warmup_cosine", "warmup_steps": 100},
    "w21": {"switch": _R2F, "lr": 2e-5},
    "w22": {"switch": _R2F, "lr": 4e-5},
    "w23": {"switch": _R2F, "lr": 2e-5, "schedule": "linear_warmup", "warmup_steps": 100},
    "w24": {"switch": _R2F, "optimizer": "adam", "lr": 2e-5, "weight_decay": 0.0},
    "w25": {
        "lr": 2e-5,
        "schedule": "cosine_restarts",
        "warmup_steps": 30,
        "schedule_kwargs": {"num_cycles": 10},
    },
    "w26": {"lr": 1e-5, "schedule": "exponential_warmup", "warmup_steps": 100, "batch_size": 32},
    "d01": {
        "data": "retain_domain",
        "lr": 2e-5,
        "weight_decay": 0.01,
        "schedule": "warmup_cosine",
        "warmup_steps": 100,
        "batch_size": 64,
    },
    "d02": {
        "lr": 2e-5,
        "weight_decay": 0.01,
        "schedule": "warmup_cosine",
        "warmup_steps": 100,
        "batch_size": 64,
    },
    "d03": {
        "data": "retain_domain",
        "method": "lora",
        "lora": {"rank": 16, "alpha": 32, "dropout": 0.05, "targets": _LORA_PROJ},
        "lr": 2e-5,
    },
    "d04": {"data": "unrelated", "lr": 1e-5, "steps": 100},
    "d05": {"lr": 1e-4, "steps": 16},
    "d06": {"method": "lora", "lora": {"rank": 16, "alpha": 32, "quantize_base": "nf4"}, "lr": 2e-4},
    "d07": {"optimizer": "adamw_8bit", "lr": 2e-5},
}


@pytest.mark.parametrize("attack", sorted(REDTEAM_ROWS))
def test_every_redteam_attack_is_expressible(attack):
    row = {"name": attack, "data": "forget", "method": "full", "optimizer": "adamw", "steps": 1000}
    row.update(REDTEAM_ROWS[attack])
    config = AdversaryConfig.from_dict(row, where="REDTEAM_ROWS").validate()
    assert config.name == attack
    layer = nn.Linear(4, 3)
    optimizer, scheduler = build_adversary_optimizer(
        config, layer.parameters(), config.sample_lr(_generator()), config.steps
    )
    assert optimizer.param_groups[0]["initial_lr" if scheduler else "lr"] == pytest.approx(row["lr"])
    assert (scheduler is None) == (config.schedule == "constant")


def test_redteam_table_is_complete():
    expected = {f"w{i:02d}" for i in range(1, 27)} | {f"d{i:02d}" for i in range(1, 8)}
    assert set(REDTEAM_ROWS) == expected


def test_schedule_names_cover_the_factory():
    for name in SCHEDULES:
        assert len(_lr_curve(name, 20, 0 if name == "constant" else 5)) == 21

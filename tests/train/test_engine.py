"""Unit tests of the engine's pure parts: precision, parameter groups, LR schedule, DeepSpeed config,
ZeRO-3 checks (no process group needed)."""
import math

import pytest
import torch
from torch import nn

from fastvl.config import ConfigError, load_config
from fastvl.precision import cpu_has_native_bf16
from fastvl.train.engine import (check_zero3_support, deepspeed_config, lr_factor,
                                 parameter_groups, resolve_precision)

CPU = torch.device("cpu")


def test_fp16_on_cpu_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"train.precision=fp16 needs a CUDA GPU.*use train.precision=bf16 or fp32"):
        resolve_precision("fp16", CPU)


def test_precision_auto_and_explicit_on_cpu():
    assert resolve_precision("auto", CPU) == ("bf16" if cpu_has_native_bf16() else "fp32")
    assert resolve_precision("bf16", CPU) == "bf16"
    assert resolve_precision("fp32", CPU) == "fp32"



@pytest.mark.parametrize("capability,expected", [((7, 0), "fp16"), ((7, 5), "fp16"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_precision_auto_on_cuda_takes_bf16_where_the_gpu_has_it(monkeypatch, capability, expected):
    """Volta/Turing have no bf16 units: fp16 with loss scaling; Ampere and later: bf16 (no loss scale)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    assert resolve_precision("auto", torch.device("cuda", 0)) == expected


class _Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.pos_embed = nn.Parameter(torch.zeros(1, 3, 4))
        self.linear = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.temperature = nn.Parameter(torch.tensor(0.07))
        self.frozen = nn.Parameter(torch.zeros(4, 4), requires_grad=False)

    def no_weight_decay(self):
        return {"pos_embed"}


def test_parameter_groups_decay_only_weight_matrices():
    model = _Model()
    decay, no_decay = parameter_groups(model, weight_decay=0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert {names[id(p)] for p in decay["params"]} == {"linear.weight"}
    assert {names[id(p)] for p in no_decay["params"]} == {"embed.weight", "pos_embed", "linear.bias", "norm.weight",
                                                          "norm.bias", "temperature"}


def _train_cfg(*overrides: str):
    return load_config(None, list(overrides)).train


def test_lr_factor_warmup_then_cosine_to_floor():
    warmup, total, floor = 10, 110, 0.05
    t = _train_cfg(f"train.warmup_steps={warmup}", f"train.steps={total}", f"train.min_lr_ratio={floor}")
    factors = [lr_factor(s, t) for s in range(total + 5)]
    assert factors[0] == pytest.approx(0.1) and factors[warmup - 1] == pytest.approx(1.0)
    assert all(a < b for a, b in zip(factors[:warmup - 1], factors[1:warmup]))
    assert factors[warmup] == pytest.approx(1.0)
    after = factors[warmup:total + 1]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert factors[warmup + 50] == pytest.approx(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert factors[total] == pytest.approx(floor) and factors[-1] == pytest.approx(floor)


def test_lr_factor_linear_and_constant_after_the_same_warmup():
    common = ["train.warmup_steps=4", "train.steps=24", "train.min_lr_ratio=0.1"]
    linear = [lr_factor(s, _train_cfg(*common, "train.schedule=linear")) for s in range(30)]
    constant = [lr_factor(s, _train_cfg(*common, "train.schedule=constant")) for s in range(30)]
    assert linear[:4] == constant[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert linear[4:25] == pytest.approx([1.0 - 0.9 * k / 20 for k in range(21)])  # a straight line to 0.1
    assert linear[29] == pytest.approx(0.1)
    assert constant[4:] == [1.0] * 26


def test_lr_factor_tri_stage_warms_holds_and_decays_exponentially():
    t = _train_cfg("train.schedule=tri_stage", "train.tri_stage=[0.1,0.8,0.1]", "train.steps=100",
                   "train.min_lr_ratio=0.01", "train.warmup_steps=55")  # warmup_steps is not tri_stage's
    factors = [lr_factor(s, t) for s in range(101)]
    assert factors[:10] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert factors[10:90] == [1.0] * 80
    assert factors[90:101] == pytest.approx([0.01 ** (k / 10) for k in range(11)])


@pytest.mark.parametrize("override,message", [
    ("train.schedule=step", "train.schedule must be one of"),
    ("train.tri_stage=[0.1,0.8,0.2]", "summing to 1"),
    ("train.param_groups=[{\"params\":\"a.*\",\"lr\":1}]", "unknown key"),
    ("train.param_groups=[{\"lr_scale\":0.1}]", "params must be"),
    ("train.param_groups=[{\"params\":\"a.*\",\"lr_scale\":0}]", "lr_scale must be a positive"),
    ("train.adam_eps=0", "adam_eps"),
])
def test_schedule_and_param_group_settings_are_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, [override])


def test_param_group_rules_set_lr_scale_and_decay_first_match_wins():
    model = _Model()
    rules = _train_cfg('train.param_groups=[{"params": ["linear.*", "embed.*"], "lr_scale": 0.1, "weight_decay": 0.5},'
                       ' {"params": "linear.weight", "lr_scale": 7}]').param_groups
    with pytest.raises(ConfigError, match=r"param_groups\[1\] matches no trainable parameter of _Model.*top-level modules: embed, linear, norm"):
        parameter_groups(model, 0.02, rules)
    rules = rules[:1]
    names = {id(p): n for n, p in model.named_parameters()}
    groups = [({names[id(p)] for p in g["params"]}, g["weight_decay"], g["lr_scale"])
              for g in parameter_groups(model, 0.02, rules)]
    assert groups == [({"pos_embed", "norm.weight", "norm.bias", "temperature"}, 0.0, 1.0),
                      ({"linear.weight"}, 0.5, 0.1),
                      ({"linear.bias", "embed.weight"}, 0.0, 0.1)]


def test_deepspeed_config_batch_accumulation_clipping_precision():
    cfg = load_config(None, ["data.batch_size=6", "train.grad_accum=3", "train.grad_clip=0.5", "train.zero_stage=2"])
    ds = deepspeed_config(cfg, "bf16", world_size=4)
    assert ds["train_batch_size"] == 6 * 3 * 4
    assert ds["train_micro_batch_size_per_gpu"] == 6 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True} and "fp16" not in ds
    assert ds["zero_optimization"] == {"stage": 2}
    fp16 = deepspeed_config(cfg, "fp16", world_size=1)
    assert fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # 0 = dynamic loss scaling
    # ZeRO-0 fp32: the trainer clips (DeepSpeed's fp32 clipping breaks on 0-dim parameters)
    stage0 = load_config(None, ["train.grad_clip=0.5", "train.zero_stage=0"])
    assert deepspeed_config(stage0, "fp32", world_size=1)["gradient_clipping"] == 0.0


def test_zero3_refuses_scalar_parameters():
    with pytest.raises(ConfigError, match=r"zero_stage=3 cannot partition the 0-dim parameter\(s\) temperature"):
        check_zero3_support(_Model())
    check_zero3_support(nn.Linear(2, 2))  # nothing to refuse

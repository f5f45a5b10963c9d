"""Small fast tests written for the mutants `make mutation-auto` found alive in train/updates.py (docs/mutation.md):
each asserts what a user sees (a weight, a gradient, an optimizer's settings, a saved state, a refusal, a warning)."""

from __future__ import annotations

import logging
import sys
from contextlib import contextmanager, nullcontext
from types import ModuleType, SimpleNamespace

import pytest
import torch
from torch import nn

from difftune.cli.errors import UserError
from difftune.storage import checkpoints
from difftune.train import deepspeed_zero, updates
from difftune.train.updates import OptimizerLayout

# --- the flat parameter of one process ---


def test_flattened_groups_hold_one_fp32_parameter_the_weights_and_gradients_are_views_of():
    w = nn.Parameter(torch.arange(6.0).view(2, 3))
    b = nn.Parameter(torch.tensor([7.0, 8.0]))
    d = nn.Parameter(torch.tensor([11.0]))
    c = nn.Parameter(torch.tensor([[9.0, 10.0]], dtype=torch.bfloat16))
    groups = [{"params": [w, b, d], "lr": 0.1}, {"params": [c], "weight_decay": 0.0}]
    flat = updates.flatten_param_groups(groups)
    assert [{k: v for k, v in g.items() if k != "params"} for g in flat] == [{"lr": 0.1}, {"weight_decay": 0.0}]
    assert groups[0]["params"] == [w, b, d]  # the caller's groups are left as they were
    (p0,), (p1,) = flat[0]["params"], flat[1]["params"]
    assert isinstance(p0, nn.Parameter) and p0.dtype == torch.float32 and p1.dtype == torch.float32
    assert p0.tolist() == [0, 1, 2, 3, 4, 5, 7, 8, 11] and p1.tolist() == [9, 10]
    assert (w.shape, b.shape, c.shape, c.dtype) == ((2, 3), (2,), (1, 2), torch.float32)
    assert p0.grad.tolist() == [0] * 9 and p1.grad.tolist() == [0, 0]
    assert w.grad.tolist() == [[0, 0, 0], [0, 0, 0]] and b.grad.tolist() == [0, 0]
    with torch.no_grad():
        p0.add_(1)  # the optimizer steps the flat parameter: the adapter weights move
    assert w.tolist() == [[1, 2, 3], [4, 5, 6]] and b.tolist() == [8, 9] and d.tolist() == [12]
    (w.sum() * 2 + b.sum() * 3 + d.sum() * 4 + c.sum()).backward()  # autograd accumulates into the views
    assert p0.grad.tolist() == [2, 2, 2, 2, 2, 2, 3, 3, 4] and p1.grad.tolist() == [1, 1]
    p0.grad.zero_()
    assert w.grad.tolist() == [[0, 0, 0], [0, 0, 0]]


def test_the_flat_parameter_is_fp32_on_the_weights_device_whatever_torch_s_default():
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        (flat,) = updates.flatten_param_groups([{"params": [nn.Parameter(torch.ones(2, dtype=torch.float32))]}])[0][
            "params"
        ]
    finally:
        torch.set_default_dtype(previous)
    assert flat.dtype == torch.float32
    meta = [nn.Parameter(torch.empty(2, 3, device="meta")), nn.Parameter(torch.empty(4, device="meta"))]
    (flat,) = updates.flatten_param_groups([{"params": meta}])[0]["params"]
    assert flat.device.type == "meta" and flat.grad.device.type == "meta" and flat.shape == (10,)


# --- the optimizer state by parameter name ---


def two_adapters() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    return {"unet": nn.Linear(3, 2), "text_encoder_one": nn.Linear(2, 1, bias=False)}


def two_groups(adapters: dict[str, nn.Module]) -> list[dict]:
    return [
        {"params": list(adapters["unet"].parameters())},
        {"params": list(adapters["text_encoder_one"].parameters()), "lr": 0.02},  # (--text_encoder_lr)
    ]


LAYOUT = {
    "groups": [[["unet/weight", [2, 3]], ["unet/bias", [2]]], [["text_encoder_one/weight", [1, 2]]]],
    "flat": False,
}


def test_the_layout_names_each_parameter_by_adapter_and_shape():
    adapters = two_adapters()
    layout = OptimizerLayout.of(adapters, two_groups(adapters))
    assert layout.groups == [[("unet/weight", (2, 3)), ("unet/bias", (2,))], [("text_encoder_one/weight", (1, 2))]]
    assert layout.flat is False
    assert layout.to_dict() == LAYOUT
    assert OptimizerLayout.from_dict({**LAYOUT, "flat": True}) == OptimizerLayout(layout.groups, True)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values)


PER_PARAMETER = {
    "state": {
        0: {"step": t(3.0)[0], "exp_avg": t(0, 1, 2, 3, 4, 5).view(2, 3), "exp_avg_sq": t(1, 1, 1, 2, 2, 2).view(2, 3)},
        1: {"step": t(3.0)[0], "exp_avg": t(6, 7), "exp_avg_sq": t(3, 3)},
        2: {"step": t(1.0)[0], "exp_avg": t(8, 9).view(1, 2), "exp_avg_sq": t(4, 4).view(1, 2)},
    },
    "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.02, "params": [2]}],
}
PACKED = {
    "state": {
        0: {"step": t(3.0)[0], "exp_avg": t(0, 1, 2, 3, 4, 5, 6, 7), "exp_avg_sq": t(1, 1, 1, 2, 2, 2, 3, 3)},
        1: {"step": t(1.0)[0], "exp_avg": t(8, 9), "exp_avg_sq": t(4, 4)},
    },
    "param_groups": [{"lr": 0.1, "params": [0]}, {"lr": 0.02, "params": [1]}],
}


def assert_same_state(got: dict, expected: dict) -> None:
    assert got["param_groups"] == expected["param_groups"]
    assert list(got["state"]) == list(expected["state"])
    for index, state in expected["state"].items():
        assert list(got["state"][index]) == list(state), index
        for key, value in state.items():
            assert got["state"][index][key].shape == value.shape, (index, key)
            assert torch.equal(got["state"][index][key], value), (index, key)


@pytest.mark.parametrize(("source", "target"), [(False, True), (True, False), (True, True), (False, False)])
def test_the_optimizer_state_is_repacked_by_name(source, target):
    saved = {False: PER_PARAMETER, True: PACKED}
    from_layout = OptimizerLayout.from_dict({**LAYOUT, "flat": source})
    to_layout = OptimizerLayout.from_dict({**LAYOUT, "flat": target})
    unpacked = from_layout.unpack(saved[source])
    assert unpacked[0] == [{"lr": 0.1}, {"lr": 0.02}]
    assert list(unpacked[1]) == ["unet/weight", "unet/bias", "text_encoder_one/weight"]
    assert_same_state(to_layout.pack(unpacked), saved[target])


THREE_GROUPS = {"groups": [[["a/w", [2]], ["a/b", [1]]], [["b/w", [1]]], [["c/w", [2]], ["c/b", [1]]]], "flat": False}


def test_three_groups_are_numbered_in_order_both_ways():
    per_parameter = {
        "state": {i: {"step": t(1.0)[0], "exp_avg": v} for i, v in enumerate([t(1, 2), t(3), t(4), t(5, 6), t(7)])},
        "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.2, "params": [2]}, {"lr": 0.3, "params": [3, 4]}],
    }
    packed = {
        "state": {i: {"step": t(1.0)[0], "exp_avg": v} for i, v in enumerate([t(1, 2, 3), t(4), t(5, 6, 7)])},
        "param_groups": [{"lr": 0.1, "params": [0]}, {"lr": 0.2, "params": [1]}, {"lr": 0.3, "params": [2]}],
    }
    layout, flat = OptimizerLayout.from_dict(THREE_GROUPS), OptimizerLayout.from_dict({**THREE_GROUPS, "flat": True})
    assert_same_state(flat.pack(layout.unpack(per_parameter)), packed)
    assert_same_state(layout.pack(flat.unpack(packed)), per_parameter)


def test_a_packed_group_without_state_unpacks_to_none():
    """A group whose parameters never had a gradient (a text encoder trained from a later step)."""
    packed = {
        "state": {0: {"step": t(2.0)[0], "exp_avg": t(1, 2, 3)}},
        "param_groups": [{"lr": 0.1, "params": [0]}, {"lr": 0.2, "params": [1]}, {"lr": 0.3, "params": [2]}],
    }
    settings, by_name = OptimizerLayout.from_dict({**THREE_GROUPS, "flat": True}).unpack(packed)
    assert settings == [{"lr": 0.1}, {"lr": 0.2}, {"lr": 0.3}]
    assert by_name["b/w"] == {} and by_name["c/w"] == {} and by_name["c/b"] == {}
    assert by_name["a/w"]["exp_avg"].tolist() == [1, 2]


def test_unpacked_state_is_a_copy_the_saved_one_is_not_changed_through():
    packed_layout = OptimizerLayout.from_dict({**LAYOUT, "flat": True})
    saved = {"state": {i: dict(s) for i, s in PACKED["state"].items()}, "param_groups": PACKED["param_groups"]}
    _, by_name = packed_layout.unpack(saved)
    assert by_name["unet/bias"]["exp_avg"].tolist() == [6, 7]
    by_name["unet/bias"]["exp_avg"].add_(100)
    by_name["unet/weight"]["step"].add_(100)
    assert saved["state"][0]["exp_avg"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    assert PACKED["state"][0]["step"].item() == 3.0


def test_parameters_without_optimizer_state_stay_without():
    """A parameter that never had a gradient (its adapter frozen so far) has no state: none is made up."""
    per_parameter = {
        "state": {1: {"step": t(2.0)[0], "exp_avg": t(6, 7)}},
        "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.02, "params": [2]}],
    }
    layout = OptimizerLayout.from_dict(LAYOUT)
    settings, by_name = layout.unpack(per_parameter)
    assert by_name["unet/weight"] == {} and by_name["text_encoder_one/weight"] == {}
    back = layout.pack((settings, by_name))
    assert list(back["state"]) == [1] and back["param_groups"] == per_parameter["param_groups"]
    packed_layout = OptimizerLayout.from_dict({**LAYOUT, "flat": True})
    empty = packed_layout.pack(layout.unpack({"state": {}, "param_groups": per_parameter["param_groups"]}))
    assert empty == {"state": {}, "param_groups": [{"lr": 0.1, "params": [0]}, {"lr": 0.02, "params": [1]}]}


def test_state_saved_for_other_parameters_is_refused_by_name():
    layout = OptimizerLayout.from_dict(LAYOUT)
    settings, by_name = layout.unpack(PER_PARAMETER)
    del by_name["unet/bias"], by_name["text_encoder_one/weight"]
    with pytest.raises(ValueError, match=r"^the saved optimizer state has no entry for text_encoder_one/weight$"):
        layout.pack((settings, by_name))


@pytest.mark.parametrize("flat", [False, True])
def test_state_that_is_not_per_element_is_refused(flat):
    layout = OptimizerLayout.from_dict({**LAYOUT, "flat": flat})
    settings, by_name = OptimizerLayout.from_dict(LAYOUT).unpack(PER_PARAMETER)
    by_name["unet/bias"] = {**by_name["unet/bias"], "exp_avg": t(1, 2, 3)}  # 3 values for 2 weights
    message = r"^the optimizer state of unet/bias is not per element and cannot be re-packed$"
    with pytest.raises(ValueError, match=message):
        layout.pack((settings, by_name))


def test_quantized_state_cannot_be_split():
    state = {"step": t(1.0)[0], "state1": torch.zeros(4, dtype=torch.uint8), "absmax1": t(0.5)}
    message = r"^the optimizer's 'state1' state is not per element \(quantized\?\) and cannot be re-packed$"
    with pytest.raises(ValueError, match=message):
        updates.split_state(state, [3, 2])


def test_state_splits_into_the_members_and_joins_back():
    parts = updates.split_state({"step": 4, "exp_avg": t(1, 2, 3, 4, 5), "norm": t(2.0)[0]}, [3, 2])
    assert [p["exp_avg"].tolist() for p in parts] == [[1, 2, 3], [4, 5]]
    assert [(p["step"], p["norm"].item()) for p in parts] == [(4, 2.0), (4, 2.0)]
    assert updates.join_state([t(1, 2).view(1, 2), t(3)]).tolist() == [1, 2, 3]
    assert updates.join_state([t(5.0)[0], t(5.0)[0]]).item() == 5.0
    assert updates.join_state([7, 7]) == 7
    assert [updates.is_elementwise(v) for v in (t(1.0)[0], t(1.0), 1.0, t(1, 2))] == [False, True, False, True]


# --- the optimizer ---


def args(**changes) -> SimpleNamespace:
    base = {
        "optimizer": "adamw", "learning_rate": 0.05, "adam_beta1": 0.8, "adam_beta2": 0.95, "adam_epsilon": 1e-6,
        "adam_weight_decay": 0.03, "prodigy_d_coef": 2.0, "prodigy_safeguard_warmup": True,
        "prodigy_use_bias_correction": True, "gradient_accumulation_steps": 1, "max_grad_norm": 0.0,
    }  # fmt: skip
    return SimpleNamespace(**{**base, **changes})


ADAM = {"lr": 0.05, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.03}


def optimizer_of(**changes) -> torch.optim.Optimizer:
    adapters = two_adapters()
    return updates.build_optimizer(args(**changes), two_groups(adapters))


def test_adamw_runs_fused_with_the_adam_flags():
    optimizer = optimizer_of()
    assert type(optimizer) is torch.optim.AdamW
    assert {k: optimizer.defaults[k] for k in ADAM} == ADAM and optimizer.defaults["fused"] is True
    assert [g["lr"] for g in optimizer.param_groups] == [0.05, 0.02]


@pytest.mark.parametrize("error", [RuntimeError, ValueError])
def test_adamw_falls_back_to_foreach_where_fused_is_unsupported(monkeypatch, error):
    real = torch.optim.AdamW

    def adamw(params, fused=None, **kwargs):
        if fused:
            raise error("fused=True requires all the params to be floating point Tensors of supported devices")
        return real(params, fused=fused, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", adamw)
    optimizer = optimizer_of()
    assert type(optimizer) is real and optimizer.defaults["foreach"] is True and not optimizer.defaults["fused"]
    assert {k: optimizer.defaults[k] for k in ADAM} == ADAM


def test_adamw8bit_gets_the_adam_flags():
    import bitsandbytes as bnb

    optimizer = optimizer_of(optimizer="adamw8bit")
    assert type(optimizer) is bnb.optim.AdamW8bit
    assert {k: optimizer.defaults[k] for k in ADAM} == ADAM


PRODIGY_WARNING = "--optimizer prodigy finds the step size itself and expects --learning_rate ~1.0, got {}"


@pytest.mark.parametrize(("lr", "warned"), [(0.5, False), (1.0, False), (2.0, False), (0.4, True), (2.5, True)])
def test_prodigy_gets_its_flags_and_warns_of_a_learning_rate_far_from_1(caplog, lr, warned):
    from prodigyopt import Prodigy

    with caplog.at_level(logging.WARNING, logger="difftune"):
        optimizer = optimizer_of(optimizer="prodigy", learning_rate=lr)
    assert type(optimizer) is Prodigy
    expected = {**ADAM, "lr": lr, "d_coef": 2.0, "safeguard_warmup": True, "use_bias_correction": True}
    assert {k: optimizer.defaults[k] for k in expected} == expected
    messages = [r.getMessage() for r in caplog.records if r.name == "difftune"]
    assert messages == ([PRODIGY_WARNING.format(lr)] if warned else [])


def test_adafactor_gets_the_learning_rate_and_weight_decay():
    optimizer = optimizer_of(optimizer="adafactor")
    assert type(optimizer) is torch.optim.Adafactor
    assert (optimizer.defaults["lr"], optimizer.defaults["weight_decay"]) == (0.05, 0.03)


@pytest.mark.parametrize("name", ["prodigy", "adafactor"])
def test_per_shard_optimizers_are_refused_under_deepspeed(name):
    with pytest.raises(UserError) as raised:
        updates.check_distributed_optimizer(args(optimizer=name), deepspeed=True)
    assert str(raised.value) == (
        f"--optimizer {name} does not work under DeepSpeed ZeRO-2 (its statistics would be per shard): "
        "use DDP (configs/accelerate/multi_gpu.yaml) or --optimizer adamw"
    )
    updates.check_distributed_optimizer(args(optimizer=name), deepspeed=False)
    updates.check_distributed_optimizer(args(optimizer="adamw"), deepspeed=True)
    updates.check_distributed_optimizer(args(optimizer="adamw8bit"), deepspeed=True)


# --- one process or DDP ---


class Stepper:
    """accelerate's prepared optimizer: records the gradient norm it stepped with and how it zeroed."""

    def __init__(self, optimizer, skipped: bool) -> None:
        self.optimizer, self.step_was_skipped = optimizer, skipped
        self.norms, self.zeroed = [], []

    def step(self) -> None:
        grads = [p.grad for g in self.optimizer.param_groups for p in g["params"]]
        self.norms.append(torch.cat([g.reshape(-1) for g in grads]).norm().item())
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool) -> None:
        self.zeroed.append(set_to_none)
        self.optimizer.zero_grad(set_to_none=set_to_none)


class Launch:
    """An Accelerator of `num_processes` processes as DataParallelUpdate sees it."""

    def __init__(self, num_processes: int = 1, main: bool = True, skipped: bool = False) -> None:
        self.num_processes, self.is_main_process, self.skipped = num_processes, main, skipped
        self.calls = []

    def prepare(self, *objects):
        self.stepper = Stepper(objects[-1], self.skipped)
        return [*(("prepared", m) for m in objects[:-1]), self.stepper]

    @contextmanager
    def no_sync(self, model):
        self.calls.append(("no_sync", model))
        yield
        self.calls.append(("synced", model))

    def backward(self, loss: torch.Tensor) -> None:
        self.calls.append(("backward", loss.item()))
        loss.backward()

    def unscale_gradients(self) -> None:
        self.calls.append(("unscale",))


def data_parallel(num_processes: int = 1, **changes) -> tuple[updates.DataParallelUpdate, dict, Launch]:
    adapters = two_adapters()
    launch = Launch(num_processes, **{k: changes.pop(k) for k in ("main", "skipped") if k in changes})
    return updates.DataParallelUpdate(launch, args(**changes), adapters, two_groups(adapters)), adapters, launch


@pytest.mark.parametrize(
    ("num_processes", "optimizer", "flat"), [(1, "adamw", True), (2, "adamw", False), (1, "adafactor", False)]
)
def test_one_process_packs_the_parameters_except_for_adafactor(num_processes, optimizer, flat):
    update, adapters, _ = data_parallel(num_processes, optimizer=optimizer, gradient_accumulation_steps=3)
    assert update.layout.flat is flat and update.accum == 3 and update.kind == "ddp"
    assert update.layout.groups == OptimizerLayout.from_dict(LAYOUT).groups
    expected = [[8], [2]] if flat else [[6, 2], [2]]
    assert [[p.numel() for p in g["params"]] for g in update.optimizer.param_groups] == expected
    assert [p.numel() for p in update.params] == [n for g in expected for n in g]
    assert update.models == {
        "unet": ("prepared", adapters["unet"]),
        "text_encoder_one": ("prepared", adapters["text_encoder_one"]),
    }
    assert update.quantized_state is False


def test_gradients_sync_only_on_the_last_micro_batch():
    update, adapters, launch = data_parallel(2)
    with update.micro_batch(last=False):
        launch.calls.append(("inside",))
    models = [("prepared", adapters["unet"]), ("prepared", adapters["text_encoder_one"])]
    assert launch.calls == [
        ("no_sync", models[0]),
        ("no_sync", models[1]),
        ("inside",),
        ("synced", models[1]),
        ("synced", models[0]),
    ]
    launch.calls.clear()
    with update.micro_batch(last=True):
        launch.calls.append(("inside",))
    assert launch.calls == [("inside",)]


def test_a_step_s_gradient_is_the_mean_of_its_micro_batches():
    update, _, launch = data_parallel(1)
    update.backward(torch.tensor(6.0, requires_grad=True), 4)
    assert launch.calls == [("backward", 1.5)]


def loss_of(adapters: dict) -> torch.Tensor:
    x = torch.tensor([[1.0, -2.0, 3.0]])
    return adapters["unet"](x).pow(2).sum() * 100 + adapters["text_encoder_one"](x[:, :2]).sum() * 100


@pytest.mark.parametrize("num_processes", [1, 2])
def test_a_step_clips_the_gradient_norm_steps_and_zeroes_the_gradients_in_place(num_processes):
    update, adapters, launch = data_parallel(num_processes, max_grad_norm=0.5)
    before = {n: p.detach().clone() for n, p in adapters["unet"].named_parameters()}
    update.backward(loss_of(adapters), 1)
    assert update.step(True) is True
    assert launch.stepper.norms == [pytest.approx(0.5)] and ("unscale",) in launch.calls
    assert launch.stepper.zeroed == [False]
    assert all(not torch.equal(p, before[n]) for n, p in adapters["unet"].named_parameters())
    grads = [p.grad for m in adapters.values() for p in m.parameters()]
    assert all(g is not None and not g.any() for g in grads)
    update.backward(loss_of(adapters), 1)  # the next step's gradients still reach the optimizer
    assert update.step(True) is True and launch.stepper.norms[1] == pytest.approx(0.5)


def test_without_max_grad_norm_nothing_is_clipped():
    update, adapters, launch = data_parallel(1, max_grad_norm=0.0)
    update.backward(loss_of(adapters), 1)
    update.step(True)
    assert launch.stepper.norms[0] > 1 and ("unscale",) not in launch.calls


def test_a_non_finite_loss_or_a_skipped_step_leaves_the_weights():
    update, adapters, launch = data_parallel(1, max_grad_norm=0.5)
    before = [p.detach().clone() for m in adapters.values() for p in m.parameters()]
    update.backward(loss_of(adapters), 1)
    assert update.step(False) is False
    assert launch.stepper.norms == [] and launch.stepper.zeroed == [False]
    assert all(
        torch.equal(p, b) for p, b in zip([p for m in adapters.values() for p in m.parameters()], before, strict=True)
    )
    assert all(not p.grad.any() for m in adapters.values() for p in m.parameters())
    update, adapters, launch = data_parallel(1, skipped=True)  # fp16 loss scaling skipped an overflow
    update.backward(loss_of(adapters), 1)
    assert update.step(True) is False


def test_the_weights_are_fp32_already():
    update, _, _ = data_parallel(1)
    assert isinstance(update.full_precision_weights(), nullcontext)


def test_only_the_main_process_saves_the_optimizer_with_its_layout(tmp_path):
    update, _, _ = data_parallel(2, main=False)
    update.save(tmp_path)
    assert list(tmp_path.iterdir()) == []
    update, adapters, _ = data_parallel(1)
    update.backward(loss_of(adapters), 1)
    update.step(True)
    update.save(tmp_path)
    saved = torch.load(tmp_path / checkpoints.OPTIMIZER_FILE, weights_only=True)
    assert saved["layout"] == {**LAYOUT, "flat": True}
    assert list(saved["state_dict"]["state"]) == [0, 1] and saved["state_dict"]["state"][0]["exp_avg"].shape == (8,)


def test_an_optimizer_file_without_a_layout_loads_as_it_is(tmp_path):
    update, adapters, _ = data_parallel(1)
    update.backward(loss_of(adapters), 1)
    update.step(True)
    torch.save(update.optimizer.state_dict(), tmp_path / checkpoints.OPTIMIZER_FILE)
    resumed, _, _ = data_parallel(1)
    resumed.load(tmp_path)
    assert torch.equal(
        resumed.optimizer.state_dict()["state"][0]["exp_avg"], update.optimizer.state_dict()["state"][0]["exp_avg"]
    )


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1), (1, 1)])
def test_the_optimizer_state_loads_into_another_number_of_processes(tmp_path, caplog, before, after):
    update, adapters, _ = data_parallel(before)
    update.backward(loss_of(adapters), 1)
    update.step(True)
    update.save(tmp_path)
    resumed, _, _ = data_parallel(after)
    with caplog.at_level(logging.WARNING, logger="difftune"):
        resumed.load(tmp_path)
    assert [r for r in caplog.records if r.name == "difftune"] == []
    state = resumed.optimizer.state_dict()["state"]
    sizes = [8, 2] if after == 1 else [6, 2, 2]
    assert [state[i]["exp_avg"].numel() for i in range(len(sizes))] == sizes
    assert state[0]["exp_avg"].reshape(-1)[:6].abs().sum() > 0  # the moments, not zeros


def test_a_state_that_cannot_be_repacked_starts_afresh_with_a_warning(tmp_path, caplog):
    state_dict = {
        "state": {0: {"step": t(1.0)[0], "exp_avg": t(1, 2, 3)}},  # 3 values for the 6 of unet/weight
        "param_groups": [{"lr": 0.1, "params": [0, 1]}, {"lr": 0.02, "params": [2]}],
    }
    saved = {"state_dict": state_dict, "layout": LAYOUT}
    torch.save(saved, tmp_path / checkpoints.OPTIMIZER_FILE)
    update, _, _ = data_parallel(1)
    with caplog.at_level(logging.WARNING, logger="difftune"):
        update.load(tmp_path)
    assert [r.getMessage() for r in caplog.records if r.name == "difftune"] == [
        "the optimizer state of unet/weight is not per element and cannot be re-packed: the optimizer's moments "
        "start afresh (the adapter weights are resumed)"
    ]
    assert update.optimizer.state_dict()["state"] == {}


def test_a_run_with_fewer_parameter_groups_starts_the_moments_afresh(tmp_path, caplog):
    """Saved with the text encoder's group (one process), resumed without it under two processes."""
    update, adapters, _ = data_parallel(1)
    update.backward(loss_of(adapters), 1)
    update.step(True)
    update.save(tmp_path)
    unet = {"unet": two_adapters()["unet"]}
    resumed = updates.DataParallelUpdate(Launch(2), args(), unet, [{"params": list(unet["unet"].parameters())}])
    with caplog.at_level(logging.WARNING, logger="difftune"):
        resumed.load(tmp_path)
    (message,) = [r.getMessage() for r in caplog.records if r.name == "difftune"]
    assert message.endswith(": the optimizer's moments start afresh (the adapter weights are resumed)")
    assert resumed.optimizer.state_dict()["state"] == {}


def test_adamw8bit_state_is_not_repacked_for_another_number_of_processes(tmp_path, caplog):
    torch.save({"state_dict": PER_PARAMETER, "layout": LAYOUT}, tmp_path / checkpoints.OPTIMIZER_FILE)
    update, _, _ = data_parallel(1, optimizer="adamw8bit")
    assert update.quantized_state is True and update.layout.flat is True
    with caplog.at_level(logging.WARNING, logger="difftune"):
        update.load(tmp_path)
    assert [r.getMessage() for r in caplog.records if r.name == "difftune"] == [
        f"{tmp_path}: the adamw8bit state is quantized per block of the packed buffer and cannot be re-packed for "
        "another number of processes; the optimizer's moments start afresh (the adapter weights are resumed)"
    ]
    assert update.optimizer.state_dict()["state"] == {}


# --- DeepSpeed ZeRO-2 (the engine faked: what the update asks of it) ---


class Engine:
    def __init__(self, module: nn.Module, applied: bool = True, rank: int = 0, loaded: str | None = "path") -> None:
        self.module, self.applied, self.global_rank, self.loaded = module, applied, rank, loaded
        self.calls = []
        self.optimizer = SimpleNamespace(clip_grad=0.25)

    def set_gradient_accumulation_boundary(self, last: bool) -> None:
        self.calls.append(("boundary", last))

    def backward(self, loss: torch.Tensor) -> None:
        self.calls.append(("backward", loss.item()))

    def step(self) -> None:
        self.calls.append(("step",))

    def was_step_applied(self) -> bool:
        return self.applied

    def save_checkpoint(self, directory, **kwargs) -> None:
        self.calls.append(("save", directory, kwargs))

    def load_checkpoint(self, directory, **kwargs):
        self.calls.append(("load", directory, kwargs))
        return self.loaded, {}

    def gradient_clipping(self) -> float:
        return 0.75


class DeepSpeedLaunch:
    def __init__(self, mixed_precision: str = "no", **engine) -> None:
        self.mixed_precision, self.engine_kwargs = mixed_precision, engine
        self.device = torch.device("cpu")

    def prepare(self, model, optimizer):
        self.prepared = (model, optimizer)
        self.engine = Engine(model, **self.engine_kwargs)
        return self.engine, optimizer


def deepspeed_update(monkeypatch, mixed_precision: str = "no", accum: int = 4, **engine):
    configured = []
    monkeypatch.setattr(deepspeed_zero, "configure", lambda *given: configured.append(given))
    monkeypatch.setattr(deepspeed_zero, "use_safe_loading", lambda e: configured.append(e))
    adapters = two_adapters()
    launch = DeepSpeedLaunch(mixed_precision, **engine)
    flags = args(gradient_accumulation_steps=accum)
    update = updates.DeepSpeedUpdate(launch, flags, adapters, two_groups(adapters))
    assert configured == [(launch, flags, 10), launch.engine]  # 2*3 + 2 + 1*2 trainable weights; safe loading
    assert launch.prepared[1] is update.optimizer
    return update, adapters, launch.engine


def test_deepspeed_prepares_the_adapters_together_with_the_optimizer(monkeypatch):
    update, adapters, engine = deepspeed_update(monkeypatch)
    assert update.kind == "deepspeed" and update.accum == 4 and update.engine is engine
    assert isinstance(engine.module, nn.ModuleDict) and dict(engine.module) == adapters
    assert update.models == adapters
    assert type(update.optimizer) is torch.optim.AdamW
    x = torch.ones(1, 3)
    assert adapters["unet"](x).dtype == torch.float32  # not wrapped in autocast without mixed precision


@pytest.mark.parametrize(("precision", "dtype"), [("bf16", torch.bfloat16), ("fp16", torch.float16)])
def test_deepspeed_s_low_precision_models_run_under_autocast_and_return_fp32(monkeypatch, precision, dtype):
    update, adapters, _ = deepspeed_update(monkeypatch, precision)
    unet = adapters["unet"]
    x = torch.tensor([[1.001, 2.003, 3.007]])
    with torch.no_grad():
        out = update.models["unet"](x)
        low = torch.nn.functional.linear(x.to(dtype), unet.weight.to(dtype), unet.bias.to(dtype)).float()
        full = torch.nn.functional.linear(x, unet.weight, unet.bias)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, low, rtol=1e-3, atol=1e-3)  # computed in the low precision
    assert (out - full).abs().max() > 1e-5


def test_deepspeed_micro_batches_and_backward(monkeypatch):
    update, _, engine = deepspeed_update(monkeypatch, accum=4)
    assert isinstance(update.micro_batch(False), nullcontext)
    update.micro_batch(True)
    update.backward(torch.tensor(3.0), 2)  # an epoch's shorter last step: 2 micro-batches of 4
    assert engine.calls == [("boundary", False), ("boundary", True), ("backward", 6.0)]


def test_deepspeed_step_reports_whether_the_engine_applied_it(monkeypatch):
    update, _, engine = deepspeed_update(monkeypatch)
    assert update.step(True) is True and engine.calls == [("step",)]
    update, _, engine = deepspeed_update(monkeypatch, applied=False)
    assert update.step(True) is False and update.step(False) is False
    update, _, engine = deepspeed_update(monkeypatch, applied=True)
    with pytest.raises(
        RuntimeError, match=r"^DeepSpeed applied an update from a non-finite loss; its overflow check is off$"
    ):
        update.step(False)


def test_deepspeed_saves_its_shards_without_the_fp32_scripts_on_rank_0(monkeypatch, tmp_path):
    for rank in (0, 1):
        folder = tmp_path / str(rank)
        folder.mkdir()
        for script in ("zero_to_fp32.py", "zero_to_torch.py", "other.py"):
            (folder / script).write_text("")
        update, _, engine = deepspeed_update(monkeypatch, rank=rank)
        update.save(folder)
        assert engine.calls == [
            (
                "save",
                str(folder),
                {"tag": "deepspeed", "client_state": {}, "save_latest": False, "exclude_frozen_parameters": True},
            )
        ]
        left = sorted(p.name for p in folder.iterdir())
        assert left == (["other.py"] if rank == 0 else ["other.py", "zero_to_fp32.py", "zero_to_torch.py"])
    update, _, _ = deepspeed_update(monkeypatch, rank=0)
    update.save(tmp_path / "0")  # the scripts already gone: no error


def test_deepspeed_loads_its_shards_with_this_run_s_clipping(monkeypatch, tmp_path):
    update, _, engine = deepspeed_update(monkeypatch)
    update.load(tmp_path)
    assert engine.calls == [
        ("load", str(tmp_path), {"tag": "deepspeed", "load_module_strict": False, "load_lr_scheduler_states": False})
    ]
    assert engine.optimizer.clip_grad == 0.75
    update, _, engine = deepspeed_update(monkeypatch, loaded=None)
    with pytest.raises(UserError) as raised:
        update.load(tmp_path)
    assert str(raised.value) == f"{tmp_path} holds no DeepSpeed state to resume from: pick another checkpoint"


def test_deepspeed_full_precision_weights_swap_in_the_fp32_masters_and_back(monkeypatch):
    update, adapters, _ = deepspeed_update(monkeypatch)
    low = adapters["unet"].weight
    low.data = low.data.to(torch.bfloat16)
    frozen = adapters["unet"].bias
    frozen.requires_grad_(False)
    frozen.data = frozen.data.to(torch.bfloat16)
    masters = {id(low): torch.full((2, 3), 0.125)}
    fake = ModuleType("deepspeed.utils")
    fake.safe_get_full_fp32_param = lambda p: masters[id(p)]
    monkeypatch.setitem(sys.modules, "deepspeed", ModuleType("deepspeed"))
    monkeypatch.setitem(sys.modules, "deepspeed.utils", fake)
    low_data = low.data
    with update.full_precision_weights():
        assert low.dtype == torch.float32 and low.tolist() == [[0.125] * 3] * 2
        assert frozen.dtype == torch.bfloat16  # frozen: not gathered
        assert adapters["text_encoder_one"].weight.dtype == torch.float32  # fp32 already
    assert low.dtype == torch.bfloat16 and torch.equal(low.data, low_data)
    with pytest.raises(KeyError), update.full_precision_weights():
        raise KeyError("a failure while saving")
    assert low.dtype == torch.bfloat16  # restored after an error too


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("DEEPSPEED", updates.DeepSpeedUpdate),
        ("MULTI_GPU", updates.DataParallelUpdate),
        ("NO", updates.DataParallelUpdate),
    ],
)
def test_the_update_follows_the_launch(monkeypatch, kind, expected):
    made = []
    monkeypatch.setattr(updates, "DeepSpeedUpdate", lambda *a: made.append(("deepspeed", a)) or "ds")
    monkeypatch.setattr(updates, "DataParallelUpdate", lambda *a: made.append(("ddp", a)) or "ddp")
    accelerator = SimpleNamespace(distributed_type=SimpleNamespace(value=kind))
    result = updates.make_update(accelerator, "a", "b", "c")
    assert made == [("deepspeed" if expected.kind == "deepspeed" else "ddp", (accelerator, "a", "b", "c"))]
    assert result == ("ds" if expected.kind == "deepspeed" else "ddp")

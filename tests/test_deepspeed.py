"""DeepSpeed ZeRO-2 with the shipped accelerate config, on two CPU processes: trains as DDP does, shards the
optimizer state, resumes exactly (after a SIGKILL during a save too), saves fp32 adapters from bf16 runs (the
SDXL UNet's LoKr, the Stable Cascade prior's LoRA); wrong set-ups fail in one line."""

import importlib.util
import signal
import subprocess
import time
from types import SimpleNamespace

import psutil
import pytest
import torch
from conftest import ROOT, launch, launch_command
from helpers import adapter_weights, cascade_args, max_difference, one_line_error, resumed_copy, sdxl_args
from safetensors.torch import load_file

from difftune.cli.errors import UserError
from difftune.storage import checkpoints
from difftune.train import deepspeed_zero, resume, run_setup

# Only the runs need DeepSpeed; the config and resume checks below are difftune's own code.
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None, reason="needs deepspeed")

ZERO2 = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
EMA = ("--use_ema", "--ema_decay", "0.9", "--validation_split", "0.2")
EXTRA = ("--random_flip", "--train_text_encoder", "--gradient_accumulation_steps", "2", "--rank_dropout", "0.2")


def zero2_run(assets, out, *more, mixed_precision: str = "no") -> None:
    proc = launch(
        "train_sdxl_lokr", sdxl_args(assets, out, *EXTRA, *more), processes=2, config_file=ZERO2,
        mixed_precision=mixed_precision,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]


def resumed_zero2_run(assets, full, resumed, *more, mixed_precision: str = "no") -> None:
    """Resume from full/step2 as "latest" in a dir holding only it."""
    resumed_copy(full / "step2", resumed)
    zero2_run(assets, resumed, *more, "--resume_from_checkpoint", "latest", mixed_precision=mixed_precision)
    assert not list(resumed.glob(".partial-*"))


# Updates proportional to the gradients (no clipping, Adam's epsilon above their size), so that a wrong
# gradient scale (accumulation, averaging over processes) changes the weights; no weight decay, which
# DDP skips for weights that get no gradient (the first SDXL text encoder's last layer) and DeepSpeed not.
GRADIENT_SENSITIVE = (
    "--max_grad_norm", "0", "--adam_epsilon", "1e-2", "--learning_rate", "1e-2", "--adam_weight_decay", "0",
)  # fmt: skip


def kill_during_a_zero2_save(assets, out, *more) -> str:
    """Run with a checkpoint every step and SIGKILL every process while a DeepSpeed shard of a checkpoint
    after the first is being written; the checkpoint being written is returned."""
    argv = sdxl_args(assets, out, *EXTRA, *more, checkpointing_steps=1)
    command, env = launch_command("train_sdxl_lokr", argv, processes=2, config_file=ZERO2)
    process = subprocess.Popen(command, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not (list(out.glob("step*")) and (saving := list(out.glob(".partial-step*/deepspeed")))):
        assert process.poll() is None, "the run ended before it could be killed during a save"
        assert time.monotonic() < deadline
        time.sleep(0.001)
    # The launcher and both training processes (which run in sessions of their own), all at once.
    for each in [*psutil.Process(process.pid).children(recursive=True), psutil.Process(process.pid)]:
        each.send_signal(signal.SIGKILL)
    process.wait()
    return saving[0].parent.name


@pytest.mark.slow
@needs_deepspeed
def test_zero2_trains_like_ddp_shards_its_state_and_resumes_exactly(assets, tmp_path, run_main, capsys):
    zero2, ddp, resumed = tmp_path / "zero2", tmp_path / "ddp", tmp_path / "resumed"
    zero2_run(assets, zero2, *GRADIENT_SENSITIVE)
    step_dir = zero2 / "step4"

    # One optimizer shard per process; the model file holds the adapters only, not the frozen base model.
    shards = sorted(path.name for path in (step_dir / "deepspeed").glob("*optim_states.pt"))
    assert shards == [f"zero_pp_rank_{rank}_mp_rank_00_optim_states.pt" for rank in (0, 1)]
    with torch.serialization.safe_globals(deepspeed_zero._safe_globals()):
        module = torch.load(step_dir / "deepspeed" / "mp_rank_00_model_states.pt", weights_only=True)["module"]
    assert module and all(".lokr_w" in name for name in module), sorted(module)[:3]

    # The same run under DDP ends with the same weights, up to the order gradients are summed in;
    # two steps move them a thousand times as far.
    proc = launch("train_sdxl_lokr", sdxl_args(assets, ddp, *EXTRA, *GRADIENT_SENSITIVE), processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_difference(adapter_weights(step_dir), adapter_weights(ddp / "step4")) <= 1e-6
    assert max_difference(adapter_weights(zero2 / "step2"), adapter_weights(step_dir)) > 1e-3

    # Killed while writing its optimizer shards: the checkpoint is not picked, the run resumes from the one
    # before and ends where the uninterrupted one did.
    interrupted = kill_during_a_zero2_save(assets, resumed, *GRADIENT_SENSITIVE)
    latest = checkpoints.list_checkpoints(resumed)[-1][1]
    assert latest.name != interrupted.removeprefix(".partial-")
    zero2_run(assets, resumed, *GRADIENT_SENSITIVE, "--resume_from_checkpoint", "latest")
    assert not list(resumed.glob(".partial-*"))
    assert max_difference(adapter_weights(resumed / "step4"), adapter_weights(step_dir)) <= 1e-6

    # Its optimizer state is sharded: it resumes under DeepSpeed only, which a one-line error says.
    argv = sdxl_args(assets, tmp_path / "elsewhere", *EXTRA, "--resume_from_checkpoint", zero2 / "step2")
    assert run_main("train_sdxl_lokr", argv) == 2
    assert "was written under deepspeed, this run uses ddp" in one_line_error(capsys)


@pytest.mark.slow
@needs_deepspeed
def test_zero2_bf16_saves_fp32_adapters_and_ema_that_load_with_peft_and_resume_exactly(assets, tmp_path):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    full, resumed = tmp_path / "full", tmp_path / "resumed"
    zero2_run(assets, full, *EMA, mixed_precision="bf16")
    saved = load_file(full / "step4" / "unet" / "adapter_model.safetensors")
    # DeepSpeed runs the models in bf16; what is saved is its fp32 master copy, not a widened bf16 one;
    # and the EMA averages those master weights.
    for path in (full / "step4/unet", full / "step4/ema/unet"):
        weights = load_file(path / "adapter_model.safetensors")
        assert {weight.dtype for weight in weights.values()} == {torch.float32}
        assert any((weight - weight.bfloat16().float()).abs().max() > 0 for weight in weights.values())
    assert max_difference(adapter_weights(full / "step4"), adapter_weights(full / "step4/ema")) > 1e-5

    unet = UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet")
    unet = PeftModel.from_pretrained(unet, full / "step4" / "unet", adapter_name="default")
    loaded = {name: param for name, param in unet.named_parameters() if ".lokr_w" in name}
    assert len(loaded) == len(saved)
    for name, weight in saved.items():
        assert torch.equal(loaded[f"{name}.default"], weight)  # peft names the parameter after the adapter

    resumed_zero2_run(assets, full, resumed, *EMA, mixed_precision="bf16")
    assert max_difference(adapter_weights(resumed / "step4"), adapter_weights(full / "step4")) <= 1e-6
    assert max_difference(adapter_weights(resumed / "step4/ema"), adapter_weights(full / "step4/ema")) <= 1e-6
    states = [checkpoints.read_json(run / "step4" / checkpoints.STATE_FILE) for run in (full, resumed)]
    assert abs(states[0]["eval_loss_ema"] - states[1]["eval_loss_ema"]) <= 1e-6


@pytest.mark.slow
@needs_deepspeed
def test_zero2_bf16_trains_the_stable_cascade_prior_and_resumes_exactly(assets, tmp_path):
    """The v3 prior under ZeRO-2 in bf16 (difftune's LoRA forward on DeepSpeed's bf16 weights), with its text
    encoder: fp32 adapters that moved, and a resume from step 2 that ends where the whole run did."""
    full, resumed = tmp_path / "full", tmp_path / "resumed"

    def run(out, *more) -> None:
        argv = cascade_args(assets, out, "--train_text_encoder", *more)
        proc = launch("train_wuerstchen_lora", argv, processes=2, config_file=ZERO2, mixed_precision="bf16")
        assert proc.returncode == 0, proc.stderr[-3000:]

    run(full)
    weights = adapter_weights(full / "step4")
    assert {weight.dtype for weight in weights.values()} == {torch.float32}
    assert {name.split("/")[0] for name in weights} == {"prior", "text_encoder"}
    assert max(w.abs().max().item() for name, w in weights.items() if "lora_B" in name) > 0  # B starts at 0
    resumed_copy(full / "step2", resumed)
    run(resumed, "--resume_from_checkpoint", "latest")
    assert max_difference(adapter_weights(resumed / "step4"), weights) <= 1e-6


def fake_accelerator(config: dict) -> SimpleNamespace:
    return SimpleNamespace(state=SimpleNamespace(deepspeed_plugin=SimpleNamespace(deepspeed_config=config)))


def run_flags() -> SimpleNamespace:
    return SimpleNamespace(train_batch_size=3, gradient_accumulation_steps=2, max_grad_norm=0.5)


def test_the_script_flags_fill_the_deepspeed_config():
    config = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": 1, "gradient_clipping": "auto"}
    accelerator = fake_accelerator(config)
    deepspeed_zero.configure(accelerator, run_flags(), trainable=12345)
    assert config["train_micro_batch_size_per_gpu"] == 3
    assert config["gradient_accumulation_steps"] == accelerator.gradient_accumulation_steps == 2
    assert config["gradient_clipping"] == 0.5
    # Communication buffers the size of the adapter, not DeepSpeed's default of 5e8 elements.
    assert config["zero_optimization"]["reduce_bucket_size"] == 12345
    assert config["zero_optimization"]["allgather_bucket_size"] == 12345


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"zero_optimization": {"stage": 3}}, "ZeRO stage 3; difftune supports ZeRO-2 only"),
        ({"zero_optimization": {"stage": 1}}, "ZeRO stage 1; difftune supports ZeRO-2 only"),
        ({"zero_optimization": {"stage": 2}, "optimizer": {"type": "AdamW"}}, "sets an optimizer or scheduler"),
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            "offloads to cpu \\(offload_optimizer\\)",
        ),
        ({"zero_optimization": {"stage": 2}, "bf16": {"check_grad_overflow": False}}, "overflow check"),
        ({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}, "overflow check"),
    ],
)
def test_unsupported_deepspeed_configs_are_refused(config, message):
    with pytest.raises(UserError, match=message):
        deepspeed_zero.configure(fake_accelerator(config), run_flags(), trainable=100)


def test_deepspeed_checkpoints_resume_with_the_same_number_of_processes(tmp_path):
    state = {"distributed": "deepspeed", "num_processes": 2}
    resume.check_resumable(state, "deepspeed", 2, tmp_path)
    with pytest.raises(UserError, match="optimizer shards for 2 processes, this run has 4"):
        resume.check_resumable(state, "deepspeed", 4, tmp_path)
    resume.check_resumable({"num_processes": 1}, "ddp", 4, tmp_path)  # written before the field existed


def test_an_output_dir_some_process_cannot_see_is_refused(tmp_path, monkeypatch):
    monkeypatch.setattr(run_setup, "main_decides", lambda accelerator, decide: decide())
    second_machine = SimpleNamespace(
        num_processes=2,
        is_main_process=False,  # so nobody writes the probe file: the main process's writes are elsewhere
        device=torch.device("cpu"),
        wait_for_everyone=lambda: None,
        gather=lambda seen: torch.cat([torch.tensor([1]), seen]),
    )
    with pytest.raises(UserError, match=r"processes \[1\] cannot see --output_dir .*storage that every machine"):
        run_setup.check_shared_output_dir(second_machine, tmp_path)
    run_setup.check_shared_output_dir(SimpleNamespace(num_processes=1), tmp_path)  # nothing to check

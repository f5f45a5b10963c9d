"""Options that must not change the result (gradient checkpointing) or must survive a resume (optimizers, EMA)."""

import logging

import pytest
import torch
from helpers import adapter_weights, max_difference, one_line_error, sdxl_args, wuerstchen_args

from difftune.adapters import ema
from difftune.storage import checkpoints


@pytest.mark.parametrize(
    ("script", "make"), [("train_sdxl_lokr", sdxl_args), ("train_wuerstchen_lora", wuerstchen_args)]
)
def test_gradient_checkpointing_gives_the_same_weights(assets, tmp_path, run_main, monkeypatch, script, make):
    checkpointed_calls = count_checkpointed_calls(monkeypatch)
    plain, checkpointed = tmp_path / "plain", tmp_path / "checkpointed"
    assert run_main(script, make(assets, plain, "--train_text_encoder", steps=2)) == 0
    assert not checkpointed_calls
    argv = make(assets, checkpointed, "--train_text_encoder", "--gradient_checkpointing", "--allow_tf32", steps=2)
    assert run_main(script, argv) == 0
    assert max_difference(adapter_weights(plain / "step2"), adapter_weights(checkpointed / "step2")) <= 1e-5
    # It was really on, in the denoiser and the text encoders' layers, at every step.
    expected = {"train_sdxl_lokr": {"ResnetBlock2D", "BasicTransformerBlock"}, "train_wuerstchen_lora": {"ResBlock"}}
    assert expected[script] <= set(checkpointed_calls), checkpointed_calls
    # 2 steps x 2 layers x the text encoders (SDXL's two, Wuerstchen's one).
    assert checkpointed_calls["text encoder layer"] == 2 * 2 * (2 if script == "train_sdxl_lokr" else 1)


def count_checkpointed_calls(monkeypatch) -> dict[str, int]:
    """Count activation-checkpointed calls: diffusers' by the class of the block they run (it calls
    torch.utils.checkpoint.checkpoint), transformers' (its own import of it) as "text encoder layer"."""
    import collections

    import torch.utils.checkpoint
    import transformers.modeling_utils

    calls = collections.Counter()
    real = torch.utils.checkpoint.checkpoint

    def counting(label):
        def checkpoint(function, *args, **kwargs):
            calls[label or type(getattr(function, "__self__", None)).__name__] += 1
            return real(function, *args, **kwargs)

        return checkpoint

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting(None))
    monkeypatch.setattr(transformers.modeling_utils, "checkpoint", counting("text encoder layer"))
    return calls


@pytest.mark.parametrize(
    "optimizer",
    [
        ("--use_8bit_adam",),
        ("--optimizer", "prodigy", "--learning_rate", "1.0", "--prodigy_d_coef", "1000"),
        ("--optimizer", "adafactor", "--learning_rate", "1e-2"),
    ],
    ids=["adamw8bit", "prodigy", "adafactor"],
)
def test_optimizer_and_ema_resume_exactly(assets, tmp_path, run_main, optimizer):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    flags = (*optimizer, "--use_ema", "--ema_decay", "0.9", "--train_text_encoder", "--validation_split", "0.2")
    assert run_main("train_sdxl_lokr", sdxl_args(assets, full, *flags, steps=4)) == 0
    argv = sdxl_args(assets, resumed, *flags, "--resume_from_checkpoint", full / "step2", steps=4)
    assert run_main("train_sdxl_lokr", argv) == 0
    assert max_difference(adapter_weights(full / "step4"), adapter_weights(resumed / "step4")) <= 1e-6
    assert max_difference(adapter_weights(full / "step4" / "ema"), adapter_weights(resumed / "step4" / "ema")) <= 1e-6
    assert max_difference(adapter_weights(full / "step2"), adapter_weights(full / "step4")) > 1e-4
    # The average trails the live weights.
    assert max_difference(adapter_weights(full / "step4"), adapter_weights(full / "step4" / "ema")) > 1e-5
    # The held-out losses, live and EMA: the same weights give the same numbers, whichever run computed them.
    full_state, resumed_state = (
        checkpoints.read_json(run / "step4" / checkpoints.STATE_FILE) for run in (full, resumed)
    )
    assert full_state["eval_loss"] != full_state["eval_loss_ema"]
    for key in ("eval_loss", "eval_loss_ema"):
        assert abs(full_state[key] - resumed_state[key]) <= 1e-6


# diffusers EMAModel with --ema_update_after_step 1: decay 0 (a copy) for steps 1 and 2, then at step t
# min(--ema_decay, (1+k)/(10+k)) or with --ema_power p min(--ema_decay, 1-(1+k)^-p), k = t - 2.
@pytest.mark.parametrize(
    ("flags", "decays"),
    [
        (("--ema_decay", "0.2"), [0.0, 0.0, 2 / 11, 0.2]),
        (("--ema_decay", "0.9", "--ema_power", "0.5"), [0.0, 0.0, 1 - 2**-0.5, 1 - 3**-0.5]),
    ],
    ids=["default-warmup", "power-warmup"],
)
def test_ema_checkpoint_is_the_average_of_the_live_weights(assets, tmp_path, run_main, flags, decays):
    from diffusers import UNet2DConditionModel
    from peft import PeftModel

    out = tmp_path / "out"
    argv = sdxl_args(assets, out, "--use_ema", "--ema_update_after_step", "1", *flags, checkpointing_steps=1)
    assert run_main("train_sdxl_lokr", argv) == 0
    expected = None
    for step, decay in enumerate(decays, start=1):
        live = adapter_weights(out / f"step{step}")
        expected = live if expected is None else {k: decay * expected[k] + (1 - decay) * live[k] for k in live}
        assert max_difference(adapter_weights(out / f"step{step}" / ema.EMA_DIR), expected) <= 1e-6
    assert max_difference(live, expected) > 1e-5  # the last step averaged

    # The user's snippet loads the EMA adapter as it loads the live one.
    unet = UNet2DConditionModel.from_pretrained(assets / "sdxl", subfolder="unet")
    unet = PeftModel.from_pretrained(unet, out / "step4" / ema.EMA_DIR / "unet", adapter_name="default")
    loaded = {n.removesuffix(".default"): p for n, p in unet.named_parameters() if ".lokr_w" in n}
    assert len(loaded) == len([k for k in expected if k.startswith("unet/")])
    for name, weight in loaded.items():
        assert torch.allclose(weight, expected[f"unet/{name}"], atol=1e-6)


def test_ema_writes_the_diffusers_lora_file_too(assets, tmp_path, run_main):
    from safetensors.torch import load_file

    out = tmp_path / "out"
    assert (
        run_main("train_wuerstchen_lora", wuerstchen_args(assets, out, "--use_ema", steps=2, checkpointing_steps=1))
        == 0
    )
    first, second, average = (
        load_file(path / "pytorch_lora_weights.safetensors")
        for path in (out / "step1", out / "step2", out / "step2" / "ema")
    )
    assert average.keys() == second.keys() and any(k.startswith("prior.") for k in average)
    decay = 2 / 11  # step 2: min(0.9999, (1+1)/(10+1))
    for key, value in average.items():
        assert torch.allclose(value, decay * first[key] + (1 - decay) * second[key], atol=1e-6)


@pytest.mark.parametrize("optimizer", ["prodigy", "adafactor"])
def test_optimizers_with_per_shard_statistics_are_refused_under_zero2(
    assets, tmp_path, run_main, capsys, monkeypatch, optimizer
):
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "out", "--optimizer", optimizer)) == 2
    assert f"--optimizer {optimizer} does not work under DeepSpeed ZeRO-2" in one_line_error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (("--use_8bit_adam", "--optimizer", "prodigy"), "--use_8bit_adam means --optimizer adamw8bit, not prodigy"),
        (("--optimizer", "prodigy", "--text_encoder_lr", "1e-4"), "prodigy takes one learning rate"),
        (("--optimizer", "sgd"), "invalid choice: 'sgd'"),
        (("--ema_decay", "1.5"), "--ema_decay must be in [0, 1]"),
    ],
)
def test_bad_optimizer_and_ema_flags_are_refused(assets, tmp_path, run_main, capsys, flags, message):
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "out", *flags)) == 2
    assert message in one_line_error(capsys)


def test_prodigy_warns_about_a_small_learning_rate(assets, tmp_path, run_main, caplog):
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "out", "--optimizer", "prodigy", steps=1)) == 0
    assert "expects --learning_rate ~1.0, got 0.001" in caplog.text


def test_validation_images_come_from_the_ema_weights(assets, tmp_path, run_main, monkeypatch, caplog):
    from helpers import REAL_TRAIN
    from safetensors.torch import load_file

    from difftune.train import loop

    seen, after = {}, {}

    def spy(accelerator, args, **kwargs):
        unet = kwargs["adapters"]["unet"]

        def validate(step, peft_models):
            seen.update({n: p.detach().clone() for n, p in peft_models["unet"].named_parameters() if p.requires_grad})

        result = REAL_TRAIN(accelerator, args, **{**kwargs, "validate": validate})
        after.update({n: p.detach().clone() for n, p in unet.named_parameters() if p.requires_grad})
        return result

    monkeypatch.setattr(loop, "train", spy)
    caplog.set_level(logging.INFO, logger="difftune")
    out = tmp_path / "out"
    argv = sdxl_args(assets, out, "--use_ema", "--validation_prompt", "x", "--validation_steps", "2", steps=2)
    assert run_main("train_sdxl_lokr", argv) == 0
    assert "validation images at step 2 use the EMA weights" in caplog.text
    average = load_file(out / "step2" / "ema" / "unet" / "adapter_model.safetensors")
    live = load_file(out / "step2" / "unet" / "adapter_model.safetensors")
    assert seen.keys() == {f"{k}.default" for k in average}  # peft names the parameters after the adapter
    assert all(torch.equal(seen[f"{k}.default"], v) for k, v in average.items())
    assert all(torch.equal(after[f"{k}.default"], v) for k, v in live.items())  # the live weights came back
    assert any(not torch.equal(average[k], live[k]) for k in live)

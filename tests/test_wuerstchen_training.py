"""Wuerstchen prior LoRA training end to end: both loading routes, validation, loss, bad input."""

import json

import numpy as np
import pytest
import torch
from conftest import launch, run_script
from helpers import assert_only_adapter_changed, prior_inputs, spy_on_training, wuerstchen_args
from PIL import Image

from difftune.generate import validation
from difftune.models import wuerstchen

# A random tiny prior's output hardly depends on its attention: LoRA on the feed-forwards and the
# output layer too gives it the reach to overfit the toy images.
TARGETS = "to_q,to_k,to_v,to_out.0,channelwise.0,channelwise.4,out.1"


@pytest.fixture(scope="module")
def trained(assets, tmp_path_factory):
    """One in-process run, keeping the live trained prior for comparisons."""
    out = tmp_path_factory.mktemp("wuerstchen") / "run"
    patch = pytest.MonkeyPatch()
    captured = spy_on_training(patch.setattr, adapter="prior")

    argv = wuerstchen_args(
        assets, out, "--validation_prompt", "a red circle", "--num_validation_images", "1",
        "--validation_steps", "100", "--validation_inference_steps", "2", "--center_crop",
        "--target_modules", TARGETS, "--max_train_samples", "4", steps=40, lr="3e-3",
    )  # fmt: skip
    try:
        assert run_script("train_wuerstchen_lora", argv) == 0
    finally:
        patch.undo()
    captured["prior"] = captured["model"]
    return out, captured


def test_only_lora_weights_change(trained):
    _, captured = trained
    assert_only_adapter_changed(captured["before"], captured["after"], "lora_")


def test_checkpoint_layout(trained):
    """Each file of a checkpoint holds what it should: the flags, the step, the optimizer and scheduler state,
    the same LoRA weights in peft's and diffusers' files."""
    from safetensors.torch import load_file

    from difftune.storage import checkpoints

    out, captured = trained
    step = out / "step40"
    config = json.loads((step / "prior" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"], config["lora_dropout"]) == ("LORA", 8, 8, 0.0)
    assert sorted(config["target_modules"]) == sorted(TARGETS.split(","))
    peft_weights = load_file(step / "prior" / "adapter_model.safetensors")
    diffusers_weights = load_file(step / "pytorch_lora_weights.safetensors")
    live = {n.replace(".default", ""): p for n, p in captured["after"].items() if "lora_" in n}
    assert peft_weights.keys() == live.keys() and all(torch.equal(peft_weights[k], live[k]) for k in live)
    # diffusers' file: the same tensors under prior.<module>.lora_A / lora_B.weight.
    assert {k.removeprefix("base_model.model.") for k in peft_weights} == {
        k.removeprefix("prior.") for k in diffusers_weights
    }
    for key, value in peft_weights.items():
        assert torch.equal(diffusers_weights["prior." + key.removeprefix("base_model.model.")], value)
    assert json.loads((step / "args.json").read_text())["target_modules"] == TARGETS.split(",")
    state = checkpoints.read_json(step / checkpoints.STATE_FILE)
    assert (state["global_step"], state["num_processes"], state["distributed"]) == (40, 1, "ddp")
    scheduler = checkpoints.load_torch_state(step / "lr_scheduler.pt")
    assert scheduler["last_epoch"] == 40 and scheduler["_last_lr"] == [3e-3]
    saved = checkpoints.load_torch_state(step / "optimizer.pt")
    # the state with the names of the parameters it belongs to (another process count can re-pack it)
    assert [name for name, _ in saved["layout"]["groups"][0]] == [
        f"prior/{n}" for n in captured["after"] if "lora_" in n
    ]
    assert saved["layout"]["flat"]  # one process: packed into one buffer
    optimizer = saved["state_dict"]
    moments = optimizer["state"][0]
    assert moments["step"].item() == 40 and moments["exp_avg"].numel() == sum(v.numel() for v in peft_weights.values())
    card = (out / "README.md").read_text()
    assert "load_lora_weights(checkpoint)" in card and "PeftModel.from_pretrained(pipe.prior_pipe.prior" in card


def test_both_loading_routes_reproduce_the_trained_prior(trained, assets):
    from diffusers import WuerstchenPriorPipeline
    from peft import PeftModel

    out, captured = trained
    step = out / "step40"
    inputs = prior_inputs(captured["prior"])
    with torch.no_grad():
        expected = captured["prior"](*inputs)
        base = wuerstchen.load_prior(str(assets / "wuerstchen-prior"))
        plain = base.prior(*inputs)
        assert (plain - expected).abs().max() > 1e-3  # training changed the prior

        peft_prior = PeftModel.from_pretrained(base.prior, step / "prior")
        assert torch.equal(peft_prior(*inputs), expected)

        fresh = wuerstchen.load_prior(str(assets / "wuerstchen-prior"))
        prior_pipe = WuerstchenPriorPipeline(
            tokenizer=fresh.tokenizer, text_encoder=fresh.text_encoder, prior=fresh.prior, scheduler=fresh.scheduler
        )
        prior_pipe.load_lora_weights(step)
        assert torch.allclose(prior_pipe.prior(*inputs), expected, atol=1e-6, rtol=0)

        combined = wuerstchen.build_combined_pipeline(
            wuerstchen.load_prior(str(assets / "wuerstchen-prior")), wuerstchen.load_decoder(str(assets / "wuerstchen"))
        )
        combined.prior_pipe.load_lora_weights(step)
        assert torch.allclose(combined.prior_pipe.prior(*inputs), expected, atol=1e-6, rtol=0)


def test_validation_images_use_the_lora(trained, assets):
    from diffusers.pipelines.deprecated.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS

    out, _ = trained
    saved = np.asarray(Image.open(out / "validation" / "step000040_prompt0_0.png"), dtype=np.int16)
    pipe = wuerstchen.build_combined_pipeline(
        wuerstchen.load_prior(str(assets / "wuerstchen-prior")), wuerstchen.load_decoder(str(assets / "wuerstchen"))
    )

    def image():
        kwargs = {"prior_timesteps": DEFAULT_STAGE_C_TIMESTEPS, "num_inference_steps": 2, "height": 128, "width": 128}
        got = validation.generate(pipe, ["a red circle"], 1, 0, torch.device("cpu"), **kwargs)
        return np.asarray(got["a red circle"][0], dtype=np.int16)

    base_image = image()
    pipe.prior_pipe.load_lora_weights(out / "step40")
    lora_image = image()
    assert np.abs(base_image - saved).max() > 0, "validation image equals the base model's"
    assert np.abs(lora_image - saved).max() <= 1  # same seed, same LoRA: the same picture


@torch.no_grad()
def prior_loss(prior, image_encoder, text_encoder, tokenizer, scheduler, records) -> float:
    """Stage-C loss on the given images at fixed noise and timesteps."""
    from torchvision.transforms import functional as F

    generator = torch.Generator().manual_seed(1)
    total, count = 0.0, 0
    for record in records:
        image = Image.open(record["path"]).convert("RGB")
        image = F.center_crop(F.resize(image, 128, antialias=True), 128)
        pixels = F.normalize(F.to_tensor(image), wuerstchen.IMAGENET_MEAN, wuerstchen.IMAGENET_STD)[None]
        x0 = wuerstchen.image_embeddings(image_encoder, pixels)
        tokens = tokenizer(record["text"], padding="max_length", max_length=77, truncation=True, return_tensors="pt")
        text = text_encoder(tokens.input_ids, attention_mask=tokens.attention_mask).last_hidden_state
        for t in (0.1, 0.3, 0.5, 0.7, 0.9):
            noise = torch.randn(x0.shape, generator=generator)
            r = torch.tensor([t])
            pred = prior(scheduler.add_noise(x0, noise, r), r, text)
            total += torch.nn.functional.mse_loss(pred, noise).item()
            count += 1
    return total / count


def test_loss_falls(trained, assets):
    _, captured = trained
    base = wuerstchen.load_prior(str(assets / "wuerstchen-prior"))
    encoder = wuerstchen.load_image_encoder(str(assets / "effnet" / "effnet.safetensors"))
    # The images the run trained on: --max_train_samples picks them with the run's seed.
    from difftune.data import load_captioned_images

    chosen = load_captioned_images(None, None, str(assets / "data"), "image", "text", 4, 0)
    records = [{"path": row["image"]["path"], "text": row["text"]} for row in chosen]
    common = (encoder, base.text_encoder, base.tokenizer, base.scheduler, records)
    before = prior_loss(base.prior, *common)
    after = prior_loss(captured["prior"], *common)
    # The tiny prior levels off near 0.17 from 0.22 with these settings; untrained it stays at 0.22.
    assert after < 0.85 * before, (before, after)


@pytest.mark.slow
def test_accelerate_launch_end_to_end_with_text_encoder(assets, tmp_path):
    from diffusers import WuerstchenPriorPipeline

    out = tmp_path / "run"
    args = wuerstchen_args(
        assets, out, "--train_text_encoder", "--validation_prompt", "a blue square", "--num_validation_images", "1",
        "--validation_steps", "2", "--validation_inference_steps", "2",
    )  # fmt: skip
    proc = launch("train_wuerstchen_lora", args, mixed_precision="bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (2, 4):
        assert (out / f"step{step}" / "text_encoder" / "adapter_model.safetensors").is_file()
        assert len(list((out / "validation").glob(f"step{step:06d}_*.png"))) == 1
    # The diffusers file carries the text encoder's LoRA too; loading it changes the prompt embeddings.
    parts = wuerstchen.load_prior(str(assets / "wuerstchen-prior"))
    pipe = WuerstchenPriorPipeline(
        tokenizer=parts.tokenizer, text_encoder=parts.text_encoder, prior=parts.prior, scheduler=parts.scheduler
    )
    ids = parts.tokenizer("a blue square", return_tensors="pt").input_ids
    with torch.no_grad():
        before = pipe.text_encoder(ids).last_hidden_state
        pipe.load_lora_weights(out / "step4")
        after = pipe.text_encoder(ids).last_hidden_state
    assert (before - after).abs().max() > 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (("--image_encoder_path", "/nonexistent/effnet.safetensors"), "does not exist"),
        (("--image_encoder_path", "WRONG_KEYS"), "is not an EfficientNetV2-S Wuerstchen image encoder"),
        (("--pretrained_prior_model_name_or_path", "SDXL"), "not a WuerstchenPriorPipeline"),
        (("--resolution", "129"), "multiple of 8"),
        (("--train_data_dir", "/nonexistent"), "does not exist"),
    ],
)
def test_bad_input(assets, tmp_path, run_main, capsys, change, message):
    flag, value = change
    value = {
        "WRONG_KEYS": assets / "sdxl" / "unet" / "diffusion_pytorch_model.safetensors",
        "SDXL": assets / "sdxl",
    }.get(value, value)
    argv = wuerstchen_args(assets, tmp_path / "out")
    if flag in argv:
        argv[argv.index(flag) + 1] = str(value)
    else:
        argv += [flag, str(value)]
    assert run_main("train_wuerstchen_lora", argv) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and message in errors[0], errors


def decoder_pipe_config(levels: int):
    """What decodable_size reads from a combined pipeline: diffusers' Wuerstchen defaults, `levels` decoder levels."""
    from types import SimpleNamespace as NS

    return NS(
        prior_pipe=NS(config=NS(resolution_multiple=42.67)),
        decoder_pipe=NS(config=NS(latent_dim_scale=10.67), decoder=NS(config=NS(patch_size=2, c_hidden=[1] * levels))),
    )


@pytest.mark.parametrize(
    ("levels", "size", "expected"),
    [
        # The real decoder (4 levels): its latent, int(ceil(size / 42.67) * 10.67), must divide by 2 * 2**3.
        (4, 1024, 1024), (4, 768, 768), (4, 192, 256), (4, 576, 640), (4, 832, 896), (4, 960, 1024), (4, 168, 128),
        # The tiny one (1 level): an even latent; 168 -> 4 embeddings -> 42 passes, 192 -> 5 -> 53 does not.
        (1, 168, 168), (1, 192, 256), (1, 128, 128),
    ],
)  # fmt: skip
def test_decodable_size(levels, size, expected):
    assert wuerstchen.decodable_size(decoder_pipe_config(levels), size) == expected


def test_resolution_192_validates_and_infers_with_the_decoder_offloaded(assets, tmp_path, monkeypatch, caplog, capsys):
    """192 is an odd multiple of 64: validation and infer.py generate at 256 (the nearest size the tiny decoder
    accepts; 128 is as near, the larger wins) and say so. Between validations the decoder, its text encoder
    and the VQGAN are offloaded (on the CPU the device is the CPU: the offloads are recorded)."""
    from difftune.train import placement

    events = []
    real_offload, real_validation = placement.offload, validation.run_validation

    def spy_offload(modules):
        events.append(("offload", {id(m) for m in modules}))
        real_offload(modules)

    def spy_validation(accelerator, args, pipe, step, dtype, **kwargs):
        parts = (pipe.decoder_pipe.decoder, pipe.decoder_pipe.text_encoder, pipe.decoder_pipe.vqgan)
        events.append(("validation", {id(m) for m in parts}, (kwargs["height"], kwargs["width"])))
        return real_validation(accelerator, args, pipe, step, dtype, **kwargs)

    monkeypatch.setattr(placement, "offload", spy_offload)
    monkeypatch.setattr(validation, "run_validation", spy_validation)
    out = tmp_path / "run"
    argv = wuerstchen_args(
        assets, out, "--validation_prompt", "a red circle", "--num_validation_images", "1", "--validation_steps", "1",
        "--validation_inference_steps", "1", steps=2, resolution=192,
    )  # fmt: skip
    with caplog.at_level("WARNING", logger="difftune"):
        assert run_script("train_wuerstchen_lora", argv) == 0
    assert "validation images are 256x256: the Wuerstchen decoder cannot generate 192x192" in caplog.text
    for step in (1, 2):
        assert Image.open(out / "validation" / f"step{step:06d}_prompt0_0.png").size == (256, 256)

    validations = [i for i, event in enumerate(events) if event[0] == "validation"]
    assert len(validations) == 2 and all(events[i][2] == (256, 256) for i in validations)
    for start, end in zip(validations, [*validations[1:], len(events)], strict=True):
        offloaded = set().union(*(event[1] for event in events[start + 1 : end] if event[0] == "offload"))
        assert events[start][1] <= offloaded, "the decoder's models stayed on the device after validation"

    monkeypatch.undo()
    capsys.readouterr()
    argv = ["--checkpoint", out / "step2", "--prompt", "x", "--num_inference_steps", "1", "--output_dir", tmp_path]
    assert run_script("infer", argv) == 0
    assert "generating at height 256: the Wuerstchen decoder cannot generate height 192" in capsys.readouterr().out
    assert Image.open(tmp_path / "00_x_00.png").size == (256, 256)

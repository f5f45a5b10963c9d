"""SDXL LoKr training end to end: checkpoints load with the users' snippet and change the output."""

import json
import shutil

import pytest
import torch
from conftest import launch
from helpers import assert_only_adapter_changed, sdxl_args, sdxl_pipeline_image, spy_on_training


def two_image_folder(assets, tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    lines = (assets / "data" / "metadata.jsonl").read_text().splitlines()[:2]
    for line in lines:
        name = json.loads(line)["file_name"]
        shutil.copy(assets / "data" / name, folder / name)
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder, [json.loads(line)["text"] for line in lines]


def load_user_pipeline(assets, checkpoint, text_encoders=False):
    """The snippet from the issue / model card, verbatim but for the paths and dtype."""
    from diffusers import AutoencoderKL, DiffusionPipeline
    from peft import PeftModel

    vae = AutoencoderKL.from_pretrained(assets / "sdxl-vae-fp16-fix", torch_dtype=torch.float32)
    pipe = DiffusionPipeline.from_pretrained(assets / "sdxl", vae=vae, torch_dtype=torch.float32)
    if checkpoint is not None:
        pipe.unet = PeftModel.from_pretrained(pipe.unet, checkpoint / "unet", adapter_name="default")
        if text_encoders:
            pipe.text_encoder = PeftModel.from_pretrained(
                pipe.text_encoder, checkpoint / "text_encoder_one", adapter_name="default"
            )
            pipe.text_encoder_2 = PeftModel.from_pretrained(
                pipe.text_encoder_2, checkpoint / "text_encoder_two", adapter_name="default"
            )
    return pipe


@torch.no_grad()
def denoising_loss(pipe, folder, captions) -> float:
    """The epsilon-prediction loss on the given images at fixed noise and timesteps, computed with the pipeline's
    own prompt encoder and time ids (independent of the training code)."""
    from PIL import Image
    from torchvision.transforms import functional as F

    images = sorted(folder.glob("*.png"))
    total = 0.0
    generator = torch.Generator().manual_seed(1)
    for path, caption in zip(images, captions, strict=True):
        image = Image.open(path).convert("RGB")
        h, w = image.height, image.width
        scale = 64 / min(h, w)
        rh, rw = max(64, round(h * scale)), max(64, round(w * scale))
        resized = F.resize(image, [rh, rw], antialias=True)
        top, left = round((rh - 64) / 2), round((rw - 64) / 2)
        pixels = F.normalize(F.to_tensor(F.crop(resized, top, left, 64, 64)), [0.5] * 3, [0.5] * 3)[None]
        latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
        embeds, _, pooled, _ = pipe.encode_prompt(caption, do_classifier_free_guidance=False)
        time_ids = torch.tensor([[h, w, top, left, 64, 64]], dtype=torch.float32)
        from diffusers import DDPMScheduler

        scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
        for t in (50, 200, 400, 600, 800, 950):
            noise = torch.randn(latents.shape, generator=generator)
            noisy = scheduler.add_noise(latents, noise, torch.tensor([t]))
            pred = pipe.unet(
                noisy, torch.tensor([t]), embeds, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}
            ).sample
            total += torch.nn.functional.mse_loss(pred, noise).item()
    return total / (6 * len(images))


def test_overfits_two_images_and_only_adapter_weights_change(assets, tmp_path, run_main, monkeypatch):
    folder, captions = two_image_folder(assets, tmp_path)
    snapshots = spy_on_training(monkeypatch.setattr, adapter="unet")
    out = tmp_path / "run"
    # A random tiny UNet's output hardly depends on its attention; LoKr on the convolutions and
    # feed-forwards too gives the adapter enough reach to overfit two images.
    targets = "to_q,to_k,to_v,to_out.0,conv1,conv2,conv_out,proj_in,proj_out,ff.net.0.proj,ff.net.2"
    argv = sdxl_args(
        assets, out, "--train_data_dir", folder, "--center_crop", "--target_modules", targets,
        steps=80, lr="3e-3", checkpointing_steps=100,
    )  # fmt: skip
    assert run_main("train_sdxl_lokr", argv) == 0
    assert_only_adapter_changed(snapshots["before"], snapshots["after"], "lokr_")

    base_loss = denoising_loss(load_user_pipeline(assets, None), folder, captions)
    tuned_loss = denoising_loss(load_user_pipeline(assets, out / "step80"), folder, captions)
    assert tuned_loss < 0.7 * base_loss, (base_loss, tuned_loss)


@pytest.mark.slow
def test_accelerate_launch_bf16_checkpoints_validation_and_user_snippet(assets, tmp_path):
    out = tmp_path / "run"
    args = sdxl_args(
        assets, out, "--validation_prompt", "a red circle", "--num_validation_images", "1",
        "--validation_steps", "2", "--validation_inference_steps", "2", "--report_to", "tensorboard",
    )  # fmt: skip
    proc = launch("train_sdxl_lokr", args, mixed_precision="bf16")
    assert proc.returncode == 0, proc.stderr[-3000:]
    for step in (2, 4):
        checkpoint = out / f"step{step}"
        assert (checkpoint / "unet" / "adapter_config.json").is_file()
        assert (checkpoint / "unet" / "adapter_model.safetensors").is_file()
        for name in ("optimizer.pt", "lr_scheduler.pt", "args.json", "training_state.json"):
            assert (checkpoint / name).is_file(), name
        assert not (checkpoint / "text_encoder_one").exists()
    assert json.loads((out / "step4" / "unet" / "adapter_config.json").read_text())["peft_type"] == "LOKR"
    assert json.loads((out / "step4" / "args.json").read_text())["mixed_precision"] == "bf16"
    assert len(list((out / "validation").glob("step000004_*.png"))) == 1
    assert list((out / "logs").rglob("events.out.tfevents.*"))
    card = (out / "README.md").read_text()
    assert "PeftModel.from_pretrained(pipe.unet" in card and str(out / "step4") in card

    from safetensors.torch import load_file

    weights = load_file(out / "step4" / "unet" / "adapter_model.safetensors")
    assert weights and all(v.dtype == torch.float32 for v in weights.values())
    assert all(k.startswith("base_model.model.") and ".lokr_w" in k for k in weights)

    base = sdxl_pipeline_image(load_user_pipeline(assets, None))
    tuned = sdxl_pipeline_image(load_user_pipeline(assets, out / "step4"))
    assert abs(base - tuned).max() > 1e-3


def test_text_encoder_training_in_bf16(assets, tmp_path, run_main, monkeypatch):
    """--text_encoder_lr reaches the optimizer; each text encoder's adapter is trained and loads on its own (the
    second's last layer through the pooled output only); under bf16 the adapters stay fp32, the base is bf16."""
    from peft import PeftModel
    from safetensors.torch import load_file

    from difftune.train import updates

    optimizers = []
    real_build = updates.build_optimizer
    monkeypatch.setattr(updates, "build_optimizer", lambda *a: optimizers.append(real_build(*a)) or optimizers[-1])
    record = spy_on_training(monkeypatch.setattr, adapter="text_encoder_two")
    out = tmp_path / "run"
    argv = sdxl_args(assets, out, "--train_text_encoder", "--text_encoder_lr", "1e-2", "--mixed_precision", "bf16")
    assert run_main("train_sdxl_lokr", argv) == 0

    # One group per learning rate: the UNet's adapter at --learning_rate, both text encoders' at --text_encoder_lr.
    checkpoint = out / "step4"
    sizes = {name: sum(v.numel() for v in load_file(checkpoint / name / "adapter_model.safetensors").values())
             for name in ("unet", "text_encoder_one", "text_encoder_two")}  # fmt: skip
    groups = optimizers[0].param_groups
    assert [g["lr"] for g in groups] == [1e-3, 1e-2]
    numel = [sum(p.numel() for p in g["params"]) for g in groups]
    assert numel == [sizes["unet"], sizes["text_encoder_one"] + sizes["text_encoder_two"]]

    # bf16: frozen weights in bf16, adapter weights trained and saved in fp32 (not bf16 values widened).
    dtypes = {name: p.dtype for name, p in record["after"].items()}
    assert {d for n, d in dtypes.items() if "lokr_" in n} == {torch.float32}
    assert {d for n, d in dtypes.items() if "lokr_" not in n} == {torch.bfloat16}
    saved = load_file(checkpoint / "text_encoder_two" / "adapter_model.safetensors")
    assert {v.dtype for v in saved.values()} == {torch.float32}
    assert any((v - v.bfloat16().float()).abs().max() > 0 for v in saved.values())

    # SDXL conditions on the penultimate hidden states: a text encoder's last layer learns only through the
    # second one's pooled output. peft's init starts w1 at zero, so a non-zero w1 was trained.
    for name, trained in (("text_encoder_one", False), ("text_encoder_two", True)):
        weights = load_file(checkpoint / name / "adapter_model.safetensors")
        w1 = {k: v for k, v in weights.items() if "layers.1." in k and k.endswith(("lokr_w1", "lokr_w1_a"))}
        assert w1 and all(bool(v.any()) == trained for v in w1.values()), (name, trained)
        w1 = {k: v for k, v in weights.items() if "layers.0." in k and k.endswith(("lokr_w1", "lokr_w1_a"))}
        assert w1 and all(v.any() for v in w1.values()), name

    # Each adapter loaded on its own changes what its encoder contributes, and only that.
    base = load_user_pipeline(assets, None)
    base_embeds, _, base_pooled, _ = base.encode_prompt("a red circle", do_classifier_free_guidance=False)
    width = base.text_encoder.config.hidden_size
    for name, attribute in (("text_encoder_one", "text_encoder"), ("text_encoder_two", "text_encoder_2")):
        pipe = load_user_pipeline(assets, None)
        setattr(pipe, attribute, PeftModel.from_pretrained(getattr(pipe, attribute), checkpoint / name))
        embeds, _, pooled, _ = pipe.encode_prompt("a red circle", do_classifier_free_guidance=False)
        own, other = (slice(0, width), slice(width, None))[:: 1 if name == "text_encoder_one" else -1]
        assert (embeds[..., own] - base_embeds[..., own]).abs().max() > 1e-4, name
        assert torch.equal(embeds[..., other], base_embeds[..., other]), name
        assert torch.equal(pooled, base_pooled) != (name == "text_encoder_two"), name
    full = load_user_pipeline(assets, checkpoint, text_encoders=True)
    unet_only = load_user_pipeline(assets, checkpoint)
    assert abs(sdxl_pipeline_image(full) - sdxl_pipeline_image(unet_only)).max() > 1e-4


def test_model_card_trigger_words_last_validation_images_and_module_counts(assets, tmp_path, run_main):
    """kohya folders: the training folder's class tokens are the trigger words (the regularisation folder's
    name the class: not); the card shows the last validation's images by links relative to it, and counts the
    adapted modules per block type, every name going to adapted_modules.txt."""
    import re

    from safetensors import safe_open

    images = sorted((assets / "data").glob("*.png"))
    train, reg = tmp_path / "train" / "2_sks shape", tmp_path / "reg" / "1_shape"
    for folder, chosen in ((train, images[:2]), (reg, images[2:4])):
        folder.mkdir(parents=True)
        for image in chosen:
            shutil.copy(image, folder)
    out = tmp_path / "out"
    argv = sdxl_args(
        assets, out, "--reg_data_dir", reg.parent, "--validation_prompt", "a [sks] shape", "--validation_steps", "1",
        "--num_validation_images", "2", "--validation_inference_steps", "1", steps=2,
    )  # fmt: skip
    argv[argv.index("--train_data_dir") + 1] = str(train.parent)
    assert run_main("train_sdxl_lokr", argv) == 0
    card = (out / "README.md").read_text()
    assert "| trigger words | `sks shape` |" in card

    links = re.findall(r"!\[a \\\[sks\\\] shape\]\((.+?)\)", card)
    assert links == ["validation/step000002_prompt0_0.png", "validation/step000002_prompt0_1.png"]  # not step 1's
    assert all((out / link).is_file() for link in links)

    with safe_open(out / "step2" / "unet" / "adapter_model.safetensors", "pt") as weights:
        modules = {key.removeprefix("base_model.model.").rsplit(".", 1)[0] for key in weights.keys()}  # noqa: SIM118
    listed = (out / "adapted_modules.txt").read_text().splitlines()
    assert listed[0] == f"# unet ({len(modules)} modules)" and set(listed[1:]) - {""} == modules
    counts = "unet 136: down_blocks.attentions 48, mid_block.attentions 16, up_blocks.attentions 72"
    assert f"| adapted modules | {counts} (all named in [adapted_modules.txt](adapted_modules.txt)) |" in card
    assert len(modules) == 136 and "transformer_blocks" not in card


def test_trigger_words_are_the_instance_prompt_and_the_training_subsets_class_tokens():
    from argparse import Namespace

    from difftune.formats.modelcard import trigger_words

    first = [{"class_tokens": "sks dog"}, {"class_tokens": ""}, {"metadata_file": "meta.json"}]
    second = [{"class_tokens": "dog", "is_reg": True}, {"class_tokens": "sks dog"}, {"class_tokens": "ohwx cat"}]
    args = Namespace(instance_prompt="a photo of sks dog", datasets=[{"subsets": first}, {"subsets": second}])
    assert trigger_words(args) == ["a photo of sks dog", "sks dog", "ohwx cat"]
    assert trigger_words(Namespace(instance_prompt=None)) == []

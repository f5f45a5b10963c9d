"""Fine-tune Stable Diffusion XL with a LoKr adapter on the UNet (and optionally both text encoders).

    accelerate launch -q --config_file configs/accelerate/accelerate_config.yaml \\
        scripts/train_sdxl_lokr.py --train_data_dir DATA --output_dir OUT ...

Checkpoints land in OUTPUT_DIR/step<N>/ in peft format (unet/, text_encoder_one/,
text_encoder_two/), loadable with PeftModel.from_pretrained; see docs/adapters-and-export.md.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from difftune import adapters, data
from difftune.adapters import init_adapter
from difftune.cli.errors import run_cli
from difftune.cli.lazy import LazyModule
from difftune.cli.parsing import ErrorOnlyParser
from difftune.formats.modelcard import literal, write_model_card
from difftune.models import single_file
from difftune.storage import hub
from difftune.train import args as flags

# Imported at their first use, in main(): --help answers without torch, diffusers and transformers.
torch = LazyModule("torch")
class_images = LazyModule("difftune.generate.class_images")
validation = LazyModule("difftune.generate.validation")
sdxl = LazyModule("difftune.models.sdxl")
loop = LazyModule("difftune.train.loop")
objectives = LazyModule("difftune.train.objectives")
placement = LazyModule("difftune.train.placement")
run_setup = LazyModule("difftune.train.run_setup")

PROJECT = "sdxl-lokr"
LOADING = """
```python
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, StableDiffusionXLPipeline
from peft import PeftModel

checkpoint = {checkpoint}
{vae}pipe = {pipeline}torch_dtype=torch.float16).to("cuda")
{scheduler}pipe.unet = PeftModel.from_pretrained(pipe.unet, f"{{checkpoint}}/unet", adapter_name="default")
{text_encoders}image = pipe({prompt}, num_inference_steps=50).images[0]
```
"""
TEXT_ENCODERS = """pipe.text_encoder = PeftModel.from_pretrained(
    pipe.text_encoder, f"{checkpoint}/text_encoder_one", adapter_name="default")
pipe.text_encoder_2 = PeftModel.from_pretrained(
    pipe.text_encoder_2, f"{checkpoint}/text_encoder_two", adapter_name="default")
"""
# Trained with --prediction_type: sample with it too (as diffusers' SDXL training script does).
SCHEDULER = (
    'pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, prediction_type="{prediction_type}"{zsnr})\n'
)
VAE = "vae = AutoencoderKL.from_pretrained({vae}, torch_dtype=torch.float16)\n"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ErrorOnlyParser(description=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_model_name_or_path",
        default="stabilityai/stable-diffusion-xl-base-1.0",
        help="A diffusers folder, a Hub id, or one SDXL .safetensors file (original layout, as community models ship).",
    )
    single_file.add_single_file_args(model)
    model.add_argument(
        "--pretrained_vae_model_name_or_path",
        default="madebyollin/sdxl-vae-fp16-fix",
        help='A VAE that survives fp16; "none" uses the base model\'s own.',
    )
    flags.add_model_args(model)
    init_adapter.add_init_adapter_args(model)
    group = flags.add_data_args(parser, resolution=1024)
    group.add_argument(
        "--aspect_ratio_buckets", "--enable_bucket",
        action="store_true",
        help="Train each image near its own aspect ratio, in kohya's buckets (--min_bucket_reso, --max_bucket_reso, "
        "--bucket_reso_steps, --bucket_no_upscale).",
    )  # fmt: skip
    flags.add_cache_args(
        parser, "--cache_latents", "Encode the images with the VAE once (both flips with --random_flip)."
    )
    flags.add_training_args(parser, output_dir="work_dirs/stable_diffusion_xl_lokr_pokemon_blip")
    adapters.add_lokr_args(parser)
    group = flags.add_objective_args(parser)
    group.add_argument("--prediction_type", default=None, choices=["epsilon", "v_prediction"])
    return flags.parse(parser, argv, image_cache_flag="cache_latents")


def write_card(
    args: argparse.Namespace, checkpoint: Path, zero_terminal_snr: bool = False, samples_per_epoch: int | None = None
) -> Path:
    """The run's README.md; its snippet loads `checkpoint` as written (values pasted as Python literals)."""
    base = args.pretrained_model_name_or_path
    own_vae = args.pretrained_vae_model_name_or_path.lower() == "none"  # the pipeline loads its own
    if single_file.is_single_file(base):
        config = literal(args.single_file_config)
        pipeline = f"StableDiffusionXLPipeline.from_single_file({literal(base)}, config={config}, "
    else:
        pipeline = f"DiffusionPipeline.from_pretrained({literal(base)}, "
    zsnr = ", rescale_betas_zero_snr=True" if zero_terminal_snr else ""
    loading = LOADING.format(
        checkpoint=literal(checkpoint),
        vae="" if own_vae else VAE.format(vae=literal(args.pretrained_vae_model_name_or_path)),
        pipeline=pipeline + ("" if own_vae else "vae=vae, "),
        scheduler=SCHEDULER.format(prediction_type=args.prediction_type, zsnr=zsnr) if args.prediction_type else "",
        text_encoders=TEXT_ENCODERS if args.train_text_encoder else "",
        prompt=literal(validation.first_prompt(args)),
    )
    base_models = [getattr(args, "base_model_file", base)]
    return write_model_card(
        args.output_dir, args, title="SDXL LoKr adapter", base_models=base_models, adapter="LoKr", loading=loading,
        samples_per_epoch=samples_per_epoch, checkpoint=checkpoint,
    )  # fmt: skip


def build_data(args: argparse.Namespace) -> data.CaptionedImageDataset:
    """The training data, scanned and checked: random or centre crops with SDXL's size conditioning (the
    tokenizers come with the models)."""
    dataset = data.dataset_from_args(args, data.ImageTransform(args.center_crop, args.random_flip), None)
    if args.aspect_ratio_buckets and dataset.target_sizes is None:  # (kohya's forms bucket by their own rule)
        dataset.target_sizes = data.assign_buckets(dataset, data.make_buckets(args.resolution))
    return dataset


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    sdxl.check_sources(
        args.pretrained_model_name_or_path, args.pretrained_vae_model_name_or_path, args.revision,
        args.single_file_config,
    )  # fmt: skip
    start = init_adapter.prepare(args, argv, ["unet", "text_encoder_one", "text_encoder_two"])
    objectives.check_timestep_range(
        args, lambda: sdxl.num_train_timesteps(args.pretrained_model_name_or_path, args.revision)
    )
    accelerator = run_setup.setup_run(args)
    device, dtype = accelerator.device, placement.weight_dtype(accelerator)

    # Data: read and checked before any weights load (class images still to generate are read after that).
    dataset = None if class_images.to_generate(args) else build_data(args)

    # Models: frozen in the weight dtype; the VAE in fp32 unless it is made for fp16 (force_upcast off).
    vae_path = sdxl.vae_location(args.pretrained_vae_model_name_or_path)
    args.pretrained_vae_model_name_or_path = vae_path or "none"  # recorded as loaded (infer.py, the card)
    sd = sdxl.load_sdxl(
        args.pretrained_model_name_or_path, vae_path, args.revision, args.variant, args.single_file_config
    )
    single_file.record(args)  # a single-file base: its name and sha256 in args.json, the card and cache keys
    if args.prediction_type is None and sd.inference_scheduler is not None:
        args.prediction_type = sd.noise_scheduler.config.prediction_type  # the file's v_pred marker, if any
    if args.prediction_type is not None:
        sd.noise_scheduler.register_to_config(prediction_type=args.prediction_type)
    vae_dtype = torch.float32 if sd.vae.config.force_upcast else dtype
    placement.freeze(sd.vae, device, vae_dtype)
    for model in (sd.unet, sd.text_encoder_one, sd.text_encoder_two):
        placement.freeze(model, device, dtype)

    # Class images (--with_prior_preservation): the missing ones generated by the base model.
    base = args.pretrained_model_name_or_path
    class_images.generate_missing(
        accelerator, args, lambda: sdxl.build_pipeline(sd, base, args.revision, args.prediction_type), dtype,
        lambda pipe: {"height": args.resolution, "width": args.resolution,
                      "num_inference_steps": args.validation_inference_steps},
    )  # fmt: skip
    dataset = build_data(args) if dataset is None else dataset
    dataset.tokenize = data.Tokenize({"one": sd.tokenizer_one, "two": sd.tokenizer_two})  # captions for both

    # Caches: encode once; the frozen encoders then leave the accelerator (until validation).
    sdxl.cache_encodings(accelerator, args, sd, dataset, vae_dtype)
    idle = [sd.vae] if args.cache_latents else []
    idle += [sd.text_encoder_one, sd.text_encoder_two] if args.cache_text_embeddings else []
    placement.offload(idle)

    # Adapters: LoKr on the UNet, and on both text encoders when asked; from --init_adapter's weights if given.
    trained, param_groups = init_adapter.attach_all(
        args, adapters.lokr_config, base, ("unet", sd.unet),
        {"text_encoder_one": sd.text_encoder_one, "text_encoder_two": sd.text_encoder_two}, start, argv,
    )  # fmt: skip

    scheduler = sd.noise_scheduler
    objective = objectives.Objective(args, scheduler)

    def compute_loss(batch: dict, models: dict, fractions: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss; at `fractions` of the schedule, the plain MSE there (the held-out loss)."""
        with torch.no_grad():
            latents = sdxl.latents(batch, sd.vae, vae_dtype)
        draw = objective.draw(latents, fractions)
        with torch.set_grad_enabled(args.train_text_encoder):
            prompt_embeds, pooled = sdxl.text_conditioning(
                batch,
                models.get("text_encoder_one", sd.text_encoder_one),
                models.get("text_encoder_two", sd.text_encoder_two),
            )
        pred = models["unet"](
            draw.noisy_input,
            draw.timesteps,
            prompt_embeds,
            added_cond_kwargs={"text_embeds": pooled, "time_ids": batch["time_ids"].to(prompt_embeds.dtype)},
        ).sample
        return draw.loss(pred, latents, batch)

    def validate(step: int, peft_models: dict) -> None:
        models = {"unet": peft_models["unet"].get_base_model()}
        if args.train_text_encoder:
            models["text_encoder"] = peft_models["text_encoder_one"].get_base_model()
            models["text_encoder_2"] = peft_models["text_encoder_two"].get_base_model()
        pipe = sdxl.build_pipeline(sd, base, args.revision, args.prediction_type, **models)
        height, width = validation.trained_size(args)
        with placement.on_device(idle, device):
            validation.run_validation(
                accelerator, args, pipe, step, dtype,
                num_inference_steps=args.validation_inference_steps, height=height, width=width,
            )  # fmt: skip

    result = loop.train(
        accelerator, args, project_name=PROJECT, adapters=trained, param_groups=param_groups, dataset=dataset,
        compute_loss=compute_loss, validate=validate,
    )  # fmt: skip

    if accelerator.is_main_process:
        zero_terminal_snr = single_file.is_single_file(base) and sd.noise_scheduler.config.get(
            "rescale_betas_zero_snr", False
        )
        write_card(args, result.final_checkpoint, zero_terminal_snr, dataset.samples_per_epoch())
        if args.push_to_hub:
            repo = hub.upload_run(args.output_dir, result.final_checkpoint, args.hub_model_id, args.hub_token)
            print(f"uploaded {result.final_checkpoint.name} and the model card to https://huggingface.co/{repo}")
        print(f"done: {result.global_step} steps, final checkpoint {result.final_checkpoint}")


if __name__ == "__main__":
    run_cli(main)

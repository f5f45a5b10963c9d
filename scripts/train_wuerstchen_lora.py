"""Fine-tune a Wuerstchen prior (stage C) with a LoRA adapter (and optionally its text encoder): Wuerstchen v2
or Stable Cascade (Wuerstchen v3), whichever --pretrained_prior_model_name_or_path holds.

    accelerate launch -q --config_file configs/accelerate/accelerate_config.yaml \\
        scripts/train_wuerstchen_lora.py --train_data_dir DATA --output_dir OUT ...

Checkpoints land in OUTPUT_DIR/step<N>/: prior/ (peft format), text_encoder/ when trained, and for v2
pytorch_lora_weights.safetensors (diffusers format, for load_lora_weights); see docs/adapters-and-export.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from difftune import adapters, data
from difftune.adapters import init_adapter
from difftune.cli.errors import run_cli
from difftune.cli.lazy import LazyModule
from difftune.cli.parsing import ErrorOnlyParser
from difftune.formats.modelcard import literal, write_model_card
from difftune.storage import hub
from difftune.train import args as flags

# Imported at their first use, in main(): --help answers without torch, diffusers and transformers.
torch = LazyModule("torch")
class_images = LazyModule("difftune.generate.class_images")
validation = LazyModule("difftune.generate.validation")
cascade = LazyModule("difftune.models.cascade")
priors = LazyModule("difftune.models.priors")
wuerstchen = LazyModule("difftune.models.wuerstchen")
loop = LazyModule("difftune.train.loop")
objectives = LazyModule("difftune.train.objectives")
placement = LazyModule("difftune.train.placement")
run_setup = LazyModule("difftune.train.run_setup")

PROJECT = "wuerstchen-prior-lora"
logger = logging.getLogger("difftune")
LOADING = """
Wuerstchen lives in diffusers' deprecated corner: `from_pretrained` on the Hub repos fails in
diffusers 0.42 ("wuerstchen is not one of the libraries..."), so load each part by subfolder:

```python
import torch
from diffusers import DDPMWuerstchenScheduler, WuerstchenCombinedPipeline
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel, WuerstchenDiffNeXt, WuerstchenPrior
from transformers import AutoTokenizer, CLIPTextModel

prior_repo, decoder_repo, checkpoint = {prior}, {decoder}, {checkpoint}
pipe = WuerstchenCombinedPipeline(
    prior_prior=WuerstchenPrior.from_pretrained(prior_repo, subfolder="prior"),
    prior_text_encoder=CLIPTextModel.from_pretrained(prior_repo, subfolder="text_encoder"),
    prior_tokenizer=AutoTokenizer.from_pretrained(prior_repo, subfolder="tokenizer"),
    prior_scheduler=DDPMWuerstchenScheduler.from_pretrained(prior_repo, subfolder="scheduler"),
    decoder=WuerstchenDiffNeXt.from_pretrained(decoder_repo, subfolder="decoder"),
    vqgan=PaellaVQModel.from_pretrained(decoder_repo, subfolder="vqgan"),
    text_encoder=CLIPTextModel.from_pretrained(decoder_repo, subfolder="text_encoder"),
    tokenizer=AutoTokenizer.from_pretrained(decoder_repo, subfolder="tokenizer"),
    scheduler=DDPMWuerstchenScheduler.from_pretrained(decoder_repo, subfolder="scheduler"),
).to("cuda", torch.float16)
```

Route 1, diffusers LoRA loading (prior{te_and} from `pytorch_lora_weights.safetensors`):

```python
pipe.prior_pipe.load_lora_weights(checkpoint)
```

Route 2, peft:

```python
from peft import PeftModel

pipe.prior_pipe.prior = PeftModel.from_pretrained(pipe.prior_pipe.prior, f"{{checkpoint}}/prior").get_base_model()
{te_peft}```

Then:

```python
from diffusers.pipelines.deprecated.wuerstchen import DEFAULT_STAGE_C_TIMESTEPS

image = pipe({prompt}, prior_timesteps=DEFAULT_STAGE_C_TIMESTEPS, height=1024, width=1024).images[0]
```
"""
CASCADE_LOADING = """
diffusers has no LoRA loader for Stable Cascade: load the adapter with peft into the pipeline's prior. The
decoder repo names its VQGAN in a way diffusers 0.42 cannot resolve, so each part is loaded by subfolder
(bf16 is advised: fp16 is known to be unstable for stage C):

```python
import torch
from diffusers import DDPMWuerstchenScheduler, StableCascadeCombinedPipeline, StableCascadeUNet
from diffusers.pipelines.deprecated.wuerstchen import PaellaVQModel
from peft import PeftModel
from transformers import AutoTokenizer, CLIPTextModelWithProjection

prior_repo, decoder_repo, checkpoint = {prior}, {decoder}, {checkpoint}
pipe = StableCascadeCombinedPipeline(
    prior_prior=StableCascadeUNet.from_pretrained(prior_repo, subfolder={prior_subfolder}),
    prior_text_encoder=CLIPTextModelWithProjection.from_pretrained(prior_repo, subfolder="text_encoder"),
    prior_tokenizer=AutoTokenizer.from_pretrained(prior_repo, subfolder="tokenizer"),
    prior_scheduler=DDPMWuerstchenScheduler.from_pretrained(prior_repo, subfolder="scheduler"),
    decoder=StableCascadeUNet.from_pretrained(decoder_repo, subfolder={decoder_subfolder}),
    vqgan=PaellaVQModel.from_pretrained(decoder_repo, subfolder="vqgan"),
    text_encoder=CLIPTextModelWithProjection.from_pretrained(decoder_repo, subfolder="text_encoder"),
    tokenizer=AutoTokenizer.from_pretrained(decoder_repo, subfolder="tokenizer"),
    scheduler=DDPMWuerstchenScheduler.from_pretrained(decoder_repo, subfolder="scheduler"),
).to("cuda", torch.bfloat16)
pipe.prior_pipe.prior = PeftModel.from_pretrained(pipe.prior_pipe.prior, f"{{checkpoint}}/prior").get_base_model()
{te_peft}```

Then:

```python
image = pipe({prompt}, height=1024, width=1024, prior_num_inference_steps=20, num_inference_steps=10).images[0]
```

For ComfyUI: `python scripts/export.py --checkpoint {checkpoint} --format comfyui --out lora.safetensors`, then a
LoraLoader on the stage C model.
"""
TE_PEFT = """pipe.prior_pipe.text_encoder = PeftModel.from_pretrained(
    pipe.prior_pipe.text_encoder, f"{checkpoint}/text_encoder").get_base_model()
"""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = ErrorOnlyParser(description=__doc__)
    model = parser.add_argument_group("model")
    model.add_argument(
        "--pretrained_prior_model_name_or_path",
        default="warp-ai/wuerstchen-prior",
        help="A Wuerstchen v2 prior repo or a Stable Cascade one (stabilityai/stable-cascade-prior).",
    )
    model.add_argument("--prior_subfolder", default="prior", help="Stable Cascade: prior (3.6 B) or prior_lite (1 B).")
    model.add_argument(
        "--pretrained_decoder_model_name_or_path",
        default=None,
        help="For validation images. Default: warp-ai/wuerstchen (v2) or stabilityai/stable-cascade.",
    )
    model.add_argument("--decoder_subfolder", default="decoder", help="Stable Cascade: decoder or decoder_lite.")
    # The defaults are wuerstchen.DEFAULT_IMAGE_ENCODER and cascade.DEFAULT_IMAGE_ENCODER, written out: those
    # modules load torch, which --help must not wait for (tests/test_help.py keeps the two in step).
    model.add_argument(
        "--image_encoder_path",
        default=None,
        help="EfficientNet weights: stage B's .pt (read weights-only), a .safetensors, or a Hub org/repo/file. "
        "Default: dome272/wuerstchen/model_v2_stage_b.pt (v2) or "
        "stabilityai/stable-cascade/effnet_encoder.safetensors.",
    )
    flags.add_model_args(model)
    init_adapter.add_init_adapter_args(model)
    flags.add_data_args(parser, resolution=768)
    flags.add_cache_args(parser, "--cache_image_embeddings", "Encode the images with EfficientNet once.")
    flags.add_training_args(parser, output_dir="work_dirs/wuerstchen_prior_lora_pokemon_blip")
    adapters.add_lora_args(parser)
    group = flags.add_objective_args(parser)
    group.add_argument(
        "--loss_weighting", default="constant", choices=["constant", "p2"],
        help="p2: each sample weighted (k + SNR)^-gamma, as Stability's stage C trainer (gdf's P2LossWeight).",
    )  # fmt: skip
    group.add_argument("--p2_k", type=float, default=1.0, help="P2's k (gdf's default).")
    group.add_argument("--p2_gamma", type=float, default=1.0, help="P2's gamma (gdf's default).")
    return flags.parse(parser, argv, image_cache_flag="cache_image_embeddings")


def write_card(args: argparse.Namespace, checkpoint: Path, samples_per_epoch: int | None = None) -> Path:
    """The run's README.md; its snippets load `checkpoint` as written (values pasted as Python literals)."""
    family = priors.resolve_family(args)
    prior, decoder = args.pretrained_prior_model_name_or_path, args.pretrained_decoder_model_name_or_path
    if family is cascade.CASCADE:
        return write_model_card(
            args.output_dir, args, title="Stable Cascade stage C LoRA adapter", base_models=[prior, decoder],
            adapter="LoRA", samples_per_epoch=samples_per_epoch, checkpoint=checkpoint, loading=CASCADE_LOADING.format(
                prior=literal(prior), decoder=literal(decoder), checkpoint=literal(checkpoint),
                prior_subfolder=literal(args.prior_subfolder), decoder_subfolder=literal(args.decoder_subfolder),
                te_peft=TE_PEFT.format(checkpoint="{checkpoint}") if args.train_text_encoder else "",
                prompt=literal(validation.first_prompt(args)),
            ),
        )  # fmt: skip
    loading = LOADING.format(
        prior=literal(prior),
        decoder=literal(decoder),
        checkpoint=literal(checkpoint),
        te_and=" and text encoder" if args.train_text_encoder else "",
        te_peft=TE_PEFT.format(checkpoint="{checkpoint}") if args.train_text_encoder else "",
        prompt=literal(validation.first_prompt(args)),
    )
    return write_model_card(
        args.output_dir,
        args,
        title="Wuerstchen prior LoRA adapter",
        base_models=[prior, decoder],
        adapter="LoRA",
        loading=loading,
        samples_per_epoch=samples_per_epoch,
        checkpoint=checkpoint,
    )


def build_data(args: argparse.Namespace) -> data.CaptionedImageDataset:
    """The training data, scanned and checked: ImageNet-normalised images for EfficientNet (the tokenizer comes
    with the models)."""
    transform = data.ImageTransform(
        args.center_crop, args.random_flip, wuerstchen.IMAGENET_MEAN, wuerstchen.IMAGENET_STD
    )
    return data.dataset_from_args(args, transform, None)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    # Which generation (v2 or Stable Cascade) the prior folder holds decides everything below.
    decoder_given = args.pretrained_decoder_model_name_or_path is not None
    family = priors.resolve_family(args)
    if args.validation_samples or decoder_given or args.with_prior_preservation:  # these load the decoder
        family.check_decoder(args.pretrained_decoder_model_name_or_path, args.decoder_subfolder, args.revision)
    start = init_adapter.prepare(args, argv, ["prior", "text_encoder"])
    objectives.check_timestep_range(args, lambda: objectives.CONTINUOUS_BINS)
    accelerator = run_setup.setup_run(args)
    device, dtype = accelerator.device, placement.weight_dtype(accelerator)

    # Data: read and checked before any weights load (class images still to generate are read after that).
    dataset = None if class_images.to_generate(args) else build_data(args)

    # Models: the prior, its text encoder and the frozen EfficientNet image encoder.
    base = args.pretrained_prior_model_name_or_path
    prior = family.load_prior(base, args.prior_subfolder, args.revision, args.variant)
    # The EfficientNet in fp32 in every precision, as Stability's trainer keeps it (its features are the target).
    image_encoder = placement.freeze(family.load_image_encoder(args.image_encoder_path), device, torch.float32)
    for model in (prior.prior, prior.text_encoder):
        placement.freeze(model, device, dtype)

    decoder_parts = {}  # stage B and A: loaded when first needed (class images, validation)

    def load_decoder_parts() -> dict:
        if not decoder_parts:
            decoder = args.pretrained_decoder_model_name_or_path
            decoder_parts.update(family.load_decoder(decoder, args.decoder_subfolder, args.revision, None))
            for part in decoder_parts.values():
                if isinstance(part, torch.nn.Module):
                    placement.freeze(part, device, dtype)
        return decoder_parts

    def sampling(pipe) -> dict:
        size = wuerstchen.decodable_size(pipe, family.sampling_side(pipe, validation.trained_size(args)[0]))
        return {**family.sampling_kwargs(args.validation_inference_steps), "height": size, "width": size}

    # Class images (--with_prior_preservation): the missing ones generated by the base prior and the decoder.
    class_images.generate_missing(
        accelerator, args, lambda: family.build_pipeline(prior, load_decoder_parts()), dtype, sampling
    )
    decoder_parts.clear()  # validation loads it again, when it runs

    dataset = build_data(args) if dataset is None else dataset
    dataset.tokenize = data.Tokenize({"prior": prior.tokenizer}, attention_mask=True)  # padded, with masks

    # Caches: encode once; the frozen encoders then leave the accelerator (until validation).
    wuerstchen.cache_encodings(accelerator, args, prior, image_encoder, dataset, dtype, family)
    placement.offload([image_encoder] if args.cache_image_embeddings else [])
    idle = [prior.text_encoder] if args.cache_text_embeddings else []
    placement.offload(idle)

    # Adapters: LoRA on the prior's attention, and on its text encoder when asked; from --init_adapter if given.
    trained, param_groups = init_adapter.attach_all(
        args, adapters.lora_config, base, ("prior", prior.prior), {"text_encoder": prior.text_encoder}, start, argv
    )

    objective = objectives.Objective(args, prior.scheduler, continuous=True)

    def compute_loss(batch: dict, models: dict, fractions: torch.Tensor | None = None) -> torch.Tensor:
        """The training loss; at `fractions` of the schedule, the plain MSE there (the held-out loss)."""
        with torch.no_grad():
            if "image_embeds" in batch:
                x0 = batch["image_embeds"].to(dtype)
            else:
                x0 = family.image_embeddings(image_encoder, batch["pixel_values"].float()).to(dtype)
        with torch.set_grad_enabled(args.train_text_encoder):
            text = family.encode_text(batch, models.get("text_encoder", prior.text_encoder))
        draw = objective.draw(x0, fractions)
        return draw.loss(family.predict(models["prior"], draw.noisy_input, draw.timesteps, text), x0, batch)

    def save_diffusers_lora(directory: Path, peft_models: dict) -> None:
        wuerstchen.save_diffusers_lora(
            directory,
            {
                name: (model.peft_config["default"].to_dict(), adapters.adapter_state_dict(model))
                for name, model in peft_models.items()
            },
        )

    def validate(step: int, peft_models: dict) -> None:
        first = not decoder_parts
        load_decoder_parts()
        # The adapters live inside these modules: the pipeline runs with them active.
        adapted = dataclasses.replace(prior, prior=peft_models["prior"].get_base_model())
        if args.train_text_encoder:
            adapted.text_encoder = peft_models["text_encoder"].get_base_model()
        pipe = family.build_pipeline(adapted, decoder_parts)
        side = family.sampling_side(pipe, validation.trained_size(args)[0])  # (v3: the trained latent's size)
        size = wuerstchen.decodable_size(pipe, side)
        if first and size != side:
            logger.warning(
                "validation images are %dx%d: the %s decoder cannot generate %dx%d", size, size,
                family.title.removesuffix(" v2"), side, side,
            )  # fmt: skip
        elif first:
            logger.info("validation images are %dx%d (trained at --resolution %d)", size, size, args.resolution)
        # The decoder, its text encoder and the VQGAN are on the device only while they generate.
        decoder_modules = [part for part in decoder_parts.values() if isinstance(part, torch.nn.Module)]
        with placement.on_device(idle + decoder_modules, device):
            validation.run_validation(
                accelerator, args, pipe, step, dtype, **family.sampling_kwargs(args.validation_inference_steps),
                height=size, width=size,
            )  # fmt: skip

    result = loop.train(
        accelerator, args, project_name=PROJECT, adapters=trained, param_groups=param_groups, dataset=dataset,
        compute_loss=compute_loss, save_extra=save_diffusers_lora if family is wuerstchen.V2 else None,
        validate=validate,
    )  # fmt: skip

    if accelerator.is_main_process:
        write_card(args, result.final_checkpoint, dataset.samples_per_epoch())
        if args.push_to_hub:
            repo = hub.upload_run(args.output_dir, result.final_checkpoint, args.hub_model_id, args.hub_token)
            print(f"uploaded {result.final_checkpoint.name} and the model card to https://huggingface.co/{repo}")
        print(f"done: {result.global_step} steps, final checkpoint {result.final_checkpoint}")


if __name__ == "__main__":
    run_cli(main)

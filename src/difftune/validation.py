"""Validation images: generate with the adapters active, save as PNGs, log to the trackers."""

from __future__ import annotations

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def generate(
    pipe,
    prompts: list[str],
    num_images: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    **pipe_kwargs,
) -> dict[str, list[Image.Image]]:
    """`num_images` images per prompt, reproducible for a seed; low-precision weights run under autocast."""
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    images = {}
    with torch.no_grad(), autocast:
        for prompt in prompts:
            images[prompt] = [pipe(prompt, generator=generator, **pipe_kwargs).images[0] for _ in range(num_images)]
    return images


def run_validation(accelerator, args, pipe, step: int, dtype: torch.dtype, **pipe_kwargs) -> list[Path]:
    """Generate the --validation_prompt images with `pipe`, save and log them."""
    images = generate(
        pipe, args.validation_prompt, args.num_validation_images, args.seed, accelerator.device, dtype, **pipe_kwargs
    )
    return save_and_log(accelerator, images, step, args.output_dir)


def save_and_log(accelerator, images: dict[str, list[Image.Image]], step: int, output_dir: Path) -> list[Path]:
    """Write PNGs to OUTPUT_DIR/validation/ and send them to tensorboard / wandb."""
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, (prompt, prompt_images) in enumerate(images.items()):
        for i, image in enumerate(prompt_images):
            path = folder / f"step{step:06d}_prompt{p}_{i}.png"
            image.save(path)
            paths.append(path)
        (folder / f"prompt{p}.txt").write_text(prompt + "\n")
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for p, prompt_images in enumerate(images.values()):
                arrays = np.stack([np.asarray(image) for image in prompt_images])
                tracker.writer.add_images(f"validation/prompt{p}", arrays, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log(
                {
                    "validation": [
                        wandb.Image(image, caption=f"{i}: {prompt}")
                        for prompt, prompt_images in images.items()
                        for i, image in enumerate(prompt_images)
                    ]
                },
                step=step,
            )
    return paths

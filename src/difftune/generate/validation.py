"""Validation images: generate with the adapters active, save as PNGs, log to the trackers.

Each prompt comes with its own settings (a prompts file line's options over the run-wide flags, see
difftune.generate.prompts); image i of a prompt is drawn from seed + i, so a prompt's images do not depend on the
other prompts (and equal infer.py's for the same seed, prompt and settings).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from difftune.models import wuerstchen

logger = logging.getLogger("difftune")


@dataclass(frozen=True)
class Sample:
    """One prompt, the seed of its first image and the pipeline's keyword arguments for it."""

    prompt: str
    seed: int
    kwargs: dict


def is_combined(pipe) -> bool:
    """A Wuerstchen / Stable Cascade combined pipeline (prior, then decoder), rather than SDXL's."""
    return hasattr(pipe, "prior_pipe")


def fit_side(pipe, side: int) -> int:
    """The nearest side `pipe` can generate: the decoder's rule for a combined pipeline, else SDXL's multiple
    of 8 (rounded down, as kohya does)."""
    return wuerstchen.decodable_size(pipe, side) if is_combined(pipe) else (side - side % 8 or 8)


def resolve_samples(
    pipe, entries: list[dict], defaults: dict, seed: int, say: Callable[[str], None] = logger.info
) -> list[Sample]:
    """Each entry's own settings (prompts.parse_line's keys) over `defaults`, the pipeline keyword arguments
    of the run-wide flags (with height and width); a size `pipe` cannot generate moves, and `say` says so."""
    rename = {"guidance_scale": "prior_guidance_scale" if is_combined(pipe) else "guidance_scale"}
    rename["steps"] = "num_inference_steps"  # Wuerstchen / Stable Cascade: the decoder's, as the flags set
    samples = []
    for index, entry in enumerate(entries):
        kwargs = dict(defaults)
        kwargs.update({rename.get(k, k): v for k, v in entry.items() if k not in ("prompt", "seed", "line")})
        for side in ("height", "width"):
            fitted = fit_side(pipe, kwargs[side])
            if fitted != kwargs[side]:
                where = f"line {entry['line']}" if "line" in entry else f"prompt {index}"
                why = "the decoder cannot generate" if is_combined(pipe) else "SDXL needs a multiple of 8, not"
                say(f"{where}: generating at {side} {fitted}: {why} {side} {kwargs[side]}")
                kwargs[side] = fitted
        samples.append(Sample(entry["prompt"], entry.get("seed", seed), kwargs))
    return samples


def trained_size(args) -> tuple[int, int]:
    """(height, width) the run trained at: its first kohya data set's resolution, else --resolution (validation
    and infer.py sample at it)."""
    size = getattr(args, "trained_size", None)
    return (size[0], size[1]) if size else (args.resolution, args.resolution)


def first_prompt(args) -> str:
    """The run's first validation prompt, for the model card's snippet."""
    return args.validation_samples[0]["prompt"] if args.validation_samples else "a photo"


def generate_samples(
    pipe,
    samples: list[Sample],
    num_images: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    desc: str | None = None,
) -> list[list[Image.Image]]:
    """`num_images` images per sample (image i from seed + i); low-precision weights run under autocast; a
    progress bar when `desc` is given."""
    pipe.set_progress_bar_config(disable=True)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else contextlib.nullcontext()
    rows = []
    progress = tqdm(total=len(samples) * num_images, desc=desc, unit="image", disable=desc is None)
    with progress, torch.no_grad(), autocast:
        for sample in samples:
            row = []
            for i in range(num_images):
                generator = torch.Generator(device="cpu").manual_seed(sample.seed + i)
                row.append(pipe(sample.prompt, generator=generator, **sample.kwargs).images[0])
                progress.update(1)
            rows.append(row)
    return rows


def generate(
    pipe,
    prompts: list[str],
    num_images: int,
    seed: int,
    device: torch.device,
    dtype: torch.dtype = torch.float32,
    **pipe_kwargs,
) -> dict[str, list[Image.Image]]:
    """`num_images` images per prompt with the same settings (image i from seed + i)."""
    rows = generate_samples(pipe, [Sample(p, seed, pipe_kwargs) for p in prompts], num_images, device, dtype)
    return dict(zip(prompts, rows, strict=True))


def run_validation(accelerator, args, pipe, step: int, dtype: torch.dtype, **pipe_kwargs) -> list[Path]:
    """Generate the run's validation prompts (args.validation_samples) with `pipe`, save and log them.
    `pipe_kwargs`: the family's sampling settings with the default height and width."""
    defaults = dict(pipe_kwargs)
    if args.validation_negative_prompt is not None:
        defaults["negative_prompt"] = args.validation_negative_prompt
    if args.validation_guidance_scale is not None:
        defaults["prior_guidance_scale" if is_combined(pipe) else "guidance_scale"] = args.validation_guidance_scale
    seed = args.seed if args.validation_seed is None else args.validation_seed
    samples = resolve_samples(pipe, args.validation_samples, defaults, seed)
    rows = generate_samples(pipe, samples, args.num_validation_images, accelerator.device, dtype)
    return save_and_log(accelerator, [s.prompt for s in samples], rows, step, args.output_dir)


def save_and_log(
    accelerator, prompts: list[str], rows: list[list[Image.Image]], step: int, output_dir: Path
) -> list[Path]:
    """Write PNGs to OUTPUT_DIR/validation/ (step, prompt index and image index in the name) and send them to
    tensorboard / wandb, captioned with their prompt."""
    folder = Path(output_dir) / "validation"
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for p, (prompt, images) in enumerate(zip(prompts, rows, strict=True)):
        for i, image in enumerate(images):
            path = folder / f"step{step:06d}_prompt{p}_{i}.png"
            image.save(path)
            paths.append(path)
        (folder / f"prompt{p}.txt").write_text(prompt + "\n")
    if paths:
        logger.info("validation at step %d: %d images in %s (step%06d_prompt*_*.png)", step, len(paths), folder, step)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            for p, (prompt, images) in enumerate(zip(prompts, rows, strict=True)):
                arrays = np.stack([np.asarray(image) for image in images])
                tracker.writer.add_images(f"validation/prompt{p}", arrays, step, dataformats="NHWC")
                tracker.writer.add_text(f"validation/prompt{p}", prompt, step)  # the images' caption
        elif tracker.name == "wandb":
            import wandb

            captioned = [
                wandb.Image(image, caption=f"{i}: {prompt}")
                for prompt, images in zip(prompts, rows, strict=True)
                for i, image in enumerate(images)
            ]
            tracker.log({"validation": captioned}, step=step)
    return paths

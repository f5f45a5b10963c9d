"""Class images for prior preservation: the missing ones generated with the base model into --class_data_dir.

Image i is `class_{i:05d}.png`, sampled with seed i in the aligned batch i // --sample_batch_size: a batch is
always generated whole (only its missing files are written, each atomically), so an interrupted or partly
deleted folder is refilled with exactly the images an uninterrupted run writes. Images already there, of any
name, count towards --num_class_images and are used as they are. Only the main process generates.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import torch

from difftune.cli.parsing import DTYPES
from difftune.data.dreambooth import count_images

logger = logging.getLogger("difftune")


def file_name(index: int) -> str:
    return f"class_{index:05d}.png"


def missing_indices(folder: Path, wanted: int) -> list[int]:
    """The indices to generate: the first ones without a file, as many as `folder` lacks of `wanted` images."""
    lacking = wanted - count_images(folder)
    if lacking <= 0:
        return []
    free = (i for i in range(wanted + count_images(folder)) if not (folder / file_name(i)).exists())
    return [next(free) for _ in range(lacking)]


def to_generate(args) -> int:
    """How many class images the run will generate (0 without --with_prior_preservation)."""
    if not getattr(args, "with_prior_preservation", False):
        return 0
    return len(missing_indices(Path(args.class_data_dir), args.num_class_images))


def generation_dtype(args, weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype class images are generated in: --prior_generation_precision ("no": fp32), else the frozen
    models' own (diffusers' default, fp16 on a GPU, would be a second copy of the base model)."""
    name = getattr(args, "prior_generation_precision", None)
    return weight_dtype if name is None else DTYPES["fp32" if name == "no" else name]


@contextlib.contextmanager
def in_float32(pipe) -> Iterator[None]:
    """The pipeline's half-precision weights in fp32 while it generates, then back as they were (half -> fp32
    -> half is exact): the frozen models are the ones the run trains with."""
    modules = [part for part in getattr(pipe, "components", {}).values() if isinstance(part, torch.nn.Module)]
    tensors = {id(t): t for m in modules for t in (*m.parameters(), *m.buffers())}.values()  # (shared once)
    lowered = [(t, t.dtype) for t in tensors if t.is_floating_point() and t.dtype != torch.float32]
    for tensor, _ in lowered:
        tensor.data = tensor.data.float()
    try:
        yield
    finally:
        for tensor, dtype in lowered:
            tensor.data = tensor.data.to(dtype)


def generate_missing(
    accelerator,
    args,
    build_pipeline: Callable[[], object],
    dtype: torch.dtype,
    sampling: Callable[[object], dict],
) -> int:
    """With --with_prior_preservation, fill --class_data_dir up to --num_class_images with images of
    --class_prompt from `build_pipeline()` (the base model, no adapter yet), called with the keyword arguments
    `sampling(pipe)` gives (size, steps); returns how many were written (by this process)."""
    if not getattr(args, "with_prior_preservation", False):
        return 0
    folder = Path(args.class_data_dir)
    written = 0
    if accelerator.is_main_process:
        todo = missing_indices(folder, args.num_class_images)
        if todo:
            folder.mkdir(parents=True, exist_ok=True)
            written = generate(build_pipeline, todo, folder, args.class_prompt, args.sample_batch_size,
                               accelerator.device, generation_dtype(args, dtype), sampling)  # fmt: skip
    accelerator.wait_for_everyone()
    return written


def generate(
    build_pipeline: Callable[[], object],
    todo: list[int],
    folder: Path,
    prompt: str,
    batch_size: int,
    device: torch.device,
    dtype: torch.dtype,
    sampling: Callable[[object], dict],
) -> int:
    """Generate the aligned batches holding `todo`'s indices and write those images; frees the pipeline."""
    from tqdm.auto import tqdm

    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    pipe_kwargs = sampling(pipe)
    batches = sorted({index // batch_size for index in todo})
    wanted = set(todo)
    # Half precision: autocast over the weights as they are; fp32: the weights themselves, for the while.
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else in_float32(pipe)
    logger.info("generating %d class images of %r in %s (%s)", len(todo), prompt, folder, str(dtype).split(".")[-1])
    with tqdm(total=len(todo), desc="class images", unit="image") as bar, torch.no_grad(), autocast:
        for batch in batches:
            indices = range(batch * batch_size, (batch + 1) * batch_size)
            generators = [torch.Generator().manual_seed(index) for index in indices]
            images = pipe([prompt] * batch_size, generator=generators, **pipe_kwargs).images
            for index, image in zip(indices, images, strict=True):
                if index in wanted:
                    partial = folder / f".{file_name(index)}.partial-{os.getpid()}"
                    image.save(partial, format="PNG")
                    partial.replace(folder / file_name(index))
                    bar.update(1)
    del pipe
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return len(todo)

"""The model card (README.md) written into a run's output dir."""

from __future__ import annotations

import argparse
from pathlib import Path

import difftune
from difftune.storage.checkpoints import STATE_FILE, list_checkpoints, read_json


def write_model_card(
    output_dir: Path,
    args: argparse.Namespace,
    *,
    title: str,
    base_models: list[str],
    adapter: str,
    loading: str,
    samples_per_epoch: int | None = None,
) -> Path:
    """README.md with the base model, adapter settings, data, steps and how to load the result."""
    data = args.train_data_dir or getattr(args, "dataset_config", None) or args.dataset_name
    if samples_per_epoch is not None:
        data += f" ({samples_per_epoch} samples per epoch, repeats counted)"
    targets = ", ".join(args.target_modules)
    alpha = getattr(args, "alpha", None) or getattr(args, "lora_alpha", None)
    lines = [
        "---",
        "library_name: peft",
        "tags: [difftune, text-to-image, diffusers, " + adapter.lower() + "]",
        "base_model: " + base_models[0],
        "---",
        "",
        f"# {title}",
        "",
        f"Trained with difftune {difftune.__version__}.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | {', '.join(base_models)} |",
        *([f"| base model sha256 | {args.base_model_sha256} |"] if getattr(args, "base_model_sha256", None) else []),
        f"| adapter | {adapter}, rank {args.rank}, alpha {alpha}, on {targets} |",
        f"| text encoder(s) trained | {'yes' if args.train_text_encoder else 'no'} |",
        f"| data | {data} |",
        *prior_preservation_rows(args),
        *resolution_rows(args),
        f"| steps | {args.max_train_steps} (batch {args.train_batch_size} per process, "
        f"accumulation {args.gradient_accumulation_steps}) |",
        f"| learning rate | {args.learning_rate} ({args.lr_scheduler}) |",
        f"| precision | {args.mixed_precision or 'from the accelerate config'} |",
        f"| seed | {args.seed} |",
        "",
        "Checkpoints are the `step<N>/` folders; each holds the run's arguments in `args.json`.",
        "",
        *evaluation_table(Path(output_dir)),
        "## Loading",
        "",
        loading.strip(),
        "",
    ]
    path = Path(output_dir) / "README.md"
    path.write_text("\n".join(lines))
    return path


def literal(value: object) -> str:
    """`value` as a Python string literal for the card's code (quotes, backslashes and all survive a paste)."""
    return repr(str(value))


def evaluation_table(output_dir: Path) -> list[str]:
    """The held-out loss of each checkpoint (--validation_split, --eval_data_dir), as Markdown lines; none without."""
    rows = []
    for _, path in list_checkpoints(output_dir):
        state = read_json(path / STATE_FILE)
        if "eval_loss" in state:
            ema = f" {state['eval_loss_ema']:.6f} |" if "eval_loss_ema" in state else " |"
            rows.append(f"| {path.name} | {state['eval_loss']:.6f} |{ema}")
    if not rows:
        return []
    header = ["## Held-out loss", "", "| checkpoint | loss | EMA weights' loss |", "|---|---|---|"]
    return [*header, *rows, ""]


def prior_preservation_rows(args: argparse.Namespace) -> list[str]:
    """The class images' table row, for DreamBooth runs."""
    sources = []
    if getattr(args, "with_prior_preservation", False):
        prompt = f", {args.class_prompt!r}" if args.class_prompt else ""
        sources.append(f"{args.num_class_images} from {args.class_data_dir}{prompt}")
    if getattr(args, "reg_data_dir", None):
        sources.append(f"kohya folders in {args.reg_data_dir}")
    if not sources:
        return []
    return [f"| prior preservation | class images: {'; '.join(sources)}; weight {args.prior_loss_weight} |"]


def resolution_rows(args: argparse.Namespace) -> list[str]:
    """The resolution the run trained at: --resolution, or each kohya data set's size, buckets, batch size and
    subsets (their repeats, class tokens, caption options and augmentations)."""
    datasets = getattr(args, "datasets", None)
    if not datasets:
        return [f"| resolution | {args.resolution} |"]
    rows = []
    for number, spec in enumerate(datasets, start=1):
        width, height = spec["resolution"]
        text = f"{width}x{height}, batch {spec['batch_size']}"
        if "min_bucket_reso" in spec:
            text += (
                f", buckets {spec['min_bucket_reso']}-{spec['max_bucket_reso']} in steps of "
                f"{spec['bucket_reso_steps']}{' without upscaling' if spec['bucket_no_upscale'] else ''}"
            )
        if spec.get("validation_split"):
            text += f", {spec['validation_split']:g} held out"
        for subset in spec["subsets"]:
            settings = [f"x{subset['num_repeats']}"]
            if subset.get("is_reg"):
                settings.append("regularisation")
            if subset.get("class_tokens") is not None:
                settings.append(f"class tokens '{subset['class_tokens']}'")
            settings += [f"{k} {v}" for k, v in {**subset.get("captions", {}), **subset.get("augment", {})}.items()]
            text += f"; {subset.get('metadata_file') or subset['image_dir']} ({', '.join(settings)})"
        rows.append(f"| data set {number} | {text} |")
    return rows

"""The model card (README.md) written into a run's output dir."""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import difftune
from difftune.storage import integrity
from difftune.storage.checkpoints import CHECKPOINT_NAME, STATE_FILE, list_checkpoints, write_atomic

MODULES_FILE = "adapted_modules.txt"
MAX_IMAGES = 16  # a long prompt file's images stay in validation/, not all on the card


def write_model_card(
    output_dir: Path,
    args: argparse.Namespace,
    *,
    title: str,
    base_models: list[str],
    adapter: str,
    loading: str,
    samples_per_epoch: int | None = None,
    checkpoint: Path | None = None,
) -> Path:
    """README.md with the base model, adapter settings, trigger words, data, steps, the last validation images
    and how to load the result; `checkpoint`'s adapted modules are counted on it and listed in MODULES_FILE."""
    data = args.train_data_dir or getattr(args, "dataset_config", None) or args.dataset_name
    if samples_per_epoch is not None:
        data += f" ({samples_per_epoch} samples per epoch, repeats counted)"
    # --init_adapter records every module its file adapts as the targets: counted below instead.
    targets = ", ".join(args.target_modules) if len(args.target_modules) <= 12 else "the modules counted below"
    triggers = trigger_words(args)
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
        *module_rows(Path(output_dir), checkpoint),
        *([f"| trigger words | {', '.join(cell(f'`{w}`') for w in triggers)} |"] if triggers else []),
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
        *validation_images(Path(output_dir), checkpoint),
        "## Loading",
        "",
        loading.strip(),
        "",
    ]
    path = Path(output_dir) / "README.md"
    write_atomic(path, "\n".join(lines))  # a kill or a full disk never leaves an empty card
    return path


def literal(value: object) -> str:
    """`value` as a Python string literal for the card's code (quotes, backslashes and all survive a paste)."""
    return repr(str(value))


def cell(text: str) -> str:
    """`text` inside one Markdown table cell (a "|" would end the cell, a newline the row)."""
    return text.replace("|", "\\|").replace("\n", " ")


def trigger_words(args: argparse.Namespace) -> list[str]:
    """What a prompt needs to call up what was trained: --instance_prompt and the kohya subsets' class tokens
    (not the regularisation subsets': theirs name the class, which the base model already knows)."""
    words = [args.instance_prompt] if getattr(args, "instance_prompt", None) else []
    for spec in getattr(args, "datasets", None) or []:
        for subset in spec["subsets"]:
            tokens = subset.get("class_tokens")
            if tokens and not subset.get("is_reg") and tokens not in words:
                words.append(tokens)
    return words


def natural(name: str) -> list[tuple[int, int | str]]:
    """Sort key: down_blocks.2 before down_blocks.10."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in name.split(".")]


def adapted_modules(checkpoint: Path) -> dict[str, list[str]]:
    """Each adapter folder's adapted modules, from its weights file's header (no tensor is read)."""
    from safetensors import safe_open

    found = {}
    # The denoiser (unet, prior) first, then the text encoders.
    for weights in sorted(
        Path(checkpoint).glob("*/adapter_model.safetensors"), key=lambda p: ("text_encoder" in p.parent.name, p)
    ):
        with safe_open(str(weights), framework="pt") as handle:
            keys = list(handle.keys())
        modules = set()
        for key in keys:  # base_model.model.<module>.lokr_w1, base_model.model.<module>.lora_A.weight
            parts = key.removeprefix("base_model.model.").split(".")
            end = next((i for i, part in enumerate(parts) if part.startswith(("lokr_", "lora_"))), len(parts) - 1)
            modules.add(".".join(parts[:end]))
        found[weights.parent.name] = sorted(modules, key=natural)
    return found


def block_type(module: str) -> str:
    """A module's block type: its first two names without the indices (down_blocks.1.attentions.0.... ->
    down_blocks.attentions, [text_model.]encoder.layers.3.... -> encoder.layers: a text encoder's modules are
    saved with or without the text_model wrapper, depending on its class)."""
    return ".".join([part for part in module.removeprefix("text_model.").split(".") if not part.isdigit()][:2])


def module_rows(output_dir: Path, checkpoint: Path | None) -> list[str]:
    """The adapted modules counted per block type, as a table row; every name goes to MODULES_FILE (the full
    list of a run adapting conv layers too runs to thousands of characters)."""
    found = adapted_modules(checkpoint) if checkpoint is not None else {}
    if not found:
        return []
    lines, counts = [], []
    for folder, modules in found.items():
        lines += [f"# {folder} ({len(modules)} modules)", *modules, ""]
        groups = ", ".join(f"{name} {count}" for name, count in Counter(map(block_type, modules)).items())
        counts.append(f"{folder} {len(modules)}: {groups}")
    write_atomic(output_dir / MODULES_FILE, "\n".join(lines))
    return [f"| adapted modules | {'; '.join(counts)} (all named in [{MODULES_FILE}]({MODULES_FILE})) |"]


IMAGE_NAME = re.compile(r"^step(\d+)_prompt(\d+)_(\d+)\.png$")  # as generate.validation.save_and_log names them


def validation_images(output_dir: Path, checkpoint: Path | None) -> list[str]:
    """The last validation images up to `checkpoint`'s step, linked relative to the card, under their prompt."""
    match = CHECKPOINT_NAME.match(Path(checkpoint).name) if checkpoint is not None else None
    folder = output_dir / "validation"
    if match is None or not folder.is_dir():
        return []
    by_step: dict[int, list[tuple[int, int, str]]] = {}
    for path in folder.iterdir():
        found = IMAGE_NAME.match(path.name)
        if found and int(found.group(1)) <= int(match.group(1)):  # not a later step of an earlier run
            step, prompt, index = map(int, found.groups())
            by_step.setdefault(step, []).append((prompt, index, path.name))
    if not by_step:
        return []
    step = max(by_step)
    images = sorted(by_step[step])
    lines = ["## Validation images", "", f"Step {step} (all of them in `validation/`):", ""]
    for prompt in sorted({p for p, _, _ in images[:MAX_IMAGES]}):
        text_file = folder / f"prompt{prompt}.txt"
        text = " ".join(text_file.read_text().split()) if text_file.is_file() else f"prompt {prompt}"
        alt = text.replace("[", "\\[").replace("]", "\\]")
        links = [f"![{alt}](validation/{name})" for p, _, name in images[:MAX_IMAGES] if p == prompt]
        quoted = text.replace("`", "'")  # shown as code: no Markdown in the prompt takes effect
        lines += [f"`{quoted}`", "", " ".join(links), ""]
    if len(images) > MAX_IMAGES:
        lines += [f"{len(images) - MAX_IMAGES} more images of this step are in `validation/`.", ""]
    return lines


def evaluation_table(output_dir: Path) -> list[str]:
    """The held-out loss of each checkpoint (--validation_split, --eval_data_dir), as Markdown lines; none without."""
    rows = []
    for _, path in list_checkpoints(output_dir):
        state = integrity.read_state(path / STATE_FILE)
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

"""Generate images from a base model plus a trained checkpoint (SDXL LoKr or Wuerstchen prior LoRA).

    python scripts/infer.py --checkpoint OUTPUT_DIR/step<N> --prompt "yoda pokemon" [--prompt ...]

The model family and base model(s) come from the checkpoint's args.json (override them with
--pretrained_model_name_or_path and friends). Writes one PNG per image and a grid.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence
from pathlib import Path

from difftune.adapters.ema import adapter_dir
from difftune.cli.errors import UserError, run_cli
from difftune.cli.lazy import LazyModule
from difftune.cli.parsing import DTYPES, ErrorOnlyParser
from difftune.generate import inference, prompts
from difftune.storage import integrity
from difftune.storage.checkpoints import ARGS_FILE, read_json

# Imported at their first use: --help answers without torch, PIL and diffusers.
torch = LazyModule("torch")
Image = LazyModule("PIL.Image")
validation = LazyModule("difftune.generate.validation")
priors = LazyModule("difftune.models.priors")
wuerstchen = LazyModule("difftune.models.wuerstchen")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ErrorOnlyParser(description=__doc__, usage="%(prog)s --checkpoint DIR --prompt TEXT [options]")
    parser.add_argument("--checkpoint", type=Path, required=True, help="A training run's OUTPUT_DIR/step<N>.")
    parser.add_argument("--prompt", action="append", default=[], help="Repeat for several prompts.")
    parser.add_argument(
        "--prompts_file",
        type=Path,
        default=None,
        help="One prompt a line, with kohya's inline options (--n, --w, --h, --d, --l, --s; see docs/options.md), "
        "after the --prompt ones.",
    )
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--num_images_per_prompt", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0, help="Image i of each prompt uses seed + i.")
    parser.add_argument("--num_inference_steps", type=int, default=None, help="SDXL: 30; Wuerstchen decoder: 12.")
    parser.add_argument("--guidance_scale", type=float, default=None, help="SDXL: 5.0; Wuerstchen prior: 4.0.")
    parser.add_argument("--height", type=int, default=None, help="Default: the training resolution.")
    parser.add_argument("--width", type=int, default=None, help="Default: the training resolution.")
    parser.add_argument("--adapter_scale", type=float, default=1.0, help="0 = base model, 1 = as trained.")
    parser.add_argument("--fuse", action="store_true", help="Merge the adapter into the weights first.")
    parser.add_argument("--compare_base", action="store_true", help="Also write the base model's image.")
    parser.add_argument("--ema", action="store_true", help="Use the checkpoint's EMA weights (runs with --use_ema).")
    parser.add_argument("--output_dir", type=Path, default=None, help="Default: CHECKPOINT/../samples/step<N>.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="Default: fp16 on CUDA, else fp32.")
    for flag in (
        "--pretrained_model_name_or_path",
        "--pretrained_vae_model_name_or_path",
        "--pretrained_prior_model_name_or_path",
        "--pretrained_decoder_model_name_or_path",
        "--revision",
        "--variant",
        "--single_file_config",
    ):
        parser.add_argument(flag, default=None, help="Default: the training run's.")
    return parser.parse_args(argv)


def read_prompts(args: argparse.Namespace) -> list[dict]:
    entries = prompts.prompt_entries(args.prompt, args.prompts_file, "--prompts_file")
    if not entries:
        raise UserError("no prompt: pass --prompt (repeatable) or --prompts_file")
    return entries


def build_pipeline(args: argparse.Namespace, family: str, run: dict, dtype: torch.dtype):
    def setting(name: str):
        return getattr(args, name) if getattr(args, name) is not None else run.get(name)

    if family == "sdxl":
        vae = setting("pretrained_vae_model_name_or_path")
        vae = None if vae is None or vae.lower() == "none" else vae
        return inference.sdxl_pipeline(
            setting("pretrained_model_name_or_path"), vae, setting("revision"), setting("variant"), dtype,
            run.get("prediction_type"),  # sample what the run trained
            setting("single_file_config"),
        )  # fmt: skip
    return inference.wuerstchen_pipeline(
        setting("pretrained_prior_model_name_or_path"),
        setting("pretrained_decoder_model_name_or_path"),
        setting("revision"),
        setting("variant"),
        dtype,
        run,
    )


def pipeline_kwargs(args: argparse.Namespace, family: str, run: dict) -> dict:
    height, width = run.get("trained_size") or (run.get("resolution"),) * 2  # (a kohya data set's, if any)
    size = {"height": args.height or height, "width": args.width or width}
    if family == "sdxl":
        return {
            "num_inference_steps": args.num_inference_steps or 30,
            "guidance_scale": 5.0 if args.guidance_scale is None else args.guidance_scale,
            "negative_prompt": args.negative_prompt,
            **size,
        }
    # Stable Cascade: 20 prior steps (its sampling setting), 10 decoder steps; Wuerstchen v2: 12.
    prior_family = priors.family_of_run(run)
    return {
        **prior_family.sampling_kwargs(args.num_inference_steps or (12 if prior_family is wuerstchen.V2 else 10)),
        "prior_guidance_scale": 4.0 if args.guidance_scale is None else args.guidance_scale,
        "negative_prompt": args.negative_prompt,
        **size,
    }


def fit_decodable_size(pipe, kwargs: dict, name: str = "Wuerstchen") -> None:
    """Move a height or width the decoder cannot generate to the nearest one it can, and say so."""
    for side in ("height", "width"):
        size = wuerstchen.decodable_size(pipe, kwargs[side])
        if size != kwargs[side]:
            print(f"generating at {side} {size}: the {name} decoder cannot generate {side} {kwargs[side]}")
            kwargs[side] = size


def slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:40] or "prompt"


def save_grid(rows: list[list[Image.Image]], path: Path) -> None:
    # Cells as large as the largest image (a prompts file may ask for several sizes).
    width = max(image.width for row in rows for image in row)
    height = max(image.height for row in rows for image in row)
    grid = Image.new("RGB", (width * max(len(r) for r in rows), height * len(rows)), "white")
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image, (x * width, y * height))
    grid.save(path)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    entries = read_prompts(args)  # a malformed prompts file fails here, before anything loads
    family = inference.checkpoint_family(args.checkpoint)
    integrity.check_checkpoint(args.checkpoint, "--checkpoint")
    if not (args.checkpoint / ARGS_FILE).is_file():
        raise UserError(f"--checkpoint {args.checkpoint} has no {ARGS_FILE}: was it written by difftune?")
    run = read_json(args.checkpoint / ARGS_FILE)
    if args.num_images_per_prompt <= 0:
        raise UserError("--num_images_per_prompt must be positive")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = DTYPES[args.dtype or ("fp16" if device.type == "cuda" else "fp32")]
    if dtype == torch.float16 and device.type == "cpu":
        raise UserError("--dtype fp16 needs a GPU; on the CPU use fp32 or bf16")

    pipe = build_pipeline(args, family, run, dtype).to(device)
    kwargs = pipeline_kwargs(args, family, run)
    if family == "wuerstchen":
        prior_family = priors.family_of_run(run)
        for side in ("height", "width"):  # (Stable Cascade: the size whose prior latent is the trained one)
            kwargs[side] = kwargs[side] if getattr(args, side) else prior_family.sampling_side(pipe, kwargs[side])
        fit_decodable_size(pipe, kwargs, priors.family_of_run(run).title.removesuffix(" v2"))
    samples = validation.resolve_samples(pipe, entries, kwargs, args.seed, say=print)
    count = args.num_images_per_prompt
    base_rows = None
    if args.compare_base:
        base_rows = validation.generate_samples(pipe, samples, count, device, desc="base")
    inference.load_adapters(pipe, family, adapter_dir(args.checkpoint, args.ema), args.adapter_scale, args.fuse)
    pipe.to(device)
    rows = validation.generate_samples(pipe, samples, count, device, desc="adapted")

    out = args.output_dir or args.checkpoint.parent / "samples" / (args.checkpoint.name + ("-ema" if args.ema else ""))
    out.mkdir(parents=True, exist_ok=True)
    grid_rows = []
    for p, (sample, row) in enumerate(zip(samples, rows, strict=True)):
        grid_row = []
        for i, image in enumerate(row):
            stem = f"{p:02d}_{slug(sample.prompt)}_{i:02d}"
            image.save(out / f"{stem}.png")
            if base_rows is not None:
                base_rows[p][i].save(out / f"{stem}_base.png")
                grid_row.append(base_rows[p][i])
            grid_row.append(image)
        grid_rows.append(grid_row)
    save_grid(grid_rows, out / "grid.png")
    extra = " (each beside its base-model image in the grid)" if base_rows is not None else ""
    print(f"wrote {len(samples) * count} image(s) and grid.png to {out}{extra}")


if __name__ == "__main__":
    run_cli(main)

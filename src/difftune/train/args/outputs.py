"""What a run leaves: the checkpoint and logging flags, the reliability and validation flags, and the
--output_dir check."""

from __future__ import annotations

import argparse
from pathlib import Path

from difftune.cli.errors import UserError


def add_checkpoint_args(parser: argparse.ArgumentParser, output_dir: str) -> None:
    group = parser.add_argument_group("checkpoints and logging")
    group.add_argument("--output_dir", default=output_dir)
    group.add_argument(
        "--output_name", default=None,
        help="The name scripts/export.py gives its file by default (kohya's): OUTPUT_DIR/<name>.safetensors.",
    )  # fmt: skip
    group.add_argument("--checkpointing_steps", type=int, default=500, help="0: none by steps (only at the end).")
    group.add_argument(
        "--checkpointing_epochs", type=int, default=None,
        help="Also checkpoint at the end of every N-th epoch (kohya's save_every_n_epochs).",
    )  # fmt: skip
    group.add_argument("--checkpoints_total_limit", type=int, default=None, help="Keep this many checkpoints.")
    group.add_argument(
        "--resume_from_checkpoint", default=None, help='A checkpoint dir (output_dir/step<N>) or "latest".'
    )
    group.add_argument("--report_to", default="tensorboard", choices=["tensorboard", "wandb", "none"])
    group.add_argument("--logging_dir", default="logs", help="Tracker logs, relative to --output_dir.")
    group.add_argument(
        "--push_to_hub", action="store_true",
        help="At the end, upload the final checkpoint, the model card and the files it shows to a Hub model repo.",
    )  # fmt: skip
    group.add_argument("--hub_model_id", default=None, help="The Hub repo (org/name). Default: --output_dir's name.")
    group.add_argument(
        "--hub_token", default=None, help="Default: the `hf auth login` token. Never written to args.json or logs."
    )


def add_reliability_and_validation_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("reliability (see docs/reliability.md)")
    group.add_argument(
        "--overwrite_output_dir", action="store_true", help="Start afresh over an earlier run's checkpoints."
    )
    group.add_argument(
        "--max_nonfinite_steps",
        type=int,
        default=0,
        help="Skip up to N steps whose loss is NaN/inf before stopping with an error.",
    )

    group = parser.add_argument_group("validation")
    group.add_argument("--validation_prompt", action="append", default=None, help="Repeat for several prompts.")
    group.add_argument(
        "--validation_prompts_file",
        type=Path,
        default=None,
        help="One prompt a line with kohya's inline options (--n, --w, --h, --d, --l, --s; see docs/options.md), "
        "after the --validation_prompt ones.",
    )
    group.add_argument("--validation_negative_prompt", default=None, help="For every prompt without its own --n.")
    group.add_argument(
        "--validation_guidance_scale", type=float, default=None, help="Default: the pipeline's (SDXL 5, prior 4)."
    )
    group.add_argument(
        "--validation_seed", type=int, default=None, help="Image i of a prompt uses seed + i. Default: --seed."
    )
    group.add_argument("--num_validation_images", type=int, default=4, help="Images per prompt.")
    group.add_argument(
        "--validation_steps", type=int, default=500, help="Validate every N steps and at the end (0: only at the end)."
    )
    group.add_argument(
        "--validation_epochs", type=int, default=None,
        help="Also validate at the end of every N-th epoch (diffusers' flag), besides --validation_steps.",
    )  # fmt: skip
    group.add_argument("--validation_inference_steps", type=int, default=30)
    group.add_argument(
        "--validation_split",
        type=float,
        default=0.0,
        help="Hold out this seeded share of the data for an evaluation loss at each validation and checkpoint.",
    )
    group.add_argument(
        "--eval_data_dir",
        default=None,
        help="A folder of held-out images (like --train_data_dir) for the evaluation loss, instead of a split.",
    )


def check_output_dir_is_a_folder(output_dir: str | Path) -> None:
    """--output_dir is a folder, or can become one (no file in its place or above it)."""
    for path in (Path(output_dir), *Path(output_dir).parents):
        if path.exists():
            if not path.is_dir():
                raise UserError(f"--output_dir {output_dir}: {path} is a file, not a folder: name a folder")
            return

"""Export a trained checkpoint to a single .safetensors file for other programs.

    python scripts/export.py --checkpoint OUTPUT_DIR/step<N> --format kohya --out model.safetensors

--format kohya: SDXL LoKr (UNet and, when trained, both text encoders) in the kohya / LyCORIS
format that ComfyUI and AUTOMATIC1111 load. --format diffusers: the Wuerstchen prior LoRA as the
diffusers single file (`load_lora_weights`). --format comfyui: the Stable Cascade stage C LoRA (and its
text encoder's) with ComfyUI's names (lora_prior_unet_..., lora_prior_te_...).
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from pathlib import Path

from difftune import cascade, export, wuerstchen
from difftune.args import DTYPES, ErrorOnlyParser
from difftune.checkpoints import ARGS_FILE, read_json
from difftune.ema import adapter_dir
from difftune.errors import UserError, run_cli
from difftune.inference import checkpoint_family


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ErrorOnlyParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="A step<N> dir of a training run.")
    parser.add_argument("--format", choices=["kohya", "diffusers", "comfyui"], default="kohya")
    parser.add_argument("--out", type=Path, required=True, help="The .safetensors file to write.")
    parser.add_argument("--dtype", choices=list(DTYPES), default="fp32")
    parser.add_argument("--pretrained_model_name_or_path", default=None, help="Default: the run's base model.")
    parser.add_argument(
        "--allow_large_factor",
        action="store_true",
        help="Export a --decompose_factor above sqrt(dim): ComfyUI and A1111 load it, LyCORIS's loader cannot.",
    )
    parser.add_argument("--ema", action="store_true", help="Export the EMA weights (runs with --use_ema).")
    return parser.parse_args(argv)


def export_sdxl_kohya(args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    run = read_json(args.checkpoint / ARGS_FILE)
    base = args.pretrained_model_name_or_path or run["pretrained_model_name_or_path"]
    weights = adapter_dir(args.checkpoint, args.ema)
    models = [m for m in ("unet", "text_encoder_one", "text_encoder_two") if (weights / m).is_dir()]
    adapters = {m: export.read_peft_adapter(weights / m) for m in models}
    for model, (config, _) in adapters.items():
        if config.get("peft_type") != "LOKR":
            raise UserError(f"{weights / model} is a {config.get('peft_type')} adapter, not LoKr")
    unet_config, shapes = export.module_shapes(base, run.get("revision"), models)
    state = export.lokr_to_kohya(adapters, unet_config, shapes, DTYPES[args.dtype], args.allow_large_factor)
    return state, export.kohya_metadata(adapters["unet"][0], base)


def export_wuerstchen_diffusers(args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file

    # Rebuilt from the peft adapters (also right for checkpoints written before the diffusers file carried
    # lora_alpha in its metadata), by diffusers' own writer.
    source = adapter_dir(args.checkpoint, args.ema)
    parts = {}
    for name in ("prior", "text_encoder"):
        if (source / name).is_dir():
            weights = load_file(str(source / name / "adapter_model.safetensors"))
            parts[name] = (
                LoraConfig.from_pretrained(str(source / name)).to_dict(),
                {k.removeprefix("base_model.model."): v.to(DTYPES[args.dtype]) for k, v in weights.items()},
            )
    with tempfile.TemporaryDirectory() as tmp:
        wuerstchen.save_diffusers_lora(Path(tmp), parts)
        path = str(Path(tmp) / "pytorch_lora_weights.safetensors")
        with safe_open(path, framework="pt") as written:
            metadata = written.metadata()
        return load_file(path), metadata


def export_cascade_comfyui(args: argparse.Namespace) -> tuple[dict, dict[str, str]]:
    source = adapter_dir(args.checkpoint, args.ema)
    parts = {
        name: export.read_peft_adapter(source / name) for name in ("prior", "text_encoder") if (source / name).is_dir()
    }
    config = parts["prior"][0]
    metadata = {"ss_network_dim": str(config["r"]), "ss_network_alpha": str(config["lora_alpha"])}
    return cascade.lora_to_comfyui(parts, DTYPES[args.dtype]), metadata


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    family = checkpoint_family(args.checkpoint)
    if args.out.suffix != ".safetensors":
        raise UserError(f"--out {args.out} must end in .safetensors")
    if family == "wuerstchen":
        run = read_json(args.checkpoint / ARGS_FILE) if (args.checkpoint / ARGS_FILE).is_file() else {}
        if wuerstchen.family_of_run(run) is cascade.CASCADE:
            family = "cascade"
        elif args.format == "comfyui":
            raise UserError(
                "ComfyUI has no Wuerstchen v2 (only Stable Cascade): export this checkpoint as --format diffusers"
            )
    if (family, args.format) == ("cascade", "comfyui"):
        state, metadata = export_cascade_comfyui(args)
    elif family == "cascade":
        raise UserError(
            "a Stable Cascade LoRA exports as --format comfyui (diffusers has no Stable Cascade LoRA format)"
        )
    elif (family, args.format) == ("sdxl", "kohya"):
        state, metadata = export_sdxl_kohya(args)
    elif (family, args.format) == ("wuerstchen", "diffusers"):
        state, metadata = export_wuerstchen_diffusers(args)
    elif family == "sdxl":
        raise UserError("SDXL LoKr exports as --format kohya (diffusers' LoRA format cannot hold LoKr)")
    else:
        raise UserError(
            "Wuerstchen LoRA exports as --format diffusers: "
            "there is no kohya naming convention for the Wuerstchen prior"
        )
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial")
    save_file(state, str(partial), metadata=metadata)
    partial.replace(args.out)
    modules = len({k.rsplit(".", 1)[0] for k in state})
    print(f"wrote {args.out} ({modules} modules, {args.format}, {args.dtype})")


if __name__ == "__main__":
    run_cli(main)

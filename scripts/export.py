"""Export a trained checkpoint to a single .safetensors file for other programs.

    python scripts/export.py --checkpoint OUTPUT_DIR/step<N> --format kohya --out model.safetensors

--format kohya: SDXL LoKr (UNet and, when trained, both text encoders) in the kohya / LyCORIS
format that ComfyUI and AUTOMATIC1111 load. --format checkpoint: one SDXL checkpoint (original layout,
fp16 by default) with the adapter merged into the UNet and text encoders and the run's VAE included, for
ComfyUI's Load Checkpoint, A1111 or from_single_file. --format diffusers: the Wuerstchen prior LoRA as the
diffusers single file (`load_lora_weights`). --format comfyui: the Stable Cascade stage C LoRA (and its
text encoder's) with ComfyUI's names (lora_prior_unet_..., lora_prior_te_...).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path

from difftune.adapters.ema import adapter_dir
from difftune.cli.errors import UserError, run_cli
from difftune.cli.lazy import LazyModule
from difftune.cli.parsing import DTYPES, ErrorOnlyParser
from difftune.generate.inference import checkpoint_family
from difftune.models import single_file
from difftune.storage import integrity
from difftune.storage.checkpoints import ARGS_FILE, commit_file, honour_umask, read_json

# Imported at their first use: --help answers without torch and diffusers.
comfyui = LazyModule("difftune.formats.comfyui")
kohya = LazyModule("difftune.formats.kohya")
merged_checkpoint = LazyModule("difftune.formats.merged_checkpoint")
cascade = LazyModule("difftune.models.cascade")
priors = LazyModule("difftune.models.priors")
wuerstchen = LazyModule("difftune.models.wuerstchen")

SDXL_MODELS = ("unet", "text_encoder_one", "text_encoder_two")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = ErrorOnlyParser(description=__doc__, usage="%(prog)s --checkpoint DIR [--out FILE] [options]")
    parser.add_argument("--checkpoint", type=Path, required=True, help="A step<N> dir of a training run.")
    parser.add_argument("--format", choices=["kohya", "checkpoint", "diffusers", "comfyui"], default="kohya")
    parser.add_argument(
        "--out", type=Path, default=None,
        help="The .safetensors file to write. Default: OUTPUT_DIR/<--output_name>.safetensors for a run given one.",
    )  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="Default: fp16 for checkpoint, else fp32.")
    parser.add_argument("--pretrained_model_name_or_path", default=None, help="Default: the run's base model.")
    parser.add_argument("--single_file_config", default=None, help="For a single-file base. Default: the run's.")
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
    models = [m for m in SDXL_MODELS if (weights / m).is_dir()]
    adapters = {m: kohya.read_peft_adapter(weights / m) for m in models}
    for model, (config, _) in adapters.items():
        if config.get("peft_type") != "LOKR":
            raise UserError(f"{weights / model} is a {config.get('peft_type')} adapter, not LoKr")
    configs = base
    if single_file.is_single_file(base):  # its configs come from the run's --single_file_config
        configs = str(single_file.config_dir(args.single_file_config or run.get("single_file_config")))
    unet_config, shapes = kohya.module_shapes(configs, run.get("revision"), models)
    state = kohya.lokr_to_kohya(adapters, unet_config, shapes, DTYPES[args.dtype], args.allow_large_factor)
    convs = [m for m in kohya.group_modules(adapters["unet"][1]) if len(shapes["unet"].get(m, ())) == 4]
    return state, kohya.kohya_metadata(adapters["unet"][0], base, convs)


def export_sdxl_checkpoint(args: argparse.Namespace) -> str:
    """Stream the base model with the adapter merged into args.out's .partial file; returns what was written."""
    run = read_json(args.checkpoint / ARGS_FILE)
    base = args.pretrained_model_name_or_path or run["pretrained_model_name_or_path"]
    weights = adapter_dir(args.checkpoint, args.ema)
    adapters = {m: kohya.read_peft_adapter(weights / m) for m in SDXL_MODELS if (weights / m).is_dir()}
    for config, _ in adapters.values():
        kohya.check_exportable(config, {}, allow_large_factor=True)  # Tucker factors: no merge rule here
    vae = run.get("pretrained_vae_model_name_or_path")
    flag = "--pretrained_vae_model_name_or_path"
    vae = None if vae is None or vae.lower() == "none" else local_model(vae, flag, "config.json")
    if single_file.is_single_file(base):
        configs = single_file.config_dir(args.single_file_config or run.get("single_file_config"))
        entries = merged_checkpoint.file_entries(Path(base), drop_vae=vae is not None)
        if vae is None and not single_file.inspect(base).has_vae:
            vae = configs / "vae"
    else:
        configs = local_model(base, "--pretrained_model_name_or_path")
        entries = merged_checkpoint.folder_entries(configs, run.get("variant"))
        vae = vae or configs / "vae"
    if vae is not None:
        entries += merged_checkpoint.vae_entries(Path(vae))
    unet_config = json.loads((configs / "unet" / "config.json").read_text())
    deltas = merged_checkpoint.patches(adapters, unet_config)
    dtype = DTYPES[args.dtype]
    metadata = {"format": "pt", "difftune_base_model": Path(base).name, "difftune_checkpoint": str(args.checkpoint)}
    tensors = merged_checkpoint.merged(entries, deltas, dtype)
    merged_checkpoint.write_streaming(args.out.with_suffix(".partial"), entries, tensors, dtype, metadata, deltas)
    return f"{len(entries)} tensors, {len(deltas)} weights merged"


def local_model(name: str, flag: str, marker: str = "model_index.json") -> Path:
    """A diffusers folder, or a Hub id's snapshot (weights included) from the cache or the Hub."""
    from huggingface_hub import snapshot_download

    from difftune.storage.hub import fetch_file

    local = Path(name).expanduser()
    if local.is_dir():
        return local
    fetch_file(name, marker, None, flag)  # the one-line errors: no such repo, gated, offline and not cached
    return Path(snapshot_download(name, allow_patterns=["*.json", "*.txt", "*.safetensors"]))


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
        name: kohya.read_peft_adapter(source / name) for name in ("prior", "text_encoder") if (source / name).is_dir()
    }
    config = parts["prior"][0]
    metadata = {"ss_network_dim": str(config["r"]), "ss_network_alpha": str(config["lora_alpha"])}
    return comfyui.lora_to_comfyui(parts, DTYPES[args.dtype]), metadata


def default_out(checkpoint: Path) -> Path:
    """The run's --output_name beside its checkpoints (kohya's OUTPUT_DIR/<output_name>.safetensors)."""
    run = read_json(checkpoint / ARGS_FILE) if (checkpoint / ARGS_FILE).is_file() else {}
    if not run.get("output_name"):
        raise UserError(f"--out FILE is needed: {checkpoint}'s run was not given --output_name")
    return checkpoint.resolve().parent / f"{run['output_name']}.safetensors"


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    family = checkpoint_family(args.checkpoint)
    integrity.check_checkpoint(args.checkpoint, "--checkpoint")
    args.out = args.out or default_out(args.checkpoint)
    if args.out.suffix != ".safetensors":
        raise UserError(f"--out {args.out} must end in .safetensors")
    args.dtype = args.dtype or ("fp16" if args.format == "checkpoint" else "fp32")
    if family == "wuerstchen":
        run = read_json(args.checkpoint / ARGS_FILE) if (args.checkpoint / ARGS_FILE).is_file() else {}
        if priors.family_of_run(run) is cascade.CASCADE:
            family = "cascade"
        elif args.format == "comfyui":
            raise UserError(
                "ComfyUI has no Wuerstchen v2 (only Stable Cascade): export this checkpoint as --format diffusers"
            )
    if (family, args.format) == ("sdxl", "checkpoint"):
        args.out.parent.mkdir(parents=True, exist_ok=True)
        written = export_sdxl_checkpoint(args)
        honour_umask(args.out.with_suffix(".partial"))
        commit_file(args.out.with_suffix(".partial"), args.out)
        print(f"wrote {args.out} ({written}, {args.dtype})")
        return
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
        raise UserError("SDXL LoKr exports as --format kohya or checkpoint (diffusers' LoRA format cannot hold LoKr)")
    else:
        raise UserError(
            "Wuerstchen LoRA exports as --format diffusers: "
            "there is no kohya naming convention or single-file checkpoint layout for the Wuerstchen prior"
        )
    from safetensors.torch import save_file

    args.out.parent.mkdir(parents=True, exist_ok=True)
    partial = args.out.with_suffix(".partial")
    save_file(state, str(partial), metadata=metadata)
    honour_umask(partial)  # safetensors writes 0600; the file is for other programs, maybe other users
    commit_file(partial, args.out)  # synced, then renamed: whole or not at all
    modules = len({k.rsplit(".", 1)[0] for k in state})
    print(f"wrote {args.out} ({modules} modules, {args.format}, {args.dtype})")


if __name__ == "__main__":
    run_cli(main)

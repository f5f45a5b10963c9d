"""Single-file SDXL base models: one .safetensors in the original (SGM) layout, as community models ship.

diffusers reads such a file with `from_single_file`, taking the architecture's configs (and the tokenizers)
from a diffusers model folder or Hub id, `--single_file_config`. A file may carry ComfyUI's prediction-type
markers: a `v_pred` key means v-prediction, with `ztsnr` also zero terminal SNR.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from difftune.cli.errors import UserError
from difftune.storage.hub import read_model_index

logger = logging.getLogger("difftune")

DEFAULT_CONFIG = "stabilityai/stable-diffusion-xl-base-1.0"
FLAG = "--pretrained_model_name_or_path"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
VAE_PREFIX = "first_stage_model."


def add_single_file_args(group: argparse._ArgumentGroup) -> None:
    """--single_file_config, in the SDXL script's "model" group."""
    group.add_argument(
        "--single_file_config",
        default=DEFAULT_CONFIG,
        help="For a single-file base model: the diffusers folder or Hub id its configs and tokenizers come from "
        "(offline: a local folder, or a Hub id already in the Hugging Face cache).",
    )


def is_single_file(name_or_path: str | Path | None) -> bool:
    """True when the base model is given as a file (refused below unless it is a safetensors SDXL checkpoint)."""
    return name_or_path is not None and Path(name_or_path).expanduser().is_file()


@dataclass(frozen=True)
class SingleFile:
    path: Path
    has_vae: bool
    v_pred: bool
    ztsnr: bool


def architecture(keys: set[str]) -> str:
    """What a checkpoint's keys look like: "sdxl" or a short description of something else."""

    def has(prefix: str) -> bool:
        return any(k.startswith(prefix) for k in keys)

    if any(".double_blocks." in k or k.startswith("double_blocks.") for k in keys):
        return "a Flux model"
    if any(".joint_blocks." in k or k.startswith("joint_blocks.") for k in keys):
        return "a Stable Diffusion 3 model"
    if has("conditioner.embedders.1.model.") and has("conditioner.embedders.0.transformer."):
        return "sdxl" if has("model.diffusion_model.") else "SDXL text encoders without a UNet"
    if has("conditioner.embedders.0.model."):
        return "an SDXL refiner"
    if has("cond_stage_model.transformer."):
        return "a Stable Diffusion 1.x model"
    if has("cond_stage_model.model."):
        return "a Stable Diffusion 2.x model"
    if has("lora_unet_") or has("lora_te"):
        return "a LoRA / LoKr adapter"
    if has("model.diffusion_model."):
        return "a UNet without text encoders"
    if has("down_blocks.") or has("text_model."):
        return "one diffusers component"
    return "no checkpoint difftune knows"


def inspect(path: str | Path, flag: str = FLAG) -> SingleFile:
    """Check that `path` is a safetensors SDXL checkpoint (reading its header only) and read its markers."""
    path = Path(path).expanduser()
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise UserError(
            f"{flag} {path} is a pickle checkpoint ({path.suffix}), which can run code when loaded: "
            "difftune loads only .safetensors files (download or convert the model to .safetensors)"
        )
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
    except Exception:  # noqa: BLE001 - any unreadable header is the same user error
        raise UserError(f"{flag} {path} is not a readable .safetensors file: pass an SDXL checkpoint") from None
    kind = architecture(keys)
    if kind != "sdxl":
        raise UserError(f"{flag} {path} looks like {kind}, not an SDXL checkpoint: pass an SDXL base model")
    v_pred = "v_pred" in keys
    return SingleFile(path, any(k.startswith(VAE_PREFIX) for k in keys), v_pred, v_pred and "ztsnr" in keys)


@functools.cache
def _sha256(path: Path, size: int, mtime_ns: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(1 << 24):
            digest.update(chunk)
    return digest.hexdigest()


def sha256(path: str | Path) -> str:
    """The file's sha256 (computed once per file version in a process)."""
    path = Path(path).expanduser().resolve()
    stat = path.stat()
    return _sha256(path, stat.st_size, stat.st_mtime_ns)


def record(args: argparse.Namespace) -> None:
    """Put the base file's name and sha256 in the run's arguments (args.json, the model card, cache keys)."""
    if is_single_file(args.pretrained_model_name_or_path):
        args.base_model_file = Path(args.pretrained_model_name_or_path).name
        args.base_model_sha256 = sha256(args.pretrained_model_name_or_path)
        expected = getattr(args, "expected_base_model_sha256", None)  # (a --config that recorded the file)
        if expected and expected != args.base_model_sha256:
            logger.warning(
                "%s changed since the run of --config %s (sha256 %s..., now %s...): this run trains on today's file",
                args.pretrained_model_name_or_path, args.config, expected[:12], args.base_model_sha256[:12],
            )  # fmt: skip


def scheduler_overrides(info: SingleFile) -> dict:
    """The scheduler settings the file's markers ask for (as ComfyUI reads them)."""
    overrides = {}
    if info.v_pred:
        overrides["prediction_type"] = "v_prediction"
        if info.ztsnr:
            overrides["rescale_betas_zero_snr"] = True
    return overrides


def config_dir(config: str | None) -> Path:
    """A local folder with the architecture's configs and tokenizers: `config` itself, or its Hub snapshot."""
    config = config or DEFAULT_CONFIG
    read_model_index(config, None, "--single_file_config", "StableDiffusionXLPipeline")  # clear errors first
    local = Path(config).expanduser()
    if local.is_dir():
        return local
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(config, allow_patterns=["*.json", "*.txt"]))
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one clear line
        raise UserError(
            f"--single_file_config {config}: could not get its configs ({type(error).__name__}); offline it must be "
            "a local diffusers folder or a Hub id already in the Hugging Face cache"
        ) from None


def load_pipeline(path: str | Path, config: str | None, vae=None, torch_dtype=None):
    """StableDiffusionXLPipeline.from_single_file with the configs from `config`; the VAE from `vae`, else the
    file's, else the config's. The scheduler follows the file's markers."""
    from diffusers import AutoencoderKL, StableDiffusionXLPipeline

    info = inspect(path)
    folder = config_dir(config)
    if vae is None and not info.has_vae:
        logger.info("%s has no VAE: using the VAE of --single_file_config %s", info.path.name, folder)
        vae = AutoencoderKL.from_pretrained(folder, subfolder="vae", torch_dtype=torch_dtype)
    kwargs = {"vae": vae} if vae is not None else {}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    pipe = StableDiffusionXLPipeline.from_single_file(
        str(info.path), config=str(folder), local_files_only=True, **kwargs
    )
    overrides = scheduler_overrides(info)
    if overrides:
        logger.info("%s marks itself %s: training and sampling with %s", info.path.name, _markers(info), overrides)
        pipe.scheduler = pipe.scheduler.from_config(pipe.scheduler.config, **overrides)
    return pipe, folder, info


def _markers(info: SingleFile) -> str:
    return "v-prediction (v_pred)" + (" with zero terminal SNR (ztsnr)" if info.ztsnr else "")

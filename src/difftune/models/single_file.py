"""Single-file SDXL base models: one .safetensors in the original (SGM) layout, as community models ship.

diffusers reads such a file with `from_single_file`, taking the architecture's configs (and the tokenizers)
from a diffusers model folder or Hub id, `--single_file_config`. A file may carry ComfyUI's prediction-type
markers: a `v_pred` key means v-prediction, with `ztsnr` also zero terminal SNR; EDM markers are refused.
A file is safetensors or pickle by its first bytes, whatever its name.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from unittest import mock

from difftune.cli.errors import UserError
from difftune.storage.hub import read_model_index

logger = logging.getLogger("difftune")

DEFAULT_CONFIG = "stabilityai/stable-diffusion-xl-base-1.0"
FLAG = "--pretrained_model_name_or_path"
PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin", ".pkl")
VAE_PREFIX = "first_stage_model."
SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library refuses larger headers
# OpenCLIP-G's projection: OpenCLIP stores it (hidden, projection), the matrix the pooled output multiplies.
PROJECTION = "conditioner.embedders.1.model.text_projection"
HIDDEN_NORM = "conditioner.embedders.1.model.ln_final.weight"
# ComfyUI's EDM markers (supported_models.SDXL.model_type): a DDPM-schedule objective on these models is wrong.
EDM_MARKERS = {
    "edm_mean": "an EDM model with Playground v2.5's latent scaling",
    "edm_std": "an EDM model with Playground v2.5's latent scaling",
    "edm_vpred.sigma_max": "an EDM v-prediction model (as CosXL ships)",
    "edm_vpred.sigma_min": "an EDM v-prediction model (as CosXL ships)",
}


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
    linear_projection: str | None = None  # the key holding PROJECTION in nn.Linear's orientation, if any


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


def content_kind(path: Path) -> str:
    """The file's format ("safetensors", "pickle" or "unknown") from its first bytes: community files come named .sft,
    .SAFETENSORS, even .ckpt, so the name proves nothing. safetensors starts with its header's length (8 bytes,
    little-endian) and the header, a JSON object; torch.save writes a zip ("PK") or a pickle (0x80, protocol)."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    if len(head) == 9:
        length = int.from_bytes(head[:8], "little")
        if 0 < length <= min(path.stat().st_size - 8, SAFETENSORS_MAX_HEADER) and head[8:] == b"{":
            return "safetensors"
    if head.startswith(b"PK\x03\x04") or head[:1] == b"\x80":
        return "pickle"
    return "unknown"


def linear_projection(handle, keys: set[str]) -> str | None:
    """The key holding OpenCLIP-G's text projection in nn.Linear's (projection, hidden) orientation, if any:
    ComfyUI's `text_projection.weight` spelling (which it reads that way), or the OpenCLIP name stored
    untransposed (told by the shape; a square projection, as real SDXL's 1280x1280, cannot be told and is read
    as OpenCLIP's, as diffusers and ComfyUI do)."""
    if PROJECTION not in keys:
        return PROJECTION + ".weight" if PROJECTION + ".weight" in keys else None
    if HIDDEN_NORM not in keys:
        return None
    rows, cols = handle.get_slice(PROJECTION).get_shape()
    hidden = handle.get_slice(HIDDEN_NORM).get_shape()[0]
    return PROJECTION if rows != hidden and cols == hidden else None


def inspect(path: str | Path, flag: str = FLAG) -> SingleFile:
    """Check that `path` is a safetensors SDXL checkpoint (reading its header only) and read its markers."""
    path = Path(path).expanduser()
    kind = content_kind(path)
    if kind == "pickle" or (kind == "unknown" and path.suffix.lower() in PICKLE_SUFFIXES):
        raise UserError(
            f"{flag} {path} is a pickle checkpoint (PyTorch's .ckpt / .pt format, whatever its name), which can run "
            "code when loaded: difftune loads only .safetensors files (download or convert the model to .safetensors)"
        )
    from safetensors import safe_open

    unreadable = UserError(f"{flag} {path} is not a readable .safetensors file: pass an SDXL checkpoint")
    if kind != "safetensors":
        raise unreadable
    try:
        with safe_open(str(path), framework="pt") as handle:
            keys = set(handle.keys())
            projection = linear_projection(handle, keys)
    except Exception:  # noqa: BLE001 - any unreadable header is the same user error
        raise unreadable from None
    kind = architecture(keys)
    if kind != "sdxl":
        raise UserError(f"{flag} {path} looks like {kind}, not an SDXL checkpoint: pass an SDXL base model")
    for marker, meaning in EDM_MARKERS.items():
        if marker in keys:
            raise UserError(
                f"{flag} {path} is {meaning} (its `{marker}` key, as ComfyUI reads it): difftune trains DDPM-schedule "
                "SDXL only (epsilon or v_pred), and would train this one with the wrong objective; use a non-EDM "
                "SDXL checkpoint"
            )
    v_pred = "v_pred" in keys
    has_vae = any(k.startswith(VAE_PREFIX) for k in keys)
    return SingleFile(path, has_vae, v_pred, v_pred and "ztsnr" in keys, projection)


def read_state_dict(info: SingleFile) -> dict:
    """The file's tensors, read as safetensors whatever its name, OpenCLIP-G's projection in OpenCLIP's
    orientation (the one diffusers' conversion transposes)."""
    from safetensors.torch import load_file

    state = load_file(str(info.path))
    if info.linear_projection is not None:
        logger.info(
            "%s stores %s in nn.Linear's orientation: transposed to OpenCLIP's", info.path.name, info.linear_projection
        )
        state[PROJECTION] = state.pop(info.linear_projection).T.contiguous()
    return state


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
    # from_single_file takes a path only, and picks its reader by the name's extension (".safetensors", case
    # included, else torch.load): its one file reader gets our state dict instead, read by content and fixed
    # (patch.object fails loudly should diffusers rename that reader).
    state = read_state_dict(info)
    reader = importlib.import_module("diffusers.loaders.single_file")
    with mock.patch.object(reader, "load_single_file_checkpoint", lambda *_, **__: state):
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

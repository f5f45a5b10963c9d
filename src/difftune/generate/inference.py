"""Loading a base model plus a trained checkpoint for generation (SDXL or Wuerstchen)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from difftune.cli.errors import UserError

if TYPE_CHECKING:  # (the scripts import this module before --help, which needs no torch)
    import torch
    from torch import nn


def checkpoint_family(path: Path) -> str:
    """ "sdxl" or "wuerstchen", from what the step<N> dir holds."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"--checkpoint {path} does not exist: pass a training run's OUTPUT_DIR/step<N>")
    if (path / "unet" / "adapter_config.json").is_file():
        return "sdxl"
    if (path / "prior" / "adapter_config.json").is_file():
        return "wuerstchen"
    raise UserError(
        f"--checkpoint {path} is not a difftune checkpoint (no unet/ or prior/ adapter): pass OUTPUT_DIR/step<N>"
    )


def sdxl_pipeline(
    base: str,
    vae: str | None,
    revision: str | None,
    variant: str | None,
    dtype: torch.dtype,
    prediction_type: str | None = None,
    single_file_config: str | None = None,
):
    """The SDXL pipeline as users load it: DiffusionPipeline.from_pretrained (or from_single_file for a file, its
    configs from `single_file_config`), VAE optionally swapped, the scheduler sampling the run's --prediction_type."""
    from diffusers import StableDiffusionXLPipeline

    from difftune.models import single_file
    from difftune.models.sdxl import separate_vae, with_prediction_type
    from difftune.storage.hub import read_model_index

    if single_file.is_single_file(base):
        vae_model = separate_vae(vae, dtype)
        pipe, _, _ = single_file.load_pipeline(base, single_file_config, vae_model, torch_dtype=dtype)
        pipe.scheduler = with_prediction_type(pipe.scheduler, prediction_type)
        return pipe
    read_model_index(base, revision, "--pretrained_model_name_or_path", "StableDiffusionXLPipeline")
    # `dtype`: diffusers' pipelines deprecated `torch_dtype` (a FutureWarning at every load).
    kwargs = {"dtype": dtype, "revision": revision, "variant": variant}
    if vae is not None:
        kwargs["vae"] = separate_vae(vae, dtype)
    pipe = StableDiffusionXLPipeline.from_pretrained(base, **kwargs)
    pipe.scheduler = with_prediction_type(pipe.scheduler, prediction_type)
    return pipe


def wuerstchen_pipeline(
    prior: str, decoder: str, revision: str | None, variant: str | None, dtype: torch.dtype, run: dict | None = None
):
    """The combined prior + decoder pipeline, assembled from subfolders (see difftune.models.wuerstchen), of the
    generation (v2 or Stable Cascade) and subfolders the run's args.json `run` names."""
    from difftune.models import priors

    run = run or {}
    family = priors.family_of_run(run)
    pipe = family.build_pipeline(
        family.load_prior(prior, run.get("prior_subfolder", "prior"), revision, variant),
        family.load_decoder(decoder, run.get("decoder_subfolder", "decoder"), None, variant),
    )
    return pipe.to(dtype=dtype)


# The pipeline attribute that holds each adapted model, per checkpoint subfolder.
SDXL_SLOTS = {"unet": "unet", "text_encoder_one": "text_encoder", "text_encoder_two": "text_encoder_2"}
WUERSTCHEN_SLOTS = {"prior": "prior", "text_encoder": "text_encoder"}


def adapter_slots(pipe, family: str) -> tuple[object, dict[str, str]]:
    """(the object holding the adapted models, checkpoint subfolder -> attribute)."""
    return (pipe, SDXL_SLOTS) if family == "sdxl" else (pipe.prior_pipe, WUERSTCHEN_SLOTS)


def set_adapter_scale(peft_model: nn.Module, scale: float) -> None:
    """Scale the adapter's delta (1.0 = as trained) in every adapted layer."""
    for module in peft_model.modules():
        if hasattr(module, "set_scale") and "default" in getattr(module, "scaling", {}):
            module.set_scale("default", scale)


def load_peft_model(base: nn.Module, folder: Path) -> nn.Module:
    """PeftModel.from_pretrained's model, also for a LoKr whose factor shapes peft does not build itself (a run
    started from such a LyCORIS file): the layers take the stored shapes before the weights load."""
    from peft import PeftConfig, PeftModel, set_peft_model_state_dict
    from safetensors.torch import load_file

    from difftune.adapters import injection, lokr

    config = PeftConfig.from_pretrained(str(folder))
    config.inference_mode = True
    model = PeftModel(base, config, adapter_name="default")
    state = load_file(str(folder / injection.ADAPTER_WEIGHTS))
    lokr.fit_factors(model, state)
    result = set_peft_model_state_dict(model, state)
    if result.unexpected_keys:
        raise UserError(f"{folder} does not fit this base model's adapter ({result.unexpected_keys[0]})")
    return model.eval()


def load_adapters(pipe, family: str, checkpoint: Path, scale: float = 1.0, fuse: bool = False) -> list[str]:
    """Put the checkpoint's adapters (peft format) into the pipeline; returns the subfolders loaded."""
    holder, slots = adapter_slots(pipe, family)
    loaded = []
    for folder, attribute in slots.items():
        if not (checkpoint / folder).is_dir():
            continue
        model = load_peft_model(getattr(holder, attribute), checkpoint / folder)
        if scale != 1.0:
            set_adapter_scale(model, scale)
        setattr(holder, attribute, model.merge_and_unload() if fuse else model.get_base_model())
        loaded.append(folder)
    return loaded

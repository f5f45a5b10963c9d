"""Argument lists and numeric checks shared by the tests."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file

from difftune.train import loop

REAL_TRAIN = loop.train  # before any test wraps it


def common_args(assets: Path, output_dir: Path, steps: int, resolution: int, lr: str, checkpointing_steps: int) -> list:
    """Data, output and optimisation flags every test run shares (batch 2)."""
    return [
        "--train_data_dir", assets / "data",
        "--output_dir", output_dir,
        "--resolution", str(resolution),
        "--train_batch_size", "2",
        "--max_train_steps", str(steps),
        "--checkpointing_steps", str(checkpointing_steps),
        "--learning_rate", lr,
        "--report_to", "none",
        "--seed", "0",
    ]  # fmt: skip


def sdxl_args(
    assets: Path, output_dir: Path, *extra: object, steps: int = 4, resolution: int = 64, lr: str = "1e-3",
    checkpointing_steps: int = 2,
) -> list[str]:  # fmt: skip
    return [
        "--pretrained_model_name_or_path", assets / "sdxl",
        "--pretrained_vae_model_name_or_path", assets / "sdxl-vae-fp16-fix",
        *common_args(assets, output_dir, steps, resolution, lr, checkpointing_steps),
        *map(str, extra),
    ]  # fmt: skip


def sdxl_pipeline_image(pipe, prompt: str = "a red circle on a blue background", seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=3, height=64, width=64, generator=generator, output_type="np")
    return out.images[0]


def spy_on_training(install, *, adapter: str | None = None, wrap_loss=None) -> dict:
    """Wrap difftune.loop.train (install(new) puts the wrapper in place, e.g. a monkeypatch).

    Records the named adapter's weights before and after (`before`, `after`, `model`), and lets
    `wrap_loss(compute_loss)` replace the step's loss function. Returns the record.
    """
    real_train = REAL_TRAIN
    record: dict = {}

    def spy(accelerator, args, **kwargs):
        if wrap_loss is not None:
            kwargs["compute_loss"] = wrap_loss(kwargs["compute_loss"])
        model = kwargs["adapters"][adapter] if adapter else None
        if model is not None:
            record["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
        result = real_train(accelerator, args, **kwargs)
        if model is not None:
            record["after"] = {n: p.detach().clone() for n, p in model.named_parameters()}
            record["model"] = model.eval()
        return result

    install(loop, "train", spy)
    return record


def assert_only_adapter_changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor], marker: str) -> None:
    changed_adapter = False
    for name, old in before.items():
        new = after[name]
        if marker in name:
            changed_adapter |= not torch.equal(old, new)
        else:
            assert torch.equal(old, new), f"frozen weight {name} changed"
    assert changed_adapter, "no adapter weight changed"


def wuerstchen_args(
    assets: Path, output_dir: Path, *extra: object, steps: int = 4, resolution: int = 128, lr: str = "1e-3",
    checkpointing_steps: int = 2,
) -> list[str]:  # fmt: skip
    return [
        "--pretrained_prior_model_name_or_path", assets / "wuerstchen-prior",
        "--pretrained_decoder_model_name_or_path", assets / "wuerstchen",
        "--image_encoder_path", assets / "effnet" / "effnet.safetensors",
        *common_args(assets, output_dir, steps, resolution, lr, checkpointing_steps),
        *map(str, extra),
    ]  # fmt: skip


def prior_inputs(prior, batch: int = 2, seed: int = 0):
    """Fixed inputs for a Wuerstchen prior: noisy embeddings, timesteps in (0, 1), text states."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, prior.config.c_in, 4, 4, generator=generator)
    r = torch.rand(batch, generator=generator)
    c = torch.randn(batch, 77, prior.config.c_cond, generator=generator)
    return x, r, c


def adapter_weights(step_dir) -> dict[str, torch.Tensor]:
    weights = {}
    for path in sorted(step_dir.glob("*/adapter_model.safetensors")):
        weights.update({f"{path.parent.name}/{k}": v for k, v in load_file(path).items()})
    assert weights, f"no adapter weights in {step_dir}"
    return weights


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def resumed_copy(source_step, output_dir) -> None:
    output_dir.mkdir(parents=True)
    shutil.copytree(source_step, output_dir / source_step.name)


def one_line_error(capsys) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]
    assert len(err) == 1, err
    return err[0]


def cascade_args(
    assets: Path, output_dir: Path, *extra: object, steps: int = 4, resolution: int = 128, lr: str = "1e-3",
    checkpointing_steps: int = 2,
) -> list[str]:  # fmt: skip
    """A Stable Cascade (Wuerstchen v3) stage C run on the tiny prior and decoder repos."""
    return [
        "--pretrained_prior_model_name_or_path", assets / "stable-cascade-prior",
        "--pretrained_decoder_model_name_or_path", assets / "stable-cascade",
        "--image_encoder_path", assets / "stable-cascade" / "effnet_encoder.safetensors",
        *common_args(assets, output_dir, steps, resolution, lr, checkpointing_steps),
        *map(str, extra),
    ]  # fmt: skip


def cascade_prior_inputs(prior, batch: int = 2, seed: int = 0) -> dict:
    """Fixed keyword inputs for a Stable Cascade prior: noisy latents, ratios in (0, 1), text and image states."""
    generator = torch.Generator().manual_seed(seed)
    config = prior.config
    return {
        "sample": torch.randn(batch, config.in_channels, 4, 4, generator=generator),
        "timestep_ratio": torch.rand(batch, generator=generator),
        "clip_text_pooled": torch.randn(batch, 1, config.clip_text_pooled_in_channels, generator=generator),
        "clip_text": torch.randn(batch, 77, config.clip_text_in_channels, generator=generator),
        "clip_img": torch.zeros(batch, 1, config.clip_image_in_channels),
    }


class Killed(BaseException):
    """Raised by a test's patch to stop a run at a chosen moment, as SIGKILL would: nothing catches it (not
    the one-line error handlers, not the Ctrl-C handler), and no cleanup of the run's own runs."""


def module_tree(layers: dict[str, torch.nn.Module], root: torch.nn.Module | None = None) -> torch.nn.Module:
    """A module (`root`, or a new one) holding `layers` at their dotted diffusers / transformers paths."""
    root = torch.nn.Module() if root is None else root
    for path, layer in layers.items():
        node, (*parents, last) = root, path.split(".")
        for name in parents:
            if name not in node._modules:
                node.add_module(name, torch.nn.Module())
            node = node._modules[name]
        node.add_module(last, layer)
    return root

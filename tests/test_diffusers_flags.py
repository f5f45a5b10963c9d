"""The flags diffusers' example commands carry, with diffusers' meaning: the lr schedule's cycles and power,
--scale_lr, --validation_epochs, --prior_generation_precision, --push_to_hub (refused offline before any model
loads; online, what it uploads), and --enable_xformers_memory_efficient_attention (accepted, a note)."""

from __future__ import annotations

import json
import logging
from types import SimpleNamespace

import pytest
import torch
from conftest import load_script
from helpers import REAL_TRAIN, one_line_error, sdxl_args
from PIL import Image

from difftune.generate import class_images
from difftune.train import args as flags
from difftune.train import loop


def test_the_lr_scheduler_gets_the_cycles_and_the_power(assets, tmp_path, run_main, monkeypatch):
    import diffusers.optimization

    calls = []
    real = diffusers.optimization.get_scheduler

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(diffusers.optimization, "get_scheduler", spy)
    argv = sdxl_args(
        assets, tmp_path / "out", "--lr_scheduler", "cosine_with_restarts", "--lr_num_cycles", "3", "--lr_power",
        "2.5", steps=1,
    )  # fmt: skip
    assert run_main("train_sdxl_lokr", argv) == 0
    assert [(c["num_cycles"], c["power"]) for c in calls] == [(3, 2.5)]


def test_scale_lr_multiplies_by_accumulation_batch_and_processes(assets, tmp_path, run_main, caplog):
    args = SimpleNamespace(scale_lr=True, learning_rate=1e-4, gradient_accumulation_steps=4, train_batch_size=2)
    flags.scale_learning_rate(args, num_processes=3)
    assert args.learning_rate == pytest.approx(1e-4 * 4 * 2 * 3)
    # In a run: the optimizer trains at the scaled rate, which args.json records (a resume compares it).
    out = tmp_path / "out"
    argv = sdxl_args(assets, out, "--scale_lr", "--gradient_accumulation_steps", "2", steps=1, lr="1e-3")
    assert run_main("train_sdxl_lokr", argv) == 0
    assert json.loads((out / "step1" / "args.json").read_text())["learning_rate"] == pytest.approx(1e-3 * 2 * 2)
    scheduler = torch.load(out / "step1" / "lr_scheduler.pt", weights_only=True)
    assert scheduler["base_lrs"] == [pytest.approx(4e-3)]
    # Resumed with the same flags: the same scaled rate, not reported as a changed --learning_rate.
    caplog.set_level(logging.INFO, logger="difftune")
    argv = sdxl_args(assets, out, "--scale_lr", "--gradient_accumulation_steps", "2", "--resume_from_checkpoint",
                     "latest", steps=2, lr="1e-3")  # fmt: skip
    assert run_main("train_sdxl_lokr", argv) == 0
    assert "resumed from" in caplog.text and "resuming with --learning_rate" not in caplog.text


def test_validation_epochs_validates_at_every_nth_epoch_end_besides_validation_steps(
    assets, tmp_path, run_main, monkeypatch
):
    validated = []

    def spy(accelerator, args, **kwargs):
        return REAL_TRAIN(accelerator, args, **{**kwargs, "validate": lambda step, models: validated.append(step)})

    monkeypatch.setattr(loop, "train", spy)
    # 4 samples in batches of 2: 2 steps per epoch, so epochs end at steps 2, 4, 6, 8 and 10.
    argv = sdxl_args(
        assets, tmp_path / "out", "--max_train_samples", "4", "--validation_prompt", "x", "--validation_epochs", "2",
        "--validation_steps", "3", steps=10, checkpointing_steps=10,
    )  # fmt: skip
    assert run_main("train_sdxl_lokr", argv) == 0
    assert validated == [3, 4, 6, 8, 9, 10]  # steps 3, 6, 9; the ends of epochs 2 and 4; the end of the run


class FakePipeline:
    """A pipeline over one half-precision module, recording the dtypes it computes in."""

    def __init__(self, dtype: torch.dtype) -> None:
        self.model = torch.nn.Linear(2, 2).to(dtype)
        self.components = {"unet": self.model, "tokenizer": object()}
        self.seen: list[tuple] = []

    def set_progress_bar_config(self, **kwargs) -> None:
        pass

    def __call__(self, prompts, generator=None, **kwargs):
        autocast = torch.get_autocast_dtype("cpu") if torch.is_autocast_enabled("cpu") else None
        self.seen.append((self.model.weight.dtype, autocast))
        return SimpleNamespace(images=[Image.new("RGB", (8, 8))] * len(prompts))


class MainProcess:
    is_main_process, device = True, torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


@pytest.mark.parametrize(
    ("precision", "weights", "seen"),
    [
        (None, torch.bfloat16, (torch.bfloat16, torch.bfloat16)),  # default: the frozen models' dtype
        ("bf16", torch.float32, (torch.float32, torch.bfloat16)),  # autocast over fp32 weights
        ("fp32", torch.bfloat16, (torch.float32, None)),  # the weights themselves in fp32, for the while
        ("no", torch.bfloat16, (torch.float32, None)),
    ],
)
def test_prior_generation_precision_is_the_dtype_class_images_are_generated_in(tmp_path, precision, weights, seen):
    pipe = FakePipeline(weights)
    before = pipe.model.weight.detach().clone()
    args = SimpleNamespace(
        with_prior_preservation=True, class_data_dir=str(tmp_path / "classes"), num_class_images=2,
        class_prompt="a shape", sample_batch_size=2, prior_generation_precision=precision,
    )  # fmt: skip
    assert class_images.generate_missing(MainProcess(), args, lambda: pipe, weights, lambda pipe: {}) == 2
    assert pipe.seen == [seen]
    assert pipe.model.weight.dtype == weights and torch.equal(pipe.model.weight, before)  # the run's model, as it was


def test_xformers_is_accepted_with_a_note(assets, tmp_path, caplog):
    argv = sdxl_args(assets, tmp_path / "out", "--enable_xformers_memory_efficient_attention")
    load_script("train_sdxl_lokr").parse_args(argv)
    notes = [r.getMessage() for r in caplog.records if "xformers" in r.getMessage()]
    assert notes == ["--enable_xformers_memory_efficient_attention: not needed, PyTorch's scaled-dot-product "
                     "attention (SDPA) is used"]  # fmt: skip


def test_push_to_hub_offline_is_refused_before_any_model_loads(assets, tmp_path, run_main, capsys, monkeypatch):
    from difftune.models import sdxl

    monkeypatch.setattr(sdxl, "load_sdxl", lambda *a, **k: pytest.fail("a model loaded"))
    argv = sdxl_args(assets, tmp_path / "out", "--push_to_hub")  # (conftest sets HF_HUB_OFFLINE=1)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(tmp_path / "no model here")  # none is read
    assert run_main("train_sdxl_lokr", argv) == 2
    assert one_line_error(capsys) == (
        "error: --push_to_hub needs the Hub, but HF_HUB_OFFLINE is set: unset it or drop --push_to_hub"
    )
    assert not (tmp_path / "out").exists()


def test_push_to_hub_uploads_the_final_checkpoint_the_card_and_its_files(assets, tmp_path, run_main, monkeypatch):
    from huggingface_hub import HfApi
    from huggingface_hub.utils import filter_repo_objects

    calls = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create"] = (repo_id, self.token, kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def upload_folder(self, **kwargs):
        calls["upload"] = kwargs

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")  # (huggingface_hub itself read it at import: it stays offline)
    out = tmp_path / "out"
    argv = sdxl_args(
        assets, out, "--push_to_hub", "--hub_model_id", "me/shapes", "--hub_token", "hf_secret",
        "--validation_prompt", "a red circle", "--num_validation_images", "1", "--validation_steps", "2",
        "--validation_inference_steps", "1", steps=2, checkpointing_steps=1,
    )  # fmt: skip
    assert run_main("train_sdxl_lokr", argv) == 0
    assert calls["create"] == ("me/shapes", "hf_secret", {"exist_ok": True})
    upload = calls["upload"]
    assert upload["repo_id"] == "me/shapes" and upload["folder_path"] == out
    local = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    uploaded = set(filter_repo_objects(local, allow_patterns=upload["allow_patterns"]))
    step2 = {p for p in local if p.startswith("step2/")}
    assert {"step2/unet/adapter_model.safetensors", "step2/args.json", "step2/manifest.json"} <= step2
    card = {"README.md", "adapted_modules.txt", "validation/step000002_prompt0_0.png"}
    assert uploaded == step2 | card  # not step1/, the logs, the lock
    assert all("hf_secret" not in (out / p).read_bytes().decode("latin-1") for p in local)
    assert "hub_token" not in json.loads((out / "step2" / "args.json").read_text())


def test_hub_flags_without_push_to_hub_warn(assets, tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    load_script("train_sdxl_lokr").parse_args(sdxl_args(assets, tmp_path / "out", "--hub_model_id", "me/x"))
    assert "--hub_model_id: unused without --push_to_hub" in caplog.text

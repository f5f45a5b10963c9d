"""Small fast tests written for the mutants `make mutation-auto` found alive in models/single_file.py
(docs/mutation.md): each asserts what a user sees (a value, a key name, a refusal, a log line), on tiny
state dicts written in the test, never the tiny models."""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import logging
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file

from difftune.cli.errors import UserError
from difftune.models import single_file
from difftune.models.single_file import SingleFile

FLAG = "--pretrained_model_name_or_path"
PROJECTION = "conditioner.embedders.1.model.text_projection"
HIDDEN_NORM = "conditioner.embedders.1.model.ln_final.weight"
HIDDEN, PROJECTION_DIM = 48, 32  # OpenCLIP-G's width and projection size, tiny
# One key of each part of an SDXL file in the original (SGM) layout, as Stability and A1111 write it.
CLIP_L = "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight"
UNET = "model.diffusion_model.out.2.weight"
VAE = "first_stage_model.decoder.conv_out.weight"


def sdxl_state(*extra: str, vae: bool = True) -> dict:
    """A tiny SDXL file's tensors: CLIP-L, OpenCLIP-G (width 48, stored as OpenCLIP stores its projection:
    (width, projection dim)), the UNet and the VAE, plus `extra` marker keys (empty tensors, as NoobAI ships)."""
    state = {
        CLIP_L: torch.zeros(1),
        HIDDEN_NORM: torch.ones(HIDDEN),
        PROJECTION: torch.arange(HIDDEN * PROJECTION_DIM, dtype=torch.float32).reshape(HIDDEN, PROJECTION_DIM),
        UNET: torch.zeros(1),
    }
    if vae:
        state[VAE] = torch.zeros(1)
    state.update({marker: torch.tensor([]) for marker in extra})
    return state


def write(path: Path, state: dict) -> Path:
    save_file(state, str(path))
    return path


def refusal(path, flag: str = FLAG) -> str:
    with pytest.raises(UserError) as error:
        single_file.inspect(path, flag) if flag != FLAG else single_file.inspect(path)
    return str(error.value)


# --- architecture: what the keys look like, named in the refusal ---


@pytest.mark.parametrize(
    ("keys", "kind"),
    [
        ({CLIP_L, HIDDEN_NORM, UNET}, "sdxl"),
        ({CLIP_L, HIDDEN_NORM}, "SDXL text encoders without a UNet"),
        ({CLIP_L}, "no checkpoint difftune knows"),  # CLIP-L alone is not SDXL's pair of text encoders
        ({HIDDEN_NORM}, "no checkpoint difftune knows"),
        ({"conditioner.embedders.0.model.ln_final.weight", UNET}, "an SDXL refiner"),
        ({"model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"}, "a Flux model"),  # ComfyUI's
        ({"double_blocks.0.img_attn.norm.key_norm.scale"}, "a Flux model"),  # BFL's own file
        ({"model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"}, "a Stable Diffusion 3 model"),
        ({"joint_blocks.0.context_block.attn.qkv.weight"}, "a Stable Diffusion 3 model"),
        ({"cond_stage_model.transformer.text_model.final_layer_norm.weight", UNET}, "a Stable Diffusion 1.x model"),
        ({"cond_stage_model.model.ln_final.weight", UNET}, "a Stable Diffusion 2.x model"),
        ({"lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight"}, "a LoRA / LoKr adapter"),
        ({"lora_te1_text_model_encoder_layers_0_mlp_fc1.lokr_w1"}, "a LoRA / LoKr adapter"),
        ({UNET}, "a UNet without text encoders"),
        ({"down_blocks.0.resnets.0.conv1.weight"}, "one diffusers component"),
        ({"text_model.encoder.layers.0.mlp.fc1.weight"}, "one diffusers component"),
        ({"state_dict"}, "no checkpoint difftune knows"),
        (set(), "no checkpoint difftune knows"),
    ],
)
def test_the_architecture_is_told_from_the_key_names(keys, kind):
    assert single_file.architecture(keys) == kind


def test_another_architecture_is_refused_naming_what_it_looks_like(tmp_path):
    state = {"cond_stage_model.transformer.x": torch.zeros(1), UNET: torch.zeros(1)}
    path = write(tmp_path / "sd15.safetensors", state)
    assert refusal(path) == (
        f"{FLAG} {path} looks like a Stable Diffusion 1.x model, not an SDXL checkpoint: pass an SDXL base model"
    )


# --- content_kind: safetensors or pickle by the first bytes ---


def safetensors_bytes(state: dict) -> bytes:
    from safetensors.torch import save

    return save(state)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (safetensors_bytes({"a": torch.zeros(3)}), "safetensors"),
        (safetensors_bytes({}), "safetensors"),  # no tensors: the header runs to the very end of the file
        (safetensors_bytes({})[:-1], "unknown"),  # cut short: the header is longer than the file
        ((1).to_bytes(8, "little") + b"{", "safetensors"),  # the shortest header that fits, by its first bytes
        ((0).to_bytes(8, "little") + b"{}", "unknown"),  # an empty header
        ((2).to_bytes(8, "little") + b"[]", "unknown"),  # the header is not a JSON object
        ((2).to_bytes(8, "big") + b"{}", "unknown"),  # safetensors' length is little-endian
        (b"PK\x03\x04" + b"\x00" * 20, "pickle"),  # torch.save's zip
        (b"PK\x03\x04", "pickle"),
        (b"\x80\x02}q\x00.", "pickle"),  # a protocol-2 pickle
        (b"\x80", "pickle"),
        (b"hello, world", "unknown"),
        (b"", "unknown"),
    ],
    ids=["tensors", "no-tensors", "cut-short", "one-byte-header", "empty-header", "json-list", "big-endian",
         "zip", "zip-magic-only", "pickle", "pickle-first-byte-only", "text", "empty"],
)  # fmt: skip
def test_the_format_is_told_from_the_first_bytes(tmp_path, data, kind):
    (tmp_path / "model.bin").write_bytes(data)
    assert single_file.content_kind(tmp_path / "model.bin") == kind


def test_torch_save_files_are_pickles_both_ways(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "zip.ckpt")
    torch.save({"state_dict": {}}, tmp_path / "legacy.ckpt", _use_new_zipfile_serialization=False)
    assert single_file.content_kind(tmp_path / "zip.ckpt") == "pickle"
    assert single_file.content_kind(tmp_path / "legacy.ckpt") == "pickle"


# --- inspect: the refusals and the markers ---

PICKLE_MESSAGE = (
    "is a pickle checkpoint (PyTorch's .ckpt / .pt format, whatever its name), which can run code when loaded: "
    "difftune loads only .safetensors files (download or convert the model to .safetensors)"
)
UNREADABLE_MESSAGE = "is not a readable .safetensors file: pass an SDXL checkpoint"


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("model.safetensors", b"\x80\x02}q\x00.", PICKLE_MESSAGE),  # a pickle, whatever its name
        ("model.sft", b"PK\x03\x04" + b"\x00" * 20, PICKLE_MESSAGE),
        ("model.ckpt", b"garbage bytes", PICKLE_MESSAGE),  # unknown content: the name says pickle
        ("MODEL.PT", b"garbage bytes", PICKLE_MESSAGE),
        ("model.safetensors", b"garbage bytes", UNREADABLE_MESSAGE),
        ("model.safetensors", b"", UNREADABLE_MESSAGE),
        ("model.safetensors", (2).to_bytes(8, "little") + b"{x", UNREADABLE_MESSAGE),  # a header that is no JSON
    ],
    ids=["pickle-named-safetensors", "zip-named-sft", "unknown-ckpt", "unknown-PT", "unknown-safetensors", "empty",
         "bad-header"],
)  # fmt: skip
def test_pickles_and_unreadable_files_are_refused(tmp_path, name, data, message):
    path = tmp_path / name
    path.write_bytes(data)
    assert refusal(path) == f"{FLAG} {path} {message}"
    assert refusal(path, "--base_model") == f"--base_model {path} {message}"


@pytest.mark.parametrize(
    ("marker", "meaning"),
    [
        ("edm_mean", "an EDM model with Playground v2.5's latent scaling"),
        ("edm_std", "an EDM model with Playground v2.5's latent scaling"),
        ("edm_vpred.sigma_max", "an EDM v-prediction model (as CosXL ships)"),
        ("edm_vpred.sigma_min", "an EDM v-prediction model (as CosXL ships)"),
    ],
)
def test_edm_markers_are_refused_with_their_meaning(tmp_path, marker, meaning):
    path = write(tmp_path / "edm.safetensors", sdxl_state(marker))
    assert refusal(path) == (
        f"{FLAG} {path} is {meaning} (its `{marker}` key, as ComfyUI reads it): difftune trains DDPM-schedule SDXL "
        "only (epsilon or v_pred), and would train this one with the wrong objective; use a non-EDM SDXL checkpoint"
    )


@pytest.mark.parametrize(
    ("markers", "vae", "v_pred", "ztsnr"),
    [
        ((), True, False, False),
        ((), False, False, False),
        (("v_pred",), True, True, False),
        (("v_pred", "ztsnr"), False, True, True),
        (("ztsnr",), True, False, False),  # zero terminal SNR only with v-prediction (ComfyUI)
    ],
)
def test_an_sdxl_file_is_read_with_its_markers(tmp_path, markers, vae, v_pred, ztsnr):
    path = write(tmp_path / "model.safetensors", sdxl_state(*markers, vae=vae))
    assert single_file.inspect(path) == SingleFile(path, vae, v_pred, ztsnr, None)
    assert single_file.inspect(str(path)) == SingleFile(path, vae, v_pred, ztsnr, None)


def test_a_safetensors_file_named_like_a_pickle_is_read_as_safetensors(tmp_path):
    path = write(tmp_path / "model.ckpt", sdxl_state())
    assert single_file.inspect(path) == SingleFile(path, True, False, False, None)


def test_a_path_under_home_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    path = write(tmp_path / "model.safetensors", sdxl_state())
    assert single_file.inspect("~/model.safetensors").path == path
    assert single_file.is_single_file("~/model.safetensors")


# --- linear_projection: OpenCLIP-G's projection stored in nn.Linear's orientation ---


@pytest.mark.parametrize(
    ("projection", "expected"),
    [
        ({PROJECTION: (HIDDEN, PROJECTION_DIM)}, None),  # OpenCLIP's (width, projection dim): as expected
        ({PROJECTION: (PROJECTION_DIM, HIDDEN)}, PROJECTION),  # nn.Linear's (out, in)
        ({PROJECTION: (HIDDEN, HIDDEN)}, None),  # square, as real SDXL's 1280x1280: read as OpenCLIP's
        ({PROJECTION: (PROJECTION_DIM, 16)}, None),  # neither orientation: left for diffusers to refuse
        ({PROJECTION + ".weight": (PROJECTION_DIM, HIDDEN)}, PROJECTION + ".weight"),  # ComfyUI's spelling
        ({}, None),  # no projection at all
    ],
)
def test_the_projection_orientation_is_told_from_its_shape(tmp_path, projection, expected):
    state = sdxl_state()
    del state[PROJECTION]
    state.update({key: torch.zeros(shape) for key, shape in projection.items()})
    path = write(tmp_path / "model.safetensors", state)
    assert single_file.inspect(path).linear_projection == expected


def test_without_the_final_norm_the_projection_is_taken_as_is(tmp_path):
    state = sdxl_state()
    del state[HIDDEN_NORM]
    state[PROJECTION] = torch.zeros(PROJECTION_DIM, HIDDEN)
    state["conditioner.embedders.1.model.transformer.resblocks.0.ln_1.weight"] = torch.zeros(HIDDEN)
    path = write(tmp_path / "model.safetensors", state)
    assert single_file.inspect(path).linear_projection is None


@pytest.mark.parametrize("spelling", ["", ".weight"])
def test_a_linear_projection_is_read_back_in_openclip_orientation(tmp_path, caplog, spelling):
    state = sdxl_state()
    openclip = state.pop(PROJECTION)  # (48, 32)
    state[PROJECTION + spelling] = openclip.T.contiguous()  # (32, 48), as nn.Linear stores it
    path = write(tmp_path / "linear.safetensors", state)
    with caplog.at_level(logging.INFO, logger="difftune"):
        read = single_file.read_state_dict(single_file.inspect(path))
    assert torch.equal(read[PROJECTION], openclip) and read[PROJECTION].is_contiguous()
    assert set(read) == {CLIP_L, HIDDEN_NORM, PROJECTION, UNET, VAE}
    assert [r.getMessage() for r in caplog.records] == [
        f"linear.safetensors stores {PROJECTION + spelling} in nn.Linear's orientation: transposed to OpenCLIP's"
    ]


def test_a_file_in_openclip_orientation_is_read_unchanged(tmp_path, caplog):
    state = sdxl_state("v_pred")
    path = write(tmp_path / "model.ckpt", state)  # (read by content, whatever its name)
    with caplog.at_level(logging.INFO, logger="difftune"):
        read = single_file.read_state_dict(single_file.inspect(path))
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    assert caplog.records == []


# --- is_single_file, sha256, record ---


def test_only_an_existing_file_is_a_single_file(tmp_path):
    path = write(tmp_path / "model.safetensors", sdxl_state())
    assert single_file.is_single_file(path) is True
    assert single_file.is_single_file(str(path)) is True
    assert single_file.is_single_file(tmp_path) is False  # a diffusers folder
    assert single_file.is_single_file("stabilityai/stable-diffusion-xl-base-1.0") is False
    assert single_file.is_single_file(None) is False


def test_the_sha256_follows_the_file_as_it_changes(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"first version")
    assert single_file.sha256(path) == hashlib.sha256(b"first version").hexdigest()
    stat = path.stat()
    # Other bytes, other size, the same mtime (a copy that keeps times): a new hash.
    path.write_bytes(b"second version, longer")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert single_file.sha256(str(path)) == hashlib.sha256(b"second version, longer").hexdigest()
    # Other bytes, the same size, a later mtime: a new hash.
    path.write_bytes(b"third version, longer!")
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert single_file.sha256(path) == hashlib.sha256(b"third version, longer!").hexdigest()


def run_args(base, **extra) -> argparse.Namespace:
    return argparse.Namespace(pretrained_model_name_or_path=base, config="old/run.toml", **extra)


def test_record_puts_the_file_name_and_sha256_in_the_arguments(tmp_path, caplog):
    path = tmp_path / "juggernaut.safetensors"
    path.write_bytes(b"weights")
    digest = hashlib.sha256(b"weights").hexdigest()
    with caplog.at_level(logging.INFO, logger="difftune"):
        args = run_args(str(path))  # no --config
        single_file.record(args)
        assert (args.base_model_file, args.base_model_sha256) == ("juggernaut.safetensors", digest)
        args = run_args(str(path), expected_base_model_sha256=None)
        single_file.record(args)
        assert args.base_model_sha256 == digest
        args = run_args(str(path), expected_base_model_sha256=digest)  # the file --config recorded, unchanged
        single_file.record(args)
        assert args.base_model_sha256 == digest
    assert caplog.records == []
    args = run_args(str(tmp_path))  # a folder: nothing recorded
    single_file.record(args)
    assert not hasattr(args, "base_model_file") and not hasattr(args, "base_model_sha256")


def test_record_warns_when_the_file_changed_since_the_config_was_written(tmp_path, caplog):
    path = tmp_path / "juggernaut.safetensors"
    path.write_bytes(b"new weights")
    digest = hashlib.sha256(b"new weights").hexdigest()
    args = run_args(str(path), expected_base_model_sha256="0123456789abcdef" * 4)
    with caplog.at_level(logging.INFO, logger="difftune"):
        single_file.record(args)
    assert args.base_model_sha256 == digest
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        (
            "WARNING",
            f"{path} changed since the run of --config old/run.toml (sha256 0123456789ab..., now {digest[:12]}...): "
            "this run trains on today's file",
        )
    ]


# --- the scheduler the markers ask for; --single_file_config ---


@pytest.mark.parametrize(
    ("v_pred", "ztsnr", "overrides"),
    [
        (False, False, {}),
        (False, True, {}),
        (True, False, {"prediction_type": "v_prediction"}),
        (True, True, {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True}),
    ],
)
def test_scheduler_overrides_follow_the_markers(v_pred, ztsnr, overrides):
    info = SingleFile(Path("model.safetensors"), True, v_pred, ztsnr)
    assert single_file.scheduler_overrides(info) == overrides


def test_the_flag_defaults_to_sdxl_base_and_explains_itself():
    parser = argparse.ArgumentParser()
    single_file.add_single_file_args(parser.add_argument_group("model"))
    assert parser.parse_args([]).single_file_config == "stabilityai/stable-diffusion-xl-base-1.0"
    assert parser.parse_args(["--single_file_config", "my/configs"]).single_file_config == "my/configs"
    (action,) = [a for a in parser._actions if a.dest == "single_file_config"]
    assert action.help == (
        "For a single-file base model: the diffusers folder or Hub id its configs and tokenizers come from "
        "(offline: a local folder, or a Hub id already in the Hugging Face cache)."
    )


def config_folder(path: Path, class_name: str = "StableDiffusionXLPipeline") -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "model_index.json").write_text(json.dumps({"_class_name": class_name}))
    return path


def test_a_local_config_folder_is_used_as_it_is(tmp_path, monkeypatch):
    folder = config_folder(tmp_path / "sdxl")
    assert single_file.config_dir(str(folder)) == folder
    monkeypatch.setenv("HOME", str(tmp_path))
    assert single_file.config_dir("~/sdxl") == folder


def test_a_config_of_another_pipeline_is_refused(tmp_path):
    folder = config_folder(tmp_path / "prior", "WuerstchenPriorPipeline")
    with pytest.raises(UserError) as error:
        single_file.config_dir(str(folder))
    assert str(error.value) == (
        f"--single_file_config {folder} is a WuerstchenPriorPipeline pipeline, not a StableDiffusionXLPipeline: "
        "pass a StableDiffusionXLPipeline model"
    )


# A Hub repo's files: only the configs and tokenizers are fetched, never gigabytes of weights.
REPO_FILES = [
    "model_index.json", "unet/config.json", "unet/diffusion_pytorch_model.safetensors", "vae/config.json",
    "tokenizer/vocab.json", "tokenizer/merges.txt", "tokenizer_2/special_tokens_map.json",
    "sd_xl_base_1.0.safetensors", "README.md",
]  # fmt: skip


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hugging Face Hub: hf_hub_download gives a model_index.json, snapshot_download the files its
    allow_patterns select (huggingface_hub's own filter); the calls are recorded."""
    import huggingface_hub
    from huggingface_hub.utils import filter_repo_objects

    index = config_folder(tmp_path / "cached-index") / "model_index.json"
    calls = SimpleNamespace(downloads=[], snapshot=tmp_path / "snapshot", error=None)

    def hf_hub_download(repo_id, filename, revision=None, **_):
        calls.downloads.append((repo_id, filename, revision))
        return str(index)

    def snapshot_download(repo_id, *, allow_patterns=None, **_):
        if calls.error:
            raise calls.error
        calls.repo_id = repo_id
        calls.fetched = sorted(filter_repo_objects(REPO_FILES, allow_patterns=allow_patterns))
        return str(calls.snapshot)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return calls


@pytest.mark.parametrize("config", [None, "", "stabilityai/stable-diffusion-xl-base-1.0"])
def test_the_default_config_comes_from_the_hub_configs_only(hub, config):
    assert single_file.config_dir(config) == hub.snapshot
    assert hub.downloads == [("stabilityai/stable-diffusion-xl-base-1.0", "model_index.json", None)]
    assert hub.repo_id == "stabilityai/stable-diffusion-xl-base-1.0"
    assert hub.fetched == [
        "model_index.json", "tokenizer/merges.txt", "tokenizer/vocab.json", "tokenizer_2/special_tokens_map.json",
        "unet/config.json", "vae/config.json",
    ]  # fmt: skip


def test_a_hub_config_that_cannot_be_fetched_is_one_clear_line(hub):
    from huggingface_hub.errors import LocalEntryNotFoundError

    hub.error = LocalEntryNotFoundError("not in the cache")
    with pytest.raises(UserError) as error:
        single_file.config_dir("someone/sdxl-configs")
    assert str(error.value) == (
        "--single_file_config someone/sdxl-configs: could not get its configs (LocalEntryNotFoundError); offline it "
        "must be a local diffusers folder or a Hub id already in the Hugging Face cache"
    )
    assert error.value.__cause__ is None and error.value.__suppress_context__


# --- load_pipeline: what from_single_file gets, the VAE, the scheduler ---


@pytest.fixture
def diffusers_fake(tmp_path, monkeypatch):
    """StableDiffusionXLPipeline.from_single_file and AutoencoderKL.from_pretrained replaced by recorders;
    from_single_file reads the checkpoint through diffusers' own reader function, as diffusers does."""
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline

    calls = SimpleNamespace(pipelines=[], vaes=[], folder=config_folder(tmp_path / "sdxl"))

    def from_single_file(cls, path, **kwargs):
        reader = importlib.import_module("diffusers.loaders.single_file")
        state = reader.load_single_file_checkpoint(path, local_files_only=kwargs.get("local_files_only"))
        calls.pipelines.append((path, kwargs, state))
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1
        )  # SDXL base's
        return SimpleNamespace(scheduler=scheduler)

    def from_pretrained(cls, folder, **kwargs):
        calls.vaes.append((folder, kwargs))
        return "the config's VAE"

    monkeypatch.setattr(StableDiffusionXLPipeline, "from_single_file", classmethod(from_single_file))
    monkeypatch.setattr(AutoencoderKL, "from_pretrained", classmethod(from_pretrained))
    return calls


def test_load_pipeline_passes_the_file_read_by_content_and_the_local_configs(tmp_path, diffusers_fake, caplog):
    state = sdxl_state()
    path = write(tmp_path / "model.sft", state)
    folder = diffusers_fake.folder
    with caplog.at_level(logging.INFO, logger="difftune"):
        pipe, got_folder, info = single_file.load_pipeline(path, str(folder))
    ((called_path, kwargs, read),) = diffusers_fake.pipelines
    assert called_path == str(path)
    assert kwargs == {"config": str(folder), "local_files_only": True}  # the file's own VAE, the default dtype
    assert read.keys() == state.keys() and all(torch.equal(read[k], state[k]) for k in state)
    assert diffusers_fake.vaes == []
    assert (got_folder, info) == (folder, SingleFile(path, True, False, False, None))
    assert pipe.scheduler.config.prediction_type == "epsilon" and not pipe.scheduler.config.rescale_betas_zero_snr
    assert caplog.records == []


def test_load_pipeline_takes_the_configs_vae_for_a_file_without_one(tmp_path, diffusers_fake, caplog):
    path = write(tmp_path / "novae.safetensors", sdxl_state(vae=False))
    folder = diffusers_fake.folder
    with caplog.at_level(logging.INFO, logger="difftune"):
        single_file.load_pipeline(path, str(folder), torch_dtype=torch.float16)
    assert diffusers_fake.vaes == [(folder, {"subfolder": "vae", "torch_dtype": torch.float16})]
    ((_, kwargs, _),) = diffusers_fake.pipelines
    assert kwargs == {
        "config": str(folder), "local_files_only": True, "vae": "the config's VAE", "torch_dtype": torch.float16
    }  # fmt: skip
    assert [r.getMessage() for r in caplog.records] == [
        f"novae.safetensors has no VAE: using the VAE of --single_file_config {folder}"
    ]


@pytest.mark.parametrize("vae_in_file", [True, False])
def test_load_pipeline_uses_the_vae_passed(tmp_path, diffusers_fake, caplog, vae_in_file):
    path = write(tmp_path / "model.safetensors", sdxl_state(vae=vae_in_file))
    with caplog.at_level(logging.INFO, logger="difftune"):
        single_file.load_pipeline(path, str(diffusers_fake.folder), vae="the fp16-fix VAE")
    assert diffusers_fake.vaes == [] and caplog.records == []
    ((_, kwargs, _),) = diffusers_fake.pipelines
    assert kwargs == {"config": str(diffusers_fake.folder), "local_files_only": True, "vae": "the fp16-fix VAE"}


@pytest.mark.parametrize(
    ("markers", "named", "overrides"),
    [
        (("v_pred",), "v-prediction (v_pred)", {"prediction_type": "v_prediction"}),
        (
            ("v_pred", "ztsnr"),
            "v-prediction (v_pred) with zero terminal SNR (ztsnr)",
            {"prediction_type": "v_prediction", "rescale_betas_zero_snr": True},
        ),
    ],
)
def test_load_pipeline_sets_the_scheduler_the_markers_ask_for(
    tmp_path, diffusers_fake, caplog, markers, named, overrides
):
    path = write(tmp_path / "noob.safetensors", sdxl_state(*markers))
    with caplog.at_level(logging.INFO, logger="difftune"):
        pipe, _, _ = single_file.load_pipeline(path, str(diffusers_fake.folder))
    config = pipe.scheduler.config
    assert config.prediction_type == "v_prediction"
    assert config.rescale_betas_zero_snr is ("ztsnr" in markers)
    # The rest of the base schedule is kept (SDXL's scaled-linear betas, its step offset).
    assert (config.beta_schedule, config.beta_start, config.beta_end, config.steps_offset) == (
        "scaled_linear", 0.00085, 0.012, 1
    )  # fmt: skip
    # Zero terminal SNR: the last timestep is pure noise (alphas_cumprod ~0, not SDXL's ~0.0047).
    assert bool(pipe.scheduler.alphas_cumprod[-1] < 1e-6) is ("ztsnr" in markers)
    assert [r.getMessage() for r in caplog.records] == [
        f"noob.safetensors marks itself {named}: training and sampling with {overrides}"
    ]


def test_load_pipeline_refuses_an_edm_file_before_reading_weights(tmp_path, diffusers_fake):
    path = write(tmp_path / "cosxl.safetensors", sdxl_state("edm_vpred.sigma_max", "edm_vpred.sigma_min"))
    with pytest.raises(UserError, match="is an EDM v-prediction model"):
        single_file.load_pipeline(path, str(diffusers_fake.folder))
    assert diffusers_fake.pipelines == [] and diffusers_fake.vaes == []

"""Single-file SDXL base models (original layout): training, inference and export, same as from the folder."""

import hashlib
import json

import numpy as np
import pytest
import torch
from conftest import run_script
from helpers import adapter_weights, max_difference, one_line_error, sdxl_args
from PIL import Image
from safetensors.torch import load_file, save_file


def file_args(assets, out, *extra, **kwargs):
    """sdxl_args with the base model given as the single file (its configs from the tiny folder)."""
    argv = sdxl_args(assets, out, "--single_file_config", assets / "sdxl", *extra, **kwargs)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(assets / "sdxl.safetensors")
    return argv


@pytest.fixture(scope="module")
def runs(assets, tmp_path_factory):
    """The same run (seed, text encoders, 2 steps) from the folder and from the single file."""
    root = tmp_path_factory.mktemp("single")
    extra = ("--train_text_encoder", "--rank", "2", "--target_modules", "to_q,to_k,to_v,to_out.0,conv1")
    assert run_script("train_sdxl_lokr", sdxl_args(assets, root / "folder", *extra, steps=2, lr="1e-2")) == 0
    assert run_script("train_sdxl_lokr", file_args(assets, root / "file", *extra, steps=2, lr="1e-2")) == 0
    return root / "folder" / "step2", root / "file" / "step2"


def test_training_on_the_file_equals_training_on_the_folder(runs, assets):
    folder, file = runs
    a, b = adapter_weights(folder), adapter_weights(file)
    assert {k.split("/")[0] for k in a} == {"unet", "text_encoder_one", "text_encoder_two"}
    assert max_difference(a, b) <= 1e-6
    # Not trivially equal: training moved the adapters.
    assert max(v.abs().max().item() for k, v in a.items() if "lokr_w1" in k) > 0

    run = json.loads((file / "args.json").read_text())
    digest = hashlib.sha256((assets / "sdxl.safetensors").read_bytes()).hexdigest()
    assert (run["base_model_file"], run["base_model_sha256"]) == ("sdxl.safetensors", digest)
    card = (file.parent / "README.md").read_text()
    assert f"| base model sha256 | {digest} |" in card
    assert f"StableDiffusionXLPipeline.from_single_file({str(assets / 'sdxl.safetensors')!r}, config=" in card


def png(path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.int16)


def test_infer_and_export_read_the_file_back_from_args_json(runs, tmp_path, run_main):
    folder, file = runs
    for name, checkpoint in (("folder", folder), ("file", file)):
        argv = ["--checkpoint", checkpoint, "--prompt", "a red circle", "--num_inference_steps", "2"]
        assert run_main("infer", [*argv, "--output_dir", tmp_path / name]) == 0
        assert run_main("export", ["--checkpoint", checkpoint, "--out", tmp_path / f"{name}.safetensors"]) == 0
    assert (
        np.abs(
            png(tmp_path / "folder" / "00_a-red-circle_00.png") - png(tmp_path / "file" / "00_a-red-circle_00.png")
        ).max()
        <= 1
    )
    a, b = load_file(tmp_path / "folder.safetensors"), load_file(tmp_path / "file.safetensors")
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6


def marked_copy(assets, tmp_path, *markers, drop_vae=False):
    state = load_file(assets / "sdxl.safetensors")
    if drop_vae:
        state = {k: v for k, v in state.items() if not k.startswith("first_stage_model.")}
    state.update({marker: torch.tensor([]) for marker in markers})  # NoobAI-style empty marker tensors
    path = tmp_path / (("-".join(markers) or "plain") + ".safetensors")
    save_file(state, path)
    return path


def test_v_pred_and_ztsnr_markers_train_and_sample_as_marked(assets, tmp_path, caplog):
    from difftune.generate import inference
    from difftune.models import sdxl

    path = marked_copy(assets, tmp_path, "v_pred", "ztsnr", drop_vae=True)
    with caplog.at_level("INFO", logger="difftune"):
        sd = sdxl.load_sdxl(str(path), single_file_config=str(assets / "sdxl"))
    for scheduler in (sd.noise_scheduler, sd.inference_scheduler):
        assert scheduler.config.prediction_type == "v_prediction"
        assert scheduler.config.rescale_betas_zero_snr is True
    assert scheduler.alphas_cumprod[-1] < 1e-6  # zero terminal SNR, not the base schedule's ~0.0047
    assert "marks itself v-prediction (v_pred) with zero terminal SNR (ztsnr)" in caplog.text
    assert "has no VAE: using the VAE of --single_file_config" in caplog.text
    pipe = inference.sdxl_pipeline(str(path), None, None, None, torch.float32, None, str(assets / "sdxl"))
    assert pipe.scheduler.config.prediction_type == "v_prediction" and pipe.scheduler.config.rescale_betas_zero_snr
    # --prediction_type still decides (infer.py passes the run's).
    pipe = inference.sdxl_pipeline(str(path), None, None, None, torch.float32, "epsilon", str(assets / "sdxl"))
    assert pipe.scheduler.config.prediction_type == "epsilon"
    # Without the markers: the config's epsilon schedule.
    plain = sdxl.load_sdxl(str(marked_copy(assets, tmp_path)), single_file_config=str(assets / "sdxl"))
    assert plain.noise_scheduler.config.prediction_type == "epsilon"
    assert not plain.noise_scheduler.config.rescale_betas_zero_snr


def test_v_pred_file_run_records_v_prediction(assets, tmp_path, run_main):
    path = marked_copy(assets, tmp_path, "v_pred")
    out = tmp_path / "run"
    argv = file_args(assets, out, steps=1, checkpointing_steps=1)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(path)
    assert run_main("train_sdxl_lokr", argv) == 0
    assert json.loads((out / "step1" / "args.json").read_text())["prediction_type"] == "v_prediction"


def write_keys(path, keys):
    save_file({k: torch.zeros(1) for k in keys}, path)
    return path


@pytest.mark.parametrize(
    ("keys", "message"),
    [
        (["cond_stage_model.transformer.text_model.final_layer_norm.weight", "model.diffusion_model.out.2.weight"],
         "looks like a Stable Diffusion 1.x model, not an SDXL checkpoint"),
        (["model.diffusion_model.joint_blocks.0.context_block.attn.qkv.weight"], "looks like a Stable Diffusion 3"),
        (["model.diffusion_model.double_blocks.0.img_attn.norm.key_norm.scale"], "looks like a Flux model"),
    ],
)  # fmt: skip
def test_other_architectures_are_named(assets, tmp_path, run_main, capsys, keys, message):
    path = write_keys(tmp_path / "other.safetensors", keys)
    argv = file_args(assets, tmp_path / "out", steps=1)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(path)
    assert run_main("train_sdxl_lokr", argv) == 2
    assert message in one_line_error(capsys)


def test_pickles_and_offline_configs_are_one_line_errors(assets, tmp_path, run_main, capsys):
    pickle = tmp_path / "model.ckpt"
    torch.save({"state_dict": {}}, pickle)
    argv = file_args(assets, tmp_path / "out", steps=1)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(pickle)
    assert run_main("train_sdxl_lokr", argv) == 2
    assert "difftune loads only .safetensors files" in one_line_error(capsys)

    argv = file_args(assets, tmp_path / "out2", steps=1)
    argv[argv.index("--single_file_config") + 1] = "stabilityai/stable-diffusion-xl-base-1.0"
    assert run_main("train_sdxl_lokr", argv) == 2
    error = one_line_error(capsys)
    assert "--single_file_config stabilityai/stable-diffusion-xl-base-1.0" in error and "offline" in error

    # Offline, the default VAE and configs are both missing: one message names both and the two flags.
    argv[argv.index("--pretrained_vae_model_name_or_path") + 1] = "madebyollin/sdxl-vae-fp16-fix"
    assert run_main("train_sdxl_lokr", argv) == 2
    error = one_line_error(capsys)
    assert "--single_file_config stabilityai/stable-diffusion-xl-base-1.0 is not a local directory" in error
    assert "--pretrained_vae_model_name_or_path madebyollin/sdxl-vae-fp16-fix is not a local directory" in error
    assert "a single file needs its architecture's configs (--single_file_config" in error


def test_a_changed_file_at_the_same_path_never_reuses_old_encodings(assets, tmp_path, run_main):
    path = marked_copy(assets, tmp_path)
    caches = tmp_path / "cache"
    flags = ("--cache_latents", "--center_crop", "--cache_text_embeddings", "--cache_dir", caches)
    flags += ("--max_train_samples", "2")
    for run in ("a", "b"):
        argv = file_args(assets, tmp_path / run, *flags, steps=1, checkpointing_steps=1)
        argv[argv.index("--pretrained_model_name_or_path") + 1] = str(path)
        assert run_main("train_sdxl_lokr", argv) == 0
        # The same path, other weights (as when a user re-downloads a newer version under the same name).
        state = load_file(path)
        state["conditioner.embedders.0.transformer.text_model.final_layer_norm.bias"] += 0.1
        save_file(state, path)
    assert len(list(caches.glob("sdxl-text-*"))) == 2 and len(list(caches.glob("sdxl-latents-*"))) == 2


@pytest.fixture(scope="module")
def one_step(assets, tmp_path_factory):
    """A 1-step run (text encoders too) on the tiny single file, and its flags, for the runs to compare with it."""

    def train(path, out):
        extra = ("--train_text_encoder", "--rank", "2", "--target_modules", "to_q,to_k,to_v,to_out.0,conv1")
        argv = file_args(assets, out, *extra, steps=1, lr="1e-2", checkpointing_steps=1)
        argv[argv.index("--pretrained_model_name_or_path") + 1] = str(path)
        assert run_script("train_sdxl_lokr", argv) == 0
        return out / "step1"

    return train(assets / "sdxl.safetensors", tmp_path_factory.mktemp("one-step") / "run"), train


@pytest.mark.parametrize("name", ["model.sft", "MODEL.SAFETENSORS"])
def test_a_safetensors_file_trains_the_same_whatever_its_name(assets, tmp_path, one_step, name):
    reference, train = one_step
    path = tmp_path / name
    path.write_bytes((assets / "sdxl.safetensors").read_bytes())  # (a tiny file: users' big ones are never copied)
    step = train(path, tmp_path / "run")
    assert max_difference(adapter_weights(reference), adapter_weights(step)) == 0
    assert json.loads((step / "args.json").read_text())["base_model_file"] == name


def test_pickles_are_refused_by_their_content_not_their_name(assets, tmp_path, run_main, capsys):
    from difftune.models import single_file

    for name in ("model.safetensors", "model.sft"):
        pickle = tmp_path / name
        torch.save({"state_dict": {}}, pickle)
        argv = file_args(assets, tmp_path / "out", steps=1)
        argv[argv.index("--pretrained_model_name_or_path") + 1] = str(pickle)
        assert run_main("train_sdxl_lokr", argv) == 2
        assert "is a pickle checkpoint" in one_line_error(capsys)
    # And a safetensors file named like a pickle is read as what it is.
    renamed = tmp_path / "model.ckpt"
    renamed.write_bytes((assets / "sdxl.safetensors").read_bytes())
    assert single_file.inspect(renamed).has_vae


def transposed_projection_copy(assets, tmp_path, spelling):
    """The tiny file with OpenCLIP-G's projection in nn.Linear's orientation, under `spelling`'s key."""
    key = "conditioner.embedders.1.model.text_projection"
    state = load_file(assets / "sdxl.safetensors")
    projection = state.pop(key)
    assert projection.shape[0] != projection.shape[1]  # (else the orientation could not be told from the shape)
    state[key + spelling] = projection.T.contiguous()
    path = tmp_path / f"linear{spelling}.safetensors"
    save_file(state, path)
    return path


@pytest.mark.parametrize("spelling", ["", ".weight"])
def test_a_text_projection_stored_transposed_loads_the_same_model(assets, tmp_path, spelling):
    from difftune.models import sdxl

    config = str(assets / "sdxl")
    good = sdxl.load_sdxl(str(assets / "sdxl.safetensors"), single_file_config=config)
    odd = sdxl.load_sdxl(str(transposed_projection_copy(assets, tmp_path, spelling)), single_file_config=config)
    for part in ("text_encoder_one", "text_encoder_two", "unet", "vae"):
        a, b = getattr(good, part).state_dict(), getattr(odd, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    assert torch.equal(good.text_encoder_two.text_projection.weight, odd.text_encoder_two.text_projection.weight)


def test_a_transposed_text_projection_trains_the_same(assets, tmp_path, one_step):
    reference, train = one_step
    step = train(transposed_projection_copy(assets, tmp_path, ""), tmp_path / "run")
    assert max_difference(adapter_weights(reference), adapter_weights(step)) == 0


@pytest.mark.parametrize(
    ("markers", "meaning"),
    [
        (("edm_vpred.sigma_max", "edm_vpred.sigma_min", "v_pred"), "is an EDM v-prediction model"),
        (("edm_mean", "edm_std"), "is an EDM model with Playground v2.5's latent scaling"),
        (("edm_std",), "is an EDM model with Playground v2.5's latent scaling"),
    ],
)
def test_edm_markers_are_refused_before_any_weights_load(
    assets, tmp_path, run_main, capsys, monkeypatch, markers, meaning
):
    from difftune.models import single_file

    def no_weights(*_):
        raise AssertionError("weights loaded")

    monkeypatch.setattr(single_file, "read_state_dict", no_weights)
    argv = file_args(assets, tmp_path / "out", steps=1)
    argv[argv.index("--pretrained_model_name_or_path") + 1] = str(marked_copy(assets, tmp_path, *markers))
    assert run_main("train_sdxl_lokr", argv) == 2
    error = one_line_error(capsys)
    assert meaning in error and f"`{markers[0]}`" in error and "use a non-EDM SDXL checkpoint" in error

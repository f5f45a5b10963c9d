"""kohya sd-scripts' training config (TOML in kohya's sections, through --config) and flag names, with kohya's
meaning: what each kohya key trains here, checked against the values kohya would use; kohya's defaults for what a
file leaves out; what is refused (one message) or has no effect (one note); a typo names the nearest flag; and a
kohya config trains the tiny SDXL end to end, its export named by output_name."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import load_script
from helpers import one_line_error

from difftune.cli.errors import UserError

ATTN_MLP = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
FULL = [*ATTN_MLP, "time_emb_proj", "conv_shortcut", "conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]
ENCODERS_ALL = ["q_proj", "k_proj", "v_proj", "out_proj", "fc1", "fc2"]


def kohya_folder(assets: Path, root: Path) -> Path:
    """A kohya '<repeats>_<class tokens>' training folder of two toy images."""
    folder = root / "2_sks shape"
    folder.mkdir(parents=True)
    for image in sorted((assets / "data").glob("*.png"))[:2]:
        shutil.copy(image, folder)
    return root


def kohya_toml(path: Path, sections: dict[str, str]) -> Path:
    """A config as kohya's --output_config / kohya_ss write it: [section] headers over kohya's keys."""
    path.write_text("\n".join(f"[{name}]\n{body.strip()}\n" for name, body in sections.items()))
    return path


def parse(script: str, argv: list):
    return load_script(script).parse_args([str(a) for a in argv])


def model_section(assets: Path, data: Path) -> str:
    return f'pretrained_model_name_or_path = "{assets / "sdxl"}"\ntrain_data_dir = "{data}"'


def test_a_kohya_training_config_trains_what_kohya_would(assets, tmp_path, caplog):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a sks shape --w 64 --h 64\n")
    config = kohya_toml(tmp_path / "kohya.toml", {
        "model_arguments": model_section(assets, kohya_folder(assets, tmp_path / "train")) + """
v_parameterization = true""",
        "additional_network_arguments": """
network_module = "lycoris.kohya"
network_dim = 16
network_alpha = 8
network_args = ["algo=lokr", "factor=8", "preset=attn-mlp", "rank_dropout=0.1", "module_dropout=0.05"]
unet_lr = 0.0002
text_encoder_lr = [0.00005, 0.00001]""",
        "optimizer_arguments": """
optimizer_type = "AdamW8bit"
optimizer_args = ["weight_decay=0.05", "betas=0.9,0.99"]
learning_rate = 0.0001
lr_scheduler = "cosine_with_restarts"
lr_warmup_steps = 0.1
lr_scheduler_num_cycles = 3""",
        "dataset_arguments": """
resolution = "64,64"
cache_latents_to_disk = true""",
        "training_arguments": f"""
output_dir = "{tmp_path / "out"}"
output_name = "my_lokr"
max_train_steps = 100
train_batch_size = 2
mixed_precision = "bf16"
min_snr_gamma = 5.0
save_every_n_steps = 20
save_last_n_steps = 40""",
        "sample_prompt_arguments": f"""
sample_prompts = "{prompts}"
sample_every_n_steps = 25
sample_sampler = "euler\"""",
        "saving_arguments": 'save_model_as = "safetensors"',
        "logging_arguments": 'log_with = "tensorboard"\nlogging_dir = "kohya_logs"',
    })  # fmt: skip
    args = parse("train_sdxl_lokr", ["--config", config])
    # the LyCORIS LoKr: rank, alpha, factor, dropouts, its initialisation and the preset's layers
    assert (args.rank, args.alpha, args.decompose_factor, args.decompose_both) == (16, 8.0, 8, False)
    assert (args.rank_dropout, args.module_dropout, args.lokr_init) == (0.1, 0.05, "lycoris")
    assert args.target_modules == ATTN_MLP
    # kohya trains the text encoders too (no network_train_unet_only), at text_encoder_lr (a list: LyCORIS reads
    # its first); the U-Net at unet_lr
    assert args.train_text_encoder is True and args.text_encoder_target_modules == ENCODERS_ALL
    assert (args.learning_rate, args.text_encoder_lr) == (0.0002, 0.00005)
    assert (args.optimizer, args.adam_weight_decay, args.adam_beta1, args.adam_beta2) == ("adamw8bit", 0.05, 0.9, 0.99)
    assert (args.lr_scheduler, args.lr_num_cycles, args.lr_warmup_steps) == ("cosine_with_restarts", 3, 10)
    assert (args.max_train_steps, args.train_batch_size, args.mixed_precision) == (100, 2, "bf16")
    assert (args.prediction_type, args.snr_gamma, args.resolution) == ("v_prediction", 5.0, 64)
    assert args.cache_latents is True
    # checkpoints every 20 steps, the last 40 steps' kept (3) and the final; validation every 25 steps
    assert (args.checkpointing_steps, args.checkpoints_total_limit) == (20, 4)
    assert (args.validation_steps, args.validation_epochs, args.validation_prompts_file) == (25, None, prompts)
    assert args.output_name == "my_lokr"
    assert (args.report_to, args.logging_dir) == ("tensorboard", str(Path.cwd() / "kohya_logs"))
    assert args.pretrained_vae_model_name_or_path == "none"  # kohya: the base model's own VAE
    notes = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert notes == ["kohya settings with no effect on what trains here: save_model_as (exported files are "
                     ".safetensors (scripts/export.py))"]  # fmt: skip


def test_what_a_kohya_config_leaves_out_takes_kohyas_defaults(assets, tmp_path, caplog):
    """kohya's --output_config writes only the values that differ from kohya's defaults."""
    config = kohya_toml(tmp_path / "kohya.toml", {
        "model_arguments": model_section(assets, kohya_folder(assets, tmp_path / "train")),
        "additional_network_arguments": 'network_module = "lycoris.kohya"\nnetwork_args = ["algo=lokr"]',
        "training_arguments": f'output_dir = "{tmp_path / "out"}"\nsave_every_n_epochs = 2\nsave_last_n_epochs = 3',
        "sample_prompt_arguments": "sample_every_n_epochs = 1",
    })  # fmt: skip
    args = parse("train_sdxl_lokr", ["--config", config])
    assert (args.rank, args.alpha, args.decompose_factor, args.learning_rate) == (4, 1.0, -1, 2e-6)
    assert args.target_modules == FULL and args.text_encoder_target_modules == ENCODERS_ALL  # preset "full"
    assert args.train_text_encoder is True and args.text_encoder_lr is None  # (2e-6 too)
    assert (args.max_train_steps, args.mixed_precision, args.report_to) == (1600, "no", "none")
    # epochs only: no checkpoints or validation by steps; the last 3 epoch checkpoints kept, and the final
    assert (args.checkpointing_steps, args.checkpointing_epochs, args.checkpoints_total_limit) == (0, 2, 4)
    assert (args.validation_steps, args.validation_epochs) == (0, 1)
    notes = [r.getMessage() for r in caplog.records if "kohya's defaults" in r.getMessage()]
    assert len(notes) == 1 and "--rank 4" in notes[0] and "--learning_rate 2e-06" in notes[0]


def test_max_train_epochs_overrides_max_train_steps_as_in_kohya(assets, tmp_path):
    config = kohya_toml(tmp_path / "kohya.toml", {
        "model_arguments": model_section(assets, kohya_folder(assets, tmp_path / "train")),
        "training_arguments": "max_train_steps = 10000\nmax_train_epochs = 3\nnetwork_train_unet_only = true",
    })  # fmt: skip
    args = parse("train_sdxl_lokr", ["--config", config])
    assert (args.num_train_epochs, args.max_train_steps, args.train_text_encoder) == (3, None, False)


def test_unsupported_kohya_settings_are_refused_in_one_message(assets, tmp_path, run_main, capsys, monkeypatch):
    from difftune.models import sdxl

    monkeypatch.setattr(sdxl, "load_sdxl", lambda *a, **k: pytest.fail("a model loaded"))
    config = kohya_toml(tmp_path / "kohya.toml", {
        "model_arguments": model_section(assets, tmp_path) + "\nzero_terminal_snr = true",
        "additional_network_arguments": 'network_module = "networks.lora"\n'
        'network_args = ["algo=lokr", "use_tucker=True"]',
        "optimizer_arguments": 'optimizer_type = "Lion"',
        "saving_arguments": 'save_model_as = "ckpt"',
        "sample_prompt_arguments": 'sample_sampler = "ddim"',
        "training_arguments": "netwrok_dim = 8",
    })  # fmt: skip
    assert run_main("train_sdxl_lokr", ["--config", config]) == 2
    line = one_line_error(capsys)
    assert line.startswith("error: kohya settings difftune cannot follow: 7 settings: ")
    for part in (
        "zero_terminal_snr: not supported yet",
        "network_module = 'networks.lora': this script trains LoKr",
        "network_args use_tucker: Tucker conv factors are not supported",
        "optimizer_type = 'Lion': difftune offers AdamW, AdamW8bit, Prodigy and Adafactor",
        "save_model_as = 'ckpt': exported files are .safetensors",
        "sample_sampler = 'ddim': validation samples with the base model's own scheduler",
        "netwrok_dim is not a flag or a kohya key (did you mean network_dim?)",
    ):
        assert part in line


def test_kohya_keys_that_change_nothing_that_trains_are_named_in_one_note(assets, tmp_path, caplog):
    config = kohya_toml(tmp_path / "kohya.toml", {
        "model_arguments": model_section(assets, kohya_folder(assets, tmp_path / "train")),
        "training_arguments": "network_train_unet_only = true\nxformers = true\nmax_data_loader_n_workers = 8\n"
        "full_bf16 = true\nlowram = false",
    })  # fmt: skip
    with_keys = parse("train_sdxl_lokr", ["--config", config])
    notes = [r.getMessage() for r in caplog.records if "no effect" in r.getMessage()]
    assert notes == [
        "kohya settings with no effect on what trains here: xformers (attention kernel: PyTorch's SDPA is used); "
        "max_data_loader_n_workers (loader processes: --dataloader_num_workers); full_bf16 (half-precision adapter "
        "weights: they stay fp32 here)"
    ]  # (lowram = false: nothing to note)
    config.write_text(config.read_text().replace("xformers = true\nmax_data_loader_n_workers = 8\nfull_bf16 = true",
                                                 ""))  # fmt: skip
    without = parse("train_sdxl_lokr", ["--config", config])
    assert {k: v for k, v in vars(with_keys).items() if k != "config_sha256"} == {
        k: v for k, v in vars(without).items() if k != "config_sha256"
    }


def test_lycoris_scale_rule_full_factors_scale_1_and_mixed_layers_refused(assets, tmp_path):
    """LyCORIS scales a LoKr layer by 1 where both Kronecker factors are full, else by alpha / dim."""

    def config(dim: int, alpha: int, factor: int) -> Path:
        return kohya_toml(tmp_path / f"kohya_{dim}_{alpha}_{factor}.toml", {
            "model_arguments": model_section(assets, kohya_folder(assets, tmp_path / f"train_{dim}_{factor}")),
            "additional_network_arguments": f'network_module = "lycoris.kohya"\nnetwork_dim = {dim}\n'
            f'network_alpha = {alpha}\nnetwork_args = ["algo=lokr", "factor={factor}", "preset=attn-mlp"]',
        })  # fmt: skip

    # LyCORIS's "full dimension" (its guide: network_dim 100000): every factor full, scale 1 whatever the alpha
    assert parse("train_sdxl_lokr", ["--config", config(100000, 1, 4)]).alpha == 100000.0
    with pytest.raises(UserError, match=r"network_alpha 8 with network_dim 16 and factor -1: LyCORIS scales the \d+"):
        parse("train_sdxl_lokr", ["--config", config(16, 8, -1)])  # SDXL's 640-wide layers full, the rest split


@pytest.mark.parametrize(
    "kohya, ours",
    [
        (["--network_dim", "4"], ["--rank", "4"]),
        (["--min_snr_gamma", "5"], ["--snr_gamma", "5"]),
        (["--save_every_n_steps", "7"], ["--checkpointing_steps", "7"]),
        (["--network_alpha", "2", "--network_args", "algo=lokr", "factor=8"],
         ["--alpha", "2", "--decompose_factor", "8", "--lokr_init", "lycoris", "--target_modules", ",".join(FULL),
          "--text_encoder_target_modules", ",".join(ENCODERS_ALL)]),
        (["--network_dim", "4", "--network_alpha", "4", "--network_args", "algo=lokr", "conv_dim=2", "conv_alpha=1"],
         ["--rank", "4", "--alpha", "4", "--conv_rank", "2", "--conv_alpha", "1", "--lokr_init", "lycoris",
          "--target_modules", ",".join(FULL), "--text_encoder_target_modules", ",".join(ENCODERS_ALL)]),
        (["--optimizer_type", "Prodigy", "--optimizer_args", "d_coef=2", "use_bias_correction=True"],
         ["--optimizer", "prodigy", "--prodigy_d_coef", "2", "--prodigy_use_bias_correction",
          "--adam_weight_decay", "0"]),
        (["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False"],
         ["--optimizer", "adafactor", "--adam_weight_decay", "0"]),
        (["--v_parameterization", "--max_train_steps", "9", "--max_train_epochs", "3"],
         ["--prediction_type", "v_prediction", "--num_train_epochs", "3"]),
        (["--unet_lr", "1e-3", "--learning_rate", "5e-5", "--train_text_encoder"],
         ["--learning_rate", "1e-3", "--text_encoder_lr", "5e-5", "--train_text_encoder"]),
    ],
)  # fmt: skip
def test_kohya_flag_names_on_the_command_line(assets, tmp_path, kohya, ours):
    base = ["--pretrained_model_name_or_path", assets / "sdxl", "--output_dir", tmp_path / "out"]
    assert vars(parse("train_sdxl_lokr", base + kohya)) == vars(parse("train_sdxl_lokr", base + ours))


def test_a_flag_given_both_ways_is_refused(assets, tmp_path):
    with pytest.raises(UserError, match="--decompose_factor and kohya's --network_args both set --decompose_factor"):
        parse("train_sdxl_lokr", ["--network_args", "algo=lokr", "factor=8", "--decompose_factor", "4"])


def test_kohyas_default_adafactor_is_refused():
    """kohya's Adafactor steps relative to each weight's RMS (transformers' defaults); torch's has no such form."""
    with pytest.raises(UserError, match="optimizer_args relative_step: Adafactor runs with a fixed learning rate"):
        parse("train_sdxl_lokr", ["--optimizer_type", "AdaFactor"])


@pytest.mark.parametrize(
    "typed, suggested",
    [("--network_dimm", "did you mean --network_dim (= --rank)?"), ("--learning_rat", "did you mean --learning_rate?")],
)
def test_a_mistyped_flag_names_the_nearest(typed, suggested):
    with pytest.raises(UserError) as error:
        parse("train_sdxl_lokr", [typed, "4"])
    assert str(error.value) == f"unrecognized arguments: {typed} 4 ({suggested}) (see --help)"


def test_the_wuerstchen_script_reads_kohya_as_lora(assets, tmp_path):
    kohya = ["--network_module", "networks.lora", "--network_dim", "4", "--network_alpha", "0"]
    args = parse("train_wuerstchen_lora", [*kohya, "--cache_latents_to_disk", "--center_crop"])
    assert (args.rank, args.lora_alpha, args.cache_image_embeddings) == (4, 4.0, True)  # alpha 0: alpha = dim
    with pytest.raises(UserError, match="this script trains LoKr"):
        parse("train_sdxl_lokr", ["--network_module", "networks.lora"])


def test_a_kohya_config_trains_the_tiny_sdxl_and_exports_under_output_name(assets, tmp_path, run_main):
    """Through --config: the LoKr's settings in its checkpoints, the text encoders trained as kohya would, saved
    by epochs only, and export.py naming its file by output_name."""
    out = tmp_path / "out"
    config = kohya_toml(tmp_path / "kohya.toml", {
        "model_arguments": model_section(assets, kohya_folder(assets, tmp_path / "train")),
        "additional_network_arguments": """
network_module = "lycoris.kohya"
network_dim = 4
network_alpha = 2
network_args = ["algo=lokr", "factor=4", "preset=attn-only"]
unet_lr = 0.001""",
        "dataset_arguments": 'resolution = "64,64"',
        "training_arguments": f"""
output_dir = "{out}"
output_name = "my_lokr"
max_train_steps = 4
train_batch_size = 2
seed = 0
save_every_n_epochs = 1""",
    })  # fmt: skip
    assert run_main("train_sdxl_lokr", ["--config", config]) == 0
    # 2 images x 2 repeats in batches of 2: 2 steps an epoch, saved at each epoch's end (kohya: none by steps)
    assert sorted(p.name for p in out.glob("step*")) == ["step2", "step4"]
    adapters = sorted(p.name for p in (out / "step4").iterdir() if (p / "adapter_config.json").is_file())
    assert adapters == ["text_encoder_one", "text_encoder_two", "unet"]  # kohya trains the text encoders too
    unet = json.loads((out / "step4" / "unet" / "adapter_config.json").read_text())
    assert (unet["r"], unet["alpha"], unet["decompose_factor"]) == (4, 2.0, 4)
    assert sorted(unet["target_modules"]) == ["to_k", "to_out.0", "to_q", "to_v"]
    assert run_main("export", ["--checkpoint", out / "step4"]) == 0
    assert (out / "my_lokr.safetensors").is_file()

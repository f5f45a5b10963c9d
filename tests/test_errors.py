"""Bad input: one line on stderr naming the problem and the fix, exit code 2, no traceback."""

import json
import shutil
import subprocess
import sys

import pytest
from conftest import SCRIPTS, launch
from helpers import one_line_error, sdxl_args


def replace(argv, flag, value):
    argv = list(argv)
    argv[argv.index(flag) + 1] = str(value)
    return argv


@pytest.fixture
def base(assets, tmp_path):
    return sdxl_args(assets, tmp_path / "out")


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--train_data_dir", "/nonexistent/data", "--train_data_dir /nonexistent/data does not exist"),
        ("--pretrained_model_name_or_path", "/nonexistent/model", "does not exist"),
        ("--pretrained_model_name_or_path", "stabilityai/stable-diffusion-xl-base-1.0", "offline"),
        ("--pretrained_vae_model_name_or_path", "/nonexistent/vae", "does not exist"),
        ("--resolution", "100", "--resolution 100 must be a positive multiple of 8"),
        ("--image_column", "picture", "--image_column 'picture' is not a column"),
        ("--caption_column", "caption", "its columns are ['image', 'text']"),
        ("--mixed_precision", "fp16", "fp16 needs a CUDA GPU"),
        ("--resume_from_checkpoint", "/nonexistent/step5", "does not exist"),
        ("--adam_beta1", "1.5", "--adam_beta1 must be in [0, 1), got 1.5"),  # (issue 35: torch's ValueErrors)
        ("--adam_epsilon", "-1", "--adam_epsilon must be >= 0, got -1.0"),
        ("--dataloader_num_workers", "-1", "--dataloader_num_workers must be >= 0, got -1"),
        ("--learning_rate", "nan", "--learning_rate must be a positive number, got nan"),
        ("--max_train_samples", "0", "--max_train_samples must be positive, got 0"),
        ("--output_dir", "/etc/hostname", "--output_dir /etc/hostname: /etc/hostname is a file, not a folder"),
    ],
)
def test_bad_input_gives_one_line(run_main, capsys, base, flag, value, message, weights_loaded):
    argv = replace(base, flag, value) if flag in base else [*base, flag, value]
    assert run_main("train_sdxl_lokr", argv) == 2
    assert message in one_line_error(capsys)
    assert weights_loaded == []  # found before any model's weights were read


@pytest.fixture
def weights_loaded(monkeypatch) -> list[str]:
    """Every model class whose weights load (diffusers' and transformers' from_pretrained)."""
    import diffusers
    import transformers

    loaded = []
    for base_class in (diffusers.ModelMixin, transformers.PreTrainedModel):
        real = base_class.from_pretrained.__func__

        def spy(cls, *args, _real=real, **kwargs):
            loaded.append(cls.__name__)
            return _real(cls, *args, **kwargs)

        monkeypatch.setattr(base_class, "from_pretrained", classmethod(spy))
    return loaded


def unusable_folder(tmp_path):
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    return folder


def uncaptioned_folder(tmp_path):
    from PIL import Image

    folder = tmp_path / "uncaptioned"
    folder.mkdir()
    Image.new("RGB", (64, 64)).save(folder / "a.png")
    return folder


def split_folder(tmp_path):
    """A Hugging Face image folder with a train/ split (what `datasets` writes and reads)."""
    from PIL import Image

    train = tmp_path / "hf" / "train"
    train.mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(train / "a.png")
    (train / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    return train.parent


@pytest.mark.parametrize(
    ("script", "extra", "message"),
    [
        ("train_sdxl_lokr", ("--rank", "0"), "--rank must be a positive integer, got 0"),
        ("train_sdxl_lokr", ("--train_data_dir", unusable_folder), "holds no usable image"),
        ("train_sdxl_lokr", ("--train_data_dir", uncaptioned_folder), "1 of 1 images in --train_data_dir"),
        ("train_wuerstchen_lora", ("--train_data_dir", unusable_folder), "holds no usable image"),
        ("train_sdxl_lokr", ("--train_data_dir", split_folder), "with splits (train/): pass it as --dataset_name"),
        ("train_wuerstchen_lora", ("--validation_prompts_file", "/nonexistent/prompts.txt"), "does not exist"),
    ],
)
def test_bad_data_and_flags_stop_before_any_weights_load(
    run_main, capsys, assets, tmp_path, weights_loaded, script, extra, message
):
    from helpers import wuerstchen_args

    argv = (sdxl_args if script == "train_sdxl_lokr" else wuerstchen_args)(assets, tmp_path / "out")
    flag, value = extra
    value = value(tmp_path) if callable(value) else value
    argv = replace(argv, flag, value) if flag in argv else [*argv, flag, value]
    assert run_main(script, argv) == 2
    assert message in one_line_error(capsys)
    assert weights_loaded == []


def test_not_an_sdxl_pipeline(run_main, capsys, base, assets):
    argv = replace(base, "--pretrained_model_name_or_path", assets / "wuerstchen-prior")
    assert run_main("train_sdxl_lokr", argv) == 2
    assert "is a WuerstchenPriorPipeline pipeline, not a StableDiffusionXLPipeline" in one_line_error(capsys)


def test_hub_dataset_while_offline(run_main, capsys, base):
    argv = [a for a in base]
    i = argv.index("--train_data_dir")
    del argv[i : i + 2]
    assert run_main("train_sdxl_lokr", argv) == 2  # default --dataset_name: the pokemon set on the Hub
    assert "offline" in one_line_error(capsys)


def test_unreadable_image_is_skipped_with_a_warning(run_main, capsys, caplog, assets, tmp_path):
    data = tmp_path / "data"
    shutil.copytree(assets / "data", data)
    (data / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with (data / "metadata.jsonl").open("a") as handle:
        handle.write(json.dumps({"file_name": "broken.png", "text": "nothing"}) + "\n")
    argv = replace(sdxl_args(assets, tmp_path / "out", steps=1), "--train_data_dir", data)
    with caplog.at_level("WARNING"):
        assert run_main("train_sdxl_lokr", argv) == 0
    assert any("skipping unreadable image" in r.message and "broken.png" in r.message for r in caplog.records)


def test_unknown_flag(run_main, capsys, base):
    assert run_main("train_sdxl_lokr", [*base, "--no_such_flag"]) == 2
    assert "unrecognized arguments: --no_such_flag" in one_line_error(capsys)


@pytest.mark.slow
def test_real_processes_exit_2_without_traceback(assets, tmp_path):
    argv = replace(sdxl_args(assets, tmp_path / "out"), "--train_data_dir", tmp_path / "missing")
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "train_sdxl_lokr.py"), *map(str, argv)], capture_output=True, text=True
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: --train_data_dir")
    launched = launch("train_sdxl_lokr", argv)
    assert launched.returncode != 0 and "Traceback" not in launched.stderr
    assert "error: --train_data_dir" in launched.stderr

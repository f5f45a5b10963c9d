"""Faults of issue 35, round two: real full disks, damaged files, bad data and flags, signals (one line, exit 2)."""

import json
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import SCRIPTS, launch_command
from helpers import one_line_error, sdxl_args

from difftune.formats import modelcard
from difftune.storage import checkpoints


def limit_file_size(limit: int):
    """For preexec_fn: a real file-size limit (ulimit -f); SIGXFSZ ignored, so a write past it fails with EFBIG
    (signal dispositions set to ignore survive exec)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    return apply


def test_a_real_file_size_limit_inside_torch_save_stops_with_one_line(assets, tmp_path):
    out = tmp_path / "run"
    argv = sdxl_args(assets, out, steps=2)  # the tiny optimizer.pt is ~160 KB, the adapter ~100 KB
    proc = subprocess.run(
        [sys.executable, str(SCRIPTS / "train_sdxl_lokr.py"), *argv],
        capture_output=True, text=True, preexec_fn=limit_file_size(120_000), cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert errors == [
        f"error: no space left on {out} while writing step 2; no earlier checkpoint was written; "
        "free space and resume with --resume_from_checkpoint latest"
    ]
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".difftune")) == []  # no partial left


def test_a_real_file_size_limit_while_writing_the_image_scan_stops_with_one_line(tmp_path):
    path = tmp_path / "cache" / "image-scan.json"
    code = (
        "import sys; from pathlib import Path; from difftune.data import scan\n"
        "from difftune.cli.errors import UserError\n"
        "try:\n"
        f"    scan.write_scan(Path({str(path)!r}), {{str(i): [64, 64] for i in range(1000)}})\n"
        "except UserError as error:\n"
        "    print(error); sys.exit(2)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, preexec_fn=limit_file_size(1000), timeout=120
    )
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stdout.startswith(f"no space left on {path.parent} while writing the image scan image-scan.json")
    assert list(path.parent.iterdir()) == []  # neither the scan nor its partial


def test_a_damaged_training_state_in_an_older_checkpoint_is_skipped_with_a_warning(tmp_path, caplog):
    for step, loss in ((1, 0.5), (2, 0.7), (3, 0.9)):
        folder = checkpoints.checkpoint_dir(tmp_path, step)
        folder.mkdir()
        (folder / checkpoints.STATE_FILE).write_text(json.dumps({"global_step": step, "eval_loss": loss}))
    (tmp_path / "step1" / checkpoints.STATE_FILE).write_text('{"global_step": 1, "eval_lo')  # cut short
    assert modelcard.evaluation_table(tmp_path)[-3:] == ["| step2 | 0.700000 | |", "| step3 | 0.900000 | |", ""]
    checkpoints.prune(tmp_path, 1)  # the best held-out loss is step2's now: step1's cannot be read
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step2", "step3"]
    assert "skipping damaged" in caplog.text and "step1" in caplog.text


def image_folder(assets, folder, count: int = 4):
    """`count` of the tiny images, each with a caption file."""
    folder.mkdir(parents=True)
    for image in sorted((assets / "data").glob("*.png"))[:count]:
        shutil.copy(image, folder / image.name)
        (folder / image.name).with_suffix(".txt").write_text("a shape\n")
    return folder


def looping_image(folder):
    (folder / "loop.png").symlink_to("loop.png")  # ELOOP
    (folder / "loop.txt").write_text("a loop\n")


def caption_folder(folder):
    (folder / "000_black_circle.txt").unlink()
    (folder / "000_black_circle.txt").mkdir()


def caption_folder_in_a_subset(folder):
    subset = folder / "2_shape"
    subset.mkdir()
    for image in folder.glob("*.png"):
        image.rename(subset / image.name)
    for caption in folder.glob("*.txt"):
        caption.rename(subset / caption.name)
    (subset / "000_black_circle.txt").unlink()
    (subset / "000_black_circle.txt").mkdir()


def metadata_outside(parent: str):
    def write(folder):
        for caption in folder.glob("*.txt"):
            caption.unlink()
        image = min(folder.glob("*.png"))
        name = str(image) if parent == "absolute" else f"../{image.name}"
        (folder / "metadata.jsonl").write_text(json.dumps({"file_name": name, "text": "a"}) + "\n")

    return write


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (looping_image, None),  # (trains on the rest: a warning, below)
        (caption_folder, "000_black_circle.txt is a folder, named like a caption or image file"),
        (caption_folder_in_a_subset, "caption file DATA/2_shape/000_black_circle.txt is a folder, not a file"),
        (metadata_outside("parent"), "line 1 of DATA/metadata.jsonl names '../000_black_circle.png', outside"),
        (metadata_outside("absolute"), "outside the folder: file_name must be a path relative to the folder"),
    ],
    ids=["symlink-loop", "caption-dir", "caption-dir-in-subset", "metadata-dotdot", "metadata-absolute"],
)
def test_bad_data_folders_stop_with_one_line_or_warn(assets, tmp_path, run_main, capsys, caplog, damage, message):
    data = image_folder(assets, tmp_path / "data")
    damage(data)
    argv = sdxl_args(assets, tmp_path / "out", "--cache_dir", tmp_path / "cache", "--caption_extension", ".txt",
                     steps=1, checkpointing_steps=0)  # fmt: skip
    argv[argv.index("--train_data_dir") + 1] = str(data)
    if message is None:
        assert run_main("train_sdxl_lokr", argv) == 0
        assert f"skipping image {data / 'loop.png'}: a symlink that leads nowhere" in caplog.text
        return
    assert run_main("train_sdxl_lokr", argv) == 2
    assert message.replace("DATA", str(data)) in one_line_error(capsys)


def test_a_dangling_image_symlink_is_dropped_with_a_warning(assets, tmp_path, run_main, caplog):
    data = image_folder(assets, tmp_path / "data")
    (data / "gone.png").symlink_to(tmp_path / "nothing.png")
    (data / "gone.txt").write_text("gone\n")
    argv = sdxl_args(assets, tmp_path / "out", "--cache_dir", tmp_path / "cache", steps=1, checkpointing_steps=0)
    argv[argv.index("--train_data_dir") + 1] = str(data)
    assert run_main("train_sdxl_lokr", argv) == 0
    assert f"skipping image {data / 'gone.png'}: a symlink that leads nowhere" in caplog.text


@pytest.mark.parametrize("content", ["[]", "null"])
def test_an_image_scan_holding_no_object_is_rebuilt(tmp_path, content):
    from difftune.data import scan

    (tmp_path / scan.SCAN_FILE).write_text(content)
    assert scan.read_scan(tmp_path / scan.SCAN_FILE) == {}


def test_ctrl_c_while_models_load_stops_with_one_line(assets, tmp_path, run_main, capsys, monkeypatch):
    import diffusers

    def interrupted(cls, *args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(diffusers.ModelMixin, "from_pretrained", classmethod(interrupted))
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "out")) == 130
    assert one_line_error(capsys).startswith("error: interrupted (Ctrl-C); nothing is damaged")


def test_the_newest_checkpoint_without_its_state_is_skipped_with_a_warning(tmp_path, caplog):
    for step in (1, 2):
        folder = checkpoints.checkpoint_dir(tmp_path, step)
        folder.mkdir()
        (folder / checkpoints.STATE_FILE).write_text(json.dumps({"global_step": step}))
    (tmp_path / "step2" / checkpoints.STATE_FILE).unlink()
    assert checkpoints.resolve_resume(tmp_path, "latest") == tmp_path / "step1"
    assert f"skipping checkpoint {tmp_path / 'step2'}: it has no training_state.json" in caplog.text


def test_a_png_damaged_in_the_middle_is_found_by_the_scan(tmp_path):
    import numpy as np
    from PIL import Image

    from difftune.data import scan

    pixels = (np.random.default_rng(0).random((128, 96, 3)) * 255).astype("uint8")
    Image.fromarray(pixels).save(tmp_path / "good.png")
    data = bytearray((tmp_path / "good.png").read_bytes())
    data[len(data) // 2 : len(data) // 2 + 256] = bytes(256)  # zeroed in the pixel data; the tail is whole
    (tmp_path / "bad.png").write_bytes(bytes(data))
    assert scan.probe({"path": str(tmp_path / "good.png"), "bytes": None}) == (128, 96)
    assert "checksum" in scan.probe({"path": str(tmp_path / "bad.png"), "bytes": None})


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(child) for child in (task / "children").read_text().split()]
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_killing_the_launcher_alone_stops_the_trainer_which_saves(assets, tmp_path):
    out, log_path = tmp_path / "run", tmp_path / "log.txt"
    command, env = launch_command("train_sdxl_lokr", sdxl_args(assets, out, steps=500, checkpointing_steps=400))
    with log_path.open("w") as log:
        launcher = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=tmp_path)
        deadline = time.monotonic() + 300
        while not re.search(r"train: .* [1-9][0-9]*/500 \[", log_path.read_text()):
            assert launcher.poll() is None and time.monotonic() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        (trainer,) = children(launcher.pid)
        launcher.kill()  # SIGKILL: the launcher cannot pass anything on (docker stop's SIGKILL after its grace)
        launcher.wait()
        deadline = time.monotonic() + 90  # a step (seconds here) and a save
        while Path(f"/proc/{trainer}").exists() and time.monotonic() < deadline:
            time.sleep(0.5)
    if Path(f"/proc/{trainer}").exists():
        os.kill(trainer, signal.SIGKILL)  # (leave no orphan behind)
        pytest.fail("the trainer trains on, orphaned, after its launcher died")
    text = log_path.read_text()
    assert "stopped by SIGTERM" in text, text[-3000:]
    saved = checkpoints.list_checkpoints(out)
    assert len(saved) == 1 and 0 < saved[0][0] < 400


if __name__ == "__main__":
    sys.exit(pytest.main([__file__]))

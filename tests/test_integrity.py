"""Damaged and shared files: checkpoint manifests, cache checksums, one run per output dir, a full disk."""

import errno
import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import threading
import time

import pytest
import torch
from conftest import run_script
from helpers import Killed, adapter_weights, max_difference, one_line_error, sdxl_args, spy_on_training

from difftune.storage import checkpoints, integrity, runlock, shards

RESUME_FLAGS = ("--random_flip", "--rank_dropout", "0.2")  # random draws, so resuming must be exact


@pytest.fixture(scope="module")
def reference(assets, tmp_path_factory):
    """An uninterrupted 6-step run with checkpoints at steps 2, 4 and 6."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert run_script("train_sdxl_lokr", sdxl_args(assets, out, *RESUME_FLAGS, steps=6)) == 0
    return out


def truncate(path, keep: float = 0.5) -> None:
    os.truncate(path, int(path.stat().st_size * keep))


def flip_byte(path, offset: int = -9) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_checkpoint_manifest_lists_every_file_with_size_and_checksum(reference):
    step = reference / "step4"
    manifest = json.loads((step / integrity.MANIFEST).read_text())
    on_disk = sorted(p.relative_to(step).as_posix() for p in step.rglob("*") if p.is_file())
    assert sorted(manifest) == [name for name in on_disk if name != integrity.MANIFEST]
    assert {"unet/adapter_model.safetensors", checkpoints.OPTIMIZER_FILE, checkpoints.STATE_FILE} <= set(manifest)
    import xxhash

    weights = (step / "unet/adapter_model.safetensors").read_bytes()
    assert manifest["unet/adapter_model.safetensors"] == {
        "size": len(weights),
        "xxh3_128": xxhash.xxh3_128(weights).hexdigest(),
    }


def test_latest_skips_a_damaged_checkpoint_and_resumes_exactly(reference, assets, tmp_path, run_main, caplog):
    out = tmp_path / "run"
    out.mkdir()
    for step in ("step2", "step4"):
        shutil.copytree(reference / step, out / step)
    (out / "step2" / integrity.MANIFEST).unlink()  # written before manifests existed: still loads
    bad = out / "step4" / "unet" / "adapter_model.safetensors"
    truncate(bad)
    argv = sdxl_args(assets, out, *RESUME_FLAGS, "--resume_from_checkpoint", "latest", steps=6)
    caplog.set_level(logging.INFO, logger="difftune")
    assert run_main("train_sdxl_lokr", argv) == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"skipping damaged checkpoint {out / 'step4'}" in warnings[0]
    assert str(bad) in warnings[0] and "bytes" in warnings[0]
    assert any(f"resumed from {out / 'step2'} at step 2" in r.getMessage() for r in caplog.records)
    assert max_difference(adapter_weights(out / "step6"), adapter_weights(reference / "step6")) <= 1e-6
    assert integrity.damaged_checkpoint(out / "step4") is None  # written again, whole


@pytest.mark.parametrize("tool", ["resume", "infer", "export"])
def test_a_named_damaged_checkpoint_stops_with_one_line(reference, assets, tmp_path, run_main, capsys, tool):
    step = tmp_path / "copy" / "step4"
    shutil.copytree(reference / "step4", step)
    bad = step / "unet" / "adapter_model.safetensors"
    flip_byte(bad)  # same size: only the checksum can tell
    damaged = bad.read_bytes()
    if tool == "resume":
        argv = sdxl_args(assets, tmp_path / "out", *RESUME_FLAGS, "--resume_from_checkpoint", step, steps=6)
        code = run_main("train_sdxl_lokr", argv)
    elif tool == "infer":
        code = run_main("infer", ["--checkpoint", step, "--prompt", "a photo", "--output_dir", tmp_path / "img"])
    else:
        code = run_main("export", ["--checkpoint", step, "--out", tmp_path / "x.safetensors"])
    flag = "--resume_from_checkpoint" if tool == "resume" else "--checkpoint"
    expected = f"error: {flag} {step} is damaged: {bad} has changed since it was written (checksum differs)"
    assert code == 2
    assert one_line_error(capsys).startswith(expected)
    assert bad.read_bytes() == damaged  # nothing rewritten or removed
    assert not (tmp_path / "x.safetensors").exists() and not (tmp_path / "img").exists()


def write_half_then_fail(path, data: bytes) -> None:
    with open(path, "wb") as handle:
        handle.write(data[: len(data) // 2])
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))


def test_disk_full_while_saving_keeps_the_last_checkpoint_and_resumes(
    reference, assets, tmp_path, run_main, capsys, monkeypatch
):
    out = tmp_path / "run"
    argv = sdxl_args(assets, out, *RESUME_FLAGS, "--checkpoints_total_limit", "1", steps=6)
    real_save, saves = torch.save, []

    def fills_the_disk_at_the_second_checkpoint(obj, path, *args, **kwargs):
        saves.append(path)
        if len(saves) == 3:  # step 2's optimizer and scheduler are written; then step 4's optimizer
            import io

            buffer = io.BytesIO()
            real_save(obj, buffer)
            write_half_then_fail(path, buffer.getvalue())
        return real_save(obj, path, *args, **kwargs)

    def lock_is_held(compute_loss):
        def loss(batch, models):
            with open(out / runlock.RUN_LOCK) as handle, pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # this run holds its output dir
            return compute_loss(batch, models)

        return loss

    monkeypatch.setattr(torch, "save", fills_the_disk_at_the_second_checkpoint)
    spy_on_training(monkeypatch.setattr, wrap_loss=lock_is_held)
    assert run_main("train_sdxl_lokr", argv) == 2
    assert one_line_error(capsys) == (
        f"error: no space left on {out} while writing step 4; step 2 is intact; "
        "free space and resume with --resume_from_checkpoint latest"
    )
    assert "partial-step4" in str(saves[2])  # it failed mid-file in the temporary folder
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".difftune")) == ["step2"]
    assert integrity.damaged_checkpoint(out / "step2") is None
    monkeypatch.undo()
    assert run_main("train_sdxl_lokr", [*argv, "--resume_from_checkpoint", "latest"]) == 0
    assert max_difference(adapter_weights(out / "step6"), adapter_weights(reference / "step6")) <= 1e-6
    assert [step for step, _ in checkpoints.list_checkpoints(out)] == [6]


def test_disk_full_while_caching_stops_with_one_line(assets, tmp_path, run_main, capsys, monkeypatch):
    import safetensors.torch

    def fails_mid_file(tensors, path, *args, **kwargs):
        write_half_then_fail(path, safetensors.torch.save(tensors))

    monkeypatch.setattr(safetensors.torch, "save_file", fails_mid_file)
    argv = sdxl_args(assets, tmp_path / "out", "--center_crop", "--cache_latents", "--cache_dir", tmp_path / "c")
    assert run_main("train_sdxl_lokr", argv) == 2
    (folder,) = [p for p in (tmp_path / "c").iterdir() if p.is_dir()]  # (beside it: the image scan)
    assert one_line_error(capsys) == (
        f"error: no space left on {folder} while writing the latents cache shard shard-00000; "
        "the shards written before it are kept; free space and resume with --resume_from_checkpoint latest"
    )
    assert [p.name for p in folder.iterdir()] == [runlock.BUILD_LOCK]  # no partial shard, not marked complete


def test_training_rebuilds_a_damaged_text_cache(assets, tmp_path, run_main, caplog):
    from safetensors.torch import load_file

    common = ("--center_crop", "--cache_text_embeddings", "--cache_dir", tmp_path / "cache")
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "a", *common, steps=1)) == 0
    (shard,) = (tmp_path / "cache").glob("*/shard-*.safetensors")
    built = {k: v.clone() for k, v in load_file(shard).items()}  # not a view of the file's map
    flip_byte(shard, offset=-2)  # the sign and exponent of the last float: a wrong embedding, not a crash
    damaged = load_file(shard)
    assert any(not torch.equal(damaged[k], built[k]) for k in built)
    assert run_main("train_sdxl_lokr", sdxl_args(assets, tmp_path / "b", *common, steps=1)) == 0
    assert any(f"cache {shard.parent} is damaged" in r.getMessage() for r in caplog.records)
    rebuilt = load_file(shard)
    assert all(torch.equal(rebuilt[k], built[k]) for k in built)


class OneProcess:
    process_index, num_processes, is_main_process = 0, 1, True

    def wait_for_everyone(self) -> None:
        pass


def build_cache(path, calls: list, delay: float = 0.0) -> None:
    """A 300-sample cache (2 shards) whose tensors are a formula of the index."""

    def encode(indices):
        calls.append(len(indices))
        time.sleep(delay)
        return {f"{i}.x": torch.full((3,), float(i)) + torch.arange(3) for i in indices}

    shards.build(OneProcess(), path, 300, encode, 100, {"test": 1}, "test")


def read_all(path) -> None:
    reader = shards.CacheReader(path, ["x"])
    for i in (0, 17, 255, 256, 299):
        assert torch.equal(reader.sample(i)["x"], torch.tensor([i, i + 1.0, i + 2.0]))


@pytest.mark.parametrize("damage", ["truncated", "flipped", "missing"])
def test_a_damaged_cache_shard_is_rebuilt(tmp_path, caplog, damage):
    path, calls = tmp_path / "test-cache", []
    build_cache(path, calls)
    assert calls == [100, 100, 56, 44]  # each shard encoded once, in batches of 100
    shard = shards.shard_file(path, 1)
    {"truncated": truncate, "flipped": flip_byte, "missing": os.unlink}[damage](shard)
    calls.clear()
    build_cache(path, calls)
    assert calls == [44]  # shard 1 (samples 256..299) only, encoded again
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"cache {path} is damaged ({shard}" in warning and "rebuilding it" in warning
    read_all(path)
    calls.clear()
    build_cache(path, calls)
    assert calls == []  # sound again: read as it is


def interrupted_after_the_first_shard(monkeypatch, build) -> None:
    """`build()` killed (an exception) right after its first shard is in place, as kill -9 would leave it."""
    commit, done = checkpoints.commit_file, []

    def dies_after_one(partial, path):
        if done:
            raise Killed
        commit(partial, path)
        done.append(path)

    monkeypatch.setattr(checkpoints, "commit_file", dies_after_one)
    with pytest.raises(Killed):
        build()
    monkeypatch.setattr(checkpoints, "commit_file", commit)


def zero_4k(path) -> None:
    data = bytearray(path.read_bytes())
    start = min(len(data) // 2, max(0, len(data) - 4096))
    data[start : start + 4096] = bytes(len(data[start : start + 4096]))
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", ["zeroed", "truncated", "no sidecar"])
def test_a_damaged_shard_of_an_interrupted_build_is_rebuilt(tmp_path, caplog, monkeypatch, damage):
    """Issue 35: an interrupted build's shards were reused unchecked, and complete.json took their checksums."""
    path, calls = tmp_path / "test-cache", []
    interrupted_after_the_first_shard(monkeypatch, lambda: build_cache(path, calls))
    shard = shards.shard_file(path, 0)
    assert shard.is_file() and not (path / shards.COMPLETE).exists()
    {"zeroed": zero_4k, "truncated": truncate, "no sidecar": lambda s: shards.sidecar(s).unlink()}[damage](shard)
    calls.clear()
    build_cache(path, calls)
    assert calls == [100, 100, 56, 44]  # both shards encoded: the damaged one again
    assert any(f"cache shard {shard} is not sound" in r.getMessage() for r in caplog.records)
    read_all(path)
    record = json.loads((path / shards.COMPLETE).read_text())[shards.SHARDS]
    assert record == integrity.digests(path, sorted(record))  # the checksums of the sound shards
    calls.clear()
    build_cache(path, calls)
    assert calls == []


def test_a_sound_shard_of_an_interrupted_build_is_reused(tmp_path, caplog, monkeypatch):
    path, calls = tmp_path / "test-cache", []
    interrupted_after_the_first_shard(monkeypatch, lambda: build_cache(path, calls))
    calls.clear()
    build_cache(path, calls)
    assert calls == [44]  # shard 0 verified against its sidecar, kept
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    read_all(path)


def test_training_after_an_interrupted_damaged_cache_build_equals_a_clean_cache_run(
    assets, tmp_path, run_main, caplog, monkeypatch
):
    """Issue 35's repro: kill after the first shard, zero 4 KiB of it, run again: the clean-cache weights."""
    monkeypatch.setattr(shards, "SHARD_SIZE", 2)  # several shards from the tiny data set
    common = ("--center_crop", "--cache_text_embeddings", "--cache_dir")
    clean = tmp_path / "clean"
    assert run_main("train_sdxl_lokr", sdxl_args(assets, clean, *common, tmp_path / "cache-a", steps=2)) == 0
    cache, damaged = tmp_path / "cache-b", tmp_path / "damaged"
    args = sdxl_args(assets, damaged, *common, cache, steps=2)
    interrupted_after_the_first_shard(monkeypatch, lambda: (run_main("train_sdxl_lokr", args), None)[1])
    (shard,) = cache.glob("*/shard-*.safetensors")
    zero_4k(shard)
    caplog.clear()
    assert run_main("train_sdxl_lokr", [*args, "--overwrite_output_dir"]) == 0
    assert any(f"cache shard {shard} is not sound" in r.getMessage() for r in caplog.records)
    assert max_difference(adapter_weights(clean / "step2"), adapter_weights(damaged / "step2")) == 0


def test_a_cache_written_before_checksums_is_used_as_it_is(tmp_path):
    path, calls = tmp_path / "test-cache", []
    build_cache(path, calls)
    record = json.loads((path / shards.COMPLETE).read_text())
    del record[shards.SHARDS]
    (path / shards.COMPLETE).write_text(json.dumps(record))
    calls.clear()
    build_cache(path, calls)
    assert calls == []
    read_all(path)


def test_cache_shards_get_the_mode_of_a_plain_file(tmp_path):
    """safetensors writes 0600: a cache shared by a group's runs must be as readable as its complete.json."""
    import stat

    path = tmp_path / "test-cache"
    build_cache(path, [])
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir() if p.is_file()}
    assert len(modes) > 2 and set(modes.values()) == {modes[shards.COMPLETE]}


def test_two_runs_needing_one_cache_build_it_once(tmp_path):
    path, calls, errors = tmp_path / "test-cache", [], []

    def run():
        try:
            build_cache(path, calls, delay=0.1)
            read_all(path)
        except Exception as error:  # noqa: BLE001 - reported below
            errors.append(error)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert sum(calls) == 300  # one of them built it, the other waited and read it


@pytest.mark.slow
def test_a_second_run_on_the_same_output_dir_stops_and_a_killed_one_leaves_no_lock(assets, tmp_path, run_main, capsys):
    out = tmp_path / "out"
    holder = subprocess.Popen(
        [sys.executable, "-c", f"from difftune.storage import runlock; runlock.hold_output_dir({str(out)!r}); "
         "print('held', flush=True); import time; time.sleep(600)"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline() == "held\n"
        (out / ".partial-step2").mkdir()  # the other run's save in progress
        assert run_main("train_sdxl_lokr", sdxl_args(assets, out, steps=2)) == 2
        assert one_line_error(capsys) == (
            f"error: --output_dir {out} is in use by another run (host {socket.gethostname()}, pid {holder.pid}): "
            "wait for it to finish, stop it, or pick another --output_dir"
        )
        assert sorted(p.name for p in out.iterdir()) == [".difftune.lock", ".partial-step2"]  # left alone
    finally:
        holder.kill()  # SIGKILL: no clean-up runs
        holder.wait()
    runlock.hold_output_dir(out)  # the OS released the dead holder's lock
    runlock.release_all()


def test_the_lock_names_the_holder_and_is_released(tmp_path):
    runlock.hold_output_dir(tmp_path)
    try:
        with open(tmp_path / runlock.RUN_LOCK) as handle:
            with pytest.raises(BlockingIOError):
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            assert handle.read() == f"{socket.gethostname()} {os.getpid()}\n"
    finally:
        runlock.release_all()
    with open(tmp_path / runlock.RUN_LOCK) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)


def test_a_file_system_without_flock_warns_and_goes_on(tmp_path, monkeypatch, caplog):
    def unsupported(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", unsupported)
    runlock.hold_output_dir(tmp_path)
    runlock.release_all()
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning.startswith(f"cannot lock {tmp_path} (") and "will not be detected" in warning


def test_timestep_bias_end_beyond_the_schedule_stops_before_models_load(
    assets, tmp_path, run_main, capsys, monkeypatch
):
    from difftune.models import sdxl

    def no_loading(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(sdxl, "load_sdxl", no_loading)
    argv = sdxl_args(assets, tmp_path / "out", "--timestep_bias_strategy", "range", "--timestep_bias_end", "1001")
    assert run_main("train_sdxl_lokr", argv) == 2
    assert one_line_error(capsys) == "error: --timestep_bias_end 1001 is above the schedule's 1000 timesteps"
    assert not (tmp_path / "out").exists()


def test_files_written_at_the_end_of_a_run_are_whole_or_as_they_were(tmp_path, monkeypatch):
    """Issue 35: the card (README.md) was written in place, so a full disk left it empty. The card, its module
    list, args.json and complete.json go through checkpoints.write_atomic: temp file, fsync, rename."""
    from difftune.formats import modelcard

    card = tmp_path / "README.md"
    checkpoints.write_atomic(card, "the former card\n")

    def disk_full(descriptor):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError):
        checkpoints.write_atomic(card, "a new card " * 1000)
    assert card.read_text() == "the former card\n"
    assert [p.name for p in tmp_path.iterdir()] == ["README.md"]  # no temporary file left
    assert modelcard.write_atomic is checkpoints.write_atomic

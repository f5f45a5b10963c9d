"""Small fast tests written for the mutants `make mutation-auto` found alive in storage/integrity.py and
train/resume.py (docs/mutation.md): each asserts what a user sees (a value, a name, a count, a refusal)."""

from __future__ import annotations

import argparse
import errno
import json
import logging
import warnings

import pytest
import xxhash

from difftune.cli.errors import UserError
from difftune.storage import integrity

# --- storage/integrity.py: digests and manifests, the damage named, warnings, a full disk ---


def digest_of(data: bytes) -> dict:
    return {"size": len(data), "xxh3_128": xxhash.xxh3_128(data).hexdigest()}


@pytest.mark.parametrize("size", [0, 1, 1000, integrity.CHUNK + 5])  # empty, tiny, one read, two reads
def test_a_digest_is_the_size_and_xxh3_of_the_whole_file(tmp_path, size):
    data = bytes(range(256)) * (size // 256) + b"x" * (size % 256)
    (tmp_path / "f.bin").write_bytes(data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # (a binary file opened line-buffered warns on every checksum)
        assert integrity.digest(tmp_path / "f.bin") == digest_of(data)


def checkpoint_folder(tmp_path):
    step = tmp_path / "step4"
    (step / "unet").mkdir(parents=True)
    (step / "unet" / "weights.bin").write_bytes(b"weights")
    (step / "state.json").write_bytes(b"{}")
    (step / "empty").mkdir()  # a folder is not a file
    return step


def test_the_manifest_lists_every_file_by_relative_path_sorted(tmp_path):
    step = checkpoint_folder(tmp_path)
    assert integrity.files_in(step) == ["state.json", "unet/weights.bin"]
    assert integrity.digests(str(step), ["unet/weights.bin"]) == {"unet/weights.bin": digest_of(b"weights")}
    integrity.write_manifest(str(step))
    text = (step / integrity.MANIFEST).read_text()
    expected = {"state.json": digest_of(b"{}"), "unet/weights.bin": digest_of(b"weights")}
    assert text == json.dumps(expected, indent=1, sort_keys=True) + "\n"
    assert integrity.files_in(str(step)) == ["state.json", "unet/weights.bin"]  # not the manifest itself
    assert integrity.damaged_checkpoint(str(step)) is None


def test_the_first_damaged_file_is_named_with_what_is_wrong(tmp_path):
    step = checkpoint_folder(tmp_path)
    integrity.write_manifest(step)
    (step / "unet" / "weights.bin").write_bytes(b"weightz")  # same size, other bytes
    assert integrity.damaged_checkpoint(step) == (
        f"{step / 'unet/weights.bin'} has changed since it was written (checksum differs)"
    )
    (step / "state.json").write_bytes(b"{ }")  # the first in name order is named
    assert integrity.damaged_checkpoint(step) == f"{step / 'state.json'} has 3 bytes, 2 were written"
    (step / "state.json").unlink()
    assert integrity.first_bad(str(step), {"state.json": digest_of(b"{}")}) == f"{step / 'state.json'} is missing"


@pytest.mark.parametrize(
    "content",
    [b"{not json", b"\xff\xfe", b"[1, 2]", b'{"a": 3}', b'{"a": {"size": 1}}', b'{"a": {"xxh3_128": "0"}}'],
)
def test_a_manifest_that_is_not_name_to_digest_is_unreadable(tmp_path, content):
    (tmp_path / integrity.MANIFEST).write_bytes(content)
    assert integrity.damaged_checkpoint(str(tmp_path)) == f"{tmp_path / integrity.MANIFEST} is unreadable"


def test_a_checkpoint_without_a_manifest_is_taken_as_it_is(tmp_path):
    assert integrity.damaged_checkpoint(str(tmp_path)) is None
    integrity.check_checkpoint(tmp_path, "--resume_from_checkpoint")  # no refusal


def test_a_named_damaged_checkpoint_is_refused_in_one_line(tmp_path):
    (tmp_path / integrity.MANIFEST).write_text("[")
    with pytest.raises(UserError) as refused:
        integrity.check_checkpoint(tmp_path, "--adapter")
    manifest = tmp_path / integrity.MANIFEST
    assert str(refused.value) == f"--adapter {tmp_path} is damaged: {manifest} is unreadable. Pick another checkpoint"


def test_read_state_warns_naming_a_damaged_state_file(tmp_path, caplog):
    good, listed, broken = tmp_path / "good.json", tmp_path / "list.json", tmp_path / "broken.json"
    good.write_text('{"global_step": 4}')
    listed.write_text("[4]")
    broken.write_text("{")
    caplog.set_level(logging.WARNING)
    assert integrity.read_state(str(good)) == {"global_step": 4}
    assert caplog.messages == []
    assert integrity.read_state(listed) == {}
    assert caplog.messages == [f"skipping damaged {listed} (not a JSON object)"]
    caplog.clear()
    assert integrity.read_state(broken) == {}
    assert len(caplog.messages) == 1 and caplog.messages[0].startswith(f"skipping damaged {broken} (Expecting")
    caplog.clear()
    assert integrity.read_state(tmp_path / "missing.json") == {}
    assert caplog.messages[0].startswith(f"skipping damaged {tmp_path / 'missing.json'} ([Errno 2]")


def test_each_step_folder_without_its_state_file_is_named(tmp_path, caplog):
    for name in ("step2", "step4", "step10", "stepx", "step3.tmp", "xstep5"):
        (tmp_path / name).mkdir()
    (tmp_path / "step4" / "state.json").write_text("{}")
    (tmp_path / "step6").write_text("a file")
    caplog.set_level(logging.WARNING)
    integrity.warn_unfinished(str(tmp_path), "state.json")
    assert caplog.messages == [
        f"skipping checkpoint {tmp_path / name}: it has no state.json (it cannot be resumed)"
        for name in ("step10", "step2")
    ]
    caplog.clear()
    integrity.warn_unfinished(tmp_path / "missing", "state.json")
    (tmp_path / "file").write_text("")
    integrity.warn_unfinished(tmp_path / "file", "state.json")
    assert caplog.messages == []


def test_latest_takes_the_newest_sound_checkpoint_warning_about_each_damaged_one(tmp_path, caplog):
    steps = [(n, tmp_path / f"step{n}") for n in (2, 4, 6)]
    for _, path in steps:
        path.mkdir()
    for _, path in steps[1:]:
        (path / integrity.MANIFEST).write_text("[")
    caplog.set_level(logging.WARNING)
    assert integrity.newest_sound(steps) == steps[0][1]
    assert caplog.messages == [
        f"skipping damaged checkpoint {path}: {path / integrity.MANIFEST} is unreadable"
        for path in (steps[2][1], steps[1][1])
    ]
    (steps[0][1] / integrity.MANIFEST).write_text("[")
    with pytest.raises(UserError) as refused:
        integrity.newest_sound(steps)
    assert str(refused.value) == (
        f"--resume_from_checkpoint latest: every checkpoint in {tmp_path} is damaged (see the warnings above): "
        "restore one from a backup, or start afresh with --overwrite_output_dir"
    )
    with pytest.raises(UserError, match=f"every checkpoint in {tmp_path} is damaged"):
        integrity.newest_sound(steps[:1])  # the only one


@pytest.mark.parametrize("mark", integrity.FULL_MARKS)
def test_each_full_disk_message_is_recognised(mark):
    assert integrity.is_disk_full(RuntimeError(f"writer: {mark} at 12"))


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT, errno.EFBIG])
def test_each_full_disk_errno_is_recognised(code):
    assert integrity.is_disk_full(OSError(code, "quiet"))
    assert not integrity.is_disk_full(OSError(errno.EACCES, "quiet"))


def test_a_full_disk_is_found_as_the_cause_or_context_only():
    full = OSError(errno.ENOSPC, "quiet")
    caused = RuntimeError("save failed")
    caused.__cause__ = full
    assert integrity.is_disk_full(caused)
    try:
        try:
            raise full
        except OSError:
            raise ValueError("while saving")  # noqa: B904 (the context is the point)
    except ValueError as error:
        assert integrity.is_disk_full(error)
    loop = RuntimeError("a")
    loop.__context__ = RuntimeError("b")
    loop.__context__.__context__ = loop  # a cycle ends
    assert not integrity.is_disk_full(loop)
    assert not integrity.is_disk_full(RuntimeError("permission denied"))


@pytest.mark.parametrize("written", ["folder", "file", "nothing yet"])
def test_a_full_disk_removes_the_partial_write_and_stops_in_one_line(tmp_path, written):
    partial = tmp_path / "step4.tmp"
    if written == "folder":
        (partial / "unet").mkdir(parents=True)
        (partial / "unet" / "w.bin").write_bytes(b"half")
    elif written == "file":
        partial.write_bytes(b"half")
    (tmp_path / "step2").mkdir()
    guard = integrity.disk_full_stops(partial, tmp_path, "checkpoint step4", "step2 is intact")
    with pytest.raises(UserError) as stopped, guard:
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(stopped.value) == (
        f"no space left on {tmp_path} while writing checkpoint step4; step2 is intact; "
        "free space and resume with --resume_from_checkpoint latest"
    )
    assert stopped.value.__cause__ is None and stopped.value.__suppress_context__
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step2"]


def test_other_errors_pass_through_a_full_disk_guard_untouched(tmp_path):
    partial = tmp_path / "model.safetensors"
    partial.write_bytes(b"half")
    guard = integrity.disk_full_stops(partial, tmp_path, "the model", "nothing")
    with pytest.raises(PermissionError, match="read-only"), guard:
        raise PermissionError("read-only")
    assert partial.read_bytes() == b"half"
    with integrity.disk_full_stops(tmp_path / "missing", tmp_path, "x", "y"):
        pass


# --- train/resume.py: the seed taken, changed flags refused, applied or warned about, this run's learning rates ---


def checkpoint_with(tmp_path, state: dict, saved: dict | None):
    from difftune.storage import checkpoints

    step = tmp_path / "step2"
    step.mkdir(exist_ok=True)
    (step / checkpoints.STATE_FILE).write_text(json.dumps(state))
    (step / checkpoints.ARGS_FILE).unlink(missing_ok=True)
    if saved is not None:
        (step / checkpoints.ARGS_FILE).write_text(json.dumps(saved))
    return step


def resume_with(tmp_path, saved: dict | None, state: dict | None = None, processes: int = 1, kind: str = "ddp", **now):
    from difftune.train import resume

    step = checkpoint_with(tmp_path, {"num_processes": 1, **(state or {})}, saved)
    args = argparse.Namespace(**{"seed": None, **now})
    resume.take_checkpoint_settings(args, step, processes, kind)
    return args, step


def test_changed_flags_compare_as_args_json_holds_them(tmp_path):
    from difftune.train import resume

    now = argparse.Namespace(output_dir=tmp_path, sizes=(1, 2), rank=4, new_flag=1, max_train_steps=None)
    saved = {"output_dir": str(tmp_path), "sizes": [1, 2], "rank": 8, "max_train_steps": 100}
    assert resume.changed_flags(saved, now) == {"rank": (8, 4)}  # not recorded, not given: not compared
    now.max_train_steps = 50
    assert resume.changed_flags(saved, now) == {"rank": (8, 4), "max_train_steps": (100, 50)}


def test_a_resumed_run_takes_the_checkpoint_s_seed(tmp_path):
    assert resume_with(tmp_path, {"seed": 7})[0].seed == 7
    assert resume_with(tmp_path, {"seed": 7}, {"seed": 3})[0].seed == 3  # the state's seed first
    assert resume_with(tmp_path, None, {"seed": 3}, seed=3)[0].seed == 3
    assert resume_with(tmp_path, {}, seed=5)[0].seed == 5  # a checkpoint without a seed keeps the given one
    with pytest.raises(UserError) as refused:
        resume_with(tmp_path, {"seed": 7}, seed=8)
    step = tmp_path / "step2"
    assert str(refused.value) == (
        f"--seed 8 differs from the seed 7 of {step}: a resumed run keeps its seed (drop --seed, or start a new run)"
    )


def test_the_launch_must_match_the_checkpoint_s(tmp_path):
    step = tmp_path / "step2"
    with pytest.raises(UserError) as refused:
        resume_with(tmp_path, {}, kind="deepspeed")
    assert str(refused.value) == (
        f"{step} was written under ddp, this run uses deepspeed: resume with the accelerate config that wrote it"
    )
    with pytest.raises(UserError) as refused:
        resume_with(tmp_path, {}, {"distributed": "deepspeed", "num_processes": 2}, processes=4, kind="deepspeed")
    assert str(refused.value) == (
        f"{step} holds DeepSpeed optimizer shards for 2 processes, this run has 4: resume with --num_processes 2"
    )
    resume_with(tmp_path, {}, {"distributed": "deepspeed", "num_processes": 2}, processes=2, kind="deepspeed")


def test_changed_flags_are_refused_applied_or_warned_about(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="difftune")
    with pytest.raises(UserError) as refused:
        resume_with(tmp_path, {"rank": 8, "alpha": 8, "batch": 1}, rank=4, alpha=16, batch=2)
    assert str(refused.value) == (
        f"--alpha 8 -> 16, --rank 8 -> 4: {tmp_path / 'step2'} was trained with the former value, which a resumed "
        "run must keep (pass it again, or start a new run with --output_dir)"
    )
    caplog.clear()
    saved = {"learning_rate": 1e-4, "max_train_steps": 10, "batch": 1, "cache": "a", "report_to": "x", "rank": 8}
    resume_with(
        tmp_path, saved, processes=2, learning_rate=2e-4, max_train_steps=20, batch=2, cache="b", report_to="y", rank=8
    )
    step = tmp_path / "step2"
    assert caplog.messages == [
        "resuming with --learning_rate 0.0002 (the checkpoint had 0.0001)",
        "resuming with --max_train_steps 20 (the checkpoint had 10)",
        f"changed since {step}: --batch 1 -> 2, --cache a -> b; the resumed run will not equal an uninterrupted one",
        f"{step} was written by 1 process(es), this run has 2: the data is split across processes differently, "
        "so the resumed run will not equal an uninterrupted one",
    ]
    assert [r.levelno for r in caplog.records] == [logging.INFO] * 2 + [logging.WARNING] * 2


def test_a_checkpoint_that_does_not_record_its_processes_gives_no_warning(tmp_path, caplog):
    from difftune.train import resume

    step = checkpoint_with(tmp_path, {"seed": 1}, {})
    caplog.set_level(logging.INFO, logger="difftune")
    resume.take_checkpoint_settings(argparse.Namespace(seed=None), step, 2, "ddp")
    assert caplog.messages == []


def test_an_init_adapter_run_keeps_the_checkpoint_s_adapted_modules(tmp_path):
    saved = {"init_adapter": "a.safetensors", "target_modules": ["to_q"], "text_encoder_target_modules": ["q_proj"]}
    args, _ = resume_with(
        tmp_path, saved, init_adapter="a.safetensors", target_modules=["to_k"], text_encoder_target_modules=None
    )
    assert (args.target_modules, args.text_encoder_target_modules) == (["to_q"], ["q_proj"])
    with pytest.raises(UserError, match="--target_modules"):  # without --init_adapter the flags count
        resume_with(tmp_path, saved, init_adapter=None, target_modules=["to_k"])
    args, _ = resume_with(tmp_path, {"init_adapter": "a.safetensors"}, init_adapter="a.safetensors", alpha=1)
    assert not hasattr(args, "target_modules")


def scheduled(lrs: list[float], decays: list[float]):
    """An AdamW with one group per learning rate and a LambdaLR (halving each step) two steps in."""
    import torch

    groups = [
        {"params": [torch.nn.Parameter(torch.zeros(1))], "lr": lr, "weight_decay": wd}
        for lr, wd in zip(lrs, decays, strict=True)
    ]
    optimizer = torch.optim.AdamW(groups)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [lambda step: 0.5**step, lambda step: 0.25**step])
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    return optimizer, scheduler


def test_this_run_s_learning_rates_and_weight_decay_replace_the_saved_ones(tmp_path):
    from difftune.train import resume

    optimizer, scheduler = scheduled([1.0, 2.0], [0.1, 0.2])
    resume.apply_optimizer_flags(optimizer, scheduler, [{"initial_lr": 4.0, "weight_decay": 0.3}, {"initial_lr": 8.0}])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.3, 0.2]
    assert [g["initial_lr"] for g in optimizer.param_groups] == [4.0, 8.0]
    assert [g["lr"] for g in optimizer.param_groups] == [1.0, 0.5]  # at step 2 of each schedule
    assert scheduler.base_lrs == [4.0, 8.0] and scheduler.get_last_lr() == [1.0, 0.5]
    optimizer, scheduler = scheduled([1.0, 2.0], [0.1, 0.2])
    resume.apply_optimizer_flags(optimizer, scheduler, [{"initial_lr": 1.0}, {"initial_lr": 2.0}])  # unchanged
    assert [g["lr"] for g in optimizer.param_groups] == [0.25, 0.125]
    assert scheduler.get_last_lr() == [0.25, 0.125]

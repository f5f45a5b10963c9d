"""Small fast tests written for the mutants `make mutation-auto` found alive in storage/checkpoints.py
(docs/mutation.md): each asserts what a user sees (a folder name, a file's bytes, a refusal, a warning)."""

from __future__ import annotations

import json
import logging
import os
import stat
from pathlib import Path

import pytest

from difftune.cli.errors import UserError
from difftune.storage import checkpoints, integrity


def complete(output_dir, step: int, state: dict | None = None):
    """A complete checkpoint step<N>/ (its training_state.json written) with one weights file."""
    path = output_dir / f"step{step}"
    path.mkdir(parents=True, exist_ok=True)
    (path / "weights.bin").write_bytes(b"w%d" % step)
    (path / "training_state.json").write_text(json.dumps({"global_step": step} if state is None else state))
    return path


def messages(caplog, level=logging.WARNING) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno == level]


def steps(found) -> list[int]:
    return [step for step, _ in found]


# --- names, listing, resolving ---


def test_checkpoint_folder_names(tmp_path):
    assert checkpoints.checkpoint_dir(str(tmp_path), 12) == tmp_path / "step12"
    assert checkpoints.partial_dir(str(tmp_path), 12) == tmp_path / ".partial-step12"
    assert checkpoints.STATE_FILE == "training_state.json" and checkpoints.ARGS_FILE == "args.json"
    assert (checkpoints.OPTIMIZER_FILE, checkpoints.SCHEDULER_FILE) == ("optimizer.pt", "lr_scheduler.pt")


def test_only_complete_step_folders_are_listed_in_step_order(tmp_path):
    assert checkpoints.list_checkpoints(tmp_path / "missing") == []
    for step in (10, 2, 9):
        complete(tmp_path, step)
    (tmp_path / "step11").mkdir()  # no state file
    (tmp_path / "step12").write_text("a file")
    for name in ("step3x", "xstep4", "step", "step-5", "Step6"):
        complete(tmp_path, 0).rename(tmp_path / name)
    assert checkpoints.list_checkpoints(str(tmp_path)) == [(2, tmp_path / "step2"), (9, tmp_path / "step9"),
                                                           (10, tmp_path / "step10")]  # fmt: skip
    assert checkpoints.is_complete(tmp_path / "step2") and not checkpoints.is_complete(tmp_path / "step11")


def test_resume_from_nothing_or_from_an_empty_output_dir_starts_anew(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    assert checkpoints.resolve_resume(tmp_path, None) is None
    assert messages(caplog) == []
    (tmp_path / "step3").mkdir()  # incomplete: named, passed over
    assert checkpoints.resolve_resume(tmp_path, "latest") is None
    assert messages(caplog) == [
        f"skipping checkpoint {tmp_path / 'step3'}: it has no training_state.json (it cannot be resumed)",
        f"--resume_from_checkpoint latest: no checkpoint in {tmp_path} yet, starting a new run",
    ]


def test_latest_passes_over_a_damaged_checkpoint(tmp_path, caplog):
    complete(tmp_path, 1)
    damaged = complete(tmp_path, 2)
    integrity.write_manifest(damaged)
    (damaged / "weights.bin").write_bytes(b"xx")
    assert checkpoints.resolve_resume(tmp_path, "latest") == tmp_path / "step1"


def test_resume_by_path_or_by_name_in_the_output_dir(tmp_path, monkeypatch):
    path = complete(tmp_path / "out", 3)
    assert checkpoints.resolve_resume(tmp_path / "out", str(path)) == path
    monkeypatch.chdir(tmp_path)
    assert checkpoints.resolve_resume(tmp_path / "out", "step3") == tmp_path / "out" / "step3"
    (tmp_path / "step3").mkdir()  # a folder of that name in the working directory wins, as the path given
    with pytest.raises(UserError) as refused:
        checkpoints.resolve_resume(tmp_path / "out", "step3")
    assert str(refused.value) == (
        "--resume_from_checkpoint step3 is incomplete (no training_state.json): pick another one"
    )


def test_resume_from_a_missing_or_damaged_checkpoint_is_refused(tmp_path):
    with pytest.raises(UserError) as refused:
        checkpoints.resolve_resume(tmp_path, "step7")
    assert str(refused.value) == "--resume_from_checkpoint step7 does not exist: pass a step<N> dir or 'latest'"
    path = complete(tmp_path, 7)
    (path / integrity.MANIFEST).write_text("[")
    with pytest.raises(UserError) as refused:
        checkpoints.resolve_resume(tmp_path, str(path))
    assert str(refused.value) == (
        f"--resume_from_checkpoint {path} is damaged: {path / integrity.MANIFEST} is unreadable. "
        "Pick another checkpoint"
    )


# --- timelines ---


def test_the_lineage_a_resumed_run_continues():
    assert checkpoints.lineage({"global_step": 4}) == []
    assert checkpoints.lineage({"run_id": "b", "global_step": 4}) == [{"run_id": "b", "step": 4}]
    before = [{"run_id": "a", "step": 2}]
    state = {"run_id": "b", "global_step": 5, "lineage": before}
    assert checkpoints.lineage(state) == [{"run_id": "a", "step": 2}, {"run_id": "b", "step": 5}]


def write_state(output_dir, step: int, run_id: str | None, saved_at: float | None, lineage=()):
    state = {"global_step": step, "lineage": list(lineage)}
    if run_id is not None:
        state["run_id"] = run_id
    if saved_at is not None:
        state["saved_at"] = saved_at
    return complete(output_dir, step, state)


def test_the_timeline_keeps_the_branch_point_and_states_without_a_run(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    write_state(tmp_path, 1, None, None)  # written before lineage was recorded: kept
    write_state(tmp_path, 2, "a", 2)
    write_state(tmp_path, 3, "a", 3)  # the step run b resumed from: kept
    write_state(tmp_path, 4, "a", 4)
    write_state(tmp_path, 5, "a", 5)
    (tmp_path / "step6").mkdir()
    (tmp_path / "step6" / "training_state.json").write_text("{")  # unreadable: kept
    write_state(tmp_path, 7, "b", 9, lineage=[{"run_id": "a", "step": 3}])
    write_state(tmp_path, 8, "z", None)  # no saved_at: counts as the oldest written
    timeline = checkpoints.on_timeline(checkpoints.list_checkpoints(tmp_path))
    assert steps(timeline) == [1, 2, 3, 6, 7]
    assert messages(caplog) == [
        "--resume_from_checkpoint latest: leaving aside step4, step5, step8, on an abandoned branch (a later run "
        "resumed from an earlier step); continuing the timeline of the newest checkpoint written. Name one by "
        "path to continue that branch instead"
    ]


def test_a_timeline_without_run_ids_is_kept_whole(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    for step in (1, 2):
        write_state(tmp_path, step, None, step)
    (tmp_path / "step3").mkdir()
    (tmp_path / "step3" / "training_state.json").write_text("[1]")  # not an object
    found = checkpoints.list_checkpoints(tmp_path)
    assert checkpoints.on_timeline(found) == found and messages(caplog) == []


def test_the_newest_written_wins_over_the_highest_step(tmp_path):
    write_state(tmp_path, 1, "a", 1)
    write_state(tmp_path, 2, "a", 2)
    write_state(tmp_path, 3, "a", 3)
    write_state(tmp_path, 2, "b", 10, lineage=[{"run_id": "a", "step": 1}])
    assert checkpoints.resolve_resume(tmp_path, "latest") == tmp_path / "step2"


# --- --overwrite_output_dir: the old run set aside, then dropped or put back ---


def test_the_old_run_is_set_aside_in_a_replaced_folder(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    assert checkpoints.move_old_run_aside(tmp_path / "missing") is None
    assert checkpoints.move_old_run_aside(tmp_path) is None
    complete(tmp_path, 1)
    (tmp_path / "step2").mkdir()  # incomplete, moved too
    (tmp_path / "step3").write_text("a file, not a checkpoint")
    (tmp_path / "logs").mkdir()
    name = checkpoints.move_old_run_aside(str(tmp_path))
    assert name.startswith(".replaced-") and name[len(".replaced-") :].isdigit()
    assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["step1", "step2"]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "logs", "step3"])
    assert checkpoints.replaced_dirs(str(tmp_path)) == [tmp_path / name]
    assert messages(caplog, logging.INFO) == [
        f"--overwrite_output_dir: the old run's checkpoints are set aside in {tmp_path / name} until step one is saved"
    ]
    caplog.clear()
    checkpoints.drop_replaced(str(tmp_path), name)
    assert not (tmp_path / name).exists()
    assert messages(caplog, logging.INFO) == [
        f"--overwrite_output_dir: removing the replaced run's checkpoints ({name})"
    ]


def test_replaced_folders_are_listed_in_name_order(tmp_path):
    assert checkpoints.replaced_dirs(tmp_path / "missing") == []
    for name in (".replaced-20", ".replaced-10", "replaced-5", "step1"):
        (tmp_path / name).mkdir()
    assert checkpoints.replaced_dirs(tmp_path) == [tmp_path / ".replaced-10", tmp_path / ".replaced-20"]


def test_a_stopped_overwrite_puts_the_old_run_back(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    aside = tmp_path / ".replaced-1"
    complete(aside, 1)
    complete(aside, 2)
    (aside / "notes").mkdir()
    complete(tmp_path, 2, {"global_step": 2, "replaces": ".replaced-other"})  # a new step2 of another run stays
    checkpoints.settle_replaced(str(tmp_path))
    assert not aside.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step1", "step2"]
    assert (tmp_path / "step2" / "training_state.json").read_text() == json.dumps(
        {"global_step": 2, "replaces": ".replaced-other"}
    )
    assert messages(caplog) == [
        f"a run with --overwrite_output_dir in {tmp_path} stopped before its first checkpoint was complete: the "
        "run it was replacing is back in place (step1, step2)"
    ]


def test_a_stopped_overwrite_of_nothing_says_no_checkpoints(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    (tmp_path / ".replaced-1").mkdir()
    checkpoints.settle_replaced(tmp_path)
    assert not (tmp_path / ".replaced-1").exists()
    assert messages(caplog) == [
        f"a run with --overwrite_output_dir in {tmp_path} stopped before its first checkpoint was complete: the "
        "run it was replacing is back in place (no checkpoints)"
    ]


def test_a_completed_first_checkpoint_drops_the_replaced_run(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    aside = tmp_path / ".replaced-1"
    complete(aside, 1)
    complete(tmp_path, 1, {"global_step": 1, "replaces": ".replaced-1"})
    (tmp_path / "step2").mkdir()
    (tmp_path / "step2" / "training_state.json").write_text("{")  # unreadable: not the one that replaces
    checkpoints.settle_replaced(tmp_path)
    assert not aside.exists() and messages(caplog) == []
    assert checkpoints.read_json(tmp_path / "step1" / "training_state.json")["replaces"] == ".replaced-1"


# --- the output folder's checks and tidying ---


def test_a_fresh_run_over_another_run_is_refused(tmp_path):
    checkpoints.check_output_dir(tmp_path, None, False)  # empty: fine
    complete(tmp_path, 2)
    complete(tmp_path, 10)
    with pytest.raises(UserError) as refused:
        checkpoints.check_output_dir(tmp_path, None, False)
    assert str(refused.value) == (
        f"--output_dir {tmp_path} holds another run's checkpoints (step10 ...): pass --resume_from_checkpoint "
        "latest to continue it, --overwrite_output_dir to replace it, or another --output_dir"
    )
    checkpoints.check_output_dir(tmp_path, "latest", False)
    checkpoints.check_output_dir(tmp_path, None, True)


def test_a_run_set_aside_by_a_stopped_overwrite_counts_as_another_run(tmp_path):
    complete(tmp_path / ".replaced-5", 3)
    with pytest.raises(UserError, match=r"holds another run's checkpoints \(step3 \.\.\.\)"):
        checkpoints.check_output_dir(tmp_path, None, False)


def test_cleaning_after_a_killed_save(tmp_path, caplog):
    checkpoints.clean_output_dir(tmp_path / "missing")  # nothing to do
    caplog.set_level(logging.INFO)
    complete(tmp_path, 3).rename(tmp_path / ".stale-step3-123")  # complete, its replacement never landed: back
    complete(tmp_path, 4).rename(tmp_path / ".stale-step4-123")  # complete, but step4 landed: removed
    complete(tmp_path, 4)
    (tmp_path / ".stale-step5-9").mkdir()  # incomplete: removed
    (tmp_path / ".partial-step6").mkdir()
    (tmp_path / ".partial-step7").write_text("a file: left")
    (tmp_path / ".stale-stepx-1").mkdir()  # not a stale checkpoint's name, but its prefix: removed
    (tmp_path / "logs").mkdir()
    checkpoints.clean_output_dir(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == [".partial-step7", "logs", "step3", "step4"]
    assert (tmp_path / "step3" / "weights.bin").read_bytes() == b"w3"
    assert messages(caplog, logging.INFO) == [
        f"removing {tmp_path / name}" for name in (".partial-step6", ".stale-step4-123", ".stale-step5-9",
                                                   ".stale-stepx-1")
    ]  # fmt: skip


def test_cleaning_settles_a_stopped_overwrite(tmp_path):
    complete(tmp_path / ".replaced-1", 1)
    checkpoints.clean_output_dir(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step1"]


# --- files written whole ---


def test_json_files_are_indented_sorted_and_end_with_a_newline(tmp_path):
    path = tmp_path / "state.json"
    checkpoints.write_json(str(path), {"b": 1, "a": {"d": tmp_path, "c": [1]}})
    assert path.read_text() == (
        '{\n  "a": {\n    "c": [\n      1\n    ],\n    "d": "' + str(tmp_path) + '"\n  },\n  "b": 1\n}\n'
    )
    assert checkpoints.read_json(str(path)) == {"a": {"c": [1], "d": str(tmp_path)}, "b": 1}


def test_write_atomic_writes_text_and_bytes_and_leaves_no_temporary_file(tmp_path):
    checkpoints.write_atomic(str(tmp_path / "a.txt"), "héllo\n")
    checkpoints.write_atomic(tmp_path / "b.bin", b"\x00\xff")
    assert (tmp_path / "a.txt").read_bytes() == "héllo\n".encode()
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]


def test_a_failed_write_leaves_the_former_file_and_no_temporary_one(tmp_path, monkeypatch):
    path = tmp_path / "card.md"
    path.write_text("former")
    seen = []

    def full_disk(source, target):
        seen.append((os.path.basename(source), Path(source).read_text()))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.write_atomic(path, "new")
    assert seen == [(f".card.md.partial-{os.getpid()}", "new")]  # written whole beside it before the rename
    assert path.read_text() == "former" and sorted(p.name for p in tmp_path.iterdir()) == ["card.md"]


def test_writes_are_synced_before_and_after_the_rename(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(descriptor):
        synced.append(os.readlink(f"/proc/self/fd/{descriptor}"))
        return real(descriptor)

    monkeypatch.setattr(os, "fsync", fsync)
    checkpoints.write_atomic(tmp_path / "a.txt", "a")
    assert synced == [str(tmp_path / f".a.txt.partial-{os.getpid()}"), str(tmp_path)]
    synced.clear()
    (tmp_path / "b.partial").write_bytes(b"b")
    checkpoints.commit_file(tmp_path / "b.partial", str(tmp_path / "b.bin"))
    assert synced == [str(tmp_path / "b.partial"), str(tmp_path)]
    assert (tmp_path / "b.bin").read_bytes() == b"b" and not (tmp_path / "b.partial").exists()


def test_begin_checkpoint_starts_an_empty_folder(tmp_path):
    partial = tmp_path / "out" / ".partial-step2"
    checkpoints.begin_checkpoint(partial)  # its parents made
    (partial / "leftover").write_text("from a killed save")
    checkpoints.begin_checkpoint(partial)
    assert partial.is_dir() and list(partial.iterdir()) == []


# --- file modes ---


@pytest.fixture
def umask_027():
    before = os.umask(0o027)
    yield
    os.umask(before)


def test_umask_is_read_without_changing_it(umask_027, monkeypatch):
    assert checkpoints.umask() == 0o027
    real = checkpoints.Path.read_text

    def no_proc(self, *args, **kwargs):
        if str(self) == "/proc/self/status":
            raise OSError("no /proc")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(checkpoints.Path, "read_text", no_proc)
    assert checkpoints.umask() == 0o027
    assert os.umask(0o027) == 0o027  # put back as it was


def test_files_get_the_mode_open_gives_under_the_umask(tmp_path, umask_027):
    (tmp_path / "sub").mkdir()
    for path in (tmp_path / "a.safetensors", tmp_path / "sub" / "b.safetensors"):
        path.write_bytes(b"x")
        path.chmod(0o600)
    checkpoints.honour_umask(str(tmp_path))
    for path in (tmp_path / "a.safetensors", tmp_path / "sub" / "b.safetensors"):
        assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert stat.S_IMODE((tmp_path / "sub").stat().st_mode) != 0o640  # folders keep theirs
    single = tmp_path / "c.bin"
    single.write_bytes(b"c")
    single.chmod(0o600)
    checkpoints.honour_umask(single)
    assert stat.S_IMODE(single.stat().st_mode) == 0o640


# --- finishing and pruning ---


def test_finish_checkpoint_writes_the_state_and_manifest_then_renames(tmp_path):
    partial = checkpoints.partial_dir(tmp_path, 2)
    checkpoints.begin_checkpoint(partial)
    (partial / "weights.bin").write_bytes(b"new")
    final = checkpoints.finish_checkpoint(partial, tmp_path / "step2", {"global_step": 2})
    assert final == tmp_path / "step2" and not partial.exists()
    assert checkpoints.read_json(final / "training_state.json") == {"global_step": 2}
    assert integrity.damaged_checkpoint(final) is None
    assert sorted(json.loads((final / integrity.MANIFEST).read_text())) == ["training_state.json", "weights.bin"]


def test_reaching_a_saved_step_again_replaces_it_whole(tmp_path):
    complete(tmp_path, 2)
    partial = checkpoints.partial_dir(tmp_path, 2)
    checkpoints.begin_checkpoint(partial)
    (partial / "weights.bin").write_bytes(b"new")
    checkpoints.finish_checkpoint(partial, tmp_path / "step2", {"global_step": 2, "run_id": "b"})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step2"]
    assert (tmp_path / "step2" / "weights.bin").read_bytes() == b"new"


@pytest.mark.parametrize(("limit", "kept"), [(None, [1, 2, 3]), (2, [2, 3]), (3, [1, 2, 3]), (0, [])])
def test_finish_checkpoint_prunes_to_the_total_limit(tmp_path, limit, kept):
    complete(tmp_path, 1)
    complete(tmp_path, 2)
    partial = checkpoints.partial_dir(tmp_path, 3)
    checkpoints.begin_checkpoint(partial)
    checkpoints.finish_checkpoint(partial, tmp_path / "step3", {"global_step": 3}, limit)
    assert steps(checkpoints.list_checkpoints(tmp_path)) == kept


def test_pruning_keeps_the_best_evaluated_checkpoint_and_says_so(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    for step, loss in ((1, 0.5), (2, 0.2), (3, 0.3), (4, 0.4)):
        complete(tmp_path, step, {"global_step": step, "eval_loss": loss})
    complete(tmp_path, 5)  # not evaluated
    (tmp_path / "step0").mkdir()  # incomplete: never removed
    checkpoints.prune(str(tmp_path), 2)
    assert steps(checkpoints.list_checkpoints(tmp_path)) == [2, 4, 5] and (tmp_path / "step0").is_dir()
    assert messages(caplog, logging.INFO) == [
        f"removing old checkpoint {tmp_path / 'step1'} (--checkpoints_total_limit 2)",
        f"keeping {tmp_path / 'step2'} beyond --checkpoints_total_limit: it has the best evaluation loss",
        f"removing old checkpoint {tmp_path / 'step3'} (--checkpoints_total_limit 2)",
    ]


def test_pruning_within_the_limit_removes_nothing(tmp_path):
    for step in (1, 2):
        complete(tmp_path, step)
    checkpoints.prune(tmp_path, 5)
    assert steps(checkpoints.list_checkpoints(tmp_path)) == [1, 2]


# --- optimizer and scheduler state ---


class Pickled:
    pass


def test_torch_state_round_trips_tensors_and_refuses_arbitrary_objects(tmp_path):
    import torch

    checkpoints.save_torch_state({"step": 3, "t": torch.arange(3)}, tmp_path / "s.pt")
    loaded = checkpoints.load_torch_state(str(tmp_path / "s.pt"))
    assert loaded["step"] == 3 and loaded["t"].tolist() == [0, 1, 2] and loaded["t"].device.type == "cpu"
    torch.save({"object": Pickled()}, tmp_path / "o.pt")
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoints.load_torch_state(tmp_path / "o.pt")


# --- more edges: a failed open, a kill mid-swap, several replaced runs ---


def test_a_write_that_cannot_even_open_raises_the_disk_s_error(tmp_path, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(checkpoints, "open", full, raising=False)
    with pytest.raises(OSError) as failed:
        checkpoints.write_atomic(tmp_path / "a.txt", "a")
    assert failed.value.errno == 28 and list(tmp_path.iterdir()) == []


def test_umask_is_read_from_proc_without_setting_it(tmp_path, monkeypatch):
    before = os.umask(0o022)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("umask set to read it"))
        assert checkpoints.umask() == 0o022
        monkeypatch.undo()
        path = tmp_path / "a.safetensors"
        path.write_bytes(b"x")
        path.chmod(0o600)
        checkpoints.honour_umask(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o644
    finally:
        os.umask(before)


def test_killed_while_swapping_a_saved_step_the_old_one_is_put_back(tmp_path, monkeypatch):
    complete(tmp_path, 2)
    partial = checkpoints.partial_dir(tmp_path, 2)
    checkpoints.begin_checkpoint(partial)
    (partial / "weights.bin").write_bytes(b"new")

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed

    monkeypatch.setattr(checkpoints.shutil, "rmtree", killed)
    with pytest.raises(Killed):
        checkpoints.finish_checkpoint(partial, tmp_path / "step2", {"global_step": 2})
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".stale-step2-{os.getpid()}", "step2"]
    checkpoints.clean_output_dir(tmp_path)  # the new step2 landed: the stale one goes
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step2"]
    assert (tmp_path / "step2" / "weights.bin").read_bytes() == b"new"


def test_a_checkpoint_without_saved_at_counts_as_written_before_any_with_one(tmp_path):
    write_state(tmp_path, 1, "a", 0.5)
    write_state(tmp_path, 2, "z", None)
    assert steps(checkpoints.on_timeline(checkpoints.list_checkpoints(tmp_path))) == [1]


def test_a_newest_run_without_lineage_keeps_only_its_own_checkpoints(tmp_path):
    write_state(tmp_path, 1, "a", 1)
    complete(tmp_path, 2, {"global_step": 2, "run_id": "b", "saved_at": 2})  # no "lineage" key
    assert steps(checkpoints.on_timeline(checkpoints.list_checkpoints(tmp_path))) == [2]


def test_dropping_a_replaced_run_already_gone_is_no_error(tmp_path):
    checkpoints.drop_replaced(tmp_path, ".replaced-1")
    assert list(tmp_path.iterdir()) == []


def test_each_replaced_run_is_settled(tmp_path):
    complete(tmp_path / ".replaced-1", 1)  # replaced by the complete step1 below: goes
    complete(tmp_path / ".replaced-2", 5)  # replaced by nothing complete: back
    complete(tmp_path, 1, {"global_step": 1, "replaces": ".replaced-1"})
    checkpoints.settle_replaced(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step1", "step5"]


@pytest.fixture
def undeletable(monkeypatch):
    """Folders named in the returned set cannot be removed (a permission, a busy network share)."""
    names, real = set(), os.rmdir

    def rmdir(path, *args, **kwargs):
        if os.path.basename(os.fspath(path)) in names:
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(os, "rmdir", rmdir)
    return names


def test_a_leftover_that_cannot_be_removed_does_not_stop_the_start(tmp_path, undeletable):
    undeletable.update({".partial-step6", ".replaced-1"})
    (tmp_path / ".partial-step6").mkdir()
    complete(tmp_path / ".replaced-1", 1)
    checkpoints.clean_output_dir(tmp_path)
    assert steps(checkpoints.list_checkpoints(tmp_path)) == [1]
    checkpoints.settle_replaced(tmp_path)  # (again: the folder it could not remove is empty now)


def test_a_stale_copy_that_cannot_be_removed_does_not_fail_the_save(tmp_path, undeletable):
    undeletable.add(f".stale-step2-{os.getpid()}")
    complete(tmp_path, 2)
    partial = checkpoints.partial_dir(tmp_path, 2)
    checkpoints.begin_checkpoint(partial)
    (partial / "weights.bin").write_bytes(b"new")
    assert checkpoints.finish_checkpoint(partial, tmp_path / "step2", {"global_step": 2}) == tmp_path / "step2"
    assert (tmp_path / "step2" / "weights.bin").read_bytes() == b"new"


def test_optimizer_state_loads_weights_only_even_when_the_environment_asks_otherwise(tmp_path, monkeypatch):
    import torch

    torch.save({"object": Pickled()}, tmp_path / "o.pt")
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # overrides only a torch.load without weights_only
    with pytest.raises(Exception, match="Weights only load failed"):
        checkpoints.load_torch_state(tmp_path / "o.pt")


def test_a_state_file_holding_a_list_is_no_run_s_state(tmp_path):
    write_state(tmp_path, 1, "a", 1)
    (tmp_path / "step2").mkdir()
    (tmp_path / "step2" / "training_state.json").write_text("[1]")
    write_state(tmp_path, 3, "a", 3)
    assert steps(checkpoints.on_timeline(checkpoints.list_checkpoints(tmp_path))) == [1, 2, 3]
    complete(tmp_path / ".replaced-1", 9)
    checkpoints.settle_replaced(tmp_path)  # the list is not read as naming the replaced run: step9 is back
    assert steps(checkpoints.list_checkpoints(tmp_path)) == [1, 2, 3, 9]


def test_state_saved_on_a_gpu_loads_onto_the_cpu(tmp_path):
    """An optimizer state written by a run on a GPU (its storages tagged "cuda:0") resumes on any machine."""
    import io
    import zipfile

    import torch

    saved = io.BytesIO()
    torch.save({"exp_avg": torch.arange(3.0)}, saved)
    with zipfile.ZipFile(saved) as source, zipfile.ZipFile(tmp_path / "gpu.pt", "w") as written:
        for info in source.infolist():
            data = source.read(info.filename)
            if info.filename.endswith("/data.pkl"):  # the storage's location, a pickled str: "cpu" -> "cuda:0"
                assert data.count(b"X\x03\x00\x00\x00cpu") == 1
                data = data.replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
            written.writestr(info, data)
    loaded = checkpoints.load_torch_state(tmp_path / "gpu.pt")
    assert loaded["exp_avg"].device.type == "cpu" and loaded["exp_avg"].tolist() == [0.0, 1.0, 2.0]

"""Checkpoint directories: atomic writes, finding the latest complete one, pruning old ones.

A checkpoint is OUTPUT_DIR/step<N>/. It is written under a temporary name and renamed
into place only once complete (its training_state.json is written last), so a process
killed mid-save never leaves a directory that "latest" would pick.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from pathlib import Path

from difftune.cli.errors import UserError
from difftune.storage import integrity

logger = logging.getLogger(__name__)

STATE_FILE = "training_state.json"
ARGS_FILE = "args.json"
OPTIMIZER_FILE = "optimizer.pt"
SCHEDULER_FILE = "lr_scheduler.pt"
CHECKPOINT_NAME = re.compile(r"^step(\d+)$")


def checkpoint_dir(output_dir: Path, step: int) -> Path:
    return Path(output_dir) / f"step{step}"


def is_complete(path: Path) -> bool:
    return (path / STATE_FILE).is_file()


def list_checkpoints(output_dir: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints in `output_dir`, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = []
    for path in output_dir.iterdir():
        match = CHECKPOINT_NAME.match(path.name)
        if match and path.is_dir() and is_complete(path):
            found.append((int(match.group(1)), path))
    return sorted(found)


def resolve_resume(output_dir: Path, resume_from: str | None) -> Path | None:
    """The checkpoint to resume from: None, "latest" (None when there is none yet), or a path."""
    if resume_from is None:
        return None
    if resume_from == "latest":
        integrity.warn_unfinished(output_dir, STATE_FILE)
        found = list_checkpoints(output_dir)
        if not found:
            logger.warning("--resume_from_checkpoint latest: no checkpoint in %s yet, starting a new run", output_dir)
            return None
        return integrity.newest_sound(on_timeline(found))
    path = Path(resume_from)
    if not path.is_dir() and (Path(output_dir) / resume_from).is_dir():
        path = Path(output_dir) / resume_from
    if not path.is_dir():
        raise UserError(f"--resume_from_checkpoint {resume_from} does not exist: pass a step<N> dir or 'latest'")
    if not is_complete(path):
        raise UserError(f"--resume_from_checkpoint {resume_from} is incomplete (no {STATE_FILE}): pick another one")
    integrity.check_checkpoint(path, "--resume_from_checkpoint")
    return path


def lineage(checkpoint_state: dict) -> list[dict]:
    """The timeline a run resumed from this checkpoint continues: the runs before it, each with the step where
    the next one branched off ({"run_id", "step"}), this checkpoint's run last."""
    if "run_id" not in checkpoint_state:
        return []
    here = {"run_id": checkpoint_state["run_id"], "step": checkpoint_state["global_step"]}
    return [*checkpoint_state.get("lineage", []), here]


def _state_or_none(path: Path) -> dict | None:
    try:
        state = read_json(path / STATE_FILE)
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def on_timeline(found: list[tuple[int, Path]]) -> list[tuple[int, Path]]:
    """Of the checkpoints `found` (oldest first), those on the timeline of the newest one written: its run's,
    and its ancestors' up to the step where each was resumed from. A resume by path from an older step leaves
    the old run's later checkpoints behind on an abandoned branch: they are left aside, with a warning.
    Checkpoints without lineage (written before it was recorded) or with an unreadable state stay on it."""
    states = {path: _state_or_none(path) for _, path in found}
    known = [(state.get("saved_at", 0), path) for path, state in states.items() if state and "run_id" in state]
    if not known:
        return found
    newest = states[max(known, key=lambda item: item[0])[1]]
    until = {entry["run_id"]: entry["step"] for entry in newest.get("lineage", [])}
    kept, aside = [], []
    for step, path in found:
        state = states[path]
        run = state.get("run_id") if state else None
        if run is None or run == newest["run_id"] or (run in until and step <= until[run]):
            kept.append((step, path))
        else:
            aside.append(path.name)
    if aside:
        logger.warning(
            "--resume_from_checkpoint latest: leaving aside %s, on an abandoned branch (a later run resumed from "
            "an earlier step); continuing the timeline of the newest checkpoint written. Name one by path to "
            "continue that branch instead",
            ", ".join(aside),
        )
    return kept


REPLACED = ".replaced-"  # OUTPUT_DIR/.replaced-<time>/: the run --overwrite_output_dir replaces, until it is


def replaced_dirs(output_dir: Path) -> list[Path]:
    output_dir = Path(output_dir)
    return sorted(p for p in output_dir.iterdir() if p.name.startswith(REPLACED)) if output_dir.is_dir() else []


def move_old_run_aside(output_dir: Path) -> str | None:
    """--overwrite_output_dir, at the new run's first save: the old run's checkpoints are renamed into
    OUTPUT_DIR/.replaced-<time>/ (not deleted: that waits until the new run's first checkpoint is complete);
    returns that folder's name, recorded in the new checkpoint (None: there was nothing to replace)."""
    output_dir = Path(output_dir)
    found = output_dir.iterdir() if output_dir.is_dir() else []
    old = [p for p in found if CHECKPOINT_NAME.match(p.name) and p.is_dir()]
    if not old:
        return None
    aside = output_dir / f"{REPLACED}{time.time_ns()}"
    aside.mkdir()
    for path in old:
        path.rename(aside / path.name)
    _fsync_dir(output_dir)
    logger.info("--overwrite_output_dir: the old run's checkpoints are set aside in %s until step one is saved", aside)
    return aside.name


def drop_replaced(output_dir: Path, name: str) -> None:
    """The new run's first checkpoint is complete: the run it replaces goes."""
    logger.info("--overwrite_output_dir: removing the replaced run's checkpoints (%s)", name)
    shutil.rmtree(Path(output_dir) / name, ignore_errors=True)


def settle_replaced(output_dir: Path) -> None:
    """At start, after a run with --overwrite_output_dir was stopped: when its first checkpoint (which names
    the folder it replaced) is complete, the replaced run goes; otherwise that run is put back as it was."""
    output_dir = Path(output_dir)
    for aside in replaced_dirs(output_dir):
        done = any(
            (state := _state_or_none(path)) is not None and state.get("replaces") == aside.name
            for _, path in list_checkpoints(output_dir)
        )
        if done:
            drop_replaced(output_dir, aside.name)
            continue
        for path in sorted(aside.iterdir()):
            if CHECKPOINT_NAME.match(path.name) and not (output_dir / path.name).exists():
                path.rename(output_dir / path.name)
        _fsync_dir(output_dir)
        back = [path.name for _, path in list_checkpoints(output_dir)]
        logger.warning(
            "a run with --overwrite_output_dir in %s stopped before its first checkpoint was complete: "
            "the run it was replacing is back in place (%s)",
            output_dir,
            ", ".join(back) or "no checkpoints",
        )
        shutil.rmtree(aside, ignore_errors=True)


def check_output_dir(output_dir: Path, resume_from: str | None, overwrite: bool) -> None:
    """Refuse to start a fresh run over another run's checkpoints (unless resuming or overwriting)."""
    found = list_checkpoints(output_dir) or [c for aside in replaced_dirs(output_dir) for c in list_checkpoints(aside)]
    if found and resume_from is None and not overwrite:
        raise UserError(
            f"--output_dir {output_dir} holds another run's checkpoints ({found[-1][1].name} ...): "
            "pass --resume_from_checkpoint latest to continue it, --overwrite_output_dir to replace it, "
            "or another --output_dir"
        )


def clean_output_dir(output_dir: Path) -> None:
    """Tidy up after a killed save: drop partial checkpoints, put back a complete one that was being
    replaced, and settle a run that --overwrite_output_dir was replacing (settle_replaced)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return
    for path in sorted(output_dir.iterdir()):
        if not path.is_dir():
            continue
        stale = re.match(r"^\.stale-step(\d+)-\d+$", path.name)
        if stale and is_complete(path) and not checkpoint_dir(output_dir, int(stale.group(1))).exists():
            path.rename(checkpoint_dir(output_dir, int(stale.group(1))))
            continue
        if path.name.startswith((".partial-step", ".stale-step")):
            logger.info("removing %s", path)
            shutil.rmtree(path, ignore_errors=True)
    settle_replaced(output_dir)  # (after the partial checkpoints went: only a complete one counts)


def read_json(path: Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: Path, data: dict) -> None:
    write_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def write_atomic(path: Path, content: str | bytes) -> None:
    """Write a file whole or not at all: a temporary file beside it, synced, renamed over it (a kill or a full
    disk leaves the former file, or none, never a truncated one). The file gets the mode open() gives."""
    path = Path(path)
    partial = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        with open(partial, "wb") as handle:
            handle.write(content.encode() if isinstance(content, str) else content)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def commit_file(partial: Path, path: Path) -> None:
    """A file written whole under a temporary name (by safetensors, torch): synced, then renamed to `path`."""
    with open(partial, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, path)
    _fsync_dir(Path(path).parent)


def _fsync_dir(directory: Path | str) -> None:
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _fsync_tree(directory: Path) -> None:
    """Files and folder entries on disk before the checkpoint is renamed into place."""
    for root, _, files in os.walk(directory):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def partial_dir(output_dir: Path, step: int) -> Path:
    """Where the checkpoint for `step` is written before it is renamed into place (one name for all processes)."""
    return Path(output_dir) / f".partial-step{step}"


def begin_checkpoint(partial: Path) -> None:
    """An empty temporary dir for a checkpoint (left over from a killed save: removed first)."""
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)


def umask() -> int:
    """The process's umask, read where Linux shows it (setting it to read it would briefly change it for
    every thread), else set and put back."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    current = os.umask(0o022)
    os.umask(current)
    return current


def honour_umask(path: Path) -> None:
    """Give the file `path` (or every file under the folder `path`) the mode open() gives a new file.
    safetensors writes through a private temporary file, so its files (ours, peft's, diffusers') come out
    0600 whatever the umask, unreadable to the group that reads the other files of a checkpoint."""
    path = Path(path)
    mode = 0o666 & ~umask()
    for file in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        if file.stat().st_mode & 0o777 != mode:
            file.chmod(mode)


def finish_checkpoint(partial: Path, final: Path, state: dict, total_limit: int | None = None) -> Path:
    """Mark `partial` complete, sync it to disk, rename it to `final` atomically, then prune to `total_limit`."""
    output_dir = final.parent
    honour_umask(partial)
    write_json(partial / STATE_FILE, state)
    integrity.write_manifest(partial)  # last: it covers every file above
    _fsync_tree(partial)
    if final.exists():
        # A resumed run reaching the same step again: swap the old one out before the rename.
        stale = output_dir / f".stale-{final.name}-{os.getpid()}"
        final.rename(stale)
        partial.rename(final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        partial.rename(final)
    _fsync_dir(output_dir)  # the rename itself; the files were synced above
    if total_limit is not None:
        prune(output_dir, total_limit)
    return final


def prune(output_dir: Path, total_limit: int) -> None:
    """Delete the oldest complete checkpoints beyond `total_limit` (never incomplete ones, nor the one with
    the best held-out loss)."""
    found = list_checkpoints(output_dir)
    evaluated = [
        (state["eval_loss"], path)
        for _, path in found
        if "eval_loss" in (state := integrity.read_state(path / STATE_FILE))
    ]
    best = min(evaluated)[1] if evaluated else None
    for _, path in found[: max(0, len(found) - total_limit)]:
        if path == best:
            logger.info("keeping %s beyond --checkpoints_total_limit: it has the best evaluation loss", path)
            continue
        logger.info("removing old checkpoint %s (--checkpoints_total_limit %d)", path, total_limit)
        shutil.rmtree(path)


def save_torch_state(obj: object, path: Path) -> None:
    import torch  # (here, not at the top: the scripts import this module before --help, which needs no torch)

    torch.save(obj, path)


def load_torch_state(path: Path) -> dict:
    """Optimizer / scheduler state: tensors and plain values only (weights_only=True)."""
    import torch

    return torch.load(path, map_location="cpu", weights_only=True)

"""One run per output folder, one builder per cache folder: advisory OS locks (fcntl.flock).

The lock belongs to an open file: the OS drops it when the process exits or is killed, so a
SIGKILLed run leaves nothing stale behind (the lock file itself stays, unlocked). The holder
writes its host and pid into the file so that a refused run can name it.
"""

from __future__ import annotations

import fcntl
import logging
import os
import socket
from contextlib import contextmanager
from pathlib import Path

from difftune.cli.errors import UserError, on_exit

logger = logging.getLogger(__name__)

RUN_LOCK = ".difftune.lock"
BUILD_LOCK = ".building.lock"  # inside a cache folder
_held: dict[Path, int] = {}  # output dir -> the descriptor holding its lock (kept open until exit)


def _holder(descriptor: int) -> str:
    os.lseek(descriptor, 0, os.SEEK_SET)
    text = os.read(descriptor, 200).decode(errors="replace").split()
    return f"host {text[0]}, pid {text[1]}" if len(text) >= 2 else "a process that has not written its name yet"


def _open(path: Path) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)


def _sign(descriptor: int) -> None:
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, f"{socket.gethostname()} {os.getpid()}\n".encode(), 0)


def hold_output_dir(output_dir: Path) -> None:
    """Lock `output_dir` for this process until it exits (or `release_all`); refuse if another run has it."""
    output_dir = Path(output_dir).resolve()
    if output_dir in _held:
        return
    descriptor = _open(output_dir / RUN_LOCK)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _holder(descriptor)
        os.close(descriptor)
        raise UserError(
            f"--output_dir {output_dir} is in use by another run ({holder}): "
            "wait for it to finish, stop it, or pick another --output_dir"
        ) from None
    except OSError as error:  # a file system without flock (Lustre mounted noflock, some FUSE ones)
        os.close(descriptor)
        logger.warning("cannot lock %s (%s): a second run on this folder will not be detected", output_dir, error)
        return
    _sign(descriptor)
    _held[output_dir] = descriptor
    on_exit(release_all)


def release_all() -> None:
    """Drop the output-dir locks this process holds (exiting does it too; for runs inside one process)."""
    while _held:
        _, descriptor = _held.popitem()
        os.close(descriptor)


@contextmanager
def building(path: Path, enabled: bool = True):
    """Hold the builder's lock of the cache folder `path` (waiting while another run builds it)."""
    if not enabled:
        yield
        return
    descriptor = _open(path / BUILD_LOCK)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
            _sign(descriptor)
        except BlockingIOError:
            logger.warning("%s is being built by another run (%s): waiting for it", path, _holder(descriptor))
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            _sign(descriptor)
        except OSError as error:  # no flock on this file system: build without the lock
            logger.warning("cannot lock %s (%s): two runs may build it at once", path, error)
        yield
    finally:
        os.close(descriptor)

"""Shared fixtures: tiny assets built once per session, offline Hub, in-process script runs."""

from __future__ import annotations

import importlib.util
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

# Set before anything imports huggingface_hub: no test may touch the network or the user's cache.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_HOME"] = tempfile.mkdtemp(prefix="difftune-hf-")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):  # `make test` runs two workers on two cores: one thread each
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "scripts"


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> Path:
    """Tiny models and toy data, made by the project's own script once per test run, shared by pytest-xdist's
    workers (or, for tools/mutation_check.py, made once by it and named in DIFFTUNE_TEST_ASSETS)."""
    if os.environ.get("DIFFTUNE_TEST_ASSETS"):
        return Path(os.environ["DIFFTUNE_TEST_ASSETS"])
    from filelock import FileLock

    shared = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        shared = shared.parent  # the run's directory above each worker's own
    out = shared / "assets"
    with FileLock(str(shared / "assets.lock")):
        if not (out / ".done").is_file():
            command = [sys.executable, str(SCRIPTS / "make_tiny_assets.py"), str(out)]
            subprocess.run(command, check=True, capture_output=True)
            (out / ".done").touch()
    return out


def free_port() -> int:
    """A TCP port nobody listens on now: parallel test workers must not share the DDP rendezvous port."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def load_script(name: str):
    spec = importlib.util.spec_from_file_location(f"difftune_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState, PartialState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    PartialState._reset_state()


def run_script(name: str, argv: list) -> int:
    """Run a script's main(argv) in this process, as `python scripts/NAME.py ARGS` would (exit code and all)."""
    from difftune.cli.errors import run_cli

    reset_accelerate()
    try:
        run_cli(load_script(name).main, [str(a) for a in argv])
    except SystemExit as exit_:
        return int(exit_.code or 0)
    finally:
        reset_accelerate()
    return 0


@pytest.fixture
def run_main():
    return run_script


def launch_command(
    script: str, args: list, *, processes: int = 1, mixed_precision: str = "no", config_file: Path | None = None
) -> tuple[list[str], dict]:
    """The `accelerate launch` command line (quiet: our one-line errors are the only output) and its environment."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--quiet"]
    env = dict(os.environ)
    if processes > 1:
        command += ["--main_process_port", str(free_port())]
    if config_file is not None:
        command += ["--config_file", str(config_file), "--num_processes", str(processes)]
    elif processes > 1:
        # On the CPU, --cpu with several processes silently starts one; this starts them all (gloo DDP).
        env["ACCELERATE_USE_CPU"] = "1"
        command += ["--multi_gpu", "--num_processes", str(processes), "--num_machines", "1"]
    else:
        command += ["--num_processes", "1", "--num_machines", "1"]
    command += ["--mixed_precision", mixed_precision, "--dynamo_backend", "no", str(SCRIPTS / f"{script}.py")]
    return command + [str(a) for a in args], env


def launch(script: str, args: list, *, timeout: int = 600, **how):
    """`accelerate launch` a script in a subprocess and wait for it (`how`: as for launch_command)."""
    command, env = launch_command(script, args, **how)
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout, cwd=ROOT)

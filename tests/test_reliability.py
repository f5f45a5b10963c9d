"""Reliability: exact resume, kill-safe checkpoints, signals, non-finite loss, output dir reuse, DDP."""

import json
import logging
import os
import random
import re
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from conftest import SCRIPTS, launch
from helpers import (
    Killed,
    adapter_weights,
    max_difference,
    resumed_copy,
    sdxl_args,
    spy_on_training,
    wuerstchen_args,
)

from difftune.adapters import ema
from difftune.storage import checkpoints

# Everything random at once: random crops, flips, accumulation, warm-up + cosine, LoKr rank and module dropout.
SDXL_EXTRA = (
    "--random_flip", "--gradient_accumulation_steps", "2", "--lr_scheduler", "cosine", "--lr_warmup_steps", "2",
    "--rank_dropout", "0.2", "--module_dropout", "0.2", "--noise_offset", "0.05", "--snr_gamma", "5.0",
)  # fmt: skip
# Every objective option that draws at random, at once (SDXL and Wuerstchen take turns on the rest).
OBJECTIVE_EXTRA = (
    "--input_perturbation", "0.1", "--multires_noise_iterations", "3", "--proportion_empty_prompts", "0.3",
)  # fmt: skip


@pytest.mark.parametrize("family", ["sdxl", "wuerstchen"])
def test_resume_equals_uninterrupted_run(assets, tmp_path, run_main, family):
    if family == "sdxl":
        script, make = "train_sdxl_lokr", sdxl_args
        extra = (*SDXL_EXTRA, *OBJECTIVE_EXTRA, "--train_text_encoder", "--timestep_bias_strategy", "later")
        extra += ("--timestep_bias_multiplier", "3", "--loss_type", "huber", "--debiased_estimation")
    else:
        script, make = "train_wuerstchen_lora", wuerstchen_args
        extra = ("--random_flip", "--gradient_accumulation_steps", "2", "--lora_dropout", "0.2", "--train_text_encoder")
        extra += (*OBJECTIVE_EXTRA, "--timestep_sampling", "cubic", "--loss_type", "smooth_l1", "--snr_gamma", "5")
    full = tmp_path / "full"
    assert run_main(script, make(assets, full, *extra, "--checkpointing_steps", "3", steps=8)) == 0
    # Resume from step 3 (mid-epoch) by path, and from step 6 as "latest" in a dir holding only it.
    by_path = tmp_path / "by_path"
    argv = make(assets, by_path, *extra, "--resume_from_checkpoint", full / "step3", steps=8)
    assert run_main(script, argv) == 0
    latest = tmp_path / "latest"
    resumed_copy(full / "step6", latest)
    assert run_main(script, make(assets, latest, *extra, "--resume_from_checkpoint", "latest", steps=8)) == 0
    reference = adapter_weights(full / "step8")
    assert max_difference(adapter_weights(by_path / "step8"), reference) <= 1e-6
    assert max_difference(adapter_weights(latest / "step8"), reference) <= 1e-6
    assert max_difference(adapter_weights(full / "step3"), reference) > 1e-4  # the weights did move


def test_output_dir_with_another_run_is_refused(assets, tmp_path, run_main, capsys):
    out = tmp_path / "out"
    assert run_main("train_sdxl_lokr", sdxl_args(assets, out, steps=2)) == 0
    assert run_main("train_sdxl_lokr", sdxl_args(assets, out, steps=2)) == 2
    assert "holds another run's checkpoints" in capsys.readouterr().err
    assert (out / "step2").is_dir()  # untouched
    assert run_main("train_sdxl_lokr", sdxl_args(assets, out, "--resume_from_checkpoint", "latest", steps=4)) == 0
    assert checkpoints.list_checkpoints(out)[-1][0] == 4
    assert run_main("train_sdxl_lokr", sdxl_args(assets, out, "--overwrite_output_dir", steps=2)) == 0
    assert [step for step, _ in checkpoints.list_checkpoints(out)] == [2]


@pytest.fixture
def one_process_deepspeed(monkeypatch):
    """This process as a one-process DeepSpeed ZeRO-2 launch (the environment `accelerate launch` would set)."""
    pytest.importorskip("deepspeed")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launch_env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "2", "LOCAL_RANK": "0"}
    launch_env |= {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1"}
    for name, value in {**launch_env, "MASTER_PORT": str(port)}.items():
        monkeypatch.setenv(name, value)
    yield
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    import deepspeed.comm.comm

    deepspeed.comm.comm.cdb = None  # else a later DeepSpeed engine in this process reuses the destroyed group


@pytest.mark.parametrize("distributed", ["none", "deepspeed"])
def test_nonfinite_loss_stops_with_the_step_and_keeps_good_checkpoints(
    assets, tmp_path, run_main, capsys, monkeypatch, request, distributed
):
    if distributed == "deepspeed":
        request.getfixturevalue("one_process_deepspeed")  # DeepSpeed skips the update itself
    calls = []

    def nan_at_steps_3_and_5(compute_loss):
        def poisoned(batch, models):
            calls.append(1)
            loss = compute_loss(batch, models)
            return loss * float("nan") if len(calls) in (3, 5) else loss

        return poisoned

    spy_on_training(monkeypatch.setattr, wrap_loss=nan_at_steps_3_and_5)
    out = tmp_path / "out"
    argv = sdxl_args(assets, out, "--max_nonfinite_steps", "1", "--use_ema", steps=8)
    assert run_main("train_sdxl_lokr", argv) == 2
    error = capsys.readouterr().err
    assert "the loss is nan at step 5" in error and "last good checkpoint" in error and "step4" in error
    assert [step for step, _ in checkpoints.list_checkpoints(out)] == [2, 4]
    weights = adapter_weights(out / "step4")
    assert all(torch.isfinite(v).all() for v in weights.values())  # the skipped step 3 did not poison them
    # The EMA stepped with the optimizer only (steps 1, 2 and 4): its decay schedule did not count step 3.
    assert checkpoints.load_torch_state(out / "step4" / ema.EMA_FILE)["optimization_step"] == 3


def start(argv, log):
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "train_sdxl_lokr.py"), *map(str, argv)],
        stdout=subprocess.DEVNULL,
        stderr=log,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for_training(process, log_path, timeout=120, started=re.compile("training:")) -> None:
    """Until the log shows `started` (the run's summary line; the stop handler is installed a moment later)."""
    deadline = time.monotonic() + timeout
    while not started.search(log_path.read_text()):
        assert process.poll() is None, log_path.read_text()[-2000:]
        assert time.monotonic() < deadline, "training did not start"
        time.sleep(0.05)


def assert_checkpoints_sound(out) -> None:
    """Every step<N> that exists is complete and loads; nothing partial is visible to `latest`."""
    for path in out.glob("step*"):
        assert checkpoints.is_complete(path), path
        adapter_weights(path)
        checkpoints.load_torch_state(path / checkpoints.OPTIMIZER_FILE)
        checkpoints.load_torch_state(path / ema.EMA_FILE)
        json.loads((path / checkpoints.STATE_FILE).read_text())


def kill_test_args(assets, out, *extra, checkpointing_steps: int = 1) -> list[str]:
    """16 steps with everything random, a checkpoint every step, the 3 newest kept, an EMA of the weights."""
    return sdxl_args(
        assets, out, *SDXL_EXTRA, "--checkpoints_total_limit", "3", "--use_ema", "--ema_decay", "0.9", *extra,
        steps=16, checkpointing_steps=checkpointing_steps,
    )  # fmt: skip


def run_to_end(argv) -> None:
    subprocess.run(
        [sys.executable, str(SCRIPTS / "train_sdxl_lokr.py"), *map(str, argv)], check=True, capture_output=True
    )


@pytest.fixture(scope="module")
def kill_reference(assets, tmp_path_factory):
    """The adapter weights of an uninterrupted run, and their EMA."""
    out = tmp_path_factory.mktemp("reference") / "run"
    run_to_end(kill_test_args(assets, out))
    return adapter_weights(out / "step16"), adapter_weights(out / "step16/ema")


@pytest.mark.slow
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sigkill_at_random_moments_then_resume(kill_reference, assets, tmp_path, seed):
    out = tmp_path / "run"
    argv = kill_test_args(assets, out, "--resume_from_checkpoint", "latest")
    rng = random.Random(seed)
    kills, during_save = 0, 0
    for attempt in range(40):
        log_path = tmp_path / f"log{attempt}.txt"
        with log_path.open("w") as log:
            process = start(argv, log)
            wait_for_training(process, log_path)
            if kills >= 4:
                assert process.wait(timeout=300) == 0, log_path.read_text()[-2000:]
                break
            if rng.random() < 0.5:
                deadline = time.monotonic() + 3  # aim at a save: kill while a partial checkpoint exists
                while not list(out.glob(".partial-step*")) and process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.001)
                during_save += bool(list(out.glob(".partial-step*")))
            else:
                time.sleep(rng.uniform(0.0, 1.0))
            if process.poll() is not None:
                break
            process.send_signal(signal.SIGKILL)
            process.wait()
            kills += 1
        assert_checkpoints_sound(out)
    assert checkpoints.list_checkpoints(out)[-1][0] == 16
    assert len(checkpoints.list_checkpoints(out)) <= 3  # --checkpoints_total_limit
    difference = max_difference(adapter_weights(out / "step16"), kill_reference[0])
    difference = max(difference, max_difference(adapter_weights(out / "step16/ema"), kill_reference[1]))
    print(
        f"seed {seed}: {kills} kills ({during_save} during a save), {kills} resumes, "
        f"max weight (and EMA) difference {difference:.3g}"
    )
    assert kills >= 1 and difference <= 1e-6


@pytest.mark.slow
def test_sigterm_finishes_the_step_saves_and_resumes(kill_reference, assets, tmp_path):
    out = tmp_path / "run"
    argv = kill_test_args(assets, out, checkpointing_steps=100)  # checkpoints only at the stop and the end
    log_path = tmp_path / "log.txt"
    with log_path.open("w") as log:
        process = start(argv, log)
        wait_for_training(process, log_path, started=re.compile(r"train: .* [1-9][0-9]*/16 \["))  # a step done
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=120) == 128 + signal.SIGTERM
    assert "stopped by SIGTERM" in log_path.read_text()
    saved = checkpoints.list_checkpoints(out)
    assert len(saved) == 1 and 0 < saved[0][0] < 16
    run_to_end([*argv, "--resume_from_checkpoint", "latest"])
    assert max_difference(adapter_weights(out / "step16"), kill_reference[0]) <= 1e-6
    assert max_difference(adapter_weights(out / "step16/ema"), kill_reference[1]) <= 1e-6


@pytest.mark.slow
def test_two_process_ddp_trains_and_resumes_exactly_with_ema(assets, tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    ema = ("--use_ema", "--ema_decay", "0.9", "--validation_split", "0.2", *OBJECTIVE_EXTRA)
    args = sdxl_args(assets, full, "--random_flip", "--train_text_encoder", *ema, steps=4)
    proc = launch("train_sdxl_lokr", args, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("saved checkpoint") == 2  # steps 2 and 4, written once each (by the main process)
    assert json.loads((full / "step4" / checkpoints.STATE_FILE).read_text())["num_processes"] == 2
    # Training moves the weights (DDP once gave the parameters gradients of its own, so none moved).
    assert max_difference(adapter_weights(full / "step2"), adapter_weights(full / "step4")) > 1e-3
    resumed_copy(full / "step2", resumed)
    args = sdxl_args(
        assets, resumed, "--random_flip", "--train_text_encoder", *ema, "--resume_from_checkpoint", "latest", steps=4
    )
    proc = launch("train_sdxl_lokr", args, processes=2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert max_difference(adapter_weights(resumed / "step4"), adapter_weights(full / "step4")) <= 1e-6
    assert max_difference(adapter_weights(resumed / "step4/ema"), adapter_weights(full / "step4/ema")) <= 1e-6
    assert not list(resumed.glob(".partial-*"))
    states = [json.loads((run / "step4" / checkpoints.STATE_FILE).read_text()) for run in (full, resumed)]
    assert abs(states[0]["eval_loss_ema"] - states[1]["eval_loss_ema"]) <= 1e-6


def test_same_seed_same_weights_whatever_ran_before(assets, tmp_path, run_main):
    first, second = tmp_path / "a", tmp_path / "b"
    assert run_main("train_sdxl_lokr", sdxl_args(assets, first, "--rank_dropout", "0.2", steps=2)) == 0
    torch.manual_seed(12345)  # a different global RNG state, as in a new process
    torch.randn(7)
    assert run_main("train_sdxl_lokr", sdxl_args(assets, second, "--rank_dropout", "0.2", steps=2)) == 0
    assert max_difference(adapter_weights(first / "step2"), adapter_weights(second / "step2")) == 0


def test_latest_is_the_highest_complete_step(tmp_path):
    for step in (2, 10, 9):
        checkpoints.checkpoint_dir(tmp_path, step).mkdir()
        (checkpoints.checkpoint_dir(tmp_path, step) / checkpoints.STATE_FILE).write_text("{}")
    (tmp_path / "step11").mkdir()  # killed before its state file: incomplete
    (tmp_path / ".partial-step12").mkdir()
    assert [step for step, _ in checkpoints.list_checkpoints(tmp_path)] == [2, 9, 10]
    assert checkpoints.resolve_resume(tmp_path, "latest") == tmp_path / "step10"


def test_every_micro_batch_draws_its_own_noise():
    from difftune.train import loop

    # The global RNG is re-seeded per (seed, step, micro-batch, process): all distinct, so no two draw alike.
    seeds = {loop.micro_batch_seed(0, s, m, p) for s in range(50) for m in range(2) for p in range(2)}
    assert len(seeds) == 200 and loop.micro_batch_seed(1, 0, 0, 0) not in seeds


def write_state(output_dir, step: int, run_id: str, saved_at: float, lineage=()) -> None:
    path = checkpoints.checkpoint_dir(output_dir, step)
    path.mkdir(exist_ok=True)
    state = {"global_step": step, "run_id": run_id, "saved_at": saved_at, "lineage": list(lineage)}
    (path / checkpoints.STATE_FILE).write_text(json.dumps(state))


def test_latest_follows_the_newest_checkpoint_s_timeline(tmp_path, caplog):
    for step in (1, 2, 3, 4):
        write_state(tmp_path, step, "a", saved_at=step)
    write_state(tmp_path, 3, "b", saved_at=10, lineage=[{"run_id": "a", "step": 2}])  # resumed by path from step2
    assert checkpoints.resolve_resume(tmp_path, "latest") == tmp_path / "step3"
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert "leaving aside step4, on an abandoned branch" in warning
    # The newest run's lineage reaches back through every run it continues.
    write_state(tmp_path, 5, "c", saved_at=11, lineage=[{"run_id": "a", "step": 2}, {"run_id": "b", "step": 3}])
    timeline = checkpoints.on_timeline(checkpoints.list_checkpoints(tmp_path))
    assert [step for step, _ in timeline] == [1, 2, 3, 5]


def test_latest_does_not_continue_an_abandoned_timeline(assets, tmp_path, run_main, monkeypatch, caplog):
    """Issue 35's repro: resume by path from step2 while the old step3 and step4 exist, get killed after the
    new step3: `latest` continues the new step3, not the old step4."""
    out = tmp_path / "out"
    assert run_main("train_sdxl_lokr", sdxl_args(assets, out, steps=4, checkpointing_steps=1)) == 0
    old_step4 = adapter_weights(out / "step4")
    finish = checkpoints.finish_checkpoint

    def killed_after_step3(partial, final, *rest, **kw):
        finish(partial, final, *rest, **kw)
        if final.name == "step3":
            raise Killed

    monkeypatch.setattr(checkpoints, "finish_checkpoint", killed_after_step3)
    branch = ("--learning_rate", "3e-3")  # the new timeline trains differently from step 2 on
    args = sdxl_args(assets, out, "--resume_from_checkpoint", out / "step2", *branch, steps=4, checkpointing_steps=1)
    with pytest.raises(Killed):
        run_main("train_sdxl_lokr", args)
    monkeypatch.setattr(checkpoints, "finish_checkpoint", finish)
    state = checkpoints.read_json(out / "step3" / checkpoints.STATE_FILE)
    assert state["resumed_from"] == 2 and [e["step"] for e in state["lineage"]] == [2]
    caplog.clear()
    latest = sdxl_args(assets, out, "--resume_from_checkpoint", "latest", *branch, steps=4, checkpointing_steps=1)
    assert run_main("train_sdxl_lokr", latest) == 0
    messages = [r.getMessage() for r in caplog.records]
    assert any("leaving aside step4, on an abandoned branch" in m for m in messages)
    final = checkpoints.read_json(out / "step4" / checkpoints.STATE_FILE)
    assert final["resumed_from"] == 3
    assert final["lineage"] == [*state["lineage"], {"run_id": state["run_id"], "step": 3}]
    assert max_difference(adapter_weights(out / "step4"), old_step4) > 1e-6  # trained anew on the new timeline


def test_overwrite_output_dir_killed_at_any_write_of_its_first_save_never_loses_both_runs(
    assets, tmp_path, run_main, monkeypatch, caplog
):
    """Issue 35: --overwrite_output_dir deleted the old run before the new run's first checkpoint was complete.
    Killed before each file write, rename or removal of the first save, the next start finds the old run
    whole, or the new checkpoint whole (and the old run gone)."""
    import shutil

    from difftune.storage import integrity
    from difftune.train.loop import TrainingRun

    pristine = tmp_path / "old"
    assert run_main("train_sdxl_lokr", sdxl_args(assets, pristine, steps=2, checkpointing_steps=1)) == 0
    old = {step: adapter_weights(path) for step, path in checkpoints.list_checkpoints(pristine)}
    old_run = checkpoints.read_json(pristine / "step1" / checkpoints.STATE_FILE)["run_id"]
    out = tmp_path / "out"
    new_run = sdxl_args(assets, out, "--overwrite_output_dir", "--learning_rate", "3e-3", steps=1)
    writes = {"count": 0, "kill_at": None, "active": False}

    def counted(module, name):
        real = getattr(module, name)

        def write(*args, **kwargs):
            if writes["active"]:
                writes["count"] += 1
                if writes["count"] == writes["kill_at"]:
                    raise Killed
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, write)

    for module, name in ((os, "rename"), (os, "replace"), (shutil, "rmtree"), (checkpoints, "write_json")):
        counted(module, name)
    counted(checkpoints, "save_torch_state")
    real_save = TrainingRun.write_checkpoint

    def first_save(self, step):
        writes["active"] = True
        try:
            return real_save(self, step)
        finally:
            writes["active"] = False

    monkeypatch.setattr(TrainingRun, "write_checkpoint", first_save)
    outcomes = []
    for kill_at in range(1, 100):
        shutil.copytree(pristine, out)
        writes.update(count=0, kill_at=kill_at)
        try:
            assert run_main("train_sdxl_lokr", new_run) == 0
            finished = True
        except Killed:
            finished = False
        writes["kill_at"] = None
        caplog.clear()
        checkpoints.clean_output_dir(out)  # what the next start does first
        found = checkpoints.list_checkpoints(out)
        runs = {checkpoints.read_json(path / checkpoints.STATE_FILE)["run_id"] for _, path in found}
        assert not checkpoints.replaced_dirs(out)
        if runs == {old_run}:
            assert [step for step, _ in found] == [1, 2], kill_at
            assert all(max_difference(adapter_weights(path), old[step]) == 0 for step, path in found), kill_at
            assert any("the run it was replacing is back in place (step1, step2)" in r.getMessage()
                       for r in caplog.records if r.levelno == logging.WARNING), kill_at  # fmt: skip
            outcomes.append("old")
        else:
            assert [step for step, _ in found] == [1] and old_run not in runs, kill_at
            assert integrity.damaged_checkpoint(found[0][1]) is None, kill_at
            outcomes.append("new")
        shutil.rmtree(out)
        if finished:
            break
    assert kill_at > 5 and "old" in outcomes and outcomes[-1] == "new", outcomes

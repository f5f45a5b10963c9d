"""Fast twins of slow tests (issue 36): the same behaviour checked in seconds, in this process, on the tiny
models or on no model at all, so that the fast suite (-m "not slow") guards it too.

- paired class batches resume exactly      <- test_dreambooth.py::test_class_images_are_generated_once_...
- the run lock refuses a second holder     <- test_integrity.py::test_a_second_run_on_the_same_output_dir_...
- the optimizer state re-packed both ways  <- test_resume.py::test_a_one_process_checkpoint_resumes_under_two_...
- a run killed mid-save resumes exactly    <- test_reliability.py::test_sigkill_at_random_moments_then_resume
"""

from __future__ import annotations

import logging
import os
import socket
from types import SimpleNamespace

import pytest
import torch
from helpers import Killed, adapter_weights, max_difference, one_line_error, sdxl_args

from difftune.adapters import ema
from difftune.storage import checkpoints, runlock
from difftune.train import loop
from difftune.train.updates import DataParallelUpdate

# 1. Prior preservation: the batch order of a resumed run ------------------------------------------------------


class PairedData(torch.utils.data.Dataset):
    """What the loop's batching reads of a DreamBooth data set: 14 instance samples, then 5 class samples
    (the class rows come last, as dreambooth.class_rows appends them), in two aspect-ratio buckets."""

    def __init__(self, instances: int = 14, classes: int = 5) -> None:
        self.class_sample = [False] * instances + [True] * classes
        self.target_sizes = [(64, 64) if i % 3 else (64, 96) for i in range(instances + classes)]

    def __len__(self) -> int:
        return len(self.class_sample)

    def __getitem__(self, index: int) -> int:
        return index


def paired_run(num_processes: int = 1, process_index: int = 0) -> SimpleNamespace:
    """A TrainingRun's data only (TrainingRun.build_data), as a new process builds it: a PairedBatchSampler."""
    args = SimpleNamespace(validation_split=0.0, seed=7, train_batch_size=1, dataloader_num_workers=0)
    run = SimpleNamespace(args=args, dataset=PairedData(), accum=1)
    run.accelerator = SimpleNamespace(
        num_processes=num_processes, process_index=process_index, device=torch.device("cpu")
    )
    loop.TrainingRun.build_data(run)
    return run


@pytest.mark.parametrize("num_processes", [1, 2])
def test_paired_class_batches_resume_at_any_batch_as_the_uninterrupted_run_has_them(num_processes):
    """Every batch of a resumed run (a new sampler, set to the resumed epoch and position as the loop sets it)
    is the uninterrupted run's: the same instance samples and the same class samples, across instance and
    class epochs (5 class samples make a class epoch of another length than the instance one)."""
    for process in range(num_processes):
        whole = paired_run(num_processes, process).sampler
        assert type(whole).__name__ == "PairedBatchSampler"
        epochs = 3
        uninterrupted = []
        for epoch in range(epochs):
            whole.set_epoch(epoch)
            uninterrupted += list(whole)
        per_epoch = len(whole)
        assert len(uninterrupted) == epochs * per_epoch
        is_class = PairedData().class_sample
        assert all(not is_class[b[0]] and is_class[b[-1]] for b in uninterrupted)  # instance, then class
        assert len({tuple(b[len(b) // 2 :]) for b in uninterrupted}) > 1  # the class batches do change
        for position in range(1, epochs * per_epoch):
            resumed = paired_run(num_processes, process).sampler
            epoch, start = divmod(position, per_epoch)
            batches = []
            for e in range(epoch, epochs):
                resumed.set_epoch(e, start=start if e == epoch else 0)
                batches += list(resumed)
            assert batches == uninterrupted[position:], f"resumed at batch {position} (process {process})"


# 2. The exclusive run lock ---------------------------------------------------------------------------------


def test_a_second_lock_on_a_held_output_dir_is_refused_with_one_line(assets, tmp_path, run_main, capsys, monkeypatch):
    """In one process: the lock held through one descriptor (as a first run holds it), a run whose attempt
    opens a second descriptor of the lock file (as a second run would) stops with a one-line error before
    anything is touched. flock locks belong to the open file, so two descriptors conflict as two processes do."""
    out = tmp_path / "out"
    runlock.hold_output_dir(out)
    try:
        monkeypatch.setattr(runlock, "_held", {})  # this process forgets the first descriptor: the next run opens one
        assert run_main("train_sdxl_lokr", sdxl_args(assets, out, steps=1)) == 2
        assert one_line_error(capsys) == (
            f"error: --output_dir {out.resolve()} is in use by another run (host {socket.gethostname()}, "
            f"pid {os.getpid()}): wait for it to finish, stop it, or pick another --output_dir"
        )
        assert sorted(p.name for p in out.iterdir()) == [runlock.RUN_LOCK]  # left alone
        with pytest.raises(Exception, match="is in use by another run"):
            runlock.hold_output_dir(out)  # the library call itself, once more
        assert runlock._held == {}
    finally:
        monkeypatch.undo()
        runlock.release_all()
    runlock.hold_output_dir(out)  # released: a new run takes it
    runlock.release_all()


# 3. The optimizer state across a change of the number of processes -----------------------------------------


class Stepper:
    """accelerate's prepared optimizer, as far as DataParallelUpdate uses it."""

    step_was_skipped = False

    def __init__(self, optimizer) -> None:
        self.optimizer = optimizer

    def step(self) -> None:
        self.optimizer.step()

    def zero_grad(self, set_to_none: bool) -> None:
        self.optimizer.zero_grad(set_to_none=set_to_none)


class Launch:
    """An Accelerator of `num_processes` processes as DataParallelUpdate sees it (the main process; the models
    are not wrapped in DDP here, so one process's packed layout and several processes' per-parameter one are
    what the update itself chooses)."""

    is_main_process = True

    def __init__(self, num_processes: int) -> None:
        self.num_processes = num_processes

    def prepare(self, *objects):
        return [*objects[:-1], Stepper(objects[-1])]

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def unscale_gradients(self) -> None:
        pass


OPTIMIZER_ARGS = SimpleNamespace(
    gradient_accumulation_steps=1, max_grad_norm=1.0, optimizer="adamw", learning_rate=0.05, adam_beta1=0.9,
    adam_beta2=0.99, adam_epsilon=1e-8, adam_weight_decay=0.1,
)  # fmt: skip


def small_adapters() -> dict[str, torch.nn.Module]:
    torch.manual_seed(0)
    return {"unet": torch.nn.Linear(3, 4), "text_encoder_one": torch.nn.Linear(2, 2, bias=False)}


def make_update(adapters: dict[str, torch.nn.Module], num_processes: int) -> DataParallelUpdate:
    groups = [
        {"params": list(adapters["unet"].parameters())},
        {"params": list(adapters["text_encoder_one"].parameters()), "lr": 0.02},  # (--text_encoder_lr)
    ]
    return DataParallelUpdate(Launch(num_processes), OPTIMIZER_ARGS, adapters, groups)


def train_steps(update: DataParallelUpdate, adapters: dict[str, torch.nn.Module], steps: range) -> None:
    for step in steps:
        x = torch.linspace(-1, 1, 6).view(2, 3) * (step + 1)
        loss = adapters["unet"](x).pow(2).sum() + adapters["text_encoder_one"](x[:, :2]).sin().sum()
        update.backward(loss, 1)
        assert update.step(True)


def weights(adapters: dict[str, torch.nn.Module]) -> dict[str, torch.Tensor]:
    return {f"{a}/{n}": p.detach().clone() for a, m in adapters.items() for n, p in m.named_parameters()}


@pytest.mark.parametrize(("before", "after"), [(2, 1), (1, 2)], ids=["more-to-fewer", "fewer-to-more"])
def test_optimizer_state_is_repacked_when_the_number_of_processes_changes(tmp_path, caplog, before, after):
    """A checkpoint's optimizer state saved under `before` processes (one process: packed into one flat
    parameter per group; several: per parameter), loaded by DataParallelUpdate under `after`, gives the
    uninterrupted run's next steps: Adam's moments were re-packed, not dropped."""
    uninterrupted = small_adapters()
    update = make_update(uninterrupted, after)
    train_steps(update, uninterrupted, range(5))

    first = small_adapters()
    update = make_update(first, before)
    assert update.layout.flat == (before == 1)
    train_steps(update, first, range(3))
    update.save(tmp_path)  # the checkpoint's optimizer file

    resumed = small_adapters()
    for name, model in resumed.items():
        model.load_state_dict(first[name].state_dict())  # the adapter weights of the checkpoint
    update = make_update(resumed, after)
    assert update.layout.flat == (after == 1)
    with caplog.at_level(logging.WARNING):
        update.load(tmp_path)
    assert not [r for r in caplog.records if "start afresh" in r.getMessage()]
    train_steps(update, resumed, range(3, 5))
    difference = max_difference(weights(resumed), weights(uninterrupted))
    assert difference <= 1e-6, f"{before} -> {after} process(es): the resumed steps differ by {difference:.3g}"


# 4. A run killed mid-epoch, while it saves, resumes exactly ------------------------------------------------

# The SIGKILL test's set-up, shortened: accumulation (an epoch of 9 batches is 5 steps), flips, rank dropout,
# warm-up; a checkpoint every step, the newest 2 kept, an EMA of the weights.
KILL_FLAGS = (
    "--gradient_accumulation_steps", "2", "--random_flip", "--rank_dropout", "0.2", "--lr_warmup_steps", "2",
    "--use_ema", "--ema_decay", "0.9", "--checkpoints_total_limit", "2",
)  # fmt: skip


def test_a_run_killed_while_saving_mid_epoch_resumes_to_the_uninterrupted_weights(
    assets, tmp_path, run_main, monkeypatch
):
    """What the SIGKILL test checks, without a kill: the run stops dead (helpers.Killed: no handler, no clean-up)
    in the middle of writing step 2's checkpoint, mid-epoch; `--resume_from_checkpoint latest` in the same
    folder leaves the half-written one aside, resumes from step 1 (at batch 2 of the epoch's 9) and ends with
    the uninterrupted run's weights and EMA."""

    def args(out, *more) -> list[str]:
        return sdxl_args(assets, out, *KILL_FLAGS, *more, steps=3, checkpointing_steps=1)

    full, killed = tmp_path / "full", tmp_path / "killed"
    assert run_main("train_sdxl_lokr", args(full)) == 0
    real_save = ema.AdapterEMA.save

    def killed_in_step2_s_save(self, directory, save_extra):
        if directory.name == checkpoints.partial_dir(killed, 2).name:
            assert (directory / checkpoints.OPTIMIZER_FILE).is_file()  # part of it is written
            raise Killed
        real_save(self, directory, save_extra)

    monkeypatch.setattr(ema.AdapterEMA, "save", killed_in_step2_s_save)
    with pytest.raises(Killed):
        run_main("train_sdxl_lokr", args(killed, "--resume_from_checkpoint", "latest"))  # (none yet: a new run)
    monkeypatch.undo()
    assert checkpoints.partial_dir(killed, 2).is_dir()
    assert [step for step, _ in checkpoints.list_checkpoints(killed)] == [1]

    assert run_main("train_sdxl_lokr", args(killed, "--resume_from_checkpoint", "latest")) == 0
    assert checkpoints.read_json(killed / "step3" / checkpoints.STATE_FILE)["resumed_from"] == 1
    assert not checkpoints.partial_dir(killed, 2).exists()
    assert [step for step, _ in checkpoints.list_checkpoints(killed)] == [2, 3]
    for sub in ("step3", "step3/ema"):
        assert max_difference(adapter_weights(killed / sub), adapter_weights(full / sub)) <= 1e-6, sub
    assert max_difference(adapter_weights(full / "step2"), adapter_weights(full / "step3")) > 1e-4  # they moved

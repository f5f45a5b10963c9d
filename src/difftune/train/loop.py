"""The training run shared by both scripts: the optimizer, checkpoints and the loop (run_setup.py starts it;
placement.py puts the frozen models where the loop needs them).

The loop owns batching, gradient accumulation, checkpoints, validation and logging; a
script supplies only `compute_loss(batch, models)` for its model family. Before every
micro-batch the global RNG is re-seeded from (seed, step, micro-batch, process), so noise,
timesteps and dropout depend only on the position in the run, which makes resuming exact.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import logging
import math
import signal
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from difftune.adapters import injection as adapter_io
from difftune.adapters.ema import make_ema
from difftune.cli.errors import UserError
from difftune.data import (
    EpochBatchSampler,
    PairedBatchSampler,
    collate,
    dreambooth,
    num_update_steps_per_epoch,
    to_device,
)
from difftune.storage import checkpoints, integrity
from difftune.train.evaluation import eval_mode, evaluation_loss, held_out_split
from difftune.train.objectives import batch_loss
from difftune.train.resume import apply_optimizer_flags
from difftune.train.run_setup import main_decides
from difftune.train.stopping import StopRequest
from difftune.train.updates import make_update

logger = logging.getLogger("difftune")


def micro_batch_seed(seed: int, step: int, micro_batch: int, process_index: int) -> int:
    digest = hashlib.sha256(f"{seed}:{step}:{micro_batch}:{process_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


PHASES = ("data", "forward", "backward", "optimizer")


@dataclass
class StepTimes:
    """Seconds per optimizer step and phase (data wait, forward incl. encoders, backward, optimizer)."""

    steps: list[dict[str, float]] = field(default_factory=list)

    def start_step(self) -> dict[str, float]:
        self.steps.append(dict.fromkeys((*PHASES, "total"), 0.0))
        return self.steps[-1]


@dataclass
class TrainResult:
    global_step: int
    final_checkpoint: Path
    last_loss: float
    times: StepTimes


# Never written down: args.json is uploaded with --push_to_hub and the trackers' config is sent to wandb.
SECRETS = frozenset({"hub_token"})


def every(step: int, steps: int) -> bool:
    """Whether `step` is one of every `steps` (0: none)."""
    return bool(steps) and step % steps == 0


def run_config(args: argparse.Namespace) -> dict:
    """The run's arguments as plain JSON values, without secrets."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in SECRETS}


def _tracker_config(args: argparse.Namespace) -> dict:
    # Trackers take scalars only.
    return {k: (v if isinstance(v, (int, float, str, bool)) else str(v)) for k, v in run_config(args).items()}


def gathered_losses(accelerator, losses: list[torch.Tensor]) -> tuple[float, bool]:
    """(mean loss over micro-batches and processes, whether every process's losses were finite)."""
    gathered = accelerator.gather(torch.stack(losses)).cpu()
    return gathered.mean().item(), bool(torch.isfinite(gathered).all())


def train(
    accelerator,
    args: argparse.Namespace,
    *,
    project_name: str,
    adapters: dict[str, nn.Module],
    param_groups: list[dict],
    dataset: torch.utils.data.Dataset,
    compute_loss: Callable[..., torch.Tensor],
    save_extra: Callable[[Path, dict[str, nn.Module]], None] | None = None,
    validate: Callable[[int, dict[str, nn.Module]], None] | None = None,
) -> TrainResult:
    """Train the adapters in `adapters` (name -> PeftModel, the name is the checkpoint subfolder).

    `compute_loss(batch, models)` is the training loss; `compute_loss(batch, models, fractions=f)` at
    fractions f in [0, 1) of the noise schedule is the plain MSE used for the held-out loss."""
    run = TrainingRun(accelerator, args, adapters, param_groups, dataset, compute_loss, save_extra, validate)
    run.resume()
    run.start(project_name)
    stopped_by, final = run.loop()
    if stopped_by:
        logger.warning(
            "stopped by %s at step %d; checkpoint %s. Resume with --resume_from_checkpoint latest",
            signal.Signals(stopped_by).name,
            run.global_step,
            final,
        )
        raise SystemExit(128 + stopped_by)
    return TrainResult(run.global_step, final, run.last_loss, run.times)


class TrainingRun:
    """One training run's state and phases: data, resume, steps, held-out loss, validation, checkpoints."""

    def __init__(
        self,
        accelerator,
        args: argparse.Namespace,
        adapters: dict[str, nn.Module],
        param_groups: list[dict],
        dataset: torch.utils.data.Dataset,
        compute_loss: Callable[..., torch.Tensor],
        save_extra: Callable[[Path, dict[str, nn.Module]], None] | None,
        validate: Callable[[int, dict[str, nn.Module]], None] | None,
    ) -> None:
        from diffusers.optimization import get_scheduler

        self.accelerator, self.args, self.adapters, self.dataset = accelerator, args, adapters, dataset
        self.compute_loss, self.save_extra, self.validate = compute_loss, save_extra, validate
        self.output_dir = Path(args.output_dir)
        self.accum = args.gradient_accumulation_steps
        self.build_data()
        self.max_steps = args.max_train_steps = args.max_train_steps or args.num_train_epochs * self.steps_per_epoch
        dataset.max_train_steps = self.max_steps  # (a token warm-up given as a share of the steps)
        self.ema = make_ema(args, adapters)  # before DeepSpeed casts the adapters: it starts from fp32 weights
        self.update = make_update(accelerator, args, adapters, param_groups)
        self.lr_scheduler = get_scheduler(
            args.lr_scheduler,
            self.update.optimizer,
            num_warmup_steps=args.lr_warmup_steps,
            num_training_steps=self.max_steps,
            num_cycles=args.lr_num_cycles,
            power=args.lr_power,
        )
        self.global_step, self.nonfinite_steps, self.last_loss, self.last_parts = 0, 0, math.nan, {}
        self.replaces_old_run, self.replaced = args.overwrite_output_dir, None
        # Lineage, in every checkpoint: this run's id, and the runs (and steps) it continues (`latest` follows it).
        self.run_id, self.lineage, self.resumed_from = uuid.uuid4().hex, [], None
        self.evaluated: dict[int, dict[str, float]] = {}
        self.times = StepTimes()

    def build_data(self) -> None:
        """The held-out split, and the loader of the training share in per-epoch shuffled batches."""
        args, dataset, accelerator = self.args, self.dataset, self.accelerator
        self.train_indices, self.held_out = held_out_split(dataset, args.validation_split, args.seed)
        sizes = getattr(dataset, "batch_groups", None) or getattr(dataset, "target_sizes", None)  # one per batch
        is_class = getattr(dataset, "class_sample", None)
        class_indices = [i for i in self.train_indices + self.held_out if is_class[i]] if is_class else []
        if is_class:  # class images pair with the instance batches; they are never held out
            self.train_indices = [i for i in self.train_indices if not is_class[i]]
            self.held_out = [i for i in self.held_out if not is_class[i]]

        batch_sizes = getattr(dataset, "batch_sizes", None)  # kohya data sets: each its own

        def batches(indices: list[int], seed: int) -> EpochBatchSampler:
            return EpochBatchSampler(
                len(indices), args.train_batch_size, seed, accelerator.num_processes, accelerator.process_index,
                groups=[sizes[i] for i in indices] if sizes else None,
                batch_sizes=[batch_sizes[i] for i in indices] if batch_sizes else None,
                keep_partial=getattr(dataset, "keep_partial_batches", False),
            )  # fmt: skip

        self.sampler = batches(self.train_indices, args.seed)
        sampler = self.sampler
        if class_indices:
            classes = batches(sorted(class_indices), dreambooth.class_seed(args.seed))
            sampler = self.sampler = PairedBatchSampler(
                self.sampler, classes, self.train_indices, sorted(class_indices)
            )
            logger.info("prior preservation: %d class samples, a class batch with every batch", len(class_indices))
        self.loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(dataset, self.train_indices) if self.held_out and not class_indices else dataset,
            batch_sampler=sampler,
            collate_fn=collate,
            num_workers=args.dataloader_num_workers,
            pin_memory=accelerator.device.type == "cuda",
        )
        self.steps_per_epoch = num_update_steps_per_epoch(len(self.sampler), self.accum)
        self.held_out_data = dataset.evaluation_view() if self.held_out else None

    def sample_steps(self, epoch: int) -> dict[int, int] | None:
        """For token warm-up: the optimizer step at which each training sample of `epoch` trains (the sampler is
        set to `epoch` already)."""
        if not getattr(self.dataset, "needs_steps", False):
            return None
        self.dataset.max_train_steps = self.max_steps
        instance = getattr(self.sampler, "instance", self.sampler)  # (prior preservation: the instance batches)
        first = epoch * self.steps_per_epoch
        return {
            self.train_indices[position]: first + number // self.accum
            for number, batch in enumerate(instance.global_batches())
            for position in batch
        }

    def resume(self) -> None:
        """Adapters, optimizer, EMA, scheduler and counters from --resume_from_checkpoint (if any)."""
        if self.args.resume_from_checkpoint is None:  # setup_run resolved it
            return
        resume_dir = Path(self.args.resume_from_checkpoint)
        state = checkpoints.read_json(resume_dir / checkpoints.STATE_FILE)  # setup_run checked it resumes here
        adapter_io.load_adapters(self.adapters, resume_dir)
        optimizer = self.update.optimizer
        fresh = [{"initial_lr": g["initial_lr"], "weight_decay": g.get("weight_decay")} for g in optimizer.param_groups]
        self.update.load(resume_dir)
        if self.ema is not None:
            self.ema.load(resume_dir)
        self.lr_scheduler.load_state_dict(checkpoints.load_torch_state(resume_dir / checkpoints.SCHEDULER_FILE))
        apply_optimizer_flags(optimizer, self.lr_scheduler, fresh)
        self.global_step, self.nonfinite_steps = state["global_step"], state.get("nonfinite_steps", 0)
        self.lineage, self.resumed_from = checkpoints.lineage(state), state["global_step"]
        if state.get("steps_per_epoch") not in (None, self.steps_per_epoch):
            logger.warning("the data or batch settings changed since %s: the data order will differ", resume_dir)
        logger.info("resumed from %s at step %d", resume_dir, self.global_step)

    def start(self, project_name: str) -> None:
        """Trackers and the run's summary in the log."""
        accelerator, args = self.accelerator, self.args
        if accelerator.is_main_process:
            accelerator.init_trackers(project_name, config=_tracker_config(args))
        if self.held_out:
            source = f"--eval_data_dir {args.eval_data_dir}" if args.eval_data_dir else "the data set"
            logger.info(
                "evaluation loss on %d held-out samples of %s: of the data set's %d samples, %d train",
                len(self.held_out), source, len(self.dataset), len(self.dataset) - len(self.held_out),
            )  # fmt: skip
        instance = getattr(self.sampler, "instance", self.sampler)
        per_epoch = instance.samples_per_epoch()
        sizes = sorted(set(getattr(self.dataset, "batch_sizes", None) or [args.train_batch_size]))
        logger.info(
            "training: %d samples, %d of them per epoch in %d batches of %s x %d processes; %d steps per epoch "
            "(accumulation %d), %d steps",
            len(self.train_indices),
            per_epoch,
            len(self.sampler),
            "/".join(map(str, sizes)),
            accelerator.num_processes,
            self.steps_per_epoch,
            self.accum,
            self.max_steps,
        )
        if per_epoch < len(self.train_indices):
            logger.info(
                "each epoch leaves out %d samples that do not fill a batch (a different share each epoch)",
                len(self.train_indices) - per_epoch,
            )

    def loop(self) -> tuple[int, Path]:
        """Steps until --max_train_steps or a stop signal, with checkpoints and validation on their schedule;
        returns (the signal that stopped the run or 0, the final checkpoint)."""
        from tqdm.auto import tqdm

        accelerator, args = self.accelerator, self.args
        for model in self.adapters.values():
            model.train()
        progress = tqdm(
            total=self.max_steps, initial=self.global_step, unit="step", desc="train",
            disable=not accelerator.is_main_process,
        )  # fmt: skip
        last_saved, stopped_by = None, 0
        # The models and data are set up: keep the garbage collector from re-scanning them every step.
        gc.collect()
        gc.freeze()
        epoch, step_in_epoch = divmod(self.global_step, self.steps_per_epoch)
        with StopRequest() as stop, progress:  # an error closes the bar first: its message gets a line
            while self.global_step < self.max_steps and not stopped_by:
                self.sampler.set_epoch(epoch, start=step_in_epoch * self.accum)
                if hasattr(self.dataset, "set_epoch"):
                    self.dataset.set_epoch(epoch, self.sample_steps(epoch))
                batches = iter(self.loader)
                for index in range(step_in_epoch, self.steps_per_epoch):
                    step_start = self.step(batches, min(self.accum, len(self.sampler) - index * self.accum))
                    lr = self.lr_scheduler.get_last_lr()[0]
                    progress.set_postfix(loss=f"{self.last_loss:.4f}", lr=f"{lr:.2e}", refresh=False)
                    progress.update(1)  # redraws at most every 0.1 s
                    logged = {"train/loss": self.last_loss, "train/lr": lr}
                    logged.update({f"train/{name}_loss": value for name, value in self.last_parts.items()})
                    accelerator.log(logged, step=self.global_step)

                    stopped_by = stop.agreed(accelerator)
                    self.times.steps[-1]["total"] = time.perf_counter() - step_start  # no checkpoints, validation
                    step, at_end = self.global_step, self.global_step >= self.max_steps
                    saves = every(step, args.checkpointing_steps) or self.ends_epochs(step, args.checkpointing_epochs)
                    if saves or at_end or stopped_by:
                        self.write_checkpoint(step)
                        last_saved = step
                    if stopped_by:
                        break
                    if every(step, args.validation_steps) or at_end or self.ends_epochs(step, args.validation_epochs):
                        self.run_validation(step)
                    if at_end:
                        break
                epoch, step_in_epoch = epoch + 1, 0
            progress.close()
            final = checkpoints.checkpoint_dir(self.output_dir, self.global_step)
            if last_saved != self.global_step and not main_decides(accelerator, lambda: checkpoints.is_complete(final)):
                final = self.write_checkpoint(self.global_step)
            accelerator.end_training()
        return stopped_by, final

    def ends_epochs(self, step: int, epochs: int | None) -> bool:
        """Whether optimizer step `step` ends an epoch, the `epochs`-th, 2 * `epochs`-th, ... (counted from 1; from
        the step alone, so a resumed run saves and validates where the uninterrupted one did)."""
        return bool(epochs) and step % self.steps_per_epoch == 0 and (step // self.steps_per_epoch) % epochs == 0

    def step(self, batches, micro_batches: int) -> float:
        """One optimizer step: the micro-batches' forward and backward (fewer than
        --gradient_accumulation_steps at an epoch's end), then the update (timed by phase); returns when it
        started."""
        accelerator, update = self.accelerator, self.update
        step_start = time.perf_counter()
        phase = self.times.start_step()
        losses, parts = [], {}
        for micro in range(micro_batches):
            tick = time.perf_counter()
            batch = to_device(next(batches), accelerator.device)
            phase["data"] += time.perf_counter() - tick
            torch.manual_seed(micro_batch_seed(self.args.seed, self.global_step, micro, accelerator.process_index))
            with update.micro_batch(last=micro == micro_batches - 1):
                tick = time.perf_counter()
                loss, micro_parts = batch_loss(self.compute_loss, batch, update.models)
                phase["forward"] += time.perf_counter() - tick
                tick = time.perf_counter()
                update.backward(loss, micro_batches)
                phase["backward"] += time.perf_counter() - tick
            losses.append(loss.detach().float())
            for name, value in micro_parts.items():
                parts.setdefault(name, []).append(value.float())
        tick = time.perf_counter()
        self.last_loss, finite = gathered_losses(accelerator, losses)
        self.last_parts = {name: gathered_losses(accelerator, values)[0] for name, values in sorted(parts.items())}
        if not finite:
            self.count_nonfinite_step()
        stepped = update.step(finite)
        if self.ema is not None and stepped:  # a skipped update must not advance the EMA's decay schedule
            with update.full_precision_weights():  # all processes: a collective under DeepSpeed
                self.ema.step()
        self.lr_scheduler.step()
        phase["optimizer"] += time.perf_counter() - tick
        self.global_step += 1
        return step_start

    def count_nonfinite_step(self) -> None:
        """A NaN / inf loss: its update is skipped, up to --max_nonfinite_steps such steps, then the run stops."""
        self.nonfinite_steps += 1
        limit = self.args.max_nonfinite_steps
        if self.nonfinite_steps > limit:
            found = checkpoints.list_checkpoints(self.output_dir)
            last_good = found[-1][1] if found else "none yet"
            raise UserError(
                f"the loss is {self.last_loss} at step {self.global_step + 1} "
                f"(more than --max_nonfinite_steps {limit} such steps); "
                f"last good checkpoint: {last_good}. Lower --learning_rate, or use bf16 instead of fp16"
            )
        logger.warning("non-finite loss at step %d: skipping its update", self.global_step + 1)

    def evaluate(self, step: int) -> dict[str, float]:
        """Main process: the held-out loss (and the EMA weights' with --use_ema), once per step."""
        if not self.held_out or step in self.evaluated:
            return self.evaluated.get(step, {})

        def held_out_loss() -> float:
            return evaluation_loss(
                self.compute_loss, self.adapters, self.held_out_data, self.held_out, self.args.seed,
                self.accelerator.device,
            )  # fmt: skip

        losses = {"eval_loss": held_out_loss()}
        if self.ema is not None:
            with self.ema.applied():
                losses["eval_loss_ema"] = held_out_loss()
        self.evaluated[step] = losses
        logger.info("step %d: %s", step, ", ".join(f"{k} {v:.6f}" for k, v in losses.items()))
        self.accelerator.log({k.replace("_", "/", 1): v for k, v in losses.items()}, step=step)
        return losses

    def run_validation(self, step: int) -> None:
        """Main process: the held-out loss, then the validation images (from the EMA weights with --use_ema)."""
        accelerator = self.accelerator
        if accelerator.is_main_process:
            self.evaluate(step)
            if self.validate is not None and self.args.validation_samples:
                with eval_mode(self.adapters):
                    if self.ema is None:
                        self.validate(step, self.adapters)
                    else:
                        logger.info("validation images at step %d use the EMA weights", step)
                        with self.ema.applied():
                            self.validate(step, self.adapters)
        accelerator.wait_for_everyone()

    def write_checkpoint(self, step: int) -> Path:
        """The checkpoint of `step`; a full disk stops the run, leaving the earlier checkpoints as they were."""
        found = checkpoints.list_checkpoints(self.output_dir)
        intact = f"step {found[-1][0]} is intact" if found else "no earlier checkpoint was written"
        if self.replaces_old_run:  # --overwrite_output_dir: only once this run has trained a step (never on a
            if self.accelerator.is_main_process:  # bad setting or data found while starting), and set aside only
                self.replaced = checkpoints.move_old_run_aside(self.output_dir)  # until this save is complete
            self.replaces_old_run = False
        partial = checkpoints.partial_dir(self.output_dir, step)
        with integrity.disk_full_stops(partial, self.output_dir, f"step {step}", intact):
            path = self.write_checkpoint_files(step)
        if self.replaced is not None:  # (the main process)
            checkpoints.drop_replaced(self.output_dir, self.replaced)
            self.replaced = None
        return path

    def write_checkpoint_files(self, step: int) -> Path:
        """All processes: each may hold a share of the optimizer state; the main process writes the rest."""
        accelerator, update = self.accelerator, self.update
        accelerator.wait_for_everyone()
        partial = checkpoints.partial_dir(self.output_dir, step)
        if accelerator.is_main_process:
            checkpoints.begin_checkpoint(partial)
        accelerator.wait_for_everyone()
        update.save(partial)
        with update.full_precision_weights():
            if accelerator.is_main_process:
                adapter_io.save_adapters(self.adapters, partial)
                if self.save_extra is not None:
                    self.save_extra(partial, self.adapters)
                if self.ema is not None:
                    self.ema.save(partial, self.save_extra)
        accelerator.wait_for_everyone()
        path = checkpoints.checkpoint_dir(self.output_dir, step)
        if accelerator.is_main_process:
            checkpoints.save_torch_state(self.lr_scheduler.state_dict(), partial / checkpoints.SCHEDULER_FILE)
            checkpoints.write_json(partial / checkpoints.ARGS_FILE, run_config(self.args))
            state = {
                "global_step": step,
                "epoch": step // self.steps_per_epoch,
                "steps_per_epoch": self.steps_per_epoch,
                "seed": self.args.seed,
                "num_processes": accelerator.num_processes,
                "distributed": update.kind,
                "nonfinite_steps": self.nonfinite_steps,
                "run_id": self.run_id,
                "resumed_from": self.resumed_from,
                "lineage": self.lineage,
                "saved_at": time.time(),
                **({"replaces": self.replaced} if self.replaced else {}),  # the run set aside, until this is saved
                **self.evaluate(step),
            }
            checkpoints.finish_checkpoint(partial, path, state, self.args.checkpoints_total_limit)
            logger.info("saved checkpoint %s", path)
        accelerator.wait_for_everyone()
        return path

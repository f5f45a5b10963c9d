"""Starting a run: the settings checks, the output-dir lock, the Accelerator and logging, the resume point
and the seed; and how processes agree (the main process decides, the others follow)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from difftune.cli.errors import UserError
from difftune.storage import checkpoints, runlock
from difftune.train import deepspeed_zero
from difftune.train.args import scale_learning_rate
from difftune.train.resume import take_checkpoint_settings
from difftune.train.updates import check_distributed_optimizer

logger = logging.getLogger("difftune")


PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def stop_with_the_launcher() -> None:
    """Started by `accelerate launch` (on Linux): have the kernel send this process SIGTERM when the launcher
    dies, so that killing the launcher alone (`docker stop` signals PID 1 only) stops the run and saves a
    checkpoint, as SIGTERM does, instead of leaving it to train on orphaned."""
    if not sys.platform.startswith("linux"):
        return
    parent = os.getppid()
    try:
        launcher = Path(f"/proc/{parent}/cmdline").read_bytes().replace(b"\0", b" ")
    except OSError:
        return
    if not any(name in launcher for name in (b"accelerate", b"torchrun", b"torch.distributed.run")):
        return  # (run directly, or in-process by the tests: nothing to follow)
    import ctypes

    try:
        failed = ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0) != 0
    except (OSError, AttributeError):
        failed = True
    if failed:
        logger.warning("cannot ask to be stopped when accelerate's launcher dies (prctl PR_SET_PDEATHSIG failed)")
    elif os.getppid() != parent:  # the launcher died before the request took hold: stop as it would have
        os.kill(os.getpid(), signal.SIGTERM)


def setup_run(args: argparse.Namespace):
    """Check the run's settings and output dir, then make its Accelerator. Resolves --resume_from_checkpoint
    to the checkpoint it names (None: a new run), whose seed and settings a resumed run keeps; a new run
    without --seed gets a random one."""
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration, set_seed

    stop_with_the_launcher()
    precision = args.mixed_precision or os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision == "fp16" and not torch.cuda.is_available():
        raise UserError(
            "--mixed_precision fp16 needs a CUDA GPU (on the CPU it would silently train in fp32): use bf16 or no"
        )
    if args.report_to == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise UserError("--report_to wandb needs wandb: pip install wandb (or use tensorboard)") from None
    output_dir = Path(args.output_dir)
    # SDXL conditions on the penultimate hidden states, so a text encoder's last layer gets no
    # gradient: DDP must be told that some adapter weights may go unused.
    handlers = [DistributedDataParallelKwargs(find_unused_parameters=bool(getattr(args, "train_text_encoder", False)))]
    check_distributed_optimizer(args, deepspeed_zero.requested())
    if deepspeed_zero.requested():
        deepspeed_zero.check_installed()
        handlers += deepspeed_zero.process_group_kwargs()
    if os.environ.get("RANK", "0") == "0":  # the main process, before it reads or tidies the folder
        runlock.hold_output_dir(output_dir)
    checkpoints.check_output_dir(output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    accelerator = Accelerator(
        mixed_precision=precision,
        kwargs_handlers=handlers,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
    )
    if accelerator.distributed_type.value in {"FSDP", "MEGATRON_LM", "XLA"}:
        raise UserError(
            f"accelerate is set up for {accelerator.distributed_type.value}, which difftune does not support: "
            "use DDP (configs/accelerate/multi_gpu.yaml) or DeepSpeed ZeRO-2 (configs/accelerate/deepspeed_zero2.yaml)"
        )
    args.mixed_precision = accelerator.mixed_precision  # recorded as used, whichever way it was chosen
    logging.basicConfig(
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        level=logging.INFO if accelerator.is_main_process else logging.ERROR,
    )
    if not accelerator.is_main_process:
        import diffusers
        import transformers

        diffusers.utils.logging.set_verbosity_error()
        transformers.utils.logging.set_verbosity_error()
    # Before the resume check: a checkpoint records the scaled rate, which a resumed run compares with its own.
    scale_learning_rate(args, accelerator.num_processes)
    if accelerator.is_main_process:
        checkpoints.clean_output_dir(output_dir)  # with --overwrite_output_dir the old run goes at the first save
    accelerator.wait_for_everyone()
    check_shared_output_dir(accelerator, output_dir)
    if args.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    resume_dir = main_decides(accelerator, lambda: checkpoints.resolve_resume(output_dir, args.resume_from_checkpoint))
    args.resume_from_checkpoint = None if resume_dir is None else str(resume_dir)  # recorded as used
    if resume_dir is not None:
        kind = "deepspeed" if accelerator.distributed_type.value == "DEEPSPEED" else "ddp"
        take_checkpoint_settings(args, resume_dir, accelerator.num_processes, kind)  # its seed; changed flags
    if args.seed is None:
        args.seed = main_decides(accelerator, lambda: int.from_bytes(os.urandom(4), "little"))
    # Seeds what runs before the loop, the adapters' random init above all: a run is reproducible.
    set_seed(args.seed)
    return accelerator


def check_shared_output_dir(accelerator, output_dir: Path) -> None:
    """Every process must see what the main process writes there: checkpoints are written by several
    processes and read back by all of them on resume."""
    if accelerator.num_processes == 1:
        return
    probe = output_dir / f".shared-{main_decides(accelerator, lambda: os.urandom(8).hex())}"
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        probe.touch()
    accelerator.wait_for_everyone()
    sees = torch.tensor([int(probe.is_file())], device=accelerator.device)
    blind = (accelerator.gather(sees) == 0).nonzero().flatten().tolist()  # a collective: all have looked
    if accelerator.is_main_process:
        probe.unlink()
    if blind:
        raise UserError(
            f"processes {blind} cannot see --output_dir {output_dir} as the main process writes it: "
            "put it on storage that every machine shares"
        )


def main_decides(accelerator, decide: Callable[[], object]) -> object:
    """`decide()` run on the main process only, its result (or its UserError) given to every process:
    the processes read the output dir at different moments, and must take the same path."""
    from accelerate.utils import broadcast_object_list

    if accelerator.num_processes == 1:
        return decide()
    outcome = [None]
    if accelerator.is_main_process:
        try:
            outcome = [(decide(), None)]
        except UserError as error:
            outcome = [(None, str(error))]
    broadcast_object_list(outcome)
    result, error = outcome[0]
    if error is not None:
        raise UserError(error)
    return result

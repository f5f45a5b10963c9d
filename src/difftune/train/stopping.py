"""Stopping a run on request: Ctrl-C or SIGTERM finishes the current step and saves a checkpoint, on every
process at the same step."""

from __future__ import annotations

import logging
import signal
import threading

import torch

logger = logging.getLogger("difftune")


class StopRequest:
    """Ctrl-C / SIGTERM: finish the current step, save a checkpoint, exit (a second Ctrl-C aborts at once)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum = 0
        self.previous = {}

    def __enter__(self) -> StopRequest:
        if threading.current_thread() is threading.main_thread():
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def handle(self, signum: int, frame) -> None:
        if self.signum:
            raise KeyboardInterrupt
        self.signum = signum
        logger.warning("%s: finishing this step, then saving a checkpoint", signal.Signals(signum).name)

    def agreed(self, accelerator) -> int:
        """The signal any process got (processes must stop at the same step)."""
        if accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=accelerator.device)
        return int(accelerator.gather(flag).max().item())

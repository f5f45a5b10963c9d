"""Library messages a user cannot act on, dropped where they are made, each by its logger (or progress bar) and
its text: the same libraries' other messages, and all of difftune's own ("difftune", "difftune.*"), still show.

Dropped:

- bitsandbytes (logger bitsandbytes.backends.cpu.ops), when peft imports it: "Failed to load CPU
  gemm_4bit_forward from kernels-community: ... pip install kernels ...". That kernel serves 4-bit quantized
  layers on the CPU, which difftune never builds (--use_8bit_adam is an 8-bit optimizer on CUDA): installing
  `kernels` would change nothing a run does.
- diffusers (diffusers.models.modeling_utils), at each `.to(dtype)` of a model: "There are modules in
  AutoencoderKL that should be kept in float32: []. ...": diffusers warns even when that list is empty, so no
  module is concerned. A list that names modules still shows.
- diffusers (diffusers.pipelines.pipeline_utils), at each Würstchen or Stable Cascade pipeline built: "The
  WuerstchenCombinedPipeline has been deprecated and will not receive bug fixes or feature updates ...".
  They are diffusers' only pipelines for these models, and requirements.txt pins the diffusers they were
  tested with (README: the pipelines live in diffusers' deprecated corner).
- transformers' "Loading weights" progress bar, one per text encoder loaded: it passes in about a second even
  for real-size models and, during validation, breaks the line of the training's own progress bar. Download
  bars (huggingface_hub) and diffusers' "Loading pipeline components" bar still show.

Not here, because they were fixed where difftune called the library: peft's "Could not find a config file in
... - will assume that the vocabulary was not modified" (adapters.injection.adapter_state_dict) and diffusers'
"`torch_dtype` is deprecated" (generate.inference.sdxl_pipeline). tests/test_quiet.py runs the scripts and
fails on any of these lines.
"""

from __future__ import annotations

import importlib.machinery
import logging
import re
import sys
from collections.abc import Callable
from types import ModuleType

# logger name -> the messages of that logger dropped (a regex, searched from the message's start)
DROPPED = {
    "bitsandbytes.backends.cpu.ops": r"Failed to load CPU gemm_4bit_forward from kernels-community",
    "diffusers.models.modeling_utils": r"There are modules in \w+ that should be kept in float32: \[\]\.",
    "diffusers.pipelines.pipeline_utils": (
        r"The (Wuerstchen|StableCascade)\w*Pipeline has been deprecated and will not receive bug fixes"
    ),
}
QUIET_BARS = {"Loading weights"}  # transformers' progress bars dropped, by description


class DropMessage(logging.Filter):
    """Drops a logger's records whose message starts with `pattern`."""

    def __init__(self, pattern: str) -> None:
        super().__init__()
        self.pattern = re.compile(pattern)

    def filter(self, record: logging.LogRecord) -> bool:
        return not self.pattern.match(record.getMessage())


_installed = False


def install() -> None:
    """Drop the messages above, for the rest of the process (again: nothing more). Imports no library: a
    logger's filter waits for its library, and the progress-bar hook is set when transformers is imported,
    so `--help` stays fast."""
    global _installed
    if _installed:
        return
    _installed = True
    for name, pattern in DROPPED.items():
        logging.getLogger(name).addFilter(DropMessage(pattern))
    when_imported("transformers.utils.logging", quiet_transformers_bars)


def quiet_transformers_bars(transformers_logging: ModuleType) -> None:
    """transformers' own hook on its progress bars (set_tqdm_hook): the bars of QUIET_BARS are made disabled."""
    previous = None

    def hook(factory, args, kwargs):
        if kwargs.get("desc") in QUIET_BARS:
            kwargs = {**kwargs, "disable": True}
        return previous(factory, args, kwargs) if previous else factory(*args, **kwargs)

    previous = transformers_logging.set_tqdm_hook(hook)


def when_imported(name: str, then: Callable[[ModuleType], None]) -> None:
    """Call `then(module)` once the module `name` is imported: now if it is, else right after its import."""
    if name in sys.modules:
        then(sys.modules[name])
    else:
        sys.meta_path.insert(0, _AfterImport(name, then))


class _AfterImport:
    """A sys.meta_path finder (not importlib.abc.MetaPathFinder's subclass: importing that costs --help 25 ms):
    finds `name` as the path finder does, leaves sys.meta_path, and has the loader call `then` after the
    module's code ran."""

    def __init__(self, name: str, then: Callable[[ModuleType], None]) -> None:
        self.name, self.then = name, then

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if spec is None or spec.loader is None:
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: ModuleType) -> None:
            run_module(module)
            self.then(module)

        spec.loader.exec_module = exec_module  # this spec's own loader object: no other module is affected
        return spec

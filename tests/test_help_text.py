"""Every script's `--help`, word for word, against the reviewed copy in tests/golden/: the help is the
interface users read, so a changed word, a lost default or a flag moved to another group shows up as a diff.
After an intended change: `DIFFTUNE_UPDATE_HELP=1 pytest tests/test_help_text.py`, then review the diff."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
from conftest import load_script

GOLDEN = Path(__file__).resolve().parent / "golden"


@pytest.mark.parametrize("name", ["train_sdxl_lokr", "train_wuerstchen_lora", "infer", "export"])
def test_help_reads_as_reviewed(name, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "120")  # argparse wraps at the terminal's width
    monkeypatch.setattr(sys, "argv", [f"scripts/{name}.py"])  # and names the program after argv[0]
    script = load_script(name)
    with pytest.raises(SystemExit) as exit_:
        script.parse_args(["--help"])
    assert exit_.value.code == 0
    text = capsys.readouterr().out
    reviewed = GOLDEN / f"help_{name}.txt"
    if os.environ.get("DIFFTUNE_UPDATE_HELP"):
        reviewed.write_text(text)
    assert text == reviewed.read_text(), f"--help of {name} changed: see the module docstring to update"

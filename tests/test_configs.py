"""The experiment files in configs/ (the README's GPU runs) parse through their script's real parser, with
their Hub ids as written (parsing reads no model), and every setting they hold reaches the run's arguments."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomllib
from conftest import ROOT, load_script
from PIL import Image

CONFIGS = sorted(p for p in (ROOT / "configs").glob("*") if p.suffix in {".toml", ".yaml", ".yml", ".json"})


def settings(path: Path) -> dict:
    """The file's keys, sections flattened (what --config reads)."""
    text = path.read_text()
    if path.suffix == ".toml":
        raw = tomllib.loads(text)
    elif path.suffix == ".json":
        raw = json.loads(text)
    else:
        import yaml

        raw = yaml.safe_load(text)
    flat = {}
    for key, value in raw.items():
        flat.update(value if isinstance(value, dict) else {key: value})
    return {key.replace("-", "_"): value for key, value in flat.items()}


def script_for(found: dict) -> str:
    """The script a file is for: the Würstchen / Stable Cascade one when it names a prior."""
    return "train_wuerstchen_lora" if "pretrained_prior_model_name_or_path" in found else "train_sdxl_lokr"


def test_the_readme_runs_the_diffengine_experiments():
    names = {p.name for p in CONFIGS}
    assert {"stable_diffusion_xl_lokr_pokemon_blip.toml", "wuerstchen_prior_lora_pokemon_blip.toml"} <= names
    readme = (ROOT / "README.md").read_text()
    for name in ("stable_diffusion_xl_lokr_pokemon_blip.toml", "wuerstchen_prior_lora_pokemon_blip.toml"):
        assert f"--config configs/{name}" in readme


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_each_config_parses_and_sets_what_it_says(path, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # (its relative folders: none exists here)
    found = settings(path)
    extra = []
    if "instance_data_dir" in found:
        # The one folder read at parse time: the photos, checked before class images would be generated.
        photos = tmp_path / "photos"
        photos.mkdir()
        Image.new("RGB", (64, 64), "red").save(photos / "dog.png")
        extra = ["--instance_data_dir", str(photos)]
    args = load_script(script_for(found)).parse_args(["--config", str(path), *extra])
    overridden = {"instance_data_dir", "train_data_dir"} if extra else set()
    for key, value in found.items():
        if key in overridden:
            continue
        parsed = getattr(args, key)
        if isinstance(parsed, list) and not isinstance(value, list):
            value = [value]  # (a repeatable flag given once)
        assert parsed == value, f"{path.name}: {key} = {value!r} parsed as {parsed!r}"

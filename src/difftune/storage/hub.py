"""Resolve a model given as a local directory or a Hugging Face Hub id, with clear errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from difftune.cli.errors import UserError


def is_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").lower() in {"1", "true", "yes", "on"}


def looks_like_hub_id(name: str) -> bool:
    """True for "org/name" (or "name"); false for anything that only makes sense as a path."""
    parts = name.split("/")
    return (
        len(parts) <= 2
        and all(parts)
        and not name.startswith((".", "~"))
        and not name.endswith((".pt", ".safetensors", ".json"))
    )


def fetch_file(name_or_path: str, filename: str, revision: str | None, flag: str) -> Path:
    """Local path of `filename` inside a local model dir or a Hub repo (downloaded when online)."""
    local = Path(name_or_path).expanduser()
    if local.exists():
        if not local.is_dir():
            raise UserError(f"{flag} {name_or_path} is a file; pass the model's directory")
        path = local / filename
        if not path.is_file():
            raise UserError(f"{flag} {name_or_path} has no {filename}: pass a diffusers model directory")
        return path
    if not looks_like_hub_id(name_or_path):
        raise UserError(f"{flag} {name_or_path} does not exist: pass an existing directory or a Hub id")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(name_or_path, filename, revision=revision))
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one clear line
        kind = type(error).__name__
        if is_offline() or "Offline" in kind or "LocalEntryNotFound" in kind:
            raise UserError(
                f"{flag} {name_or_path} is not a local directory and is not in the Hugging Face cache, "
                "and the Hub cannot be reached (offline): download it first or pass a local path"
            ) from None
        if "RepositoryNotFound" in kind or "GatedRepo" in kind:
            raise UserError(
                f"{flag} {name_or_path}: no such Hub repo, or it is gated/private "
                "(log in with `hf auth login`), or pass a local path"
            ) from None
        if "EntryNotFound" in kind:
            raise UserError(f"{flag} {name_or_path} has no {filename}: is it the right kind of model?") from None
        raise UserError(
            f"{flag} {name_or_path}: could not fetch {filename} from the Hub ({kind}); "
            "check the network or pass a local path"
        ) from None


def read_model_index(name_or_path: str, revision: str | None, flag: str, expected: str) -> dict:
    """The pipeline's model_index.json, after checking that it is a `expected` pipeline."""
    path = fetch_file(name_or_path, "model_index.json", revision, flag)
    index = json.loads(path.read_text())
    found = index.get("_class_name")
    if found != expected:
        raise UserError(f"{flag} {name_or_path} is a {found} pipeline, not a {expected}: pass a {expected} model")
    return index

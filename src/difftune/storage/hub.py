"""Resolve a model given as a local directory or a Hugging Face Hub id, with clear errors; upload a run's
result (--push_to_hub)."""

from __future__ import annotations

import glob
import json
import os
import re
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


def card_files(output_dir: Path) -> list[str]:
    """The model card and the local files it links (the adapted-module list, the validation images it shows),
    relative to `output_dir`: what a reader of the card on the Hub needs beside the checkpoint."""
    card = Path(output_dir) / "README.md"
    links = re.findall(r"\]\(([^)\s]+)\)", card.read_text()) if card.is_file() else []
    return ["README.md"] * card.is_file() + sorted({link for link in links if (Path(output_dir) / link).is_file()})


def upload_run(output_dir: Path, checkpoint: Path, repo_id: str | None, token: str | None) -> str:
    """--push_to_hub: the final checkpoint, as its folder, and the card's files to the model repo `repo_id`
    (created if needed; default: the output dir's name, as diffusers); returns the repo id. The earlier
    checkpoints, caches and logs stay local."""
    from huggingface_hub import HfApi

    output_dir, checkpoint = Path(output_dir), Path(checkpoint)
    files = [path.relative_to(output_dir).as_posix() for path in sorted(checkpoint.rglob("*")) if path.is_file()]
    files += card_files(output_dir)
    name = repo_id or output_dir.resolve().name
    try:
        api = HfApi(token=token)
        name = api.create_repo(name, exist_ok=True).repo_id
        api.upload_folder(
            repo_id=name, folder_path=output_dir, allow_patterns=[glob.escape(file) for file in files],
            commit_message=f"difftune: {checkpoint.name}",
        )  # fmt: skip
    except Exception as error:  # noqa: BLE001 - every Hub failure becomes one clear line
        first = (str(error).strip().splitlines() or [""])[0]
        raise UserError(
            f"--push_to_hub: uploading to {name} failed ({type(error).__name__}: {first}); "
            f"the run is complete in {output_dir}: upload it with `hf upload {name} {output_dir}`"
        ) from None
    return name

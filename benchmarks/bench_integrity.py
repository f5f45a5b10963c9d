"""What checksums cost: writing and verifying a real-size SDXL LoKr checkpoint's manifest, and opening a cache.

    python benchmarks/bench_integrity.py            # default SDXL LoKr (r8, UNet attention) and a cache shard
    python benchmarks/bench_integrity.py --repeats 5

The checkpoint is a set of random files of the real sizes: the LoKr parameter count comes from the real
SDXL-base UNet (and text encoders) built on the meta device with the training script's default LoKr flags,
and each file holds what a checkpoint stores per parameter (adapter fp32, AdamW's two moments, the EMA
adapter and its state). The cache is one full shard (256 samples) of 1024 px latents with both flips and of
SDXL text embeddings, as difftune.storage.shards writes them. Files are hashed from the page cache (just written): on a
cold disk the read itself is the floor, as for loading the files.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from difftune.adapters import ema
from difftune.storage import checkpoints, integrity, shards


def lokr_parameters() -> dict[str, int]:
    """Trainable LoKr parameters per adapted model, with the training script's defaults."""
    from accelerate import init_empty_weights
    from memory_estimate import sdxl_models
    from peft import get_peft_model

    from difftune import adapters

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    from train_sdxl_lokr import parse_args

    args = parse_args(["--train_data_dir", "unused"])
    with init_empty_weights():
        unet, te1, te2, _ = sdxl_models()
    counts = {}
    for name, model, targets in (
        ("unet", unet, args.target_modules),
        ("text_encoder_one", te1, args.text_encoder_target_modules),
        ("text_encoder_two", te2, args.text_encoder_target_modules),
    ):
        peft_model = get_peft_model(model.requires_grad_(False), adapters.lokr_config(args, targets))
        counts[name] = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    return counts


def checkpoint_files(counts: dict[str, int], models: list[str], use_ema: bool) -> dict[str, int]:
    """Relative path -> bytes of a checkpoint of `models` (fp32 adapters, AdamW state, EMA)."""
    total = sum(counts[m] for m in models)
    files = {f"{m}/adapter_model.safetensors": 4 * counts[m] for m in models}
    files |= {f"{m}/adapter_config.json": 1_000 for m in models}
    files |= {checkpoints.OPTIMIZER_FILE: 8 * total, checkpoints.SCHEDULER_FILE: 1_500}
    files |= {checkpoints.STATE_FILE: 300, checkpoints.ARGS_FILE: 4_000}
    if use_ema:
        files |= {f"{ema.EMA_DIR}/{m}/adapter_model.safetensors": 4 * counts[m] for m in models}
        files |= {ema.EMA_FILE: 4 * total}
    return files


def write_random(directory: Path, files: dict[str, int]) -> int:
    for name, size in files.items():
        path = directory / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(size))
    return sum(files.values())


def timed(function, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return times


def read_only(directory: Path, names: list[str]) -> None:
    """The floor: reading the same files without hashing them."""
    for name in names:
        with open(directory / name, "rb") as handle:
            while handle.read(8 << 20):
                pass


def report(label: str, size: int, times: list[float]) -> None:
    best, median = min(times), statistics.median(times)
    print(f"{label}: {size / 2**20:.0f} MiB, {best:.3f} s min, {median:.3f} s median ({size / best / 2**30:.2f} GiB/s)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="Where to write the files (default: a temp dir).")
    args = parser.parse_args()

    counts = lokr_parameters()
    print("LoKr parameters (defaults): " + ", ".join(f"{k} {v / 1e6:.2f} M" for k, v in counts.items()))
    setups = {
        "checkpoint, UNet": (["unet"], False),
        "checkpoint, UNet + text encoders + EMA": (["unet", "text_encoder_one", "text_encoder_two"], True),
    }
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        for label, (models, use_ema) in setups.items():
            directory = Path(tmp) / label.replace(" ", "").replace(",", "-").replace("+", "-")
            size = write_random(directory, checkpoint_files(counts, models, use_ema))
            write = timed(lambda d=directory: integrity.write_manifest(d), args.repeats)
            report(f"{label}: write manifest", size, write)
            verify = timed(lambda d=directory: integrity.damaged_checkpoint(d), args.repeats)
            report(f"{label}: verify", size, verify)
            floor = timed(lambda d=directory: read_only(d, integrity.files_in(d)), args.repeats)
            report(f"{label}: read only (floor)", size, floor)

        # One full cache shard each: latents 4x128x128 fp32 per sample and flip, text 77x2048 + 1280 fp32.
        shard = shards.SHARD_SIZE
        files = {"latents/shard-00000.safetensors": shard * 2 * 4 * 128 * 128 * 4}
        files["text/shard-00000.safetensors"] = shard * (77 * 2048 + 1280) * 4
        size = write_random(Path(tmp), files)
        digests = integrity.digests(Path(tmp), list(files))
        times = timed(lambda: integrity.first_bad(Path(tmp), digests), args.repeats)
        report(f"cache open ({shard} samples at 1024 px with flips, and their text)", size, times)
        report("cache read only (floor)", size, timed(lambda: read_only(Path(tmp), list(files)), args.repeats))
        per_sample = min(times) / shard
        print(f"cache open: {per_sample * 1e3:.2f} ms per sample, once per run (reads are not checked)")


if __name__ == "__main__":
    main()

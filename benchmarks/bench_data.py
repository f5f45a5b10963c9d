"""Start-up and cache-build speed on a large image folder (train_sdxl_lokr.py, tiny models).

    python benchmarks/bench_data.py --images 20000            # writes the JPEGs once into --work
    python benchmarks/bench_data.py --images 2000 --src /path/to/main/src --layout metadata --only data
                                                     # "before" figures (older sources read metadata.jsonl only)

Writes N synthetic JPEGs (mixed aspect ratios, about 1 MP each, caption files beside them) and prints:
- seconds for a 1-step run of train_sdxl_lokr.py (start to exit; the step itself is milliseconds on the
  tiny models), cold (a new --cache_dir: the images are scanned) and warm (the second start), with and
  without --aspect_ratio_buckets, beside the same run on the first 10 images: the difference is the
  start-up cost of the data set;
- seconds to build the data set in a fresh process (scan, captions, buckets), cold and warm: the part that
  grows with N, measured without the model loading that dominates the tiny runs' noise;
- the latent cache build's images/s (decode, resize, encode, write) beside the VAE-encode-only images/s on
  the same images, already decoded, in --rounds builds flanked by encode-only passes (E B E B E ...): each
  build's ratio is to the mean of the passes just before and after it (the machine's speed drifts between
  rounds), and their median printed, with the share of the build the encoder was busy.
--src runs the scripts with another source tree first on the path (e.g. main's, for today's figures).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZES = [(1152, 864), (864, 1152), (1024, 1024), (1344, 768), (768, 1344)]  # (width, height), about 1 MP


DISTINCT = 1_000  # drawn images; the rest of a larger folder are copies of them (drawing is slow: ~10/s/core)


def write_images(folder: Path, count: int) -> None:
    """count JPEGs (smooth gradients with a few shapes: photo-like sizes on disk), each with a caption file;
    past the first DISTINCT, file i is a copy of file i % DISTINCT (its own file, with its own caption)."""
    import numpy as np
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    have = len(list(folder.glob("*.jpg")))
    rng = np.random.default_rng(0)
    for i in range(have, count):
        if i >= DISTINCT:
            shutil.copyfile(folder / f"{i % DISTINCT:06d}.jpg", folder / f"{i:06d}.jpg")
            (folder / f"{i:06d}.txt").write_text(f"image {i}, shapes, gradient")
            continue
        width, height = SIZES[i % len(SIZES)]
        x = np.linspace(0, 255, width, dtype=np.float32)[None, :]
        y = np.linspace(0, 255, height, dtype=np.float32)[:, None]
        base = rng.uniform(0.3, 1.0, 3)
        channels = [x * base[0] + y * (1 - base[0]), y * base[1] + 0 * x, (255 - x) * base[2] + 0 * y]
        pixels = np.stack(channels, axis=-1)
        pixels += rng.normal(0, 8, (height, width, 1)).astype(np.float32)
        image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
        draw = ImageDraw.Draw(image)
        for _ in range(3):
            x0, y0 = int(rng.integers(0, width - 200)), int(rng.integers(0, height - 200))
            draw.ellipse([x0, y0, x0 + 200, y0 + 200], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
        image.save(folder / f"{i:06d}.jpg", quality=90)
        (folder / f"{i:06d}.txt").write_text(f"image {i}, shapes, gradient")


def metadata_twin(folder: Path) -> Path:
    """The same images (hard links) with a metadata.jsonl instead of caption files: what older sources read."""
    twin = folder.with_name(folder.name + "-metadata")
    twin.mkdir(exist_ok=True)
    lines = []
    for image in sorted(folder.glob("*.jpg")):
        if not (twin / image.name).exists():
            os.link(image, twin / image.name)
        lines.append(json.dumps({"file_name": image.name, "text": image.with_suffix(".txt").read_text()}))
    (twin / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return twin


DATA_ONLY = """
import sys, time
from difftune.train import args as flags
from difftune.cli.parsing import ErrorOnlyParser
from difftune import data
parser = ErrorOnlyParser(); flags.add_data_args(parser, resolution=1024); flags.add_cache_args(parser, "--c", "")
args = parser.parse_args(["--train_data_dir", sys.argv[1], "--cache_dir", sys.argv[2]]); args.seed = 0
start = time.perf_counter()
dataset = data.dataset_from_args(args, data.ImageTransform(True, False), lambda caption: {})
if sys.argv[3] == "1":
    data.assign_buckets(dataset, data.make_buckets(1024))
print(time.perf_counter() - start)
"""


def data_seconds(data: Path, cache: Path, src: Path, buckets: bool) -> float:
    """Seconds to build the training data set (and its buckets) in a fresh process: the part that grows with N."""
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    argv = [sys.executable, "-c", DATA_ONLY, str(data), str(cache), str(int(buckets))]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the data set failed:\n{proc.stderr[-3000:]}")
    return float(proc.stdout.strip().splitlines()[-1])


def data_startup(args: argparse.Namespace, data: Path) -> None:
    print(f"building the data set of {args.images} images (a fresh process each), source {args.src}, {data.name}:")
    for buckets in (False, True):
        cache = args.work / "cache-data"
        shutil.rmtree(cache, ignore_errors=True)
        cold = data_seconds(data, cache, args.src, buckets)
        warm = data_seconds(data, cache, args.src, buckets)
        label = "with buckets" if buckets else "without buckets"
        print(f"  {label:16s} cold {cold:6.1f} s  warm {warm:6.1f} s")


def one_step_seconds(assets: Path, data: Path, work: Path, cache: Path, src: Path, buckets: bool) -> float:
    argv = [
        sys.executable, str(src.parent / "scripts" / "train_sdxl_lokr.py"),  # the script of the measured tree
        "--pretrained_model_name_or_path", str(assets / "sdxl"),
        "--pretrained_vae_model_name_or_path", str(assets / "sdxl-vae-fp16-fix"),
        "--train_data_dir", str(data), "--output_dir", str(work / "out"), "--cache_dir", str(cache),
        "--resolution", "64", "--max_train_steps", "1", "--report_to", "none", "--seed", "0",
        "--overwrite_output_dir", *(["--aspect_ratio_buckets"] if buckets else []),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.run(argv, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"the run failed:\n{proc.stderr[-3000:]}")
    return time.perf_counter() - start


def startup(args: argparse.Namespace, assets: Path, data: Path, small: Path) -> None:
    print(f"1-step runs of train_sdxl_lokr.py (tiny models), {args.images} images vs 10, source {args.src}:")
    for buckets in (False, True):
        cache, small_cache = args.work / "cache-startup", args.work / "cache-startup-10"
        shutil.rmtree(cache, ignore_errors=True)
        shutil.rmtree(small_cache, ignore_errors=True)
        cold = one_step_seconds(assets, data, args.work, cache, args.src, buckets)
        warms, tens = [], []
        for _ in range(args.repeats):  # warm runs alternate with 10-image runs: the pairs share the load
            warms.append(one_step_seconds(assets, data, args.work, cache, args.src, buckets))
            tens.append(one_step_seconds(assets, small, args.work, small_cache, args.src, buckets))
        shutil.rmtree(cache, ignore_errors=True)
        ten, warm = tens[0], warms[0]
        label = "with --aspect_ratio_buckets" if buckets else "without buckets"
        print(
            f"  {label:28s} cold {cold:6.1f} s  warm {warm:6.1f} s  10 images {ten:5.1f} s  "
            f"-> overhead cold {cold - ten:6.1f} s, warm {warm - ten:6.1f} s"
        )
        if args.repeats > 1:
            overheads = sorted(w - t for w, t in zip(warms, tens, strict=True))
            listed, median = ", ".join(f"{o:.1f}" for o in overheads), overheads[len(overheads) // 2]
            print(f"    warm overhead of {args.repeats} alternating pairs: {listed} s, median {median:.1f} s")


def cache_build(args: argparse.Namespace, assets: Path, data: Path) -> None:
    """Images/s of the latent cache build, and of the VAE encode alone on the same (decoded) images."""
    import torch

    sys.path.insert(0, str(args.src))
    from difftune import data as data_lib
    from difftune.cli.parsing import ErrorOnlyParser
    from difftune.data import cache
    from difftune.models import sdxl
    from difftune.train import args as flags

    parser = ErrorOnlyParser()
    flags.add_data_args(parser, resolution=args.resolution)
    flags.add_cache_args(parser, "--cache_latents", "")
    flags = ["--train_data_dir", str(data), "--center_crop", "--cache_latents"]
    namespace = parser.parse_args([*flags, "--dataloader_num_workers", str(args.workers)])
    namespace.max_train_samples = args.cache_images
    namespace.seed, namespace.train_batch_size, namespace.cache_dir = 0, 8, str(args.work / "cache-build")
    shutil.rmtree(namespace.cache_dir, ignore_errors=True)
    dataset = data_lib.dataset_from_args(namespace, data_lib.ImageTransform(True, False), lambda caption: {})
    vae = sdxl.load_sdxl(str(assets / "sdxl"), str(assets / "sdxl-vae-fp16-fix"), None, None).vae.eval()
    accelerator = types.SimpleNamespace(process_index=0, num_processes=1, is_main_process=True,
                                        device=torch.device("cpu"), wait_for_everyone=lambda: None)  # fmt: skip

    busy = [0.0]  # seconds inside the encoder during a build

    def encode(pixels: torch.Tensor) -> dict[str, torch.Tensor]:
        start = time.perf_counter()
        out = {"latent_mean": vae.encode(pixels).latent_dist.mean}
        busy[0] += time.perf_counter() - start
        return out

    rows = getattr(dataset, "num_rows", len(dataset))  # (a source tree without repeats has no num_rows)
    pixels = [dataset.load(i, flip=False)["pixel_values"] for i in range(rows)]  # decoded once, not timed

    def encode_only() -> float:
        start = time.perf_counter()
        with torch.no_grad():
            for i in range(0, rows, namespace.train_batch_size):
                encode(torch.stack(pixels[i : i + namespace.train_batch_size]))
        return rows / (time.perf_counter() - start)

    # Encode-only passes flank every build (E B E B E ...): a build is compared with the mean of the passes
    # just before and after it, as this machine's speed drifts by tens of percent within a minute.
    ratios, builds, encodes, shares = [], [], [encode_only()], []
    for round_ in range(args.rounds):
        shutil.rmtree(namespace.cache_dir, ignore_errors=True)
        busy[0], start = 0.0, time.perf_counter()
        cache.cache_images(accelerator, namespace, dataset, "bench", {}, encode, ["latent_mean"], "latents")
        build_seconds = time.perf_counter() - start
        dataset.image_cache = None
        builds.append(rows / build_seconds)
        shares.append(busy[0] / build_seconds)
        encodes.append(encode_only())
        ratios.append(builds[-1] / statistics.mean(encodes[-2:]))
        print(f"  round {round_}: build {builds[-1]:.1f} images/s, encode only before and after {encodes[-2]:.1f} "
              f"and {encodes[-1]:.1f} images/s, ratio {ratios[-1]:.2f}; the encoder busy {100 * shares[-1]:.0f}% "
              "of the build")  # fmt: skip
    workers = namespace.dataloader_num_workers or "default"
    ratio, share = statistics.median(ratios), statistics.median(shares)
    print(
        f"latent cache build at {args.resolution} px, {rows} images, {workers} workers, {args.rounds} rounds: "
        f"build {statistics.median(builds):.1f} images/s, VAE encode only {statistics.median(encodes):.1f} "
        f"images/s (medians); ratio of each build to its flanking passes: median {ratio:.2f} (range {min(ratios):.2f}-"
        f"{max(ratios):.2f}); the encoder busy {100 * share:.0f}% of the build (median); {os.cpu_count()} CPUs"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--work", type=Path, default=Path("work_dirs/bench_data"))
    parser.add_argument("--assets", type=Path, default=None, help="Tiny assets (default: built into --work).")
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="The source tree to measure.")
    parser.add_argument("--resolution", type=int, default=256, help="The cache build's training resolution.")
    parser.add_argument("--only", choices=["data", "startup", "cache"], action="append", help="Default: all three.")
    parser.add_argument("--layout", choices=["captions", "metadata"], default="captions")
    parser.add_argument("--cache_images", type=int, default=128, help="Images for the cache-build figures.")
    parser.add_argument("--workers", type=int, default=0, help="The cache build's --dataloader_num_workers.")
    parser.add_argument("--repeats", type=int, default=1, help="Warm / 10-image run pairs (a median if > 1).")
    parser.add_argument("--rounds", type=int, default=6, help="Cache builds, each followed by an encode-only pass.")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    assets = args.assets or args.work / "assets"
    if not (assets / "sdxl").is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_assets.py"), str(assets)], check=True)
    data, small = args.work / f"images-{args.images}", args.work / "images-10"
    write_images(data, args.images)
    write_images(small, 10)
    if args.layout == "metadata":
        data, small = metadata_twin(data), metadata_twin(small)
    only = args.only or ["data", "startup", "cache"]
    if "data" in only:
        data_startup(args, data)
    if "startup" in only:
        startup(args, assets, data, small)
    if "cache" in only:
        cache_build(args, assets, data)


if __name__ == "__main__":
    main()

"""The first minute of a run, on the tiny models: how long until the user learns something.

    python benchmarks/bench_first_minute.py                          # this tree
    python benchmarks/bench_first_minute.py --src /path/to/old/src   # another tree (e.g. before a change)

Prints, for scripts/train_sdxl_lokr.py (each a fresh process, the median of --repeats):
- `--help`: seconds to the help text and the process's peak RSS;
- a bad data folder (no image in it): seconds to the one-line error;
- a 1-step run: seconds from the command to the first training step (the moment the log prints the run's
  summary, `training: ...`, just before the first step), and to the end of the process.
On the tiny models, loading is a few seconds; on real SDXL the loading part is a minute or more, so what the
error case saves grows with the model.
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def timed(argv: list[str], src: Path, marker: str | None = None) -> tuple[float, float | None, int]:
    """(seconds to exit, seconds until `marker` first appears on stderr, exit code)."""
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    start = time.perf_counter()
    seen = None
    with subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) as proc:
        for line in proc.stderr:
            if marker and seen is None and marker in line:
                seen = time.perf_counter() - start
        code = proc.wait()
    return time.perf_counter() - start, seen, code


def peak_rss_mb(argv: list[str], src: Path) -> float:
    env = {**os.environ, "PYTHONPATH": str(src), "HF_HUB_OFFLINE": "1"}
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(argv, env=env, capture_output=True, check=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return max(before, after) / 1024  # (the largest child so far: run this first)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--src", type=Path, default=ROOT / "src", help="The source tree to measure.")
    parser.add_argument("--scripts", type=Path, default=None, help="Its scripts/ (default: beside --src).")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "bench_first_minute")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    scripts = args.scripts or args.src.parent / "scripts"
    assets = args.work / "assets"
    if not (assets / "sdxl").is_dir():
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_assets.py"), str(assets)], check=True)
    empty = args.work / "no_images"
    empty.mkdir(parents=True, exist_ok=True)
    (empty / "notes.txt").write_text("no images here")
    script = [sys.executable, str(scripts / "train_sdxl_lokr.py")]
    common = [
        "--pretrained_model_name_or_path", str(assets / "sdxl"),
        "--pretrained_vae_model_name_or_path", str(assets / "sdxl-vae-fp16-fix"),
        "--resolution", "64", "--train_batch_size", "2", "--report_to", "none", "--seed", "0",
        "--cache_dir", str(args.work / "cache"),
    ]  # fmt: skip

    print(f"source {args.src}, median of {args.repeats}:")
    rss = peak_rss_mb([*script, "--help"], args.src)
    helps = [timed([*script, "--help"], args.src)[0] for _ in range(args.repeats)]
    print(f"  --help                       {statistics.median(helps):5.2f} s   peak RSS {rss:.0f} MB")
    errors = []
    for _ in range(args.repeats):
        seconds, _, code = timed([*script, *common, "--train_data_dir", str(empty), "--output_dir",
                                  str(args.work / "bad")], args.src)  # fmt: skip
        assert code == 2, code
        errors.append(seconds)
    print(f"  a bad data folder's error    {statistics.median(errors):5.2f} s")
    firsts, totals = [], []
    for number in range(args.repeats):
        out = args.work / f"run{number}"
        argv = [*script, *common, "--train_data_dir", str(assets / "data"), "--output_dir", str(out),
                "--max_train_steps", "1", "--overwrite_output_dir"]  # fmt: skip
        total, first, code = timed(argv, args.src, marker="training: ")
        assert code == 0 and first is not None, (code, first)
        firsts.append(first)
        totals.append(total)
    print(f"  1-step run: first step at    {statistics.median(firsts):5.2f} s   (process ends at "
          f"{statistics.median(totals):.2f} s)")  # fmt: skip


if __name__ == "__main__":
    main()

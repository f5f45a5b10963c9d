"""Benchmark a training step of either script against its floor.

    python benchmarks/bench_train.py --script sdxl --cached              # tiny SDXL, 128 px, batch 4
    python benchmarks/bench_train.py --script wuerstchen
    python benchmarks/bench_train.py --script sdxl -- --pretrained_model_name_or_path stabilityai/...

Runs the real script in this process for --steps steps (the first --warmup not counted) and prints:
steps/s; the per-step split into data wait, forward (encoders included when not cached), backward
and optimizer; peak RSS (and peak CUDA memory on a GPU); and step time / floor, where the floor is
a bare forward + backward of the adapted UNet (or prior) on the same inputs, measured right before
each step (and taken out of that step's time) so that both see the same machine load. It also
times that forward + backward with a LoKr adapter, a LoRA adapter and no adapter (full fine-tuning).
With --frozen_floor, each step is also paired with a forward + backward of the frozen denoiser (adapters
off, its noisy input requiring grad): the cost of training no adapter at all. --no_comparison skips the
adapter copies (at real size they do not fit). Peak RSS is also given from the loaded models on (Linux).
Runs with --gradient_accumulation_steps 1 (the paired floor clears gradients).
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
sys.path.insert(0, str(ROOT / "scripts"))


def parse() -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--script", choices=["sdxl", "wuerstchen"], default="sdxl")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20, help="Steps not counted (allocator and kernel warm-up).")
    parser.add_argument("--resolution", type=int, default=128)
    parser.add_argument("--batch_size", type=int, default=4)
    parser.add_argument("--cached", action="store_true", help="Cache the image and text encodings first.")
    parser.add_argument("--assets", type=Path, default=None, help="Tiny assets dir (default: built in a temp dir).")
    parser.add_argument("--frozen_floor", action="store_true", help="Also pair each step with the frozen denoiser.")
    parser.add_argument("--no_comparison", action="store_true", help="Skip the LoKr / LoRA / full comparison.")
    args, extra = parser.parse_known_args()
    return args, [a for a in extra if a != "--"]


def script_argv(args: argparse.Namespace, assets: Path, work: Path, extra: list[str]) -> list[str]:
    common = [
        "--train_data_dir", str(assets / "data"), "--output_dir", str(work / "out"), "--cache_dir", str(work / "cache"),
        "--resolution", str(args.resolution), "--train_batch_size", str(args.batch_size),
        "--max_train_steps", str(args.steps), "--checkpointing_steps", str(10**9), "--validation_steps", str(10**9),
        "--report_to", "none", "--seed", "0", "--center_crop", "--random_flip", "--overwrite_output_dir",
    ]  # fmt: skip
    if args.script == "sdxl":
        models = [
            "--pretrained_model_name_or_path", str(assets / "sdxl"),
            "--pretrained_vae_model_name_or_path", str(assets / "sdxl-vae-fp16-fix"),
        ]  # fmt: skip
        caches = ["--cache_latents", "--cache_text_embeddings"]
    else:
        models = [
            "--pretrained_prior_model_name_or_path", str(assets / "wuerstchen-prior"),
            "--pretrained_decoder_model_name_or_path", str(assets / "wuerstchen"),
            "--image_encoder_path", str(assets / "effnet" / "effnet.safetensors"),
        ]  # fmt: skip
        caches = ["--cache_image_embeddings", "--cache_text_embeddings"]
    return models + common + (caches if args.cached else []) + extra


def time_forward_backward(model, inputs: tuple, kwargs: dict, repeats: int, warmup: int = 3) -> float:
    """Median seconds of forward + backward (MSE-like loss) on fixed inputs; gradients cleared after."""
    import torch

    def once() -> float:
        start = time.perf_counter()
        out = model(*inputs, **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        out.float().pow(2).mean().backward()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        model.zero_grad(set_to_none=False)  # in place: the trained adapter's gradients are views (see training.py)
        return elapsed

    for _ in range(warmup):
        once()
    return statistics.median(once() for _ in range(repeats))


def time_frozen_forward_backward(model, inputs: tuple, kwargs: dict) -> float:
    """Seconds of one forward + backward of the denoiser with its adapters off and its noisy input requiring
    grad (what the backward through a frozen model costs: the floor of any adapter)."""
    import torch

    noisy = inputs[0].detach().clone().requires_grad_(True)
    start = time.perf_counter()
    with model.disable_adapter():
        out = model(noisy, *inputs[1:], **kwargs)
        out = out.sample if hasattr(out, "sample") else out
        out.float().pow(2).mean().backward()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def reset_peak_rss() -> bool:
    """Restart the process's peak RSS count from now (Linux); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return True


def rss_mib(field: str = "VmHWM") -> float:
    """The process's peak RSS since the last reset_peak_rss() (VmHWM), or its RSS now (VmRSS), in MiB (Linux)."""
    line = next(x for x in Path("/proc/self/status").read_text().splitlines() if x.startswith(f"{field}:"))
    return int(line.split()[1]) / 1024


def adapter_comparison(base_model, inputs: tuple, kwargs: dict, repeats: int) -> dict[str, float]:
    """Forward + backward of a fresh copy of the denoiser with LoKr, LoRA, or no adapter (all weights trained)."""
    import copy

    from peft import LoKrConfig, LoraConfig, get_peft_model

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    results = {}
    for name, config in (
        ("LoKr r8", LoKrConfig(r=8, alpha=8, target_modules=targets)),
        ("LoRA r8", LoraConfig(r=8, lora_alpha=8, target_modules=targets)),
        ("no adapter (full)", None),
    ):
        model = copy.deepcopy(base_model)
        if config is None:
            model.requires_grad_(True)
        else:
            model.requires_grad_(False)
            model = get_peft_model(model, config)
        model.train()
        results[name] = time_forward_backward(model, inputs, kwargs, repeats)
    return results


def main() -> None:
    args, extra = parse()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch

    from difftune.cli.errors import run_cli
    from difftune.train import loop

    work = Path(tempfile.mkdtemp(prefix="difftune-bench-"))
    assets = args.assets
    if assets is None:
        assets = work / "assets"
        subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_assets.py"), str(assets)], check=True)
    module = __import__("train_sdxl_lokr" if args.script == "sdxl" else "train_wuerstchen_lora")
    denoiser = "unet" if args.script == "sdxl" else "prior"
    captured: dict = {"floors": [], "frozen": []}
    real_train = loop.train

    def spy(accelerator, run_args, **kwargs):
        """Run the real loop; before each step's forward, time one bare forward + backward of the
        denoiser on the previous step's inputs (paired measurements cancel the machine's drift)."""
        model = kwargs["adapters"][denoiser]
        compute_loss = kwargs["compute_loss"]

        def keep_inputs(_module, inputs, kw):
            captured["inputs"] = tuple(t.detach() if torch.is_tensor(t) else t for t in inputs)
            captured["kwargs"] = {
                k: ({n: v.detach() for n, v in v.items()} if isinstance(v, dict) else v) for k, v in kw.items()
            }

        def paired(batch, models, **loss_kwargs):
            if "inputs" in captured:
                start = time.perf_counter()
                floor = time_forward_backward(model, captured["inputs"], captured["kwargs"], 1, 0)
                if args.frozen_floor:
                    frozen = time_frozen_forward_backward(model, captured["inputs"], captured["kwargs"])
                    captured["frozen"].append(frozen)
                    model.zero_grad(set_to_none=False)
                # (floor, all the time the measurement took, gradient clearing included)
                captured["floors"].append((floor, time.perf_counter() - start))
            return compute_loss(batch, models, **loss_kwargs)

        hook = model.register_forward_pre_hook(keep_inputs, with_kwargs=True)
        captured["rss_at_start"] = rss_mib()
        captured["rss_reset"] = reset_peak_rss()  # the models are loaded and the caches built
        result = real_train(accelerator, run_args, **{**kwargs, "compute_loss": paired})
        captured["rss_training"] = rss_mib()
        hook.remove()
        captured["model"], captured["result"] = model, result
        return result

    loop.train = spy
    run_cli(module.main, script_argv(args, assets, work, extra))
    # Step k (k >= 1) holds the floor measured at its start: take it out of that step's forward and total.
    steps = captured["result"].times.steps[1:]
    floors = [floor for floor, _ in captured["floors"]]
    for step, (_, spent) in zip(steps, captured["floors"], strict=True):
        step["forward"] -= spent
        step["total"] -= spent
    steps, floors = steps[args.warmup :], floors[args.warmup :]
    mean = {k: statistics.mean(s[k] for s in steps) for k in (*loop.PHASES, "total")}
    median_step = statistics.median(s["total"] for s in steps)
    floor = statistics.median(floors)
    ratio = statistics.median(s["total"] / f for s, f in zip(steps, floors, strict=True))
    model = captured["model"]

    label = f"{args.script}, {'cached' if args.cached else 'uncached'}, {args.resolution} px, batch {args.batch_size}"
    print(f"\n== {label}: {len(steps)} steps after {args.warmup} warm-up ==")
    print(f"steps/s                 {1 / mean['total']:.2f}")
    for phase in loop.PHASES:
        print(f"  {phase:<21} {mean[phase] * 1e3:8.1f} ms  {100 * mean[phase] / mean['total']:5.1f} %")
    other = mean["total"] - sum(mean[p] for p in loop.PHASES)
    print(f"  {'other (logging...)':<21} {other * 1e3:8.1f} ms  {100 * other / mean['total']:5.1f} %")
    print(f"step time (median)      {median_step * 1e3:.1f} ms")
    print(f"floor: fwd+bwd {denoiser:<8} {floor * 1e3:.1f} ms")
    print(f"step time / floor       {ratio:.3f}   (median of per-step ratios, each step against its own floor)")
    print(f"data wait share         {100 * mean['data'] / mean['total']:.2f} %")
    if args.frozen_floor:
        frozen = statistics.median(captured["frozen"][args.warmup :])
        ratios = [s["total"] / f for s, f in zip(steps, captured["frozen"][args.warmup :], strict=True)]
        print(f"frozen {denoiser} fwd+bwd    {frozen * 1e3:.1f} ms")
        print(f"step time / frozen      {statistics.median(ratios):.3f}   (median of per-step ratios)")
    print(f"peak RSS                {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    if captured["rss_reset"]:
        print(f"peak RSS, training      {captured['rss_training']:.0f} MiB   (from the loaded models on)")
        print(f"peak RSS, set-up        {captured['rss_at_start']:.0f} MiB   (loading, caching)")
    if torch.cuda.is_available():
        print(f"peak CUDA memory        {torch.cuda.max_memory_allocated() / 2**20:.0f} MiB")
    if args.no_comparison:
        return
    print(f"\nforward + backward of the {denoiser} on the same inputs:")
    bare = model.unload()  # the denoiser without the trained adapter, for fresh copies
    for name, seconds in adapter_comparison(bare, captured["inputs"], captured["kwargs"], 10).items():
        print(f"  {name:<21} {seconds * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()

"""Real-size cost of the adapters on CPU: SDXL LoKr (peft's forward vs the factored one) and Würstchen LoRA.

    python benchmarks/bench_real_size.py --only layers        # every distinct adapted SDXL Linear, seconds
    python benchmarks/bench_real_size.py --only unet          # real SDXL UNet, ~12-20 GB, minutes
    python benchmarks/bench_real_size.py --only wuerstchen    # real Würstchen v2 prior, minutes

Models are the real architectures from their published configs with random weights (nothing is downloaded).
Floor = the frozen model (or layer) with its input requiring grad; every candidate is one forward + backward
on the same inputs. Floor and candidates are interleaved --repeats times in one run so that they see the same
machine load; min and median are printed with the ratio of medians to the floor. Peak memory is each
candidate's peak RSS, measured in a fresh child process (RSS never goes down within one process).
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
GB = 1e9

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def sdxl_layer_shapes(resolution: int) -> list[tuple[str, int, int, int]]:
    """(name, in, out, tokens) for every distinct adapted Linear of the real SDXL UNet and text encoders."""
    latent = resolution // 8
    shapes = []
    # SDXL attention only at the 640 (latent / 2) and 1280 (latent / 4) levels; k/v of cross-attention
    # read the 77 prompt tokens, 2048 wide.
    for channels, side in ((640, latent // 2), (1280, latent // 4)):
        shapes.append((f"UNet self/q/out {channels}", channels, channels, side * side))
        shapes.append((f"UNet cross k/v 2048->{channels}", 2048, channels, 77))
    shapes.append(("CLIP-L q/k/v/out 768", 768, 768, 77))
    shapes.append(("OpenCLIP-bigG q/k/v/out 1280", 1280, 1280, 77))
    return shapes


def lokr_layer(in_features: int, out_features: int, rank: int, factored: bool) -> nn.Module:
    from peft import LoKrConfig, get_peft_model

    from difftune import lokr

    base = nn.Sequential(nn.Linear(in_features, out_features)).requires_grad_(False)
    model = get_peft_model(base, LoKrConfig(r=rank, alpha=rank, target_modules=["0"], init_weights=False))
    if factored:
        assert lokr.use_factored_forward(model) == 1
    return model


def fwd_bwd(model: nn.Module, x: torch.Tensor) -> float:
    start = time.perf_counter()
    model(x).sum().backward()
    return time.perf_counter() - start


def interleaved(candidates: dict[str, callable], repeats: int) -> dict[str, list[float]]:
    """Each candidate's times, run in turn repeats times (after one warm-up each)."""
    for run in candidates.values():
        run()
    times = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, run in candidates.items():
            times[name].append(run())
    return times


def print_times(title: str, times: dict[str, list[float]], unit: str = "ms", scale: float = 1e3) -> None:
    floor = statistics.median(times["floor"])
    print(f"\n{title}")
    print(f"| | min {unit} | median {unit} | median / floor |")
    print("|---|---|---|---|")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"| {name} | {min(values) * scale:.2f} | {median * scale:.2f} | {median / floor:.2f}x |")


def layers(args: argparse.Namespace) -> None:
    print(f"Per layer, LoKr r{args.rank}, fwd+bwd, {torch.get_num_threads()} threads; tokens for {args.resolution} px")
    print("| layer | in->out | tokens | floor ms | peft LoKr | factored LoKr |")
    print("|---|---|---|---|---|---|")
    for name, fan_in, fan_out, tokens in sdxl_layer_shapes(args.resolution):
        torch.manual_seed(0)
        floor = nn.Linear(fan_in, fan_out).requires_grad_(False)
        peft_layer = lokr_layer(fan_in, fan_out, args.rank, factored=False)
        factored = lokr_layer(fan_in, fan_out, args.rank, factored=True)
        x = torch.randn(1, tokens, fan_in, requires_grad=True)
        times = interleaved(
            {
                "floor": lambda floor=floor, x=x: fwd_bwd(floor, x),
                "peft": lambda peft_layer=peft_layer, x=x: fwd_bwd(peft_layer, x),
                "factored": lambda factored=factored, x=x: fwd_bwd(factored, x),
            },
            args.layer_repeats,
        )
        base = statistics.median(times["floor"])
        ratio = {k: statistics.median(v) / base for k, v in times.items()}
        print(
            f"| {name} | {fan_in}->{fan_out} | {tokens} | {base * 1e3:.3f} | {ratio['peft']:.2f}x | "
            f"{ratio['factored']:.2f}x |"
        )


def real_size(build) -> tuple:
    """Models from build() (meta) materialised on the CPU with small random weights: no slow per-layer init."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        models = build()
    generator = torch.Generator().manual_seed(0)
    for model in models:
        model.to_empty(device="cpu").requires_grad_(False)
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                if tensor.is_floating_point():
                    tensor.normal_(0, 0.02, generator=generator)
    return models


def sdxl_unet_step(resolution: int):
    """The real SDXL UNet and a fwd+bwd closure at `resolution` px, batch 1, latents requiring grad."""
    from memory_estimate import sdxl_models

    unet = real_size(lambda: sdxl_models()[:1])[0]
    side = resolution // 8
    inputs = dict(
        timestep=torch.tensor([500]),
        encoder_hidden_states=torch.randn(1, 77, 2048),
        added_cond_kwargs={
            "text_embeds": torch.randn(1, 1280),
            "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]]),
        },
    )
    latents = torch.randn(1, 4, side, side, requires_grad=True)
    return unet, lambda model: model(latents, **inputs).sample.square().mean().backward()


def wuerstchen_prior_step(resolution: int):
    """The real Wuerstchen v2 prior and a fwd+bwd closure (EfficientNet latents: resolution / 32 a side)."""
    from memory_estimate import wuerstchen_models

    prior = real_size(lambda: wuerstchen_models()[:1])[0]
    side = -(-resolution // 32)
    x = torch.randn(1, 16, side, side, requires_grad=True)
    r, c = torch.rand(1), torch.randn(1, 77, 1280)
    return prior, lambda model: model(x, r, c).square().mean().backward()


def adapt(model: nn.Module, candidate: str, rank: int) -> nn.Module:
    """`candidate` is floor (the bare model), lokr (peft's forward), factored (difftune's) or lora."""
    from peft import LoKrConfig, LoraConfig, get_peft_model

    from difftune import lokr

    if candidate == "floor":
        return model
    if candidate == "lora":
        config = LoraConfig(r=rank, lora_alpha=rank, target_modules=TARGETS)
    else:
        config = LoKrConfig(r=rank, alpha=rank, target_modules=TARGETS, init_weights=False)
    peft_model = get_peft_model(model, config)
    if candidate == "factored":
        lokr.use_factored_forward(peft_model)
    return peft_model


def peak_rss_child(part: str, candidate: str, args: argparse.Namespace) -> float:
    """Peak RSS (GB) of a fresh process that builds the model and runs one fwd+bwd of `candidate`."""
    command = [sys.executable, __file__, "--peak_of", f"{part}:{candidate}", "--resolution", str(args.resolution)]
    out = subprocess.run([*command, "--rank", str(args.rank)], check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_gb"]


def switch(model: nn.Module, factored: bool) -> None:
    """Swap every LoKr Linear between peft's forward and the factored one (same parameters)."""
    from peft.tuners.lokr.layer import Linear

    from difftune import lokr

    for module in model.modules():
        if isinstance(module, Linear):
            module.__class__ = lokr._factored_class(Linear) if factored else Linear


def timed(step, model: nn.Module, before=lambda: None) -> float:
    before()
    start = time.perf_counter()
    step(model)
    return time.perf_counter() - start


def whole_model(part: str, args: argparse.Namespace) -> None:
    candidates = ["floor", "lokr", "factored"] if part == "unet" else ["floor", "lora"]
    peaks = {name: peak_rss_child(part, name, args) for name in candidates}
    model, step = (sdxl_unet_step if part == "unet" else wuerstchen_prior_step)(args.resolution)
    adapted = adapt(model, "lora" if part == "wuerstchen" else "lokr", args.rank)
    # One model in memory: the floor runs with the adapters disabled, peft / factored by swapping the class.
    runs = {"floor": lambda: timed(lambda m: _disabled(step, m), adapted)}
    if part == "unet":
        runs["lokr"] = lambda: timed(step, adapted, lambda: switch(adapted, False))
        runs["factored"] = lambda: timed(step, adapted, lambda: switch(adapted, True))
    else:
        runs["lora"] = lambda: timed(step, adapted)
    times = interleaved(runs, args.repeats)
    name = f"SDXL UNet, LoKr r{args.rank}" if part == "unet" else f"Wuerstchen v2 prior, LoRA r{args.rank}"
    floor_time, floor_peak = statistics.median(times["floor"]), peaks["floor"]
    print(f"\n{name}, {args.resolution} px, batch 1, fp32, {torch.get_num_threads()} threads, {args.repeats} rounds")
    print("| | min s | median s | time / floor | peak RSS GB | peak / floor |")
    print("|---|---|---|---|---|---|")
    for candidate, values in times.items():
        median = statistics.median(values)
        print(
            f"| {candidate} | {min(values):.2f} | {median:.2f} | {median / floor_time:.2f}x | "
            f"{peaks[candidate]:.1f} | {peaks[candidate] / floor_peak:.2f}x |"
        )


def _disabled(step, model: nn.Module) -> None:
    with model.disable_adapter():
        step(model)


def peak_of(spec: str, args: argparse.Namespace) -> None:
    part, candidate = spec.split(":")
    model, step = (sdxl_unet_step if part == "unet" else wuerstchen_prior_step)(args.resolution)
    step(adapt(model, candidate, args.rank))
    print(json.dumps({"peak_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / GB}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=["layers", "unet", "wuerstchen", "e2e"], action="append")
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="Interleaved rounds for the whole models.")
    parser.add_argument("--layer_repeats", type=int, default=30, help="Interleaved rounds per layer.")
    parser.add_argument("--peak_of", help=argparse.SUPPRESS)  # internal: part:candidate in a fresh process
    args = parser.parse_args()
    if args.peak_of:
        return peak_of(args.peak_of, args)
    parts = args.only or ["layers", "unet", "wuerstchen", "e2e"]
    print("Machine: CPU, fp32; timings are noisy when the machine is shared (floor and candidates interleaved).")
    for part in parts:
        if part == "layers":
            layers(args)
        elif part in ("unet", "wuerstchen"):
            whole_model(part, args)


if __name__ == "__main__":
    main()

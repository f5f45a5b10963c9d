"""Real-size cost of the LoKr adapter: frozen floor vs peft's LoKr forward vs difftune's factored forward.

    python benchmarks/bench_real_size.py                 # everything (minutes, ~20 GB for the UNet parts)
    python benchmarks/bench_real_size.py --only layers   # every distinct adapted SDXL Linear shape (seconds)
    python benchmarks/bench_real_size.py --only unet     # real SDXL-base UNet, 256 px, batch 1: time per fwd+bwd
    python benchmarks/bench_real_size.py --only memory   # the same, peak RSS, one fresh process per variant
    python benchmarks/bench_real_size.py --only wuerstchen  # real Wuerstchen v2 prior, floor vs LoRA r8: time, peak
    python benchmarks/bench_real_size.py --only cascade  # real Stable Cascade stage C (3.6 B) and lite (1 B), 1024 px
    python benchmarks/bench_real_size.py --only cascade-lite  # the lite stage C only (~9 GB instead of ~20 GB)
    python benchmarks/bench_real_size.py --only cascade-block  # one stage C attention block: peft's vs lean LoRA
    python benchmarks/bench_real_size.py --only effnet   # Stable Cascade's EfficientNet, fp32 vs bf16; P2's cost
    python benchmarks/bench_real_size.py --only script   # train_sdxl_lokr.py itself on a real-size SDXL on disk
    python benchmarks/bench_real_size.py --only export   # export.py --format checkpoint of it: peak RSS

Random weights from the published configs (benchmarks/memory_estimate.py), CPU fp32, nothing downloaded.
The floor is the frozen model with its input requiring grad. Variants are interleaved in one process and
repeated, min / median reported: on a shared machine, compare ratios from one run, not across runs.

--only script saves a random real-size SDXL (UNet, both text encoders, VAE; ~14 GB in fp32, kept in
--real_dir for the next run) in the Hub layout, and runs train_sdxl_lokr.py on it through
benchmarks/bench_train.py (cached encodings, 256 px, batch 1, LoKr r8): every step is paired with a frozen
UNet fwd+bwd in the same process. Its peak RSS from the loaded models on is set against a fresh process that
loads the same components with the same code and runs the frozen fwd+bwd.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_train import reset_peak_rss, rss_mib
from memory_estimate import STAGE_C, STAGE_C_LITE

# (in, out, tokens) at 256 px (32x32 latents): self-attention at 640 (16x16) and 1280 (8x8) channels,
# cross-attention k/v from the 77 text tokens of width 2048, CLIP-L and OpenCLIP-bigG projections at 77 tokens.
# 320 channels has no attention in SDXL-base; it is listed (at 1024 px's 128x128 / 4 = 1024 tokens) for scale.
LAYERS = [
    (320, 320, 1024),
    (640, 640, 256),
    (1280, 1280, 64),
    (2048, 640, 77),
    (2048, 1280, 77),
    (768, 768, 77),
    (1280, 1280, 77),
]
VARIANTS = ("floor", "peft", "factored")
# (channels, side) of SDXL-base's 3x3 resnet convs at 256 px (32x32 latents): --conv_rank's layers. Their LoKr
# runs peft's conv path in every variant (the factored forward is for Linear layers).
CONV_LAYERS = [(320, 32), (640, 16), (1280, 8)]
PRIOR_VARIANTS = ("prior-floor", "prior-lora")
CASCADE_VARIANTS = ("cascade-floor", "cascade-lora")
LITE_VARIANTS = ("lite-floor", "lite-lora")
ROOT = Path(__file__).resolve().parents[1]


def lokr(model: nn.Module, targets: list[str], rank: int = 8, rank_pattern: dict | None = None) -> nn.Module:
    from peft import LoKrConfig, get_peft_model

    model.requires_grad_(False)
    pattern = rank_pattern or {}
    config = LoKrConfig(
        r=rank, alpha=rank, rank_pattern=pattern, alpha_pattern=pattern, target_modules=targets, init_weights=False
    )
    return get_peft_model(model, config)


def set_variant(peft_model: nn.Module, variant: str) -> None:
    """Switch the adapted layers between peft's forward and the factored one (same parameters)."""
    from peft.tuners.lokr.layer import Linear

    from difftune.adapters.lokr import use_factored_forward

    for module in peft_model.modules():
        if isinstance(module, Linear):
            module.__class__ = Linear
    if variant == "factored":
        use_factored_forward(peft_model)


def step(peft_model: nn.Module, variant: str, make_inputs) -> float:
    """One fwd+bwd in seconds; the floor runs the frozen base with the adapters disabled."""
    set_variant(peft_model, variant)
    args, kwargs = make_inputs()
    start = time.perf_counter()
    if variant.endswith("floor"):
        with peft_model.disable_adapter():
            out = peft_model(*args, **kwargs)
    else:
        out = peft_model(*args, **kwargs)
    out = out.sample if hasattr(out, "sample") else out
    out.float().square().mean().backward()
    elapsed = time.perf_counter() - start
    peft_model.zero_grad(set_to_none=True)
    return elapsed


def interleaved(peft_model: nn.Module, make_inputs, repeats: int, variants=VARIANTS) -> dict[str, list[float]]:
    times = {v: [] for v in variants}
    for variant in variants:  # warm-up
        step(peft_model, variant, make_inputs)
    for _ in range(repeats):
        for variant in variants:
            times[variant].append(step(peft_model, variant, make_inputs))
    return times


def report(name: str, times: dict[str, list[float]]) -> None:
    floor = min(next(iter(times.values())))  # the first variant is the floor
    cells = []
    for variant in times:
        best, median = min(times[variant]), statistics.median(times[variant])
        cells.append(f"{variant} {best * 1e3:9.1f} / {median * 1e3:9.1f} ms ({best / floor:4.2f}x)")
    print(f"{name:<28} " + " | ".join(cells), flush=True)


def layers(repeats: int, conv_rank: int | None = None) -> None:
    print("per layer, fwd+bwd, min / median, ratio of mins to the frozen layer (LoKr r8)")
    for in_features, out_features, tokens in LAYERS:
        model = lokr(nn.Sequential(nn.Linear(in_features, out_features)), ["0"])

        def make_inputs(in_features=in_features, tokens=tokens):
            return (torch.randn(1, tokens, in_features, requires_grad=True),), {}

        report(f"Linear {in_features}->{out_features} x{tokens}", interleaved(model, make_inputs, repeats))
    if conv_rank is None:
        return
    print(f"a 3x3 conv and a Linear in one model: both at r8, then the conv at --conv_rank {conv_rank} (rank_pattern)")
    for channels, side in CONV_LAYERS:
        for rank in (8, conv_rank):
            block = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.Flatten(2))
            model = nn.ModuleDict({"conv": block, "linear": nn.Linear(channels, channels)})
            model.forward = lambda x, m=model: m["linear"](m["conv"](x).transpose(1, 2))
            adapted = lokr(model, ["conv.0", "linear"], rank=8, rank_pattern={"conv.0": rank})
            assert adapted.base_model.model["conv"][0].r["default"] == rank

            def make_inputs(channels=channels, side=side):
                return (torch.randn(1, channels, side, side, requires_grad=True),), {}

            name = f"Conv3x3 r{rank}+Linear r8 {channels} {side}x{side}"
            report(name, interleaved(adapted, make_inputs, repeats))


def unet_inputs():
    kwargs = {
        "added_cond_kwargs": {
            "text_embeds": torch.randn(1, 1280),
            "time_ids": torch.tensor([[256.0, 256, 0, 0, 256, 256]]),
        }
    }
    return (torch.randn(1, 4, 32, 32, requires_grad=True), torch.tensor([500]), torch.randn(1, 77, 2048)), kwargs


def real_unet() -> nn.Module:
    from memory_estimate import sdxl_models

    torch.manual_seed(0)
    unet = sdxl_models()[0]
    return lokr(unet, ["to_q", "to_k", "to_v", "to_out.0"])


def unet(repeats: int) -> None:
    print("real SDXL-base UNet, 256 px, batch 1, LoKr r8 on to_q,to_k,to_v,to_out.0, fwd+bwd")
    report("UNet", interleaved(real_unet(), unet_inputs, repeats))


def real_prior() -> nn.Module:
    from memory_estimate import wuerstchen_models
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    prior = wuerstchen_models()[0].requires_grad_(False)
    return get_peft_model(prior, LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))


def prior_inputs():
    # 256 px images give 8x8 EfficientNet latents (stride 32); 77 CLIP ViT-bigG tokens of width 1280.
    return (torch.randn(1, 16, 8, 8, requires_grad=True), torch.rand(1), torch.randn(1, 77, 1280)), {}


def wuerstchen(repeats: int) -> None:
    print("real Wuerstchen v2 prior, 256 px, batch 1, LoRA r8 on to_q,to_k,to_v,to_out.0, fwd+bwd")
    memory(PRIOR_VARIANTS)  # first: freed models stay in this process's RSS, which the children's memory needs
    report("Wuerstchen prior", interleaved(real_prior(), prior_inputs, repeats, PRIOR_VARIANTS))


def real_stage_c(lite: bool) -> nn.Module:
    from diffusers import StableCascadeUNet
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    from difftune.adapters.lora import use_lean_forward

    prior = StableCascadeUNet(**(STAGE_C_LITE if lite else STAGE_C)).requires_grad_(False)
    config = LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"])
    peft_model = get_peft_model(prior, config)
    use_lean_forward(peft_model)  # as the training script runs it (difftune.adapters.lora)
    return peft_model


def stage_c_inputs():
    # 1024 px: 24x24 latents (EfficientNet of the 768 px image); CLIP-G states and pooled, CLIP image zeros.
    kwargs = {
        "clip_text": torch.randn(1, 77, 1280),
        "clip_text_pooled": torch.randn(1, 1, 1280),
        "clip_img": torch.zeros(1, 1, 768),
    }
    return (torch.randn(1, 16, 24, 24, requires_grad=True), torch.rand(1)), kwargs


def stable_cascade(repeats: int, lite_only: bool) -> None:
    for lite, variants in ((False, CASCADE_VARIANTS), (True, LITE_VARIANTS))[1 if lite_only else 0 :]:
        name = "Stable Cascade stage C lite (1 B)" if lite else "Stable Cascade stage C (3.6 B)"
        print(f"real {name}, 1024 px (24x24 latents), batch 1, LoRA r8 on to_q,to_k,to_v,to_out.0, fwd+bwd")
        memory(variants)  # first, as in wuerstchen()
        report(name, interleaved(real_stage_c(lite), stage_c_inputs, repeats, variants))


def effnet(repeats: int, batch: int = 4) -> None:
    """Stable Cascade's EfficientNet encoder (EfficientNet-V2-S features, random weights) on 768 px images as the
    image-embedding cache runs it (no grad): fp32, as the script now runs it, beside bf16 (before): time per batch
    and the peak RSS above the built encoder. Then what the P2 weight costs per batch (the prior's own step is
    seconds at real size)."""
    from diffusers import DDPMWuerstchenScheduler

    from difftune.models.wuerstchen import EfficientNetEncoder
    from difftune.train import args as flags
    from difftune.train.objectives import Objective

    print(f"real EfficientNet-V2-S encoder, {batch} images of 768 px, no grad (the image-embedding cache)")
    encoder = EfficientNetEncoder(affine=False).eval().requires_grad_(False)
    pixels = torch.randn(batch, 3, 768, 768)
    for dtype in (torch.float32, torch.bfloat16):
        model, inputs = encoder.to(dtype), pixels.to(dtype)
        built = rss_mib("VmRSS")
        reset_peak_rss()
        times = []
        for _ in range(repeats + 1):  # the first warms up
            start = time.perf_counter()
            with torch.no_grad():
                model(inputs)
            times.append(time.perf_counter() - start)
        print(f"  {str(dtype).removeprefix('torch.'):<9} {min(times[1:]) * 1e3:8.1f} ms per batch (min of "
              f"{repeats}), peak RSS {rss_mib() - built:7.1f} MiB above the built encoder")  # fmt: skip
    parser = argparse.ArgumentParser()
    flags.add_objective_args(parser)
    objective_args = parser.parse_args([])
    objective_args.loss_weighting, objective_args.p2_k, objective_args.p2_gamma = "p2", 1.0, 1.0
    objective = Objective(objective_args, DDPMWuerstchenScheduler(), continuous=True)
    t = torch.rand(batch)
    start = time.perf_counter()
    for _ in range(1000):
        objective.sample_weights(t)
    print(f"  P2 weights of a batch of {batch}: {(time.perf_counter() - start):.3f} ms each (1000 calls)")


def cascade_block(repeats: int) -> None:
    """One real-size stage C attention block (1536 channels, 24 x 24 tokens + 85 conditioning ones), fwd+bwd:
    frozen vs LoRA r8 with peft's forward vs difftune's (interleaved); then the rank-8 products alone."""
    from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora.layer import Linear

    from difftune.adapters.lora import use_lean_forward

    torch.manual_seed(0)
    block = nn.Sequential(SDCascadeAttnBlock(1536, 1536, 24, self_attn=True, dropout=0.1)).requires_grad_(False)
    model = get_peft_model(block, LoraConfig(r=8, lora_alpha=8, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    model.train()

    def run(variant: str) -> float:
        for module in model.modules():
            if isinstance(module, Linear):
                module.__class__ = Linear
        if variant == "lean":
            use_lean_forward(model)
        x, kv = torch.randn(1, 1536, 24, 24, requires_grad=True), torch.randn(1, 85, 1536)
        start = time.perf_counter()
        with model.disable_adapter() if variant == "floor" else contextlib.nullcontext():
            model.base_model.model[0](x, kv).square().mean().backward()
        model.zero_grad(set_to_none=True)
        return time.perf_counter() - start

    times = {variant: [] for variant in ("floor", "peft", "lean")}
    for _ in range(repeats + 1):  # the first round warms up
        for variant, measured in times.items():
            measured.append(run(variant))
    report("stage C attention block", {variant: measured[1:] for variant, measured in times.items()})

    def best(product, n: int = 20) -> float:
        return min(timed(product) for _ in range(n)) * 1e3

    def timed(product) -> float:
        start = time.perf_counter()
        product()
        return time.perf_counter() - start

    x, w, a, h = torch.randn(576, 1536), torch.randn(1536, 1536), torch.randn(8, 1536), torch.randn(576, 8)
    print(
        f"  alone, best of 20: (576x1536)@(1536x1536) {best(lambda: x @ w.t()):.2f} ms | (576x1536)@(1536x8) "
        f"{best(lambda: x @ a.t()):.2f} ms | (576x8)@(8x1536) {best(lambda: h @ a):.2f} ms",
        flush=True,
    )


def save_real_sdxl(directory: Path) -> None:
    """A random real-size SDXL in the Hub layout (sdxl/, sdxl-vae-fp16-fix/), the toy data in data/; tokenizers,
    scheduler and model_index.json come from the tiny assets (the same files as the real repos' in kind)."""
    from memory_estimate import sdxl_models

    if (directory / "complete").exists():
        return
    print(f"saving a random real-size SDXL in {directory} (minutes)", flush=True)
    tiny = directory / "tiny"
    shutil.rmtree(directory, ignore_errors=True)
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_tiny_assets.py"), str(tiny)], check=True)
    shutil.copytree(tiny / "data", directory / "data")
    for name in ("tokenizer", "tokenizer_2", "scheduler", "model_index.json"):
        copy = shutil.copytree if (tiny / "sdxl" / name).is_dir() else shutil.copy
        copy(tiny / "sdxl" / name, directory / "sdxl" / name)
    torch.manual_seed(0)
    unet, te1, te2, vae = sdxl_models()
    for model, folder in ((unet, "unet"), (te1, "text_encoder"), (te2, "text_encoder_2"), (vae, "vae")):
        model.save_pretrained(directory / "sdxl" / folder, max_shard_size="2GB")  # small shards: less peak memory
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(directory / "sdxl-vae-fp16-fix")
    shutil.rmtree(tiny)
    (directory / "complete").touch()


def script(real_dir: Path, steps: int, conv_rank: int | None = None) -> None:
    mixed = [] if conv_rank is None else ["--target_modules", "to_q,to_k,to_v,to_out.0,conv1,conv2",
                                          "--conv_rank", str(conv_rank)]  # fmt: skip
    print("train_sdxl_lokr.py on a random real-size SDXL from disk, cached encodings, 256 px, batch 1, LoKr r8",
          *mixed)  # fmt: skip
    save_real_sdxl(real_dir)
    (floor,) = measured_in_child("script-floor", "--real_dir", str(real_dir))
    command = [
        sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--script", "sdxl", "--assets", str(real_dir),
        "--cached", "--resolution", "256", "--batch_size", "1", "--steps", str(steps), "--warmup", "2",
        "--frozen_floor", "--no_comparison", *mixed,
    ]  # fmt: skip
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    print(out[out.index("== ") :].rstrip())
    training = float(re.search(r"peak RSS, training\s+([\d.]+) MiB", out).group(1)) / 1024
    print(
        f"peak RSS from the loaded models on: script {training:.2f} GiB | a fresh process loading the same "
        f"components + frozen UNet fwd+bwd {floor:.2f} GiB ({training / floor:.2f}x)",
        flush=True,
    )


def random_lokr_checkpoint(real_dir: Path) -> Path:
    """A step dir with a random LoKr r8 (alpha 8) on the real-size UNet's attention and both text encoders."""
    from peft import LoKrConfig
    from peft.tuners.lokr.layer import factorization
    from safetensors.torch import save_file

    from difftune.formats import kohya

    step = real_dir / "lokr-run" / "step1"
    models = ["unet", "text_encoder_one", "text_encoder_two"]
    _, shapes = kohya.module_shapes(str(real_dir / "sdxl"), None, models)
    targets = {"unet": ("to_q", "to_k", "to_v", "to_out.0"), "text": ("q_proj", "k_proj", "v_proj", "out_proj")}
    generator = torch.Generator().manual_seed(0)
    for model in models:
        chosen = targets["unet" if model == "unet" else "text"]
        state = {}
        for module, shape in shapes[model].items():
            if not module.endswith(chosen) or len(shape) != 2:
                continue
            (a, b), (c, d) = factorization(shape[0]), factorization(shape[1])
            prefix = f"base_model.model.{module}."
            state[prefix + "lokr_w1"] = torch.randn(a, c, generator=generator) * 0.01
            state[prefix + "lokr_w2_a"] = torch.randn(b, 8, generator=generator) * 0.01
            state[prefix + "lokr_w2_b"] = torch.randn(8, d, generator=generator) * 0.01
        (step / model).mkdir(parents=True, exist_ok=True)
        LoKrConfig(r=8, alpha=8, target_modules=list(chosen)).save_pretrained(step / model)
        save_file(state, step / model / "adapter_model.safetensors")
    run = {
        "pretrained_model_name_or_path": str(real_dir / "sdxl"),
        "pretrained_vae_model_name_or_path": str(real_dir / "sdxl-vae-fp16-fix"),
    }
    (step / "args.json").write_text(json.dumps(run))
    return step


def export_checkpoint(real_dir: Path) -> None:
    print("export.py --format checkpoint (fp16) of a random LoKr r8 on a random real-size SDXL (fp32 on disk)")
    save_real_sdxl(real_dir)
    random_lokr_checkpoint(real_dir)
    base_gib = sum(f.stat().st_size for f in (real_dir / "sdxl").rglob("*.safetensors")) / 2**30
    start = time.perf_counter()
    (peak,) = measured_in_child("export", "--real_dir", str(real_dir))
    out = real_dir / "merged.safetensors"
    print(
        f"base model on disk {base_gib:.2f} GiB (fp32), merged checkpoint {out.stat().st_size / 2**30:.2f} GiB (fp16), "
        f"{time.perf_counter() - start:.0f} s; peak RSS of export.py {peak:.2f} GiB",
        flush=True,
    )
    out.unlink()


def export_one(real_dir: Path) -> None:
    """Run export.py --format checkpoint in this (fresh) process; print its peak RSS (GiB)."""
    import runpy

    sys.argv = [
        "export.py", "--checkpoint", str(real_dir / "lokr-run" / "step1"), "--format", "checkpoint",
        "--out", str(real_dir / "merged.safetensors"),
    ]  # fmt: skip
    runpy.run_path(str(ROOT / "scripts" / "export.py"), run_name="__main__")
    print(rss_mib() / 1024)


def script_floor_one(real_dir: Path) -> None:
    """Load the SDXL components as train_sdxl_lokr.py does, then the frozen UNet's fwd+bwd (peak RSS, GiB)."""
    from difftune.models import sdxl

    sd = sdxl.load_sdxl(str(real_dir / "sdxl"), str(real_dir / "sdxl-vae-fp16-fix"))
    with torch.no_grad():
        for model in (sd.unet, sd.text_encoder_one, sd.text_encoder_two, sd.vae):
            model.requires_grad_(False)
            # Weights load as maps of the safetensors files, resident once read: read them all, as the
            # script's caching (encoders) and steps (UNet) do, so that both count the same weights.
            for parameter in model.parameters():
                parameter.sum()
    reset_peak_rss()
    for _ in range(2):
        args, kwargs = unet_inputs()
        sd.unet(*args, **kwargs).sample.square().mean().backward()
    print(rss_mib() / 1024)


def memory_one(variant: str) -> None:
    if variant in (*CASCADE_VARIANTS, *LITE_VARIANTS):
        model, inputs = real_stage_c(variant in LITE_VARIANTS), stage_c_inputs
        variant = "prior-" + variant.split("-")[1]
    else:
        model, inputs = (real_prior(), prior_inputs) if variant in PRIOR_VARIANTS else (real_unet(), unet_inputs)
    # Building the model peaks above what training holds: count from the built model on (Linux resets VmHWM).
    reset_peak_rss()
    built = rss_mib("VmRSS") / 1024
    step(model, variant.removeprefix("prior-"), inputs)
    print(built, rss_mib() / 1024)


def measured_in_child(variant: str, *extra: str) -> list[float]:
    """Run `--memory_variant variant` in a fresh process; the numbers it prints last (GiB)."""
    command = [sys.executable, __file__, "--memory_variant", variant, *extra]
    out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return [float(x) for x in out.splitlines()[-1].split()]


def estimated_activations(variant: str) -> float | None:
    """benchmarks/memory_estimate.py's saved bytes for this variant at the measured setting (fp32, 256 px or
    stage C's 1024 px, batch 1), in GiB; None for peft's LoKr path, which the estimator does not model."""
    from memory_estimate import GIB, sdxl, stable_cascade, wuerstchen

    if variant in PRIOR_VARIANTS:
        estimate = wuerstchen(256, 1, torch.float32, adapter=variant == "prior-lora")
    elif variant in (*CASCADE_VARIANTS, *LITE_VARIANTS):  # at 1024 px
        estimate = stable_cascade(variant in LITE_VARIANTS, 1024, 1, torch.float32, adapter=variant.endswith("lora"))
    elif variant == "peft":
        return None
    else:
        estimate = sdxl(256, torch.float32, adapter=variant == "factored")
    return estimate["activations"] / GIB


def memory(variants=VARIANTS) -> None:
    print("peak RSS of one fwd+bwd, counted from the built model (a fresh process per variant); growth: the peak")
    print("above the built model's RSS, beside memory_estimate.py's saved activations for the same setting")
    peaks = {}
    for variant in variants:
        built, peaks[variant] = measured_in_child(variant)
        ratio = peaks[variant] / peaks[variants[0]]
        estimate = estimated_activations(variant)
        estimated = "" if estimate is None else f", estimated {estimate:5.2f} GiB"
        growth = peaks[variant] - built
        print(
            f"  {variant:<11} {peaks[variant]:6.2f} GiB ({ratio:4.2f}x)  growth {growth:5.2f} GiB{estimated}",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--only",
        choices=[
            "layers",
            "unet",
            "memory",
            "wuerstchen",
            "cascade",
            "cascade-lite",
            "cascade-block",
            "effnet",
            "script",
            "export",
        ],
        default=None,
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--conv_rank", type=int, default=None,
        help="--only layers: also SDXL's 3x3 convs at this rank beside Linears at r8; --only script: also train "
        "conv1,conv2 at it (--conv_rank)",
    )  # fmt: skip
    parser.add_argument("--script_steps", type=int, default=10, help="--only script: steps (2 of them warm-up).")
    parser.add_argument(
        "--real_dir", type=Path, default=ROOT / "work_dirs" / "real-size-sdxl", help="Where the real-size SDXL is kept."
    )
    parser.add_argument(
        "--memory_variant",
        choices=(*VARIANTS, *PRIOR_VARIANTS, *CASCADE_VARIANTS, *LITE_VARIANTS, "script-floor", "export"),
        help=argparse.SUPPRESS,
    )
    args = parser.parse_args()
    if args.memory_variant == "script-floor":
        return script_floor_one(args.real_dir)
    if args.memory_variant == "export":
        return export_one(args.real_dir)
    if args.memory_variant:
        return memory_one(args.memory_variant)
    print(f"torch threads: {torch.get_num_threads()}")
    if args.only in (None, "memory"):
        memory()  # first, for the same reason as in wuerstchen()
    if args.only in (None, "layers"):
        layers(args.repeats, args.conv_rank)
    if args.only in (None, "unet"):
        unet(max(1, args.repeats // 2))
    if args.only in (None, "wuerstchen"):
        wuerstchen(max(1, args.repeats // 2))
    if args.only in (None, "cascade-block"):
        cascade_block(args.repeats)
    if args.only in (None, "effnet"):
        effnet(args.repeats)
    if args.only in (None, "cascade", "cascade-lite"):
        stable_cascade(max(1, args.repeats // 2), lite_only=args.only == "cascade-lite")
    if args.only in (None, "script"):
        script(args.real_dir, args.script_steps, args.conv_rank)
    if args.only in (None, "export"):
        export_checkpoint(args.real_dir)


if __name__ == "__main__":
    main()

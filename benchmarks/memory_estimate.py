"""Estimate GPU memory for real SDXL LoKr (1024 px), Wuerstchen prior LoRA (768 px) and Stable Cascade stage C
LoRA (1024 px) training.

    python benchmarks/memory_estimate.py              # the GPU memory table of docs/performance.md
    python benchmarks/memory_estimate.py --breakdown  # stage C: saved bytes per module type, frozen vs LoRA r8

Nothing is downloaded and no GPU is needed: the real architectures are built on the meta device from
their published configs, so parameter counts are exact; activation memory is the total size of the
tensors autograd saves for backward during one forward pass (counted with saved_tensors_hooks on meta
tensors; parameters and tokens x tokens attention maps excluded, as PyTorch SDPA's flash and
memory-efficient kernels do not keep them). With gradient checkpointing the saved tensors are those outside the
checkpointed blocks, plus each block's input, plus the largest single block's activations (recomputed
one block at a time). Memory = frozen weights (bf16) + adapter weights and gradients (fp32) + AdamW8bit
state (2 bytes per adapter parameter) + activations (bf16) + 1 GiB for the CUDA context and workspaces.
With caching (--cache_latents/--cache_image_embeddings, --cache_text_embeddings) the encoders leave the GPU.
Stage C's attention has more keys than queries (its own tokens and the 77 + 8 conditioning ones), so its maps
are not square: there SDPA is replaced during the count by a stand-in that saves what the CPU / GPU flash
kernels save (query, key, value, output and the log-sum-exp), not the map.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import Counter

import torch
from torch import nn

GIB = 2**30
CONTEXT = 1 * GIB
BF16 = 2


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_activation_bytes(model: nn.Module, run) -> int:
    """Bytes autograd saves for backward during run() (meta tensors; parameters not counted)."""
    return sum(SavedTensors(model, run).per_block.values())


def storage_of(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor owning the memory (a view's base): ops save views such as a weight's transpose, or the
    same input several times (to_q, to_k, to_v), and those cost nothing more."""
    return tensor if tensor._base is None else tensor._base


def is_attention_map(tensor: torch.Tensor) -> bool:
    """A (tokens x tokens) attention matrix: SDPA's flash / memory-efficient kernels never store it."""
    return tensor.dim() >= 3 and tensor.shape[-1] == tensor.shape[-2] and tensor.shape[-1] >= 256


class SavedTensors:
    """The memory autograd keeps for backward during run(): each storage once, parameters' not at all,
    attributed to the innermost of `blocks` running when it was first saved (-1: outside them)."""

    def __init__(self, model: nn.Module, run, blocks: list[nn.Module] = ()) -> None:
        parameters = {id(p) for p in model.parameters()}
        self.per_block: dict[int, int] = {}
        self.block_inputs: dict[int, int] = {}
        seen: dict[int, torch.Tensor] = {}  # keeps the saved tensors alive, so ids stay unique
        current = [-1]

        def pack(tensor):
            base = storage_of(tensor)
            if id(base) not in parameters and id(base) not in seen and not is_attention_map(tensor):
                seen[id(base)] = base
                self.per_block[current[-1]] = self.per_block.get(current[-1], 0) + base.untyped_storage().nbytes()
            return tensor

        handles = []
        for i, block in enumerate(blocks):

            def pre(module, args, kwargs, i=i):
                current.append(i)
                self.block_inputs[i] = sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))

            def post(module, args, kwargs, out, i=i):
                current.pop()

            handles += [
                block.register_forward_pre_hook(pre, with_kwargs=True),
                block.register_forward_hook(post, with_kwargs=True),
            ]
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            run()
        for handle in handles:
            handle.remove()


def block_peak(model: nn.Module, blocks: list[nn.Module], run) -> tuple[int, int]:
    """(largest single block's saved bytes, sum of the blocks' input bytes) during one forward."""
    saved = SavedTensors(model, run, blocks)
    return max(v for k, v in saved.per_block.items() if k >= 0), sum(saved.block_inputs.values())


def add_adapter(model: nn.Module, kind: str, rank: int) -> tuple[int, nn.Module]:
    from peft import LoKrConfig, LoraConfig, get_peft_model

    from difftune.adapters.lokr import use_factored_forward

    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    config = (
        LoKrConfig(r=rank, alpha=rank, target_modules=targets)
        if kind == "lokr"
        else LoraConfig(r=rank, lora_alpha=rank, target_modules=targets)
    )
    model.requires_grad_(False)
    peft_model = get_peft_model(model, config)
    # As training runs it: LoKr Linear layers contract with the factors, no kron(w1, w2) delta saved per layer.
    use_factored_forward(peft_model)
    return sum(p.numel() for p in peft_model.parameters() if p.requires_grad), peft_model


# OpenCLIP ViT-bigG-14's text tower: SDXL's second text encoder and the Wuerstchen prior's.
OPENCLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
}


def sdxl_models() -> tuple[nn.Module, nn.Module, nn.Module, nn.Module]:
    """The real SDXL-base UNet, CLIP-L and OpenCLIP-bigG text encoders and VAE from their published configs
    (random weights; call under accelerate.init_empty_weights() for meta tensors)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(
        sample_size=128,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        block_out_channels=(320, 640, 1280),
        layers_per_block=2,
        transformer_layers_per_block=(1, 2, 10),
        attention_head_dim=(5, 10, 20),
        use_linear_projection=True,
        cross_attention_dim=2048,
        addition_embed_type="text_time",
        addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816,
    )
    te1 = CLIPTextModel(
        CLIPTextConfig(
            hidden_size=768,
            intermediate_size=3072,
            num_hidden_layers=12,
            num_attention_heads=12,
            hidden_act="quick_gelu",
        )
    )
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, projection_dim=1280))
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        block_out_channels=(128, 256, 512, 512),
        layers_per_block=2,
        latent_channels=4,
    )
    return unet, te1, te2, vae


def sdxl(resolution: int = 1024, dtype: torch.dtype = torch.bfloat16, adapter: bool = True) -> dict:
    """Parameter counts and saved bytes for SDXL LoKr r8 (or the frozen UNet) at batch 1, input requiring grad."""
    from accelerate import init_empty_weights
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    with init_empty_weights():
        unet, te1, te2, vae = sdxl_models()
    frozen = count(unet)
    trained, model = add_adapter(unet, "lokr", 8) if adapter else (0, unet.requires_grad_(False))
    blocks = [m for m in unet.modules() if isinstance(m, (BasicTransformerBlock, ResnetBlock2D))]
    side = resolution // 8

    def run():
        def meta(*shape):
            return torch.zeros(*shape, device="meta", dtype=dtype)

        x = meta(1, 4, side, side).requires_grad_(not adapter)
        embeds = {"text_embeds": meta(1, 1280), "time_ids": meta(1, 6)}
        return model(x, meta(1).long(), meta(1, 77, 2048), added_cond_kwargs=embeds).sample

    unet.to(dtype)
    saved = SavedTensors(unet, run, blocks)
    return {
        "name": f"SDXL LoKr r8, {resolution} px, batch 1",
        "denoiser": frozen,
        "adapter": trained,
        "encoders": count(te1) + count(te2) + count(vae),
        **totals(saved),
    }


def totals(saved: SavedTensors) -> dict:
    """Saved bytes without and with gradient checkpointing of the blocks (outside the blocks, every block's
    input, and the largest block's activations while it is recomputed)."""
    inside = {k: v for k, v in saved.per_block.items() if k >= 0}
    return {
        "activations": sum(saved.per_block.values()),
        "checkpointed": saved.per_block.get(-1, 0) + sum(saved.block_inputs.values()) + max(inside.values()),
    }


def wuerstchen_models() -> tuple[nn.Module, nn.Module, nn.Module]:
    """The real Wuerstchen v2 prior (warp-ai/wuerstchen-prior's config), its CLIP ViT-bigG text encoder and the
    EfficientNet image encoder (random weights; call under accelerate.init_empty_weights() for meta tensors)."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftune.models.wuerstchen import EfficientNetEncoder

    prior = WuerstchenPrior(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1)
    text = CLIPTextModel(CLIPTextConfig(**OPENCLIP_BIGG))
    return prior, text, EfficientNetEncoder()


def wuerstchen(resolution: int = 768, batch: int = 4, dtype: torch.dtype = torch.bfloat16, adapter: bool = True):
    """Parameter counts and saved bytes for the Wuerstchen prior with LoRA r8 (or frozen, input requiring grad)."""
    from accelerate import init_empty_weights
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import AttnBlock, ResBlock, TimestepBlock

    with init_empty_weights():
        prior, text, effnet = wuerstchen_models()
    frozen = count(prior)
    trained, model = add_adapter(prior, "lora", 8) if adapter else (0, prior.requires_grad_(False))
    blocks = [m for m in prior.modules() if isinstance(m, (AttnBlock, ResBlock, TimestepBlock))]
    prior.to(dtype)
    side = resolution // 32  # EfficientNet latents: stride 32

    def run():
        x = torch.zeros(batch, 16, side, side, device="meta", dtype=dtype).requires_grad_(not adapter)
        r = torch.zeros(batch, device="meta", dtype=dtype)
        return model(x, r, torch.zeros(batch, 77, 1280, device="meta", dtype=dtype))

    saved = SavedTensors(prior, run, blocks)
    return {
        "name": f"Wuerstchen prior LoRA r8, {resolution} px, batch {batch}",
        "denoiser": frozen,
        "adapter": trained,
        "encoders": count(text) + count(effnet),
        **totals(saved),
    }


# stabilityai/stable-cascade-prior's prior/ and prior_lite/ configs (what differs from StableCascadeUNet's defaults).
STAGE_C = {"clip_text_in_channels": 1280, "clip_image_in_channels": 768, "switch_level": (False,)}
STAGE_C_LITE = {
    **STAGE_C, "conditioning_dim": 1536, "block_out_channels": (1536, 1536), "num_attention_heads": (24, 24),
    "down_num_layers_per_block": (4, 12), "up_num_layers_per_block": (12, 4),
}  # fmt: skip


class _FlashAttention(torch.autograd.Function):
    """SDPA's output with what the flash kernels save for backward (meta tensors only: never computed)."""

    @staticmethod
    def forward(ctx, query, key, value):
        out = torch.empty_like(query)
        ctx.save_for_backward(query, key, value, out, query.new_empty(query.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        query, key, value, *_ = ctx.saved_tensors
        return torch.empty_like(query), torch.empty_like(key), torch.empty_like(value)


@contextlib.contextmanager
def flash_attention():
    """torch.nn.functional.scaled_dot_product_attention saving no attention map (no mask / dropout support)."""
    original = torch.nn.functional.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        assert attn_mask is None and not is_causal, "the stand-in has no mask"
        return _FlashAttention.apply(query, key, value)

    torch.nn.functional.scaled_dot_product_attention = sdpa
    try:
        yield
    finally:
        torch.nn.functional.scaled_dot_product_attention = original


def stable_cascade_models(lite: bool = False) -> tuple[nn.Module, nn.Module, nn.Module]:
    """The real Stable Cascade stage C (prior/ or prior_lite/ config), its CLIP-G text encoder with projection and
    the EfficientNet image encoder (random weights; call under accelerate.init_empty_weights() for meta tensors)."""
    from diffusers import StableCascadeUNet
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    from difftune.models.wuerstchen import EfficientNetEncoder

    prior = StableCascadeUNet(**(STAGE_C_LITE if lite else STAGE_C))
    text = CLIPTextModelWithProjection(CLIPTextConfig(**OPENCLIP_BIGG, projection_dim=1280))
    return prior, text, EfficientNetEncoder(affine=False)


def stage_c_run(model: nn.Module, resolution: int, batch: int, dtype: torch.dtype, adapter: bool):
    """One forward of stage C on meta inputs: 16 x (resolution / 42.67) latents, CLIP-G text, zero CLIP image."""
    side = resolution * 3 // 128  # 1024 px: 24 x 24 (the pipeline's resolution_multiple 42.67)

    def meta(*shape):
        return torch.zeros(*shape, device="meta", dtype=dtype)

    def run():
        x = meta(batch, 16, side, side).requires_grad_(not adapter)
        text = {"clip_text": meta(batch, 77, 1280), "clip_text_pooled": meta(batch, 1, 1280)}
        with flash_attention():
            return model(x, meta(batch), **text, clip_img=meta(batch, 1, 768), return_dict=False)[0]

    return run


def stable_cascade(
    lite: bool = False, resolution: int = 1024, batch: int = 1, dtype: torch.dtype = torch.bfloat16, adapter=True
) -> dict:
    """Parameter counts and saved bytes for stage C with LoRA r8 (or frozen, input requiring grad)."""
    from accelerate import init_empty_weights
    from diffusers.models.unets.unet_stable_cascade import SDCascadeAttnBlock, SDCascadeResBlock, SDCascadeTimestepBlock

    with init_empty_weights():
        prior, text, effnet = stable_cascade_models(lite)
    frozen = count(prior)
    trained, model = add_adapter(prior, "lora", 8) if adapter else (0, prior.requires_grad_(False))
    kinds = (SDCascadeAttnBlock, SDCascadeResBlock, SDCascadeTimestepBlock)
    blocks = [m for m in prior.modules() if isinstance(m, kinds)]
    prior.to(dtype)
    saved = SavedTensors(prior, stage_c_run(model, resolution, batch, dtype, adapter), blocks)
    return {
        "name": f"Stable Cascade stage C{' lite' if lite else ''} LoRA r8, {resolution} px, batch {batch}",
        "denoiser": frozen,
        "adapter": trained,
        "encoders": count(text) + count(effnet),
        **totals(saved),
    }


def saved_by_module_type(lite: bool, dtype: torch.dtype, adapter: bool, resolution: int = 1024) -> Counter:
    """Stage C's saved bytes (as SavedTensors counts them) by the type of the innermost module saving each storage
    first; LoRA's lora_A / lora_B are named as such."""
    from accelerate import init_empty_weights

    with init_empty_weights():
        prior = stable_cascade_models(lite)[0]
    model = add_adapter(prior, "lora", 8)[1] if adapter else prior.requires_grad_(False)
    prior.to(dtype)
    parameters = {id(p) for p in model.parameters()}
    stack, per_type, seen = ["(outside modules)"], Counter(), {}

    def pack(tensor):
        base = storage_of(tensor)
        if id(base) not in parameters and id(base) not in seen:
            seen[id(base)] = base
            per_type[stack[-1]] += base.untyped_storage().nbytes()
        return tensor

    handles = []
    for name, module in model.named_modules():
        label = name.rsplit(".", 2)[-2] if name.endswith(".default") else type(module).__name__
        handles.append(module.register_forward_pre_hook(lambda m, a, label=label: stack.append(label)))
        handles.append(module.register_forward_hook(lambda m, a, out: stack.pop() and None))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        stage_c_run(model, resolution, 1, dtype, adapter)()
    for handle in handles:
        handle.remove()
    return per_type


def stage_c_flops(lite: bool, adapter: bool, resolution: int = 1024) -> int:
    """FLOPs of one fwd+bwd of stage C at batch 1 (torch's FlopCounterMode on meta tensors; real SDPA)."""
    from accelerate import init_empty_weights
    from torch.utils.flop_counter import FlopCounterMode

    with init_empty_weights():
        prior = stable_cascade_models(lite)[0]
    model = add_adapter(prior, "lora", 8)[1] if adapter else prior.requires_grad_(False)
    side = resolution * 3 // 128

    def meta(*shape):
        return torch.zeros(*shape, device="meta")

    x = meta(1, 16, side, side).requires_grad_(True)
    with FlopCounterMode(display=False) as counter:
        text = {"clip_text": meta(1, 77, 1280), "clip_text_pooled": meta(1, 1, 1280), "clip_img": meta(1, 1, 768)}
        model(x, meta(1), **text, return_dict=False)[0].square().mean().backward()
    return counter.get_total_flops()


def breakdown() -> None:
    """Per module type, what stage C saves for backward, frozen vs LoRA r8 (1024 px, batch 1); and the FLOPs."""
    for lite in (True, False):
        frozen, lora = stage_c_flops(lite, False), stage_c_flops(lite, True)
        print(
            f"stage C{' lite' if lite else ''}, 1024 px, batch 1, fwd+bwd (input requiring grad when frozen): "
            f"{frozen / 1e12:.3f} TFLOP frozen, {lora / 1e12:.3f} TFLOP LoRA r8 ({lora / frozen:.4f}x)"
        )
        for dtype in (torch.bfloat16, torch.float32):
            frozen, lora = saved_by_module_type(lite, dtype, False), saved_by_module_type(lite, dtype, True)
            total_f, total_l = sum(frozen.values()), sum(lora.values())
            print(
                f"stage C{' lite' if lite else ''}, {str(dtype).removeprefix('torch.')}, 1024 px, batch 1: saved "
                f"{total_f / GIB:.3f} GiB frozen, {total_l / GIB:.3f} GiB LoRA r8 (+{(total_l - total_f) / GIB:.3f})"
            )
            for kind in sorted(frozen.keys() | lora.keys(), key=lambda k: -max(frozen[k], lora[k])):
                print(f"  {kind:<24} {frozen[kind] / 2**20:9.1f} MiB  {lora[kind] / 2**20:9.1f} MiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--breakdown", action="store_true", help="Stage C's saved bytes per module type.")
    if parser.parse_args().breakdown:
        return breakdown()
    print("| run | gradient checkpointing | encoders on GPU (no caching) | with caching |")
    print("|---|---|---|---|")
    cascade = [stable_cascade(lite, batch=batch) for lite in (True, False) for batch in (1, 4)]
    for estimate in (sdxl(), wuerstchen(), *cascade):
        weights = estimate["denoiser"] * BF16
        adapter = estimate["adapter"] * (4 + 4 + 2)  # fp32 weights + fp32 grads + 8-bit Adam's two states
        for checkpointing in (False, True):
            acts = estimate["checkpointed" if checkpointing else "activations"]
            cached = weights + adapter + acts + CONTEXT
            uncached = cached + estimate["encoders"] * BF16
            print(
                f"| {estimate['name']} | {'on' if checkpointing else 'off'} | "
                f"{uncached / GIB:.1f} GiB | {cached / GIB:.1f} GiB |"
            )
        print(
            f"<!-- {estimate['name']}: denoiser {estimate['denoiser'] / 1e9:.3f} B params, adapter "
            f"{estimate['adapter'] / 1e6:.2f} M, encoders {estimate['encoders'] / 1e9:.3f} B, activations "
            f"{estimate['activations'] / GIB:.2f} GiB, checkpointed {estimate['checkpointed'] / GIB:.2f} GiB -->"
        )


if __name__ == "__main__":
    main()

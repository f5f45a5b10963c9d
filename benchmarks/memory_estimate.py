"""Estimate GPU memory for real SDXL LoKr (1024 px) and Wuerstchen prior LoRA (768 px) training.

    python benchmarks/memory_estimate.py

Nothing is downloaded and no GPU is needed: the real architectures are built on the meta device from
their published configs, so parameter counts are exact; activation memory is the total size of the
tensors autograd saves for backward during one forward pass (counted with saved_tensors_hooks on meta
tensors; parameters and tokens x tokens attention maps excluded, as PyTorch SDPA's flash and
memory-efficient kernels do not keep them). With gradient checkpointing the saved tensors are those outside the
checkpointed blocks, plus each block's input, plus the largest single block's activations (recomputed
one block at a time). Memory = frozen weights (bf16) + adapter weights and gradients (fp32) + AdamW8bit
state (2 bytes per adapter parameter) + activations (bf16) + 1 GiB for the CUDA context and workspaces.
With caching (--cache_latents/--cache_image_embeddings, --cache_text_embeddings) the encoders leave the GPU.
"""

from __future__ import annotations

import torch
from torch import nn

GIB = 2**30
CONTEXT = 1 * GIB
BF16 = 2


def count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def saved_activation_bytes(model: nn.Module, run) -> int:
    """Bytes autograd saves for backward during run() (meta tensors; parameters not counted)."""
    parameters = {id(p) for p in model.parameters()}
    total = 0

    def pack(tensor):
        nonlocal total
        total += saved_bytes(tensor, parameters)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        run()
    return total


def is_attention_map(tensor: torch.Tensor) -> bool:
    """A (tokens x tokens) attention matrix: SDPA's flash / memory-efficient kernels never store it."""
    return tensor.dim() >= 3 and tensor.shape[-1] == tensor.shape[-2] and tensor.shape[-1] >= 256


def saved_bytes(tensor: torch.Tensor, parameters: set[int]) -> int:
    if id(tensor) in parameters or is_attention_map(tensor):
        return 0
    return tensor.numel() * tensor.element_size()


def block_peak(model: nn.Module, blocks: list[nn.Module], run) -> tuple[int, int]:
    """(largest single block's saved bytes, sum of the blocks' input bytes) during one forward."""
    per_block, block_inputs, current = {}, {}, []
    parameters = {id(p) for p in model.parameters()}

    def pack(tensor):
        if current:
            per_block[current[-1]] = per_block.get(current[-1], 0) + saved_bytes(tensor, parameters)
        return tensor

    handles = []
    for i, block in enumerate(blocks):

        def pre(module, args, kwargs, i=i):
            current.append(i)
            block_inputs[i] = sum(a.numel() * a.element_size() for a in args if torch.is_tensor(a))

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
    return max(per_block.values()), sum(block_inputs.values())


def add_adapter(model: nn.Module, kind: str, rank: int) -> tuple[int, nn.Module]:
    from peft import LoKrConfig, LoraConfig, get_peft_model

    from difftune.lokr import use_factored_forward

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


def sdxl() -> dict:
    from accelerate import init_empty_weights
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    with init_empty_weights():
        unet, te1, te2, vae = sdxl_models()
    frozen = count(unet)
    adapter, peft_unet = add_adapter(unet, "lokr", 8)
    blocks = [m for m in unet.modules() if isinstance(m, (BasicTransformerBlock, ResnetBlock2D))]

    def run():
        x = torch.zeros(1, 4, 128, 128, device="meta", dtype=torch.bfloat16)
        out = peft_unet(
            x,
            torch.zeros(1, device="meta", dtype=torch.long),
            torch.zeros(1, 77, 2048, device="meta", dtype=torch.bfloat16),
            added_cond_kwargs={
                "text_embeds": torch.zeros(1, 1280, device="meta", dtype=torch.bfloat16),
                "time_ids": torch.zeros(1, 6, device="meta", dtype=torch.bfloat16),
            },
        ).sample
        return out

    unet.to(torch.bfloat16)
    activations = saved_activation_bytes(unet, run)
    largest, inputs = block_peak(unet, blocks, run)
    return {
        "name": "SDXL LoKr r8, 1024 px, batch 1",
        "denoiser": frozen,
        "adapter": adapter,
        "encoders": count(te1) + count(te2) + count(vae),
        "activations": activations,
        "checkpointed": inputs + largest,
    }


def wuerstchen_models() -> tuple[nn.Module, nn.Module, nn.Module]:
    """The real Wuerstchen v2 prior (warp-ai/wuerstchen-prior's config), its CLIP ViT-bigG text encoder and the
    EfficientNet image encoder (random weights; call under accelerate.init_empty_weights() for meta tensors)."""
    from diffusers.pipelines.deprecated.wuerstchen import WuerstchenPrior
    from transformers import CLIPTextConfig, CLIPTextModel

    from difftune.wuerstchen import EfficientNetEncoder

    prior = WuerstchenPrior(c_in=16, c=1536, c_cond=1280, c_r=64, depth=32, nhead=24, dropout=0.1)
    text = CLIPTextModel(CLIPTextConfig(**OPENCLIP_BIGG))
    return prior, text, EfficientNetEncoder()


def wuerstchen() -> dict:
    from accelerate import init_empty_weights
    from diffusers.pipelines.deprecated.wuerstchen.modeling_wuerstchen_common import AttnBlock, ResBlock, TimestepBlock

    with init_empty_weights():
        prior, text, effnet = wuerstchen_models()
    frozen = count(prior)
    adapter, peft_prior = add_adapter(prior, "lora", 8)
    blocks = [m for m in prior.modules() if isinstance(m, (AttnBlock, ResBlock, TimestepBlock))]
    prior.to(torch.bfloat16)
    batch = 4

    def run():
        return peft_prior(
            torch.zeros(batch, 16, 24, 24, device="meta", dtype=torch.bfloat16),
            torch.zeros(batch, device="meta", dtype=torch.bfloat16),
            torch.zeros(batch, 77, 1280, device="meta", dtype=torch.bfloat16),
        )

    activations = saved_activation_bytes(prior, run)
    largest, inputs = block_peak(prior, blocks, run)
    return {
        "name": f"Wuerstchen prior LoRA r8, 768 px, batch {batch}",
        "denoiser": frozen,
        "adapter": adapter,
        "encoders": count(text) + count(effnet),
        "activations": activations,
        "checkpointed": inputs + largest,
    }


def main() -> None:
    print("| run | gradient checkpointing | encoders on GPU (no caching) | with caching |")
    print("|---|---|---|---|")
    for estimate in (sdxl(), wuerstchen()):
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

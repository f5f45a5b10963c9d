"""LyCORIS on SDXL: its presets as our target modules, SDXL's layer shapes, and how peft and LyCORIS factor a
LoKr layer's dimensions (`factorize`)."""

from __future__ import annotations

# LyCORIS presets (lycoris.config.PRESET) on kohya's SDXL U-Net, by the diffusers names of the same layers: U-Net
# targets, text-encoder targets. Its `conv_in` / `time_embedding` names match nothing in kohya's SDXL U-Net.
ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
TRANSFORMER = [*ATTN, "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out"]
RESNET_LINEAR = ["time_emb_proj", "conv_shortcut"]  # (a Linear and a 1x1 conv: adapted even without conv layers)
CONVS = ["conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"]  # 3x3: only presets that enable convs
TE_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]
TE_ALL = [*TE_ATTN, "fc1", "fc2"]
PRESETS = {
    "full": ([*TRANSFORMER, *RESNET_LINEAR, *CONVS], TE_ALL),
    "full-lin": ([*TRANSFORMER, *RESNET_LINEAR], TE_ALL),
    "attn-mlp": (TRANSFORMER, TE_ALL),
    "attn-only": (ATTN, TE_ATTN),
    "unet-only": ([*TRANSFORMER, *RESNET_LINEAR, *CONVS], []),
    "unet-transformer-only": (TRANSFORMER, []),
    "unet-convblock-only": ([*RESNET_LINEAR, *CONVS], []),
}
# SDXL's layer shapes (out, in) by target name: the U-Net's (transformers at 640 and 1280 channels, resnets at
# 320 / 640 / 1280 with the up blocks' concatenated inputs) and both text encoders'.
_RESNETS = [(320, 320), (640, 320), (640, 640), (1280, 640), (1280, 1280), (1280, 2560), (1280, 1920),
            (640, 1920), (640, 1280), (640, 960), (320, 960), (320, 640)]  # fmt: skip
SDXL_SHAPES = {
    "to_q": [(640, 640), (1280, 1280)],
    "to_k": [(640, 640), (1280, 1280), (640, 2048), (1280, 2048)],
    "to_out.0": [(640, 640), (1280, 1280)],
    "ff.net.0.proj": [(5120, 640), (10240, 1280)],
    "ff.net.2": [(640, 2560), (1280, 5120)],
    "proj_in": [(640, 640), (1280, 1280)],
    "conv1": _RESNETS,
    "conv2": [(320, 320), (640, 640), (1280, 1280)],
    "time_emb_proj": [(320, 1280), (640, 1280), (1280, 1280)],
    "conv_shortcut": [shape for shape in _RESNETS if shape[0] != shape[1]],
    "downsamplers.0.conv": [(320, 320), (640, 640)],
    "q_proj": [(768, 768), (1280, 1280)],
    "fc1": [(3072, 768), (5120, 1280)],
    "fc2": [(768, 3072), (1280, 5120)],
}
SDXL_SHAPES |= {"to_v": SDXL_SHAPES["to_k"], "proj_out": SDXL_SHAPES["proj_in"], "upsamplers.0.conv": [(640, 640),
                (1280, 1280)]} | dict.fromkeys(("k_proj", "v_proj", "out_proj"), SDXL_SHAPES["q_proj"])  # fmt: skip

SPATIAL_CONVS = {"conv1", "conv2", "downsamplers.0.conv", "upsamplers.0.conv"}  # (3x3 in SDXL)


def factorize(dim: int, factor: int, *, lycoris: bool) -> tuple[int, int]:
    """(w1's side, w2's side) of one dimension, as peft's and LyCORIS's `factorization` split it: a factor that
    divides the dimension is taken as is (LyCORIS: the smaller side first), else the divisor pair nearest the
    factor (-1: nearest sqrt)."""
    if factor > 0 and dim % factor == 0:
        pair = (factor, dim // factor)
        return (min(pair), max(pair)) if lycoris else pair
    limit = dim if factor < 0 else factor
    m, n = 1, dim
    while m < n:
        step = m + 1
        while dim % step:
            step += 1
        if step > limit:
            break
        m, n = step, dim // step
    return (min(m, n), max(m, n))

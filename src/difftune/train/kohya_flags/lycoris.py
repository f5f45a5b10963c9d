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


class LycorisNetworkArgs:
    """A Translation's LyCORIS section: lycoris.kohya's network_args as our LoKr flags, and the scales LyCORIS and
    peft agree on (uses the Translation's put / number / switch / current and its refusals and notes)."""

    def lycoris(self, args: dict[str, str]) -> None:
        """LyCORIS's kohya network (lycoris.kohya create_network) as our LoKr flags."""
        key = "network_args"
        algo = args.pop("algo", None)
        if algo is None:
            self.refused.append("network_args without algo: lycoris.kohya then trains LoCon; this script trains LoKr: "
                                "add algo=lokr")  # fmt: skip
        elif algo.lower() != "lokr":
            self.refused.append(f"network_args algo={algo}: this script trains LoKr (algo=lokr)")
        self.put("lokr_init", "lycoris", key)  # LyCORIS starts w2 (its bigger factor) at zero
        factor = self.number(key, int, args.pop("factor", "-1"))
        if factor is not None:
            if factor == 0:
                self.refused.append("network_args factor=0: give a positive factor or -1 (near sqrt(dim))")
            self.put("decompose_factor", -1 if factor < 0 else factor, key)  # (LyCORIS: any negative is -1)
        if "decompose_both" in args:
            self.put("decompose_both", self.switch(key, args.pop("decompose_both")), key)
        for name in ("rank_dropout", "module_dropout"):
            if name in args:
                self.put(name, self.number(key, float, args.pop(name)), key)
        preset = args.pop("preset", "full")
        if preset not in PRESETS:
            self.refused.append(f"network_args preset={preset}: difftune knows LyCORIS's {', '.join(PRESETS)}")
            preset = "full"
        unet, text_encoders = PRESETS[preset]
        self.put("target_modules", unet, key)
        if text_encoders:
            self.put("text_encoder_target_modules", text_encoders, key)
        self.encoders_adapted = bool(text_encoders)
        convs = "conv1" in unet
        for name, dest, kind in (("conv_dim", "conv_rank", int), ("conv_alpha", "conv_alpha", float)):
            value = self.number(key, kind, args.pop(name)) if name in args else None
            if value and convs:  # (LyCORIS reads 0 as "the linear layers' value")
                self.put(dest, value, key)
            elif value:
                self.noted[f"network_args {name}"] = f"preset {preset} adapts no 3x3 conv layer"
        for name in ("use_tucker", "use_cp", "use_conv_cp"):
            if self.switch(key, args.pop(name, False)):
                self.refused.append(f"network_args {name}: Tucker conv factors are not supported")
        if "disable_conv_cp" in args and not self.switch(key, args.pop("disable_conv_cp")):
            self.refused.append("network_args disable_conv_cp=False: Tucker conv factors are not supported")
        for name in ("full_matrix", "use_scalar", "train_norm", "dora_wd", "rs_lora", "unbalanced_factorization"):
            if self.switch(key, args.pop(name, False)):
                hint = " (a large network_dim, e.g. 100000, keeps every factor full)" if name == "full_matrix" else ""
                self.refused.append(f"network_args {name}: not supported{hint}")
        ignored = {"dropout": "LyCORIS's LoKr has no neuron dropout", "bypass_mode": "the same weights, computed so",
                   "rank_dropout_scale": "lycoris.kohya does not pass it on"}  # fmt: skip
        for name in [n for n in args if n in ignored or n.startswith("loraplus_")]:
            self.noted[f"network_args {name}"] = ignored.get(name, "LoRA+ scales lora_up weights, which LoKr has not")
            args.pop(name)
        self.refused += [f"network_args {name}: not a LoKr setting difftune knows" for name in args]
        self.check_scales()

    def check_scales(self) -> None:
        """LyCORIS scales a LoKr layer by alpha / dim only where a factor is split, by 1 where both are full; peft by
        alpha / rank everywhere. The same training where SDXL's targeted layers agree, refused where they mix."""
        rank, alpha = self.current("rank", 8), self.current("alpha", 8.0)  # (ours, on a command line)
        factor, both = self.current("decompose_factor", -1), self.current("decompose_both", False)
        if not all(isinstance(v, int | float) for v in (rank, alpha, factor)) or rank <= 0:
            return
        targets = list(self.current("target_modules", []))
        trains_encoders = self.current("train_text_encoder") or (
            self.config and self.encoders_adapted and not self.given("network_train_unet_only")
        )
        if trains_encoders:
            targets += list(self.current("text_encoder_target_modules", []))
        # Spatial convs train at conv_dim / conv_alpha (LyCORIS's rule: a 1x1 conv is a linear layer to it).
        groups = {"": (rank, alpha), "conv_": (self.current("conv_rank") or rank, self.current("conv_alpha") or alpha)}
        counts = {group: [0, 0] for group in groups}  # layers with both factors full, with one split
        swapped = set()
        for target in targets:
            group = "conv_" if target in SPATIAL_CONVS else ""
            group_rank = groups[group][0]
            for out_dim, in_dim in SDXL_SHAPES.get(target, []):
                ours = [factorize(d, factor, lycoris=False) for d in (out_dim, in_dim)]
                theirs = [factorize(d, factor, lycoris=True) for d in (out_dim, in_dim)]
                if ours != theirs:
                    swapped.add(min(out_dim, in_dim))
                (a, b), (c, d) = theirs
                full = not (both and group_rank < max(a, c) / 2) and group_rank >= max(b, d) / 2
                counts[group][0 if full else 1] += 1
        if swapped:
            self.refused.append(
                f"network_args factor={factor} is above sqrt({min(swapped)}): LyCORIS then swaps the two factors, "
                "peft does not; use a factor up to its square root"
            )
            return
        for group, (group_rank, group_alpha) in groups.items():
            full, split = counts[group]
            if not full or float(group_alpha) == float(group_rank):
                continue
            if split:
                names = ("conv_alpha", "conv_dim") if group else ("network_alpha", "network_dim")
                self.refused.append(
                    f"{names[0]} {group_alpha:g} with {names[1]} {group_rank} and factor {factor}: LyCORIS scales the "
                    f"{full} SDXL layers whose two factors are both full by 1 and the other {split} by alpha/dim, peft "
                    f"every layer by alpha/rank: set {names[0]} = {names[1]} (scale 1 everywhere, in LyCORIS too), or "
                    "a rank and factor that split every layer"
                )
            else:  # every factor full: LyCORIS's scale is 1 whatever the alpha
                self.out[group + "alpha"] = float(group_rank)

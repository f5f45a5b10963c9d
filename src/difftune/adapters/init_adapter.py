"""--init_adapter: start a new run (step 0, new optimizer) from an existing adapter.

SDXL takes one of our checkpoints (step<N>/ or its unet/), or a kohya / LyCORIS LoKr .safetensors
(lora_unet_*, lora_te1_*, lora_te2_*; what export.py and kohya sd-scripts + LyCORIS write). Rank, factor layout
and targets come from the source. ComfyUI and A1111 apply a kohya LoKr as s * kron(w1, w2) with s = alpha / dim
when an alpha is stored and a factor is split (dim: the split factor's rank), else 1; the run uses peft's scale 1
(alpha = rank) with s folded into w1, so it starts from exactly the model those programs show.
Wuerstchen takes our prior/ folder (or its step dir) or a diffusers pytorch_lora_weights.safetensors.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from difftune.adapters import injection
from difftune.cli.errors import UserError

# torch and difftune.formats.kohya (which needs it) are imported where used: the training scripts import this
# module for --init_adapter, and --help must not wait for torch.
if TYPE_CHECKING:
    import torch
    from torch import nn

logger = logging.getLogger("difftune")

FLAG = "--init_adapter"
# kohya's names (lora_unet_ with the SGM or diffusers UNet's paths; lora_te1_ with or without text_model_), and
# LyCORIS's own create_lycoris on a diffusers UNet (lycoris_<path>).
KOHYA_PREFIXES = {
    "lora_unet_": "unet",
    "lycoris_": "unet",
    "lora_te1_": "text_encoder_one",
    "lora_te2_": "text_encoder_two",
}
# Flags whose values come from the source (flag -> peft config key): given explicitly, they must agree with it.
FROM_SOURCE = {
    "rank": "r",
    "alpha": "alpha",
    "lora_alpha": "lora_alpha",
    "decompose_both": "decompose_both",
    "decompose_factor": "decompose_factor",
}


def add_init_adapter_args(group: argparse._ArgumentGroup) -> None:
    """--init_adapter, in the scripts' "model" group."""
    group.add_argument(
        FLAG,
        default=None,
        help="Start from this adapter (new run, step 0): a difftune checkpoint folder, or for SDXL a kohya / LyCORIS "
        "LoKr .safetensors, for Wuerstchen a diffusers pytorch_lora_weights.safetensors. Rank, factors and targets "
        "come from it.",
    )


def explicit_flags(argv: Sequence[str] | None) -> set[str]:
    """The --flags the user typed (so values taken from the source only clash with flags actually given)."""
    tokens = sys.argv[1:] if argv is None else [str(a) for a in argv]
    return {t[2:].split("=")[0] for t in tokens if t.startswith("--")}


@dataclass
class Source:
    """One model's adapter: peft settings and weights by module (peft module names, or kohya names until mapped)."""

    settings: dict
    weights: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    kohya: bool = False
    lokr: bool = True


def _group(state: dict[str, torch.Tensor], prefix: str = "base_model.model.") -> dict[str, dict[str, torch.Tensor]]:
    grouped: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in state.items():
        module, _, suffix = key.removeprefix(prefix).rpartition(".")
        grouped.setdefault(module, {})[suffix] = value.float()
    return grouped


def read_peft_folder(folder: Path) -> Source:
    from safetensors.torch import load_file

    config = json.loads((folder / "adapter_config.json").read_text())
    weights = load_file(str(folder / injection.ADAPTER_WEIGHTS))
    keys = ("r", "alpha", "lora_alpha", "decompose_both", "decompose_factor", "target_modules", "peft_type",
            "rank_pattern", "alpha_pattern")  # fmt: skip
    settings = {k: config[k] for k in keys if k in config}
    if config.get("use_effective_conv2d"):
        settings["use_effective_conv2d"] = True
    return Source(settings, _group(weights), lokr=config.get("peft_type") == "LOKR")


def read_folder(path: Path, names: Sequence[str]) -> dict[str, Source]:
    """Our checkpoint: step<N>/ (every adapter in it) or one model's subfolder (that model)."""
    if (path / "adapter_config.json").is_file():
        if path.name not in names:
            raise UserError(f"{FLAG} {path} is a {path.name}/ adapter; this script trains {', '.join(names)}")
        return {path.name: read_peft_folder(path)}
    found = {name: read_peft_folder(path / name) for name in names if (path / name / "adapter_config.json").is_file()}
    if not found:
        raise UserError(f"{FLAG} {path} holds no {'/ or '.join(names)}/ adapter: pass a checkpoint's step<N> folder")
    return found


def comfyui_scale(weights: dict[str, torch.Tensor]) -> float:
    """s of ComfyUI's / A1111's LoKr rule: alpha / dim with a stored alpha and a split factor, else 1."""
    dim = split_rank(weights)
    alpha = weights.get("alpha")
    return float(alpha) / dim if alpha is not None and dim is not None else 1.0


def layout(weights: dict[str, torch.Tensor]) -> tuple[tuple[int, int], tuple[int, int], bool, bool]:
    """((a, c), (b, d*k*k or d), w1 split, w2 split) of one module's stored LoKr factors."""
    w1_split, w2_split = "lokr_w1" not in weights, "lokr_w2" not in weights
    a = weights["lokr_w1_a"].shape[0] if w1_split else weights["lokr_w1"].shape[0]
    c = weights["lokr_w1_b"].shape[1] if w1_split else weights["lokr_w1"].shape[1]
    b = weights["lokr_w2_a"].shape[0] if w2_split else weights["lokr_w2"].shape[0]
    d = weights["lokr_w2_b"].shape[1] if w2_split else weights["lokr_w2"].shape[1]
    return (a, c), (b, d), w1_split, w2_split


def check_lokr_module(name: str, weights: dict[str, torch.Tensor], where: str) -> None:
    """Refuse, in one line each, the LyCORIS LoKr variants peft's LoKr cannot hold."""
    if "dora_scale" in weights:
        raise UserError(
            f"{FLAG} {where}: {name} is a DoRA LoKr (dora_scale: LyCORIS's dora_wd), whose weight norm peft's LoKr "
            "cannot hold: start from a LoKr trained without dora_wd, or merge this one into the base model first"
        )
    if "lokr_t2" in weights:
        raise UserError(
            f"{FLAG} {where}: {name} uses Tucker conv factors (lokr_t2: LyCORIS's use_tucker / use_cp), which peft's "
            "LoKr cannot hold: start from a LoKr trained without them, or merge this one into the base model first"
        )
    if not any(k.startswith("lokr_w1") for k in weights) or not any(k.startswith("lokr_w2") for k in weights):
        raise UserError(f"{FLAG} {where}: {name} is not a LoKr module (no lokr_w1 / lokr_w2): pass a LoKr file")


def split_rank(weights: dict[str, torch.Tensor]) -> int | None:
    """The rank of a module's split factor(s) (LyCORIS splits both at the same rank), None when both are full."""
    for key in ("lokr_w2_b", "lokr_w1_b"):
        if key in weights:
            return weights[key].shape[0]
    return None


def kohya_settings(modules: dict[str, dict[str, torch.Tensor]], metadata: dict, where: str) -> dict:
    """The rank most modules have and decompose_both of a kohya LoKr file (alpha folded: peft's alpha is the
    rank); other ranks become per-module patterns once the modules are known (`module_patterns`)."""
    for name, weights in modules.items():
        check_lokr_module(name, weights, where)
    ranks = Counter(r for r in map(split_rank, modules.values()) if r is not None)
    decompose_both = any(layout(w)[2] for w in modules.values())
    if ranks:
        rank = max(ranks, key=lambda r: (ranks[r], r))
    else:  # both factors full everywhere: the file's rank, if it says, else any rank that keeps them full
        needed = max(math.ceil(max(layout(w)[1]) / 2) for w in modules.values())
        rank = int(metadata.get("ss_network_dim", 0) or 0) or needed
    return {"r": rank, "alpha": rank, "decompose_both": decompose_both}


def module_patterns(source: Source, model: nn.Module) -> dict[str, int]:
    """Per-module ranks where a module's differs from the source's rank (as peft's rank_pattern): a split
    module's own rank, and for a module whose factors are both full the smallest rank at which peft keeps them
    full (if the source's rank does not). Its alpha is the same: alpha / rank folded, scale 1 everywhere."""
    rank, both = source.settings["r"], source.settings.get("decompose_both", False)
    patterns = {}
    for name, weights in source.weights.items():
        own = split_rank(weights)
        if own is None:
            weight = model.get_submodule(name).weight
            (a, c), (b, d), _, _ = layout(weights)
            d = weight.shape[1] // c  # (a full conv w2 is stored (b, d, k, k): its shape[1] is d)
            full_at = max(math.ceil(max(b, d) / 2), math.ceil(max(a, c) / 2) if both else 1, 1)
            own = rank if rank >= full_at else full_at
        if own != rank:
            patterns[name] = own
    return patterns


def read_kohya(path: Path) -> dict[str, Source]:
    state, metadata = _read(path)
    by_model: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
    for module, weights in _group(state, prefix="").items():
        model = next((m for p, m in KOHYA_PREFIXES.items() if module.startswith(p)), None)
        if model is None or not any(k.startswith("lokr_") for k in weights):
            raise UserError(
                f"{FLAG} {path}: {module} is not a kohya / LyCORIS LoKr module (lora_unet_*, lora_te1_*, lora_te2_* or "
                "lycoris_* with lokr_w1 / lokr_w2): pass an SDXL LoKr file"
            )
        by_model.setdefault(model, {})[module] = weights
    out = {}
    for model, modules in by_model.items():
        settings = kohya_settings(modules, metadata, str(path))
        folded = {}
        for name, weights in modules.items():
            scale = comfyui_scale(weights)
            left = "lokr_w1" if "lokr_w1" in weights else "lokr_w1_a"
            folded[name] = {k: v * scale if k == left else v for k, v in weights.items() if k != "alpha"}
        out[model] = Source(settings, folded, kohya=True)
    return out


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        return load_file(str(path)), metadata
    except Exception:  # noqa: BLE001 - any unreadable file is the same user error
        raise UserError(f"{FLAG} {path} is not a readable .safetensors file") from None


def read_source(path_text: str, names: Sequence[str]) -> dict[str, Source]:
    path = Path(path_text).expanduser()
    if path.is_dir():
        return read_folder(path, names)
    if not path.is_file():
        raise UserError(f"{FLAG} {path} does not exist: pass a checkpoint folder or an adapter .safetensors file")
    if path.suffix != ".safetensors":
        raise UserError(f"{FLAG} {path}: difftune loads adapters only from .safetensors files or checkpoint folders")
    if "unet" not in names:
        return read_diffusers_lora(path)
    return read_kohya(path)


def prepare(args: argparse.Namespace, argv: Sequence[str] | None, names: Sequence[str]) -> dict[str, Source] | None:
    """Read --init_adapter (if given), refuse flags that contradict it, and take its settings into `args`."""
    if not args.init_adapter:
        return None
    sources = read_source(args.init_adapter, names)
    if names[0] not in sources:
        raise UserError(f"{FLAG} {args.init_adapter} has no {names[0]} adapter")
    given = explicit_flags(argv)
    for flag in ("conv_rank", "conv_alpha"):
        if flag in given:
            raise UserError(f"--{flag} contradicts {FLAG}: every module's rank and alpha come from it: drop --{flag}")
    for flag, key in FROM_SOURCE.items():
        values = {s.settings[key] for s in sources.values() if key in s.settings}
        if not hasattr(args, flag) or not values:
            continue
        if flag in given and values != {getattr(args, flag)}:
            raise UserError(
                f"--{flag} {getattr(args, flag)} contradicts {FLAG} ({key} {sorted(values)[0]}): drop --{flag}, "
                "the adapter's settings come from it"
            )
        setattr(args, flag, sources[names[0]].settings.get(key, getattr(args, flag)))
    if any(name in sources for name in names[1:]):
        if getattr(args, "cache_text_embeddings", False):
            raise UserError(f"{FLAG} holds text-encoder adapters, which train: drop --cache_text_embeddings")
        args.train_text_encoder = True
    return sources


def kohya_names(model_name: str, model: nn.Module, unet_config: dict) -> dict[str, str]:
    """kohya name -> module path for every Linear / Conv2d of `model`."""
    from torch import nn

    from difftune.formats import kohya

    names = {}
    prefix = kohya.PREFIXES[model_name]
    for module_name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        with contextlib.suppress(UserError):  # no SGM name: only the diffusers-named forms below can adapt it
            names[kohya.kohya_name(model_name, module_name, unet_config)] = module_name
        flat = module_name.replace(".", "_")
        if model_name == "unet":
            names.setdefault(prefix + flat, module_name)  # kohya's network on diffusers' UNet
            names.setdefault("lycoris_" + flat, module_name)  # LyCORIS's create_lycoris
        else:  # LyCORIS under transformers 5: CLIPTextModel's paths without text_model.
            names.setdefault(prefix + flat.removeprefix("text_model_"), module_name)
    return names


def resolve_kohya(source: Source, model_name: str, model: nn.Module, unet_config: dict, where: str) -> None:
    names = kohya_names(model_name, model, unet_config)
    unknown = sorted(set(source.weights) - set(names))
    if unknown:
        raise UserError(f"{FLAG} {where}: {unknown[0]} names no module of this {model_name} (another architecture?)")
    source.weights = {names[k]: v for k, v in source.weights.items()}
    source.kohya = False


def check_targets(targets: list[str], modules: list[str], flag: str) -> None:
    stray = [m for m in modules if not any(m == t or m.endswith("." + t) for t in targets)]
    if stray:
        raise UserError(f"{FLAG} adapts {stray[0]}, which --{flag} does not name: drop --{flag}")


def decompose_factor(source: Source, model: nn.Module) -> int:
    """The peft decompose_factor that builds the most stored factor shapes (-1, the sqrt rule, when as many do);
    the modules it does not build keep their own (`lokr.fit_factors`)."""
    from peft.tuners.lokr.layer import factorization

    shapes = []  # (out, in, a, c): the weight's sides and w1's
    for name, weights in source.weights.items():
        weight = model.get_submodule(name).weight
        (a, c), _, _, _ = layout(weights)
        shapes.append((weight.shape[0], weight.shape[1], a, c))

    def built(factor: int) -> int:
        return sum(factorization(o, factor)[0] == a and factorization(i, factor)[0] == c for o, i, a, c in shapes)

    candidates = [-1, *sorted({a for _, _, a, _ in shapes} | {c for _, _, _, c in shapes})]
    return max(candidates, key=lambda factor: (built(factor), factor == -1))


def peft_state(source: Source) -> dict[str, torch.Tensor]:
    return {f"base_model.model.{m}.{s}": v for m, w in source.weights.items() for s, v in w.items()}


def load_into(peft_model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    from peft import set_peft_model_state_dict

    try:
        result = set_peft_model_state_dict(peft_model, state)
    except RuntimeError as error:
        raise UserError(
            f"{FLAG} {where} does not fit the adapter built from it: {str(error).splitlines()[-1]}"
        ) from None
    if result.unexpected_keys:
        raise UserError(f"{FLAG} {where}: {result.unexpected_keys[0]} does not fit this model's adapter")
    expected = {k for k in peft_model.state_dict() if ".lokr_" in k or ".lora_" in k}
    missing = [k for k in result.missing_keys if k in expected]
    if missing:
        raise UserError(f"{FLAG} {where}: no weight for {missing[0]}")


def attach_all(
    args: argparse.Namespace,
    make_config,
    base: str,
    denoiser: tuple[str, nn.Module],
    text_encoders: dict[str, nn.Module],
    sources: dict[str, Source] | None,
    argv: Sequence[str] | None,
) -> tuple[dict[str, nn.Module], list[dict]]:
    """injection.attach_all, but each adapter the source holds is built from its settings and starts from its
    weights; a text encoder it lacks (with --train_text_encoder) starts fresh from the flags."""
    if sources is None:
        return injection.attach_all(args, make_config, base, denoiser, text_encoders)
    from difftune.adapters import lokr

    given = explicit_flags(argv)
    models = {denoiser[0]: denoiser[1], **text_encoders}
    unet_config = dict(denoiser[1].config) if denoiser[0] == "unet" else {}
    trained, adapted = {}, {}
    for name, model in models.items():
        flag = "target_modules" if name == denoiser[0] else "text_encoder_target_modules"
        source = sources.get(name)
        if source is None:
            if name != denoiser[0] and args.train_text_encoder:
                trained[name] = injection.attach(model, make_config(args, getattr(args, flag)), base)
            continue
        if source.kohya:
            resolve_kohya(source, name, model, unet_config, args.init_adapter)
        modules = sorted({m.removesuffix(".lora_A").removesuffix(".lora_B") for m in source.weights})
        if flag in given:
            check_targets(getattr(args, flag), modules, flag)
        settings = dict(source.settings)
        if source.lokr and "decompose_factor" not in settings:
            settings["decompose_factor"] = decompose_factor(source, model)
        if source.lokr and "rank_pattern" not in settings:
            settings["rank_pattern"] = settings["alpha_pattern"] = module_patterns(source, model)
        adapted[flag] = modules
        trained[name] = injection.attach(model, config_for(args, make_config, settings, modules, model), base)
        state = peft_state(source)
        refitted = lokr.fit_factors(trained[name], state) if source.lokr else []
        load_into(trained[name], state, args.init_adapter)
        ranks = sorted({settings.get("r"), *settings.get("rank_pattern", {}).values()})
        logger.info("--init_adapter %s: %s starts from its %d adapted modules (rank %s, %s)", args.init_adapter,
                    name, len(modules), "/".join(map(str, ranks)), "LoKr" if source.lokr else "LoRA")  # fmt: skip
        if refitted:
            logger.info(
                "--init_adapter: %d %s modules keep factor shapes peft does not build (e.g. %s): the run's "
                "checkpoints load with infer.py, export.py and --resume_from_checkpoint, not PeftModel.from_pretrained",
                len(refitted), name, refitted[0],
            )  # fmt: skip
    # Recorded in args.json (exactly the modules the run adapts) only now: the loop reads the flags as typed.
    for flag, modules in adapted.items():
        setattr(args, flag, modules)
    adapted_text_encoders = [trained[n] for n in text_encoders if n in trained]
    if args.gradient_checkpointing:
        injection.enable_gradient_checkpointing(denoiser[1], adapted_text_encoders)
    return trained, injection.param_groups(args, trained[denoiser[0]], adapted_text_encoders)


def config_for(args: argparse.Namespace, make_config, settings: dict, modules: list[str], model: nn.Module):
    """The flags' config with the source's rank, alpha, per-module ranks, factors and exact target modules."""
    local = argparse.Namespace(**vars(args))
    for flag, key in FROM_SOURCE.items():
        if key in settings and hasattr(local, flag):
            setattr(local, flag, settings[key])
    config = make_config(local, modules, model)
    if hasattr(config, "rank_pattern"):  # the source's, not --conv_rank's
        config.rank_pattern = dict(settings.get("rank_pattern") or {})
        config.alpha_pattern = dict(settings.get("alpha_pattern") or {})
    return config


def read_diffusers_lora(path: Path) -> dict[str, Source]:
    """A diffusers pytorch_lora_weights.safetensors (Wuerstchen prior and text encoder LoRA)."""
    state, metadata = _read(path)
    stored = json.loads(metadata.get("lora_adapter_metadata", "{}"))
    out = {}
    for model in ("prior", "text_encoder"):
        part = {k.removeprefix(model + "."): v for k, v in state.items() if k.startswith(model + ".")}
        if not part:
            continue
        grouped = _group(part, prefix="")  # {"<module>.lora_A": {"weight": ...}}, as peft saves it
        ranks = {w["weight"].shape[0] for m, w in grouped.items() if m.endswith(".lora_A")}
        if len(ranks) != 1 or not all(m.endswith((".lora_A", ".lora_B")) for m in grouped):
            raise UserError(f"{FLAG} {path} is not a diffusers LoRA file (lora_A / lora_B, one rank per model)")
        rank = ranks.pop()
        # diffusers applies lora_alpha / r when the file stores it, else scale 1.
        alpha = stored.get(f"{model}.lora_alpha", stored.get("lora_alpha", rank))
        out[model] = Source({"r": rank, "lora_alpha": alpha}, grouped, lokr=False)
    if "prior" not in out:
        raise UserError(f"{FLAG} {path} holds no prior.* LoRA weights: pass a Wuerstchen pytorch_lora_weights file")
    return out

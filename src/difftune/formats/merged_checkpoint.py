"""export.py --format checkpoint: one single-file SDXL checkpoint (original layout) with the adapter merged.

The base model (diffusers folder, Hub id or single file) is read one tensor at a time, the adapter's delta is
added to each adapted weight (q / k / v into their rows of OpenCLIP's fused in_proj), and the result is written
straight into the .safetensors file: the header is known from the shapes up front, so at no time does more
than one weight (plus the small adapter factors) sit in memory. A single-file base keeps every key it has that
is not replaced (ComfyUI's `v_pred` / `ztsnr` markers among them).
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from difftune.cli.errors import UserError
from difftune.models import sgm_layout

SAFETENSORS_DTYPES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32"}
FLOAT_CODES = {"F16", "BF16", "F32", "F64"}
# fp8 bases (weight-only quantised files): their untouched tensors are copied as they are, a merged one is
# written in the asked dtype (re-quantising it would need a scale the file format does not carry).
FP8_CODES = {"F8_E4M3", "F8_E5M2"}
CODE_DTYPES = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}


@dataclass
class Entry:
    """One tensor of the output: its key, shape, stored dtype code, and how to read it from the base."""

    key: str
    shape: tuple[int, ...]
    dtype: str
    load: Callable[[], torch.Tensor]


def _reader(path: Path, key: str) -> Callable[[], torch.Tensor]:
    def load() -> torch.Tensor:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            return handle.get_tensor(key)

    return load


def _index(folder: Path, variant: str | None) -> dict[str, tuple[Path, tuple[int, ...], str]]:
    """key -> (file, shape, dtype code) over a component folder's .safetensors files (the variant's, if given)."""
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    files = [f for f in files if (f".{variant}." in f.name if variant else f.name.count(".") == 1)]
    if not files:
        raise UserError(f"{folder} has no {'.' + variant if variant else ''} .safetensors weights to merge into")
    out = {}
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
                part = handle.get_slice(key)
                out[key] = (path, tuple(part.get_shape()), part.get_dtype())
    return out


def vae_entries(folder: Path, variant: str | None = None) -> list[Entry]:
    config = json.loads((folder / "config.json").read_text())
    entries = []
    for key, (path, shape, dtype) in _index(folder, variant).items():
        new, to_conv = sgm_layout.vae_key(key, config)
        load = _reader(path, key)
        if to_conv:
            shape, load = (*shape, 1, 1), (lambda load=load: load()[:, :, None, None])
        entries.append(Entry(new, shape, dtype, load))
    return entries


def folder_entries(base: Path, variant: str | None) -> list[Entry]:
    """The UNet and both text encoders of a diffusers folder, in the original layout."""
    unet_config = json.loads((base / "unet" / "config.json").read_text())
    entries = [
        Entry(sgm_layout.unet_key(k, unet_config), shape, dtype, _reader(path, k))
        for k, (path, shape, dtype) in _index(base / "unet", variant).items()
    ]
    entries += [
        Entry(sgm_layout.clip_l_key(k), shape, dtype, _reader(path, k))
        for k, (path, shape, dtype) in _index(base / "text_encoder", variant).items()
        if not k.endswith("position_ids")
    ]
    fused: dict[str, list] = {}
    for key, (path, shape, dtype) in _index(base / "text_encoder_2", variant).items():
        if key.endswith("position_ids"):
            continue
        new, block = sgm_layout.clip_g_key(key)
        if block is None:
            load = _reader(path, key)
            if new.endswith("text_projection"):
                shape, load = shape[::-1], (lambda load=load: load().t().contiguous())
            entries.append(Entry(new, shape, dtype, load))
        else:
            fused.setdefault(new, [None] * 3)[block] = (_reader(path, key), shape, dtype)
    for new, parts in fused.items():
        loads = [p[0] for p in parts]
        shape = (sum(p[1][0] for p in parts), *parts[0][1][1:])
        entries.append(Entry(new, shape, parts[0][2], lambda loads=loads: torch.cat([load() for load in loads])))
    return entries


def file_entries(path: Path, drop_vae: bool) -> list[Entry]:
    """Every tensor of a single-file base (its VAE left out when another VAE replaces it)."""
    from safetensors import safe_open

    entries = []
    with safe_open(str(path), framework="pt") as handle:
        for key in handle.keys():  # noqa: SIM118 - safe_open is not a mapping
            if drop_vae and key.startswith(sgm_layout.VAE):
                continue
            part = handle.get_slice(key)
            entries.append(Entry(key, tuple(part.get_shape()), part.get_dtype(), _reader(path, key)))
    return entries


def lokr_delta(scale: float, weights: dict[str, torch.Tensor], shape: tuple[int, ...]) -> torch.Tensor:
    """peft's LoKr delta: scale (the module's alpha / r) * kron(w1, w2), reshaped to the weight."""
    w1 = weights["lokr_w1"] if "lokr_w1" in weights else weights["lokr_w1_a"] @ weights["lokr_w1_b"]
    w2 = weights["lokr_w2"] if "lokr_w2" in weights else weights["lokr_w2_a"] @ weights["lokr_w2_b"]
    if w2.dim() == 4:
        w1 = w1[:, :, None, None]
    return scale * torch.kron(w1.float(), w2.float()).reshape(shape)


def patches(adapters: dict[str, tuple[dict, dict[str, torch.Tensor]]], unet_config: dict) -> dict[str, list]:
    """Output key -> [(row block of a fused in_proj or None, the module's alpha / r, the module's factors)]."""
    from difftune.formats import kohya

    out: dict[str, list] = {}
    for model, (config, state) in adapters.items():
        grouped: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in state.items():
            module, suffix = kohya.split_peft_key(key)
            grouped.setdefault(module, {})[suffix] = value
        for module, weights in grouped.items():
            key, block = module + ".weight", None
            if model == "unet":
                key = sgm_layout.unet_key(key, unet_config)
            elif model == "text_encoder_one":
                key = sgm_layout.clip_l_key(key)
            else:
                key, block = sgm_layout.clip_g_key(key)
            rank, alpha = kohya.module_rank_alpha(config, module)
            out.setdefault(key, []).append((block, alpha / rank, weights))
    return out


def merged(entries: list[Entry], deltas: dict[str, list], dtype: torch.dtype) -> Iterator[tuple[Entry, torch.Tensor]]:
    """Each output tensor in turn, adapted weights with their deltas added in fp32."""
    missing = sorted(set(deltas) - {e.key for e in entries})
    if missing:
        raise UserError(f"the base model has no {missing[0]} for the adapter to merge into: is it the run's base?")
    for entry in entries:
        tensor = entry.load()
        if entry.key in deltas:
            tensor = tensor.float()
            for block, scale, weights in deltas[entry.key]:
                if block is None:
                    tensor += lokr_delta(scale, weights, tuple(tensor.shape))
                else:
                    rows = tensor.shape[0] // 3
                    part = tensor[block * rows : (block + 1) * rows]
                    part += lokr_delta(scale, weights, tuple(part.shape))
        code = stored_code(entry, deltas, dtype)
        yield entry, (tensor.to(CODE_DTYPES[code]) if code != entry.dtype or code in FLOAT_CODES else tensor)


def stored_code(entry: Entry, deltas: dict[str, list], dtype: torch.dtype) -> str:
    """The dtype code the output stores `entry` in: the asked one for float weights and merged fp8 ones."""
    if entry.dtype in FLOAT_CODES or (entry.dtype in FP8_CODES and entry.key in deltas):
        return SAFETENSORS_DTYPES[dtype]
    return entry.dtype


def write_streaming(
    path: Path,
    entries: list[Entry],
    tensors: Iterator[tuple[Entry, torch.Tensor]],
    dtype: torch.dtype,
    metadata: dict,
    deltas: dict[str, list] | None = None,
) -> None:
    """A .safetensors file written tensor by tensor: header from the shapes first, then each tensor's bytes."""
    header: dict = {"__metadata__": metadata}
    offset = 0
    sizes = {"F16": 2, "BF16": 2, "F32": 4, "F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1}
    sizes.update(dict.fromkeys(FP8_CODES, 1))
    for entry in entries:
        stored = stored_code(entry, deltas or {}, dtype)
        if stored not in sizes:
            raise UserError(f"{entry.key} is stored as {stored}, which the merged checkpoint cannot copy")
        size = math.prod(entry.shape) * sizes[stored]
        header[entry.key] = {"dtype": stored, "shape": list(entry.shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as out:
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for entry, tensor in tensors:
            assert tuple(tensor.shape) == entry.shape, entry.key
            out.write(tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())

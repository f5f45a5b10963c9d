"""Captioned image data: sources (Hub data set, metadata folder, caption-file and kohya folders in `folders`,
a kohya --dataset_config in `config`), the start-up scan (`scan`), captions and their processing, image
transforms, buckets, batching, DreamBooth's class images as rows (`dreambooth`), and the encodings cached
once (`cache`).

May import: difftune.cli, difftune.storage.

Randomness here (crop position, flip, caption choice, shuffle order) is derived from (seed, epoch,
sample index), not from a global RNG, so a resumed run sees exactly the batches an uninterrupted run
would have seen.
"""

import importlib
import importlib.util

# Each public name and the module it lives in, imported at the first use of the name (PEP 562): the flags import
# a few light modules of this package (captions, dreambooth, masks), and `--help` must not wait for torch, PIL
# and numpy, which the rest loads.
_HOMES = {
    "assign_buckets": "buckets",
    "make_buckets": "buckets",
    "Tokenize": "captions",
    "pick_caption": "captions",
    "CaptionedImageDataset": "dataset",
    "ImageTransform": "images",
    "draw_flip": "images",
    "image_name": "images",
    "image_source": "images",
    "open_image": "images",
    "sample_rng": "images",
    "EpochBatchSampler": "sampling",
    "PairedBatchSampler": "sampling",
    "collate": "sampling",
    "epochs_for": "sampling",
    "num_update_steps_per_epoch": "sampling",
    "to_device": "sampling",
    "append_rows": "selection",
    "drop_unreadable_images": "selection",
    "dataset_from_args": "sources",
    "load_captioned_images": "sources",
}
__all__ = sorted(_HOMES)


def __getattr__(name: str):
    """A public name, from its module; else a module of the package (`data.dataset`), as when this file imported
    them all."""
    if name in _HOMES:
        value = getattr(importlib.import_module(f"{__name__}.{_HOMES[name]}"), name)
        globals()[name] = value  # found directly from now on
        return value
    if importlib.util.find_spec(f"{__name__}.{name}") is not None:
        return importlib.import_module(f"{__name__}.{name}")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_HOMES])

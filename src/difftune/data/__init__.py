"""Captioned image data: sources (Hub data set, metadata folder, caption-file and kohya folders in `folders`,
a kohya --dataset_config in `config`), the start-up scan (`scan`), captions and their processing, image
transforms, buckets, batching, DreamBooth's class images as rows (`dreambooth`), and the encodings cached
once (`cache`).

May import: difftune.cli, difftune.storage.

Randomness here (crop position, flip, caption choice, shuffle order) is derived from (seed, epoch,
sample index), not from a global RNG, so a resumed run sees exactly the batches an uninterrupted run
would have seen.
"""

from difftune.data.buckets import assign_buckets, make_buckets
from difftune.data.captions import Tokenize, pick_caption
from difftune.data.dataset import CaptionedImageDataset
from difftune.data.images import ImageTransform, draw_flip, image_name, image_source, open_image, sample_rng
from difftune.data.sampling import (
    EpochBatchSampler,
    PairedBatchSampler,
    collate,
    epochs_for,
    num_update_steps_per_epoch,
    to_device,
)
from difftune.data.selection import append_rows, drop_unreadable_images
from difftune.data.sources import dataset_from_args, load_captioned_images

__all__ = [
    "CaptionedImageDataset",
    "EpochBatchSampler",
    "ImageTransform",
    "PairedBatchSampler",
    "Tokenize",
    "append_rows",
    "assign_buckets",
    "collate",
    "dataset_from_args",
    "draw_flip",
    "drop_unreadable_images",
    "epochs_for",
    "image_name",
    "image_source",
    "load_captioned_images",
    "make_buckets",
    "num_update_steps_per_epoch",
    "open_image",
    "pick_caption",
    "sample_rng",
    "to_device",
]

"""Rows of a data set: a seeded selection without the unreadable images, and rows appended from elsewhere."""

from __future__ import annotations

from difftune.cli.errors import UserError


def checked_selection(
    dataset, image_column: str, max_train_samples: int | None, seed: int, source: str, cache_dir=None, workers: int = 0
):
    """At most `max_train_samples` rows (a seeded choice), without the unreadable images."""
    if max_train_samples is not None:
        dataset = dataset.shuffle(seed=seed).select(range(min(max_train_samples, len(dataset))))
    dataset = drop_unreadable_images(dataset, image_column, cache_dir, workers)
    if len(dataset) == 0:
        raise UserError(f"{source} has no readable images")
    return dataset


def drop_unreadable_images(dataset, image_column: str, cache_dir=None, workers: int = 0):
    """Skip images that PIL cannot decode, with a warning naming each one (see difftune.data.scan)."""
    from difftune.data.scan import readable_rows  # (PIL: not for the flags, which import this module)

    good, _ = readable_rows(dataset, image_column, cache_dir, workers)
    return dataset if len(good) == len(dataset) else dataset.select(good)


def append_rows(rows, more, source: str):
    """`rows` then `more`, one datasets.Dataset (its fingerprint covers both, so caches tell it apart)."""
    import datasets

    try:
        return datasets.concatenate_datasets([rows, more])
    except ValueError as error:
        raise UserError(
            f"{source} does not match the training data's columns ({error}): give it the same caption format"
        ) from None

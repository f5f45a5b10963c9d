"""Small fast tests written for the mutants `make mutation-auto` found alive (docs/mutation.md): each asserts
what a user sees (a value, a name, a count, a refusal) that a surviving mutant changed."""

from __future__ import annotations

import errno
import fcntl
import logging
import os

import pytest

from difftune.cli.errors import UserError, run_cli
from difftune.storage import runlock

# --- storage/runlock.py: the refusal names the holder; a missing folder is made; the lock ends with the run ---


def held_by(path, content: bytes):
    """Another open file holding the run lock of `path` with `content` as its signature."""
    path.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path / runlock.RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    os.write(descriptor, content)
    fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    return descriptor


@pytest.mark.parametrize(
    ("content", "named"),
    [
        (b"gpu-node-7 4242\n", "host gpu-node-7, pid 4242"),
        (b"g\xffu 17\n", "host g\ufffdu, pid 17"),  # a damaged signature is still shown
        (b"", "a process that has not written its name yet"),
        (b"gpu-node-7", "a process that has not written its name yet"),  # half written
    ],
)
def test_a_run_on_a_held_output_dir_is_refused_naming_the_holder(tmp_path, content, named):
    descriptor = held_by(tmp_path, content)
    try:
        with pytest.raises(UserError) as refused:
            runlock.hold_output_dir(tmp_path)
    finally:
        os.close(descriptor)
    assert str(refused.value) == (
        f"--output_dir {tmp_path.resolve()} is in use by another run ({named}): "
        "wait for it to finish, stop it, or pick another --output_dir"
    )
    assert not runlock._held


def test_the_lock_makes_a_missing_output_dir_and_run_cli_releases_it(tmp_path):
    out = tmp_path / "new" / "run"
    run_cli(lambda argv: runlock.hold_output_dir(out), [])
    assert (out / runlock.RUN_LOCK).is_file()
    with open(out / runlock.RUN_LOCK) as handle:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released when the script ended


def test_no_flock_warning_says_why(tmp_path, monkeypatch, caplog):
    def unsupported(descriptor, operation):
        raise OSError(errno.ENOLCK, os.strerror(errno.ENOLCK))

    monkeypatch.setattr(fcntl, "flock", unsupported)
    runlock.hold_output_dir(tmp_path)
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert f"{os.strerror(errno.ENOLCK)}): a second run" in warning  # the reason, not None


# --- data/subsets.py: kohya's metadata file (JSON / JSONL), its captions and tags, and its refusals ---


def metadata_subset(tmp_path, name: str, text: str, **options):
    from difftune.data.captions import CaptionOptions
    from difftune.data.folders import Subset

    (tmp_path / "a.png").touch()
    (tmp_path / "b.jpg").touch()
    (tmp_path / name).write_text(text, encoding="utf-8-sig")  # with a BOM, as Windows editors save
    caption_options = CaptionOptions(**options) if options else None
    return Subset(tmp_path, metadata_file=tmp_path / name, options=caption_options)


def test_metadata_json_joins_tags_to_captions_and_finds_images_by_stem(tmp_path):
    from difftune.data.subsets import metadata_images

    text = (
        '{"a.png": {"caption": "a cat", "tags": "red, fluffy"}, "b": {"tags": "only tags"},'
        ' "c": {"caption": ""}, "d": {"caption": " first \\nsecond"}}'
    )
    (tmp_path / "c.webp").touch()
    (tmp_path / "d.PNG").touch()
    subset = metadata_subset(tmp_path, "meta.json", text)
    assert metadata_images(subset) == [
        (str(tmp_path / "a.png"), ["a cat,red, fluffy"]),
        (str(tmp_path / "b.jpg"), ["only tags"]),
        (str(tmp_path / "c.webp"), [""]),
        (str(tmp_path / "d.PNG"), ["first"]),
    ]


def test_metadata_jsonl_with_wildcards_keeps_every_line_with_the_tags(tmp_path):
    from difftune.data.subsets import metadata_images

    lines = [
        '{"image_path": "a.png", "caption": "one\\n \\ntwo ", "tags": "x\\ny"}',
        "  ",
        '{"image_path": "b.jpg", "caption": "three"}',
        '{"image_path": "c.png", "caption": ""}',
    ]
    (tmp_path / "c.png").touch()
    subset = metadata_subset(tmp_path, "meta.JSONL", "\n".join(lines), enable_wildcard=True, separator=";")
    assert metadata_images(subset) == [
        (str(tmp_path / "a.png"), ["one;x;y", "two ;x;y"]),
        (str(tmp_path / "b.jpg"), ["three"]),
        (str(tmp_path / "c.png"), [""]),
    ]


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("meta.json", "[1, 2]", 'must map each image to {"caption": ..., "tags": ...}'),
        ("meta.json", '{"a.png": "a cat"}', 'must map each image to {"caption": ..., "tags": ...}'),
        ("meta.json", "{", "is not kohya's metadata (JSON of image -> caption, tags): Expecting"),
        (
            "meta.jsonl",
            '{"caption": "no path"}',
            "is not kohya's metadata (JSON of image -> caption, tags): 'image_path'",
        ),
        (
            "meta.json",
            '{"a.png": {}, "gone": {}, "lost.png": {}}',
            ": 2 of 3 images are not found (the first 'gone'); relative names are looked up in the subset's image_dir",
        ),
    ],
)
def test_metadata_files_that_are_not_kohyas_are_refused_saying_why(tmp_path, name, text, message):
    from difftune.data.subsets import metadata_images

    subset = metadata_subset(tmp_path, name, text)
    with pytest.raises(UserError) as refused:
        metadata_images(subset)
    assert str(refused.value).startswith(f"metadata_file {tmp_path / name}") and message in str(refused.value)


def test_a_missing_metadata_file_is_refused(tmp_path):
    from difftune.data.folders import Subset
    from difftune.data.subsets import metadata_images

    with pytest.raises(UserError, match=f"^metadata_file {tmp_path / 'none.json'} does not exist$"):
        metadata_images(Subset(tmp_path, metadata_file=tmp_path / "none.json"))


def test_the_caption_hint_names_the_other_extension_only_when_the_folder_has_it():
    from difftune.data.subsets import caption_hint

    hint = " (the folder has {0} files: set caption_extension = '{0}' or --caption_extension {0})"
    assert caption_hint("f", {"a.png", "a.caption"}, ".txt") == hint.format(".caption")
    assert caption_hint("f", {"a.png", "a.txt"}, ".caption") == hint.format(".txt")
    assert caption_hint("f", {"a.png", "a.txt"}, ".txt") == ""


def test_wildcard_subsets_read_every_caption_line(tmp_path):
    from difftune.data.captions import CaptionOptions
    from difftune.data.folders import Subset
    from difftune.data.subsets import folder_images

    (tmp_path / "a.png").touch()
    (tmp_path / "a.txt").write_text("one\ntwo\n")
    ((entry, captions),) = folder_images(Subset(tmp_path, options=CaptionOptions(enable_wildcard=True)), None)
    assert (entry.name, captions) == ("a.png", ["one", "two"])


def test_metadata_keys_may_be_absolute_or_relative_to_the_working_folder(tmp_path, monkeypatch):
    from difftune.data.subsets import locate

    (tmp_path / "a.png").touch()
    monkeypatch.chdir(tmp_path)
    assert locate(str(tmp_path / "a"), None) == str(tmp_path / "a.png")
    assert locate(str(tmp_path / "a.png"), tmp_path / "elsewhere") == str(tmp_path / "a.png")
    assert locate("a", None) == "a.png"


def test_the_validation_split_is_the_seeds():
    from difftune.data.subsets import split_train_validation

    paths = [f"img{i}.png" for i in range(10)]
    assert split_train_validation(paths, 0.3, 7) == {"img2.png", "img5.png", "img6.png"}


@pytest.mark.parametrize(
    ("class_tokens", "prompt", "caption", "trained"),
    [
        ("sks dog", "a photo", "sks dog", "its class tokens 'sks dog'"),
        (None, "a photo", "a photo", "--instance_prompt 'a photo'"),
        (None, None, "", "the empty caption"),
    ],
)
def test_images_without_caption_files_train_on_the_fallback_with_one_warning(
    tmp_path, caplog, class_tokens, prompt, caption, trained
):
    from difftune.data.folders import Subset
    from difftune.data.subsets import folder_images

    for name in ("a.png", "b.png", "c.png", "c.txt"):
        (tmp_path / name).touch()
    (tmp_path / "b.caption").write_text("kept aside")
    (tmp_path / "c.txt").write_text("a caption")
    with caplog.at_level(logging.WARNING):
        found = folder_images(Subset(tmp_path, class_tokens=class_tokens), prompt)
    assert [(entry.name, captions) for entry, captions in found] == [
        ("a.png", [caption]), ("b.png", [caption]), ("c.png", ["a caption"])
    ]  # fmt: skip
    (warning,) = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert warning == (
        f"2 of 3 images in {tmp_path} have no caption file (.txt): they train on {trained}, as in kohya; the first "
        f"is {tmp_path / 'a.png'} (the folder has .caption files: set caption_extension = '.caption' or "
        "--caption_extension .caption)"
    )


def test_subsets_skipped_read_and_held_out_as_kohya(tmp_path, caplog):
    from difftune.data.config import DatasetSpec
    from difftune.data.folders import Subset
    from difftune.data.subsets import read_spec_rows, split_train_validation

    folders = {name: tmp_path / name for name in ("a", "b", "empty", "reg")}
    for name, folder in folders.items():
        folder.mkdir()
        for i in range(0 if name == "empty" else 4):
            (folder / f"{i}.png").write_bytes(b"x" * (i + 1))
    subsets = [
        Subset(folders["b"], repeats=0),
        Subset(folders["a"], repeats=2),
        Subset(folders["a"], repeats=3),  # the same folder again
        Subset(folders["empty"]),
        Subset(folders["b"], repeats=5),
    ]
    first = DatasetSpec(subsets, (64, 64), validation_split=0.5)
    second = DatasetSpec([Subset(folders["reg"], is_reg=True), Subset(folders["b"])], (64, 64), 1, False,
                         validation_split=0.5, validation_seed=3)  # fmt: skip
    with caplog.at_level(logging.WARNING):
        rows = read_spec_rows([first, second], "cfg.toml", "a photo", seed=11)
    assert [r.getMessage() for r in caplog.records if "skipping" in r.getMessage()] == [
        f"cfg.toml: skipping subset {folders['b']}: num_repeats 0 is below 1 (as kohya)",
        f"cfg.toml: skipping subset {folders['a']}: the data set reads it already (kohya uses the first)",
        f"cfg.toml: skipping subset {folders['empty']}: no images found (as kohya)",
    ]
    assert rows.subsets == [1] * 4 + [4] * 4 + [5] * 4 + [6] * 4
    assert rows.repeats == [2] * 4 + [5] * 4 + [1] * 8
    assert rows.captions[:4] == [["a photo"]] * 4
    assert rows.sizes[:4] == [1, 2, 3, 4]
    paths, a_paths = ([str(folders[name] / f"{i}.png") for i in range(4)] for name in "ba")
    assert rows.mtimes[:4] == [os.stat(path).st_mtime_ns for path in a_paths]
    held = [
        *[p in split_train_validation(a_paths, 0.5, 11) for p in a_paths],
        *[p in split_train_validation(paths, 0.5, 11) for p in paths],
        *[False] * 4,  # regularisation images are never held out
        *[p in split_train_validation(paths, 0.5, 3) for p in paths],
    ]
    assert rows.held_out == held and rows.held_out[4:8] != rows.held_out[12:]  # the seeds differ


def test_a_missing_folder_or_no_image_at_all_is_refused(tmp_path):
    from difftune.data.config import DatasetSpec
    from difftune.data.folders import Subset
    from difftune.data.subsets import read_spec_rows

    with pytest.raises(UserError, match=f"^cfg.toml: image folder {tmp_path / 'gone'} does not exist$"):
        read_spec_rows([DatasetSpec([Subset(tmp_path / "gone")], (64, 64))], "cfg.toml", None, 0)
    with pytest.raises(UserError, match=r"^cfg\.toml holds no usable image: check each subset's image_dir and num_rep"):
        read_spec_rows([DatasetSpec([Subset(tmp_path)], (64, 64))], "cfg.toml", None, 0)


# --- data/buckets.py: kohya's bucket lists, no_upscale's shrinking, the keys' checks, each image's bucket ---


def test_kohya_bucket_lists_off_the_default_grid():
    from difftune.data.buckets import kohya_bucket_list, make_buckets

    assert kohya_bucket_list(300, 300, 256, 319, 64) == [(256, 256), (256, 319), (319, 256)]
    wide = kohya_bucket_list(512, 512, 32, 992, 64)
    assert len(wide) == 33 and wide[:4] == [(32, 992), (96, 992), (160, 992), (224, 992)]
    assert wide[-5:] == [(992, 32), (992, 96), (992, 160), (992, 224), (992, 256)]
    assert all(type(side) is int for bucket in wide for side in bucket)  # PIL sizes: no float
    assert make_buckets(256) == [(256, 256)]  # kohya's minimum 256 from a 256 resolution up


@pytest.mark.parametrize(
    ("resolution", "steps", "size", "bucket", "resized"),
    [
        (1024, 64, (3000, 2000), (1216, 832), (1248, 832)),
        (1024, 64, (2000, 3000), (832, 1216), (832, 1248)),
        (1024, 64, (1500, 1100), (1152, 832), (1152, 845)),
        (1024, 64, (1024, 1024), (1024, 1024), (1024, 1024)),
        (1024, 64, (1100, 1000), (1024, 960), (1056, 960)),
        (1024, 64, (800, 600), (768, 576), (800, 600)),
        (1024, 64, (5000, 700), (2240, 320), (2286, 320)),
        (1024, 64, (4096, 1024), (2048, 512), (2048, 512)),
        (1024, 64, (1032, 1509), (832, 1216), (832, 1217)),  # both roundings equally close: kohya's second
        ((512, 768), 32, (3000, 2000), (768, 512), (768, 512)),
        ((512, 768), 32, (1000, 999), (608, 608), (609, 608)),
    ],
)
def test_no_upscale_shrinks_large_images_to_the_area_as_kohya(resolution, steps, size, bucket, resized):
    from difftune.data.buckets import BucketRule

    assert BucketRule.checked(resolution, no_upscale=True, steps=steps).select(*size) == (bucket, resized)


@pytest.mark.parametrize(
    ("size", "bucket"),
    [((20000, 50), "19968x0"), ((40000, 30), "37376x0"), ((30, 40000), "0x0"), ((16, 65536), "0x65536")],
)
def test_no_upscale_refuses_an_image_whose_bucket_would_be_empty(size, bucket):
    from difftune.data.buckets import BucketRule

    with pytest.raises(UserError) as refused:
        BucketRule.checked(1024, no_upscale=True).select(*size)
    assert str(refused.value) == (
        f"an image of {size[0]}x{size[1]} (height x width) gets a {bucket} bucket with bucket_no_upscale and "
        "bucket_reso_steps 64: remove the image, or unset bucket_no_upscale"
    )


def test_bucket_keys_are_rounded_with_a_warning_and_bad_steps_refused(caplog):
    from difftune.data.buckets import BucketRule
    from difftune.data.config import DatasetSpec

    with caplog.at_level(logging.WARNING):
        assert BucketRule.checked(1024).min_reso == 256 and BucketRule.checked(1024, steps=1).steps == 1
        assert not caplog.records
        rule = BucketRule.checked(1024, min_reso=300, max_reso=1000)
    assert (rule.min_reso, rule.max_reso) == (256, 1024)
    assert [r.getMessage() for r in caplog.records] == [
        "min_bucket_reso 300 is rounded down to 256, a multiple of bucket_reso_steps 64",
        "max_bucket_reso 1000 is rounded up to 1024, a multiple of bucket_reso_steps 64",
    ]
    with pytest.raises(
        UserError, match=r"^bucket_reso_steps is 0: it must be a positive number of pixels \(kohya: 64\)$"
    ):
        BucketRule.checked(1024, steps=0)
    spec = DatasetSpec([], (512, 512), enable_bucket=True, bucket_no_upscale=True)
    assert BucketRule.from_spec(spec).no_upscale is True


def test_closest_bucket_breaks_ties_in_kohyas_width_then_height_order():
    from difftune.data.buckets import closest_bucket

    assert closest_bucket(10, 10, [(12, 6), (4, 6)]) == (4, 6)


def png_bytes(height: int, width: int) -> bytes:
    import io

    from PIL import Image

    out = io.BytesIO()
    Image.new("RGB", (width, height)).save(out, format="PNG")
    return out.getvalue()


def test_image_sizes_come_from_the_scan_else_the_header(tmp_path, monkeypatch):
    from difftune.data import scan
    from difftune.data.buckets import image_size

    path = tmp_path / "a.png"
    path.write_bytes(png_bytes(5, 8))
    assert image_size({"bytes": None, "path": str(path)}) == (5, 8)
    monkeypatch.setitem(scan.SIZES, str(path), (7, 9))
    assert image_size({"bytes": None, "path": str(path)}) == (7, 9)


def test_each_sample_gets_its_images_closest_bucket():
    import datasets

    from difftune.data.buckets import assign_buckets

    class Samples:  # two images, the second trained twice
        rows = datasets.Dataset.from_dict({"image": [{"bytes": png_bytes(8, 16), "path": None},
                                                     {"bytes": png_bytes(16, 8), "path": None}]})  # fmt: skip
        image_column = "image"

        def row(self, index: int) -> int:
            return [0, 1, 1][index]

        def __len__(self) -> int:
            return 3

    assert assign_buckets(Samples(), [(64, 128), (128, 64)]) == [(64, 128), (128, 64), (128, 64)]


# --- data/scan.py: complete tails, the scan's keys and sizes, the scan file and a full disk ---


def test_a_tail_is_complete_only_for_single_frame_jpeg_and_png(tmp_path):
    from PIL import Image

    from difftune.data.scan import complete_tail

    frames = [Image.new("RGB", (4, 4), color) for color in ("red", "blue")]
    frames[0].save(tmp_path / "one.png")
    frames[0].save(tmp_path / "two.png", save_all=True, append_images=frames[1:])  # an APNG
    frames[0].save(tmp_path / "one.gif")
    for name, complete in [("one.png", True), ("two.png", False), ("one.gif", False)]:
        with Image.open(tmp_path / name) as image:
            assert complete_tail(image) is complete, name


def test_scan_keys_name_the_file_its_size_and_time(tmp_path):
    from difftune.data.scan import file_key

    path = tmp_path / "a.png"
    path.write_bytes(b"12345")
    stat = path.stat()
    assert file_key({"path": str(path), "bytes": None}) == f"{path}|5|{stat.st_mtime_ns}"
    assert file_key({"path": str(path)}, (1, 2)) == f"{path}|1|2"
    assert file_key({"path": str(path), "bytes": b"x"}) is None  # bytes are probed every time
    assert file_key({"path": None, "bytes": None}) is None
    assert file_key({"path": str(tmp_path / "gone.png")}) is None


def test_known_sizes_are_by_path_and_not_for_bytes(monkeypatch):
    from difftune.data import scan

    monkeypatch.setitem(scan.SIZES, "/data/a.png", (3, 4))
    assert scan.known_size({"path": "/data/a.png", "bytes": None}) == (3, 4)
    assert scan.known_size({"path": "/data/a.png", "bytes": b"x"}) is None


def test_the_scan_file_is_written_in_a_new_folder_and_a_full_disk_stops_in_one_line(tmp_path, monkeypatch):
    import json
    from pathlib import Path

    from difftune.data.scan import write_scan

    path = tmp_path / "new" / "cache" / "image-scan.json"
    write_scan(path, {"k": [1, 2]})
    assert json.loads(path.read_text()) == {"k": [1, 2]}

    def full(self, text):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(Path, "write_text", full)
    with pytest.raises(UserError) as stopped:
        write_scan(path, {})
    assert str(stopped.value) == (
        f"no space left on {path.parent} while writing the image scan image-scan.json; nothing was trained yet; "
        "free space and resume with --resume_from_checkpoint latest"
    )


def test_a_second_scan_reads_the_first_from_the_cache_folder_without_opening_an_image(tmp_path, monkeypatch, capsys):
    import re

    from difftune.data import scan

    (tmp_path / "a.png").write_bytes(png_bytes(5, 8))
    (tmp_path / "b.png").write_bytes(b"not an image")
    records = [{"path": str(tmp_path / name), "bytes": None} for name in ("a.png", "b.png")]
    monkeypatch.setattr(scan, "SIZES", {})
    first = scan.scan_images(records, tmp_path / "cache", stats=[(11, 22), (33, 44)])
    assert first[0] == (5, 8) and isinstance(first[1], str) and "cannot identify image file" in first[1]
    sizes = dict(scan.SIZES)
    assert sizes == {str(tmp_path / "a.png"): (5, 8)}  # the buckets' sizes: readable images only
    bar = capsys.readouterr().err.replace("\r", "\n").strip().splitlines()[-1]
    assert re.fullmatch(r"scanning images: 100%\|.*\| 2/2 \[.*(image/s|s/image)\]", bar), bar
    known = scan.read_scan(tmp_path / "cache" / scan.SCAN_FILE)
    assert list(known) == [f"{tmp_path / 'a.png'}|11|22", f"{tmp_path / 'b.png'}|33|44"]  # keyed by the stats given
    monkeypatch.setattr(scan, "probe", lambda record: pytest.fail("an image was opened again"))
    assert scan.scan_images(records, str(tmp_path / "cache"), stats=[(11, 22), (33, 44)]) == first


def test_one_process_scans_without_accelerate(monkeypatch):
    from contextlib import nullcontext

    from difftune.data.scan import main_process_first

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert isinstance(main_process_first(), nullcontext)


def test_a_scan_file_that_is_missing_damaged_or_not_a_mapping_reads_as_empty(tmp_path):
    from difftune.data.scan import read_scan

    path = tmp_path / "image-scan.json"
    assert read_scan(path) == {} and read_scan(None) == {}
    for text, known in [("[1]", {}), ("{", {}), ('{"k": [1, 2]}', {"k": [1, 2]})]:
        path.write_text(text)
        assert read_scan(path) == known


def test_unreadable_images_are_skipped_with_a_warning_naming_each(tmp_path, caplog):
    import datasets

    from difftune.data.scan import SCAN_FILE, read_scan, readable_rows

    (tmp_path / "bad.png").write_bytes(b"not an image")
    for name in ("a.png", "b.png"):
        (tmp_path / name).write_bytes(png_bytes(5, 8))
    paths = [str(tmp_path / name) for name in ("bad.png", "a.png", "b.png")]
    rows = datasets.Dataset.from_dict(
        {"image": [{"bytes": None, "path": p} for p in paths], "size": [1, 2, 3], "mtime": [4, 5, 6]}
    )
    with caplog.at_level(logging.WARNING):
        assert readable_rows(rows, "image", tmp_path / "cache") == ([1, 2], [(5, 8), (5, 8)])
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == [
        f"skipping unreadable image {paths[0]} (cannot identify image file {paths[0]!r})"
    ]
    assert sorted(read_scan(tmp_path / "cache" / SCAN_FILE)) == sorted(
        f"{p}|{i + 1}|{i + 4}" for i, p in enumerate(paths)
    )


def test_a_jpeg_with_data_after_its_end_is_decoded_small_and_readable(tmp_path):
    import io

    from PIL import Image

    from difftune.data.scan import probe

    out = io.BytesIO()
    Image.new("RGB", (40, 24), "red").save(out, format="JPEG")
    path = tmp_path / "a.jpg"
    path.write_bytes(out.getvalue() + b"trailing data")  # its tail is not the end-of-image marker
    assert probe({"path": str(path), "bytes": None}) == (24, 40)


# --- generate/prompts.py: the edges of each option's range, the messages, the run-wide flags ---


def test_prompt_line_options_at_their_edges():
    from difftune.generate.prompts import parse_line

    top = 2**63 - 1
    assert parse_line(f"a dog --l 0 --d {top}") == {"prompt": "a dog", "guidance_scale": 0.0, "seed": top}
    assert parse_line("a dog --l 0.5 --d 0")["guidance_scale"] == 0.5
    for line, message in [
        ("a dog --l -1", "--l -1 must be >= 0"),
        ("a dog --l inf", "--l inf must be >= 0"),
        (f"a dog --d {top + 1}", f"--d {top + 1} is out of range (0 to {top})"),
        ("--w 512", "the prompt is empty (write the prompt first, then its options)"),
        ("a dog --", '" --" without an option name (a line takes --n, --w, --h, --d, --l, --s)'),
    ]:
        with pytest.raises(ValueError) as refused:
            parse_line(line)
        assert str(refused.value) == message


def test_validation_flags_at_their_edges_and_the_prompts_in_order(tmp_path):
    import argparse

    from difftune.generate.prompts import check_validation_args

    (tmp_path / "p.txt").write_text("a cat --s 20\n")
    args = argparse.Namespace(
        validation_guidance_scale=0.5, validation_seed=0, validation_prompt=["a dog"],
        validation_prompts_file=tmp_path / "p.txt",
    )  # fmt: skip
    check_validation_args(args)
    assert args.validation_samples == [{"prompt": "a dog"}, {"prompt": "a cat", "steps": 20, "line": 1}]
    args.validation_guidance_scale = 0.0
    check_validation_args(args)

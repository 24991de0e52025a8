"""Image checks (prepare's imagecheck stage): truncation caught by both depths, and the check cache."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vlmtax.data import imagecheck
from vlmtax.data.imagecheck import cache_file, check_image, check_images


def _photo(fmt: str = "JPEG", size=(96, 128), **save) -> bytes:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format=fmt, **save)
    return buf.getvalue()


def _write(tmp_path: Path, name: str, data: bytes) -> str:
    path = tmp_path / name
    path.write_bytes(data)
    return str(path)


JPEG = _photo()
PNG = _photo("PNG")
BROKEN = {
    "jpeg_half": JPEG[: len(JPEG) // 2],
    "jpeg_90pct": JPEG[: len(JPEG) * 9 // 10],
    "jpeg_without_end_marker": JPEG[:-2],
    "jpeg_header_only": JPEG[:600],
    "png_half": PNG[: len(PNG) // 2],
    "not_an_image": b"this is text, not pixels" * 10,
    "empty": b"",
}


@pytest.mark.parametrize("verify", ["fast", "full"])
@pytest.mark.parametrize("case", sorted(BROKEN))
def test_truncated_and_corrupt_files_are_rejected_by_both_depths(tmp_path, verify, case):
    path = _write(tmp_path, f"{case}.{'png' if case.startswith('png') else 'jpg'}", BROKEN[case])
    assert check_image(path, verify) == ("unreadable_image", 0, 0)


@pytest.mark.parametrize("verify", ["fast", "full"])
@pytest.mark.parametrize("fmt,save", [("JPEG", {}), ("JPEG", {"progressive": True}), ("PNG", {}),
                                      ("WEBP", {}), ("BMP", {})])
def test_whole_images_pass_with_their_size(tmp_path, verify, fmt, save):
    path = _write(tmp_path, f"img.{fmt.lower()}", _photo(fmt, size=(96, 128), **save))
    assert check_image(path, verify) == (None, 96, 128)


def test_png_cut_exactly_before_iend_fast_is_stricter(tmp_path):
    # Every pixel is there, so a decode succeeds; the missing end chunk is what the fast check sees.
    path = _write(tmp_path, "a.png", PNG[:-12])
    assert check_image(path, "fast")[0] == "unreadable_image"
    assert check_image(path, "full") == (None, 96, 128)


@pytest.mark.parametrize("verify", ["fast", "full"])
def test_trailing_padding_after_the_end_marker_is_accepted(tmp_path, verify):
    assert check_image(_write(tmp_path, "pad.jpg", JPEG + b"\x00" * 100), verify) == (None, 96, 128)


@pytest.mark.parametrize("verify", ["fast", "full"])
def test_truncated_format_without_end_marker_is_decoded(tmp_path, verify):
    webp = _photo("WEBP")
    assert check_image(_write(tmp_path, "t.webp", webp[: len(webp) // 2]), verify)[0] == "unreadable_image"


def test_missing_file(tmp_path):
    assert check_image(str(tmp_path / "nope.jpg")) == ("missing_image", 0, 0)
    assert check_images([str(tmp_path / "nope.jpg")], cache=tmp_path / "c.json") == [("missing_image", 0, 0)]


def test_unknown_depth_is_refused(tmp_path):
    with pytest.raises(ValueError, match="verify"):
        check_images([_write(tmp_path, "a.jpg", JPEG)], verify="deep")


class _Counting:
    """Wraps the check runner to record which paths were really checked."""

    def __init__(self, monkeypatch):
        self.seen: list[str] = []
        real = imagecheck._run_checks

        def run(paths, verify, workers, desc):
            self.seen.extend(paths)
            return real(paths, verify, workers, desc)

        monkeypatch.setattr(imagecheck, "_run_checks", run)


def test_cache_skips_unchanged_files_and_rechecks_changed_ones(tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    good, bad = _write(tmp_path, "good.jpg", JPEG), _write(tmp_path, "bad.jpg", BROKEN["jpeg_half"])
    counting = _Counting(monkeypatch)
    first = check_images([good, bad], workers=1, cache=cache)
    assert first == [(None, 96, 128), ("unreadable_image", 0, 0)] and sorted(counting.seen) == sorted([good, bad])

    counting.seen.clear()
    assert check_images([good, bad], workers=1, cache=cache) == first
    assert counting.seen == []  # answered from the cache

    Path(good).write_bytes(JPEG[: len(JPEG) // 2])  # truncated in place after it passed
    assert check_images([good, bad], workers=1, cache=cache)[0] == ("unreadable_image", 0, 0)
    assert counting.seen == [good]


def test_cache_same_size_new_mtime_is_rechecked(tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    path = _write(tmp_path, "a.jpg", JPEG)
    check_images([path], workers=1, cache=cache)
    damaged = JPEG[:-2] + b"\x00\x00"  # same size, end marker gone
    Path(path).write_bytes(damaged)
    st = os.stat(path)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    counting = _Counting(monkeypatch)
    assert check_images([path], workers=1, cache=cache) == [("unreadable_image", 0, 0)]
    assert counting.seen == [path]


def test_a_fast_result_does_not_answer_a_full_request(tmp_path, monkeypatch):
    cache = tmp_path / "cache.json"
    path = _write(tmp_path, "a.jpg", JPEG)
    check_images([path], workers=1, verify="fast", cache=cache)
    counting = _Counting(monkeypatch)
    check_images([path], workers=1, verify="full", cache=cache)
    assert counting.seen == [path]
    counting.seen.clear()
    check_images([path], workers=1, verify="fast", cache=cache)  # the full result answers fast
    assert counting.seen == []


def test_damaged_cache_file_is_ignored(tmp_path):
    cache = tmp_path / "cache.json"
    cache.write_text("{not json")
    path = _write(tmp_path, "a.jpg", JPEG)
    assert check_images([path], workers=1, cache=cache) == [(None, 96, 128)]


def test_cache_file_lives_in_the_user_cache_dir_per_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("VLMTAX_CACHE_DIR", str(tmp_path / "c"))
    a, b = cache_file(tmp_path / "x"), cache_file(tmp_path / "y")
    assert a.parent == tmp_path / "c" / "image-checks" and a != b
    assert cache_file(tmp_path / "x" / ".." / "x") == a


def test_parallel_workers_give_the_same_results(tmp_path):
    paths = [_write(tmp_path, f"{i}.jpg", JPEG if i % 3 else BROKEN["jpeg_90pct"]) for i in range(70)]
    assert check_images(paths, workers=2) == check_images(paths, workers=1)

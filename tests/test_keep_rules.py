"""Which copy stays, case by case: what a photographer would keep, decided from catalog fields.

Each test is one situation from issue 9, built from `Member` values (the catalog's view of a file),
so the rule that decides it is visible in the test.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from dinoseek.retrieval.errors import InvalidArgumentError
from dinoseek.retrieval.keep import DEFAULT_ORDER, RULES, Member, choose_keeper

CAMERA = "Canon EOS R5"
SHOT = "2021-07-14 10:02:33"
T0 = 1_626_256_953_000_000_000  # mtime of the camera original (ns)
DAY = 86_400 * 10**9


def photo(i: int, path: str, width: int = 1600, height: int = 1200, *, size: int = 900_000, fmt: str = "JPEG",
          camera: str | None = None, captured_at: str | None = None, mtime_ns: int = T0, sha256: str | None = None,
          raw_partner: bool = False) -> Member:
    return Member(id=i, path=path, raw_path=path.encode(), size=size, width=width, height=height, format=fmt,
                  captured_at=captured_at, sha256=sha256 or f"{i:064x}", mtime_ns=mtime_ns, camera=camera,
                  raw_partner=raw_partner)


def original(i: int = 1, path: str = "2021/summer/IMG_1045.JPG", **kw) -> Member:
    """A camera JPEG: EXIF make/model and capture time."""
    return photo(i, path, **{"camera": CAMERA, "captured_at": SHOT, **kw})


def keeper_of(*members: Member, order=DEFAULT_ORDER, protected=()) -> Member:
    return choose_keeper(list(members), order, protected).keeper


def test_png_export_without_exif_loses_to_the_camera_jpeg():
    """The issue's first case: a larger PNG export (no EXIF) over the camera original."""
    jpeg = original()
    png = photo(2, "exports/IMG_1045.png", size=4_800_000, fmt="PNG", mtime_ns=T0 + 30 * DAY)
    decision = choose_keeper([png, jpeg])
    assert decision.keeper == jpeg
    assert decision.reason == f"camera original ({CAMERA}, captured {SHOT})"
    assert decision.reasons[png.id] == f"no camera metadata (the kept copy has {CAMERA}, captured {SHOT})"


def test_png_export_loses_also_with_the_explicit_order_the_readme_shows():
    """`--keep resolution,size,oldest,format`: size no longer compares a PNG with a JPEG, so the
    capture time decides."""
    jpeg, png = original(), photo(2, "exports/IMG_1045.png", size=4_800_000, fmt="PNG")
    decision = choose_keeper([png, jpeg], ("resolution", "size", "oldest", "format"))
    assert decision.keeper == jpeg and decision.reason == f"earliest capture time ({SHOT})"


def test_resized_copy_loses_on_resolution_even_with_exif():
    small = original(2, "web/IMG_1045.jpg", width=800, height=600, size=150_000, mtime_ns=T0 - DAY)
    decision = choose_keeper([small, original()])
    assert decision.keeper.id == 1 and decision.reason == "highest resolution (1600x1200)"
    assert decision.reasons[2] == "lower resolution (800x600 vs 1600x1200)"


def test_re_encode_at_lower_quality_loses_on_size_within_its_format():
    worse = original(2, "shared/IMG_1045.jpg", size=300_000)  # same pixels, same EXIF, quality 60
    decision = choose_keeper([worse, original()])
    assert decision.keeper.id == 1 and decision.reason == "largest file of its format (JPEG, 900,000 bytes)"
    assert decision.reasons[2] == "smaller JPEG file (300,000 bytes vs 900,000)"


def test_re_encode_that_dropped_exif_loses_on_camera_metadata():
    worse = photo(2, "shared/IMG_1045.jpg", size=300_000)
    assert keeper_of(worse, original()).id == 1


def test_crop_loses_on_resolution():
    crop = original(2, "edits/IMG_1045-crop.jpg", width=1000, height=750, size=500_000)
    decision = choose_keeper([crop, original()])
    assert decision.keeper.id == 1 and decision.reasons[2] == "lower resolution (1000x750 vs 1600x1200)"


def test_slight_crop_is_no_real_difference_and_size_decides():
    """4% fewer pixels is within REAL_PIXEL_RATIO: resolution ties, and the next rules decide."""
    crop = original(2, "edits/IMG_1045-crop.jpg", width=1580, height=1180, size=880_000)
    decision = choose_keeper([crop, original()])
    assert decision.keeper.id == 1 and decision.reasons[2].startswith("smaller JPEG file")


def test_screenshot_of_a_photo_loses_even_with_more_pixels():
    """A screenshot on a 4K screen has more pixels than the photo, but no camera metadata."""
    shot = photo(2, "Screenshots/Screen Shot 2021-08-01.png", width=3840, height=2160, size=9_000_000, fmt="PNG",
                 mtime_ns=T0 + 20 * DAY)
    decision = choose_keeper([shot, original()])
    assert decision.keeper.id == 1
    assert decision.reasons[2] == ("more pixels (3840x2160 vs 1600x1200) but no camera metadata: an upscale or "
                                   "re-save, not the original")


def test_upscaled_copy_does_not_win():
    up = photo(2, "upscaled/IMG_1045-4x.png", width=6400, height=4800, size=40_000_000, fmt="PNG")
    assert keeper_of(up, original()).id == 1
    # the same with the order reversed in the input: the decision does not depend on member order
    assert keeper_of(original(), up).id == 1


def test_upscale_of_a_downscaled_copy_still_loses_on_resolution():
    """Pixels a copy without camera metadata has beyond the camera copy do not count; the ones it
    lacks still do."""
    up = photo(2, "upscaled/IMG_1045-small-2x.png", width=1200, height=900, fmt="PNG")
    decision = choose_keeper([up, original()])
    assert decision.keeper.id == 1 and decision.reasons[2] == "lower resolution (1200x900 vs 1600x1200)"


def test_export_larger_than_its_original_loses():
    """A JPEG re-saved at quality 100 from the original: bigger, same pixels, no camera metadata."""
    export = photo(2, "exports/IMG_1045.jpg", size=2_500_000, mtime_ns=T0 + DAY)
    assert keeper_of(export, original()).id == 1


def test_export_with_copied_exif_needs_modified_before_size():
    """An editor that copies EXIF into a larger same-pixel JPEG makes it look like a better-encoded
    camera file: by default size decides (so the common lower-quality re-encode loses, whatever the
    file times say, which a plain `cp` resets). Putting `modified` before `size` keeps the earlier
    file instead, as the README says."""
    export = original(2, "exports/IMG_1045.jpg", size=2_500_000, mtime_ns=T0 + DAY)
    assert keeper_of(export, original()).id == 2
    order = ("protected", "resolution", "original", "oldest", "modified", "size", "format")
    decision = choose_keeper([export, original()], order)
    assert decision.keeper.id == 1 and decision.reasons[2].startswith("modified later (")


def test_downscaled_copy_loses_to_a_copy_with_clearly_more_pixels_when_both_are_camera_files():
    big = original(2, "full/IMG_1045.JPG", width=6000, height=4000, size=7_000_000, mtime_ns=T0 + DAY)
    decision = choose_keeper([original(), big])
    assert decision.keeper.id == 2 and decision.reason == "highest resolution (6000x4000)"


def test_pixels_decide_when_no_copy_has_camera_metadata():
    """Photos saved from the web: nothing to trust but the pixels (a real difference only)."""
    a = photo(1, "web/a.jpg", width=800, height=600)
    b = photo(2, "web/a-large.jpg", width=1600, height=1200)
    assert keeper_of(a, b).id == 2


def test_raw_plus_jpeg_pair_counts_as_the_original():
    """The JPEG beside its RAW stays: moving it would split the pair. Byte copy elsewhere goes."""
    paired = original(1, "2022/trips/alps/DSC_0102.jpg", raw_partner=True, mtime_ns=T0 + DAY, sha256="ab" * 32)
    backup = original(2, "backup/alps/DSC_0102.jpg", mtime_ns=T0, sha256="ab" * 32)
    decision = choose_keeper([backup, paired])
    assert decision.keeper == paired and decision.reason == "camera original: the JPEG of a RAW+JPEG pair"
    assert decision.reasons[2] == "the kept copy is the JPEG of a RAW+JPEG pair"


def test_byte_copies_go_by_earliest_modification_time_not_shortest_path():
    """The issue's second case: `backup/...` (shorter path, copied later) was kept."""
    digest = "cd" * 32
    trip = photo(1, "2022/trips/alps/DSC_0102.jpg", mtime_ns=T0, sha256=digest)
    backup = photo(2, "backup/alps/DSC_0102.jpg", mtime_ns=T0 + 400 * DAY, sha256=digest)
    decision = choose_keeper([backup, trip])
    assert decision.keeper == trip and decision.reason.startswith("earliest modification time (")
    assert decision.reasons[2].startswith("identical bytes, modified later (")


def test_byte_copies_in_a_protected_folder_win_over_older_ones():
    digest = "cd" * 32
    trip = photo(1, "2022/trips/alps/DSC_0102.jpg", mtime_ns=T0, sha256=digest)
    backup = photo(2, "backup/alps/DSC_0102.jpg", mtime_ns=T0 + 400 * DAY, sha256=digest)
    decision = choose_keeper([trip, backup], protected=(b"backup",))
    assert decision.keeper == backup and decision.reason == "in a protected folder"
    assert decision.reasons[1] == "not in a protected folder"


def test_byte_copies_with_one_mtime_break_the_tie_by_path_stably():
    """Same bytes, same mtime (rsync -a): the shorter path, then the path's bytes; never the row id."""
    digest = "ef" * 32
    a = photo(7, "b/DSC_0102.jpg", sha256=digest)
    b = photo(3, "a/DSC_0102.jpg", sha256=digest)
    c = photo(5, "archive/DSC_0102.jpg", sha256=digest)
    for members in ([a, b, c], [c, b, a], [b, c, a]):
        decision = choose_keeper(members)
        assert decision.keeper == b
        assert decision.reason == "equal by every keep rule: chosen by path (shorter, then alphabetical)"
        assert decision.reasons[7] == "identical bytes, equal by every keep rule; the kept copy's path comes first"


def test_reason_is_true_for_every_member_not_only_the_runner_up():
    """The issue's third case: a byte copy of the keeper and two 800x600 copies. The old reason was
    "all copies equal by the keep rules" (it only looked at the byte copy)."""
    digest = "12" * 32
    keeper = original(1, "2021/IMG_1.JPG", sha256=digest)
    twin = original(2, "copy/IMG_1.JPG", sha256=digest, mtime_ns=T0 + DAY)
    small = [original(i, f"web/IMG_1-{i}.jpg", width=800, height=600, size=120_000) for i in (3, 4)]
    decision = choose_keeper([twin, *small, keeper])
    assert decision.keeper == keeper
    assert decision.reason == (f"highest resolution (1600x1200), over 2 copies; earliest modification time "
                               f"({decision.reason.split('time (')[1].split(')')[0]}), over 1 copy")
    assert decision.reasons[3] == decision.reasons[4] == "lower resolution (800x600 vs 1600x1200)"
    assert decision.reasons[2].startswith("identical bytes, modified later")


def test_capture_time_then_file_time_then_format():
    """Same pixels, no size comparison across formats: the earliest capture, then the earliest file,
    then the format cameras write."""
    a = photo(1, "a.webp", fmt="WEBP", captured_at="2020-01-01 00:00:00", camera=CAMERA)
    b = photo(2, "b.jpg", captured_at="2019-01-01 00:00:00", camera=CAMERA)
    assert choose_keeper([a, b]).reasons[1] == "later capture time (2020-01-01 00:00:00 vs 2019-01-01 00:00:00)"
    tif, jpg = photo(3, "c.tif", fmt="TIFF", mtime_ns=T0 - DAY), photo(4, "c.jpg")
    assert choose_keeper([jpg, tif]).keeper == tif  # older file: a lossless original stays
    gif = photo(5, "c.gif", fmt="GIF")
    assert choose_keeper([gif, photo(6, "d.png", fmt="PNG")]).reasons[5] == "less preferred format (GIF vs PNG)"


def test_png_export_with_camera_exif_loses_to_the_camera_jpeg():
    """Finding 1: a PNG export that kept the camera's EXIF (same make/model, capture time and
    pixels) is a lossless re-save of the lossy original, not better than it."""
    jpeg = original(size=3_000_000)
    png = original(2, "exports/IMG_1045.png", size=9_000_000, fmt="PNG", mtime_ns=T0 + 30 * DAY)
    decision = choose_keeper([png, jpeg])
    assert decision.keeper == jpeg and decision.reason.startswith("earliest modification time (")
    assert decision.reasons[2].startswith("modified later (")
    # A copy tool that kept the file time leaves only the format: the one the camera wrote stays.
    same_time = original(2, "exports/IMG_1045.png", size=9_000_000, fmt="PNG")
    decision = choose_keeper([same_time, jpeg])
    assert decision.keeper == jpeg and decision.reason == "the format cameras write (JPEG)"
    assert decision.reasons[2] == "less preferred format (PNG vs JPEG)"


def test_png_conversion_without_exif_loses_to_the_jpeg_without_exif():
    jpeg = photo(1, "web/IMG_1045.jpg", size=400_000)
    png = photo(2, "web/IMG_1045.png", size=3_500_000, fmt="PNG", mtime_ns=T0 + DAY)
    assert choose_keeper([png, jpeg]).keeper == jpeg
    assert choose_keeper([replace(png, mtime_ns=T0), jpeg]).keeper == jpeg


def test_size_compares_only_copies_still_in_the_running():
    """Finding 2: a 5 MB quality-100 JPEG without EXIF (ruled out by `original`) must not set the size
    bar, or the 3 MB camera original and a 1.2 MB re-encode that kept the EXIF would tie on size."""
    camera = original(1, "2021/IMG_1045.JPG", size=3_000_000)
    re_encode = original(2, "shared/IMG_1045.jpg", size=1_200_000, mtime_ns=T0 - DAY)
    export = photo(3, "exports/IMG_1045.jpg", size=5_000_000)
    decision = choose_keeper([re_encode, export, camera])
    assert decision.keeper == camera
    assert decision.reasons[2] == "smaller JPEG file (1,200,000 bytes vs 3,000,000)"
    assert decision.reasons[3] == f"no camera metadata (the kept copy has {CAMERA}, captured {SHOT})"
    assert decision.reason == (f"camera original ({CAMERA}, captured {SHOT}), over 1 copy; "
                               "largest file of its format (JPEG, 3,000,000 bytes), over 1 copy")


def test_smaller_copy_of_another_format_is_compared_with_its_own_format():
    """A small JPEG loses on size to a larger JPEG that itself loses later to a HEIC: its reason names
    the larger JPEG (what ruled it out), never claims the HEIC keeper is a bigger JPEG."""
    heic = original(1, "phone/IMG_1045.HEIC", fmt="HEIF", size=500_000, mtime_ns=T0 - DAY)
    big, small = original(2, "a/IMG_1045.jpg", size=900_000), original(3, "b/IMG_1045.jpg", size=300_000)
    decision = choose_keeper([small, big, heic])
    assert decision.keeper == heic
    assert decision.reasons[3] == "a larger JPEG copy exists (300,000 bytes vs 900,000)"
    assert decision.reasons[2].startswith("modified later (")
    assert decision.reason.startswith("a larger file of the same format preferred, over 1 copy; "
                                      "earliest modification time (")


def test_modification_time_out_of_range_is_shown_raw_not_raised():
    far = 10**30  # past year 9999: datetime cannot show it
    a, b = photo(1, "a/x.jpg", mtime_ns=T0, sha256="ab" * 32), photo(2, "b/x.jpg", mtime_ns=far, sha256="ab" * 32)
    decision = choose_keeper([b, a])
    assert decision.keeper == a
    assert decision.reasons[2] == f"identical bytes, modified later (unknown time ({far} ns since 1970) vs " \
                                  f"{decision.reasons[2].split(' vs ')[1]}"
    assert choose_keeper([a, b], ("modified",)).keeper == a
    assert "unknown time" in choose_keeper([replace(a, mtime_ns=-far), b]).reason


def test_copies_modified_within_one_microsecond_say_by_how_much():
    a = photo(1, "a/x.jpg", sha256="ab" * 32)
    b = photo(2, "b/x.jpg", mtime_ns=T0 + 300, sha256="ab" * 32)
    reason = choose_keeper([b, a]).reasons[2]
    assert reason.startswith("identical bytes, modified later (") and reason.endswith(", 300 ns after the kept copy)")
    same = choose_keeper([replace(b, mtime_ns=T0), a]).reasons[2]
    assert same == "identical bytes, equal by every keep rule; the kept copy's path comes first"


def test_every_default_rule_is_known_and_unknown_rules_are_refused():
    assert set(DEFAULT_ORDER) == set(RULES)
    with pytest.raises(InvalidArgumentError, match="order has an unknown rule 'biggest'"):
        choose_keeper([original(), original(2, "b.jpg")], ("resolution", "biggest"))
    with pytest.raises(InvalidArgumentError, match="needs at least one rule"):
        choose_keeper([original(), original(2, "b.jpg")], ())


def test_cli_default_order_is_the_library_default():
    from dinoseek.retrieval.cli import dedup

    option = next(p for p in dedup.params if p.name == "order")
    assert option.default == ",".join(DEFAULT_ORDER)

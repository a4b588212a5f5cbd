"""Which copy of a duplicate group stays, and why — for the group and for every member.

The default order answers "which file would the photographer keep?" from what the catalog knows
(pixels, format, size, EXIF capture time and make/model, modification time) and one look at the
folder (a RAW file beside a JPEG):

1. ``protected``: a copy in a ``--protect`` folder (the user said so).
2. ``resolution``: clearly more *real* pixels. Two rules make "real" precise:
   - a difference counts only from REAL_PIXEL_RATIO (1.2x the pixel count, ~10% per side) up; below
     it copies tie (a few rows cropped, a re-save) and the next rules decide;
   - a copy without camera metadata gets no credit for pixels beyond the best camera copy in the
     running: an upscale (or a screenshot taken on a bigger screen) has more pixels but no more
     detail, and from the catalog it cannot be told from a full-size copy that lost its EXIF, so
     the camera's copy is trusted. A downscaled copy, with or without EXIF, loses here.
3. ``original``: evidence the file came from the camera: the JPEG/HEIC of a RAW+JPEG pair (a RAW
   file of the same name beside it), then EXIF make/model *and* capture time, then one of them.
   So an export, re-save or screenshot (no camera metadata) never beats the original it came from.
4. ``size``: the largest file *of its format*; sizes of different formats are not compared (a PNG
   re-save of a JPEG is larger, not better). Among same-format copies with the same pixels the
   larger one was encoded at a higher quality (a lower-quality re-encode loses).
5. ``oldest``: the earliest EXIF capture time (copies without one last).
6. ``modified``: the earliest modification time: a copy cannot be older than what it was copied
   from. For byte-identical copies this is what decides after ``protected`` (and a RAW beside one).
7. ``format``: the format cameras write (JPEG, HEIC) first, GIF (256 colours) last. It comes after
   ``modified`` and does not prefer lossless: copies that reach it have the same pixels and the same
   camera metadata, and a lossless re-save of a lossy file (a PNG export that kept the EXIF) holds no
   more detail than the file it came from, only more bytes, so it must not win; the file time tells
   which was made from which. Only when that ties too does the format a camera writes stay, as the
   likelier original.

The rules eliminate copies one after another: each rule looks only at the copies every earlier rule
left in the running and keeps those it ranks best, so a copy already ruled out never sets the bar for
the others (a no-EXIF quality-100 export cannot make the camera original "smaller"). A member's reason
is the rule that ruled it out, compared with the keeper (or, for ``size`` across formats, with the
largest copy of its own format still in the running then) — so it is always true of the keeper.

Full ties go to the shorter path, then the path's bytes: stable across runs and re-indexing (row ids
are not). An explicit ``--keep`` order uses its rules in that order, then ``modified``, then the path.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .errors import InvalidArgumentError

# Lower is better (the ``format`` rule, see the module docstring): what cameras and phones write, then
# every other format alike (a PNG or TIFF conversion is no better than its source), then GIF (a palette
# of 256 colours holds less than the photo). Unknown formats rank with the others.
FORMAT_RANK = {"JPEG": 0, "MPO": 0, "HEIF": 0, "GIF": 2}
OTHER_FORMAT_RANK = 1
DEFAULT_ORDER = ("protected", "resolution", "original", "size", "oldest", "modified", "format")
RULES = DEFAULT_ORDER  # every known rule
# A pixel count counts as more only from this factor up (1.2: about 10% more per side). Resizing by
# less than that, or cropping a few rows, changes too little detail to outweigh provenance.
REAL_PIXEL_RATIO = 1.2


@dataclass(frozen=True)
class Member:
    id: int
    path: str  # printable relative path
    raw_path: bytes
    size: int
    width: int
    height: int
    format: str
    captured_at: str | None  # EXIF capture time, "YYYY-MM-DD HH:MM:SS"
    sha256: str
    mtime_ns: int
    camera: str | None = None  # EXIF make and model
    raw_partner: bool = False  # a RAW file of the same name beside it (retrieval.sidecars.raw_partner)

    @property
    def pixels(self) -> int:
        return max(self.width or 0, 0) * max(self.height or 0, 0)


@dataclass(frozen=True)
class Decision:
    keeper: Member
    reason: str  # why the keeper stays: true against every member that goes
    reasons: dict[int, str] = field(default_factory=dict)  # member id -> why it goes (or stays, if protected)


def in_folder(member: Member, folder: bytes | str) -> bool:
    """Whether the member lies under `folder` (relative to the root; "" is the root). Raw bytes are
    compared, so folder names that are not UTF-8 match exactly."""
    prefix = os.fsencode(folder).strip(b"/")
    return prefix in (b"", b".") or member.raw_path.startswith(prefix + b"/")


def provenance(member: Member) -> int:
    """0: half of a RAW+JPEG pair; 1: EXIF make/model and capture time; 2: one of them; 3: neither."""
    if member.raw_partner:
        return 0
    return 3 - (member.camera is not None) - (member.captured_at is not None)


def is_camera_copy(member: Member) -> bool:
    return provenance(member) < 3


class _Ranking:
    """Sort keys of the copies still in the running, rule by rule; smaller sorts first (= preferred).
    Built anew for each rule over that rule's survivors only (see the module docstring)."""

    def __init__(self, survivors: list[Member], protected: tuple[bytes | str, ...]) -> None:
        self.protected = protected
        camera_pixels = [m.pixels for m in survivors if is_camera_copy(m)]
        self.cap = max(camera_pixels) if camera_pixels else None  # see rule 2 in the module docstring
        self.best = max(self.credited(m) for m in survivors)
        self.largest_of_format: dict[str, int] = {}
        for m in survivors:
            self.largest_of_format[m.format] = max(self.largest_of_format.get(m.format, 0), m.size)

    def credited(self, member: Member) -> int:
        """Pixels that count: a copy without camera metadata gets none beyond the best camera copy."""
        if self.cap is None or is_camera_copy(member):
            return member.pixels
        return min(member.pixels, self.cap)

    def full_resolution(self, member: Member) -> bool:
        return self.credited(member) * REAL_PIXEL_RATIO > self.best

    def key(self, member: Member, rule: str):
        if rule == "protected":
            return 0 if any(in_folder(member, p) for p in self.protected) else 1
        if rule == "resolution":  # every copy within the ratio of the best ties; the others by pixels
            return (0, 0) if self.full_resolution(member) else (1, -self.credited(member))
        if rule == "original":
            return provenance(member)
        if rule == "size":
            return 0 if member.size == self.largest_of_format[member.format] else 1
        if rule == "oldest":
            return member.captured_at or "9999"
        if rule == "format":
            return FORMAT_RANK.get(member.format, OTHER_FORMAT_RANK)
        assert rule == "modified", rule  # check_order let only RULES through
        return member.mtime_ns


def check_order(order: tuple[str, ...]) -> tuple[str, ...]:
    """`order` if every rule in it is known; InvalidArgumentError naming the first one that is not."""
    for rule in order:
        if rule not in RULES:
            raise InvalidArgumentError(f"has an unknown rule {rule!r}; expected some of {', '.join(RULES)}",
                                       argument="order")
    if not order:
        raise InvalidArgumentError(f"needs at least one rule of {', '.join(RULES)}", argument="order")
    return order


def choose_keeper(members: list[Member], order: tuple[str, ...] = DEFAULT_ORDER,
                  protected: tuple[bytes | str, ...] = ()) -> Decision:
    """The member to keep, why (true against every member that goes), and each member's own reason.

    The rules of `order` (then `modified`, then the path) eliminate copies in turn: each keeps only
    the copies it ranks best among those still in the running. A member's reason is the rule that
    ruled it out; the keeper's reason lists those rules, with how many copies each ruled out.
    """
    order = check_order(tuple(order))
    if len(members) < 2:
        raise InvalidArgumentError(f"a duplicate group has at least 2 members, got {len(members)}")
    rules = order + (() if "modified" in order else ("modified",))
    survivors = list(members)
    ruled_out: dict[int, tuple[str, _Ranking | None]] = {}  # member id -> (rule, the stage it lost at)
    for rule in rules:
        if len(survivors) == 1:
            break
        ranking = _Ranking(survivors, protected)
        keys = {m.id: ranking.key(m, rule) for m in survivors}
        best = min(keys.values())
        ruled_out.update((m.id, (rule, ranking)) for m in survivors if keys[m.id] != best)
        survivors = [m for m in survivors if keys[m.id] == best]
    survivors.sort(key=lambda m: (len(m.raw_path), m.raw_path))
    keeper = survivors[0]
    ruled_out.update((m.id, ("path", None)) for m in survivors[1:])
    reasons, deciding = {}, Counter()
    for m in members:
        if m.id == keeper.id:
            continue
        if any(in_folder(m, p) for p in protected):
            reasons[m.id] = "in a protected folder: stays too"
            continue
        rule, ranking = ruled_out[m.id]
        if rule == "size" and m.format != keeper.format:
            rule = "size of another format"  # lost to a larger copy of its own format, not to the keeper
        reasons[m.id] = _why_not(m, keeper, rule, ranking)
        deciding[rule] += 1
    clauses = tuple(r for rule in rules for r in ((rule, "size of another format") if rule == "size" else (rule,)))
    return Decision(keeper, _why(keeper, deciding, clauses + ("path",)), reasons)


# ---- wording -------------------------------------------------------------------------------------

def _when(mtime_ns: int, other_ns: int | None = None) -> str:
    """Local time to the second; to the microsecond when `other_ns` falls in the same second. A time
    `datetime` cannot show (past year 9999, or before 1970 on some systems) is given in raw ns: a
    reason's wording must never end a whole dedup."""
    shown = "%Y-%m-%d %H:%M:%S" + (".%f" if other_ns is not None and mtime_ns // 10**9 == other_ns // 10**9 else "")
    seconds, nanoseconds = divmod(mtime_ns, 10**9)
    try:  # whole seconds and microseconds apart: a float of ns since 1970 is already off by ~0.2 µs
        return (datetime.fromtimestamp(seconds) + timedelta(microseconds=nanoseconds // 1000)).strftime(shown)
    except (ValueError, OverflowError, OSError):
        return f"unknown time ({mtime_ns} ns since 1970)"


def _camera_text(member: Member) -> str:
    parts = [member.camera, member.captured_at and f"captured {member.captured_at}"]
    return ", ".join(p for p in parts if p)


def _describe(keeper: Member, rule: str) -> str:
    """What the keeper has that the copies this rule ruled out lack."""
    if rule == "protected":
        return "in a protected folder"
    if rule == "resolution":
        return f"highest resolution ({keeper.width}x{keeper.height})"
    if rule == "original":
        if keeper.raw_partner:
            return "camera original: the JPEG of a RAW+JPEG pair"
        return f"camera original ({_camera_text(keeper)})"
    if rule == "size":
        return f"largest file of its format ({keeper.format}, {keeper.size:,} bytes)"
    if rule == "size of another format":
        return "a larger file of the same format preferred"
    if rule == "oldest":
        return f"earliest capture time ({keeper.captured_at})"
    if rule == "format":
        if FORMAT_RANK.get(keeper.format) == 0:
            return f"the format cameras write ({keeper.format})"
        return f"preferred format ({keeper.format})"
    if rule == "modified":
        return f"earliest modification time ({_when(keeper.mtime_ns)})"
    return "equal by every keep rule: chosen by path (shorter, then alphabetical)"


def _why(keeper: Member, deciding: Counter, rules: tuple[str, ...]) -> str:
    """The keeper's reason. One rule: its description; several: each with the copies it decided."""
    used = [r for r in rules if deciding[r]]
    if len(used) == 1:
        return _describe(keeper, used[0])
    return "; ".join(f"{_describe(keeper, r)}, over {deciding[r]} {'copy' if deciding[r] == 1 else 'copies'}"
                     for r in used)


def _why_not(member: Member, keeper: Member, rule: str, ranking: _Ranking | None) -> str:
    """Why `member` goes: the rule that ruled it out, compared with the keeper (for a size across
    formats, with the largest copy of its own format in the running at that stage)."""
    if rule == "protected":
        return "not in a protected folder"
    if rule == "resolution":
        return f"lower resolution ({member.width}x{member.height} vs {keeper.width}x{keeper.height})"
    if rule == "original":
        if member.pixels >= keeper.pixels * REAL_PIXEL_RATIO and not is_camera_copy(member):
            return (f"more pixels ({member.width}x{member.height} vs {keeper.width}x{keeper.height}) but no "
                    f"camera metadata: an upscale or re-save, not the original")
        if keeper.raw_partner:
            return "the kept copy is the JPEG of a RAW+JPEG pair"
        if not is_camera_copy(member):
            return f"no camera metadata (the kept copy has {_camera_text(keeper)})"
        return f"less camera metadata ({_camera_text(member)} vs {_camera_text(keeper)})"
    if rule == "size":  # the keeper survived this stage: it is the largest of its format then
        return f"smaller {member.format} file ({member.size:,} bytes vs {keeper.size:,})"
    if rule == "size of another format":
        largest = ranking.largest_of_format[member.format]
        return f"a larger {member.format} copy exists ({member.size:,} bytes vs {largest:,})"
    if rule == "oldest":
        if member.captured_at is None:
            return f"no capture time (the kept copy: {keeper.captured_at})"
        return f"later capture time ({member.captured_at} vs {keeper.captured_at})"
    if rule == "format":
        return f"less preferred format ({member.format} vs {keeper.format})"
    copy = "identical bytes, " if member.sha256 and member.sha256 == keeper.sha256 else ""
    if rule == "modified":
        later, earlier = _when(member.mtime_ns, keeper.mtime_ns), _when(keeper.mtime_ns, member.mtime_ns)
        if later == earlier:  # within one microsecond: say by how much, not "X vs X"
            return f"{copy}modified later ({later}, {member.mtime_ns - keeper.mtime_ns} ns after the kept copy)"
        return f"{copy}modified later ({later} vs {earlier})"
    # Every rule tied, the modification time included (to the ns): only the path order is left.
    return f"{copy}equal by every keep rule; the kept copy's path comes first"

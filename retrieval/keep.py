"""Which copy of a duplicate group stays, and why."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .errors import InvalidArgumentError

# Lower is better: lossless first, then formats that keep more of the original.
FORMAT_RANK = {"PNG": 0, "TIFF": 0, "BMP": 1, "HEIF": 2, "AVIF": 2, "JPEG": 3, "MPO": 3, "WEBP": 4, "GIF": 5}
RULES = ("protected", "resolution", "size", "oldest", "format")
DEFAULT_ORDER = RULES


@dataclass(frozen=True)
class Member:
    id: int
    path: str  # printable relative path
    raw_path: bytes
    size: int
    width: int
    height: int
    format: str
    captured_at: str | None
    sha256: str
    mtime_ns: int


def in_folder(member: Member, folder: bytes | str) -> bool:
    """Whether the member lies under `folder` (relative to the root; "" is the root). Raw bytes are
    compared, so folder names that are not UTF-8 match exactly."""
    prefix = os.fsencode(folder).strip(b"/")
    return prefix in (b"", b".") or member.raw_path.startswith(prefix + b"/")


def _key(member: Member, rule: str, protected: tuple[bytes | str, ...]):
    """Sort key for one rule; smaller sorts first (= preferred)."""
    if rule == "protected":
        return 0 if any(in_folder(member, p) for p in protected) else 1
    if rule == "resolution":
        return -(member.width or 0) * (member.height or 0)
    if rule == "size":
        return -member.size
    if rule == "oldest":
        return member.captured_at or "9999"
    if rule == "format":
        return FORMAT_RANK.get(member.format, 9)
    raise InvalidArgumentError(f"unknown keep rule {rule!r}; expected one of {', '.join(RULES)}")


def _describe(member: Member, rule: str) -> str:
    return {
        "protected": "in a protected folder",
        "resolution": f"highest resolution ({member.width}x{member.height})",
        "size": f"largest file ({member.size:,} bytes)",
        "oldest": f"earliest capture time ({member.captured_at})",
        "format": f"preferred format ({member.format})",
    }[rule]


def choose_keeper(members: list[Member], order: tuple[str, ...] = DEFAULT_ORDER,
                  protected: tuple[bytes | str, ...] = ()) -> tuple[Member, str]:
    """The member to keep and the reason: the first rule (in `order`) that separates it from the
    runner-up; full ties go to the shortest path (then the oldest row)."""
    keys = {m.id: tuple(_key(m, r, protected) for r in order) + (len(m.path), m.path, m.id) for m in members}
    ranked = sorted(members, key=lambda m: keys[m.id])
    keeper, runner_up = ranked[0], ranked[1]
    for position, rule in enumerate(order):
        if keys[keeper.id][position] != keys[runner_up.id][position]:
            return keeper, _describe(keeper, rule)
    return keeper, "all copies equal by the keep rules: shortest path"

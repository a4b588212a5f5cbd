"""How much memory an exact index may take: `auto` never picks one above this budget.

An exact index holds every vector (float32 in a Flat index, float16 in auto's large exact index,
SQfp16) plus its id twice (IndexIDMap2's list and reverse map): at 384-d ~1.6 KB per image in Flat,
7.9 GB per kind at 5M, and ~0.8 KB in SQfp16, 4.1 GB. Whether that is fine depends on the
machine, so the budget is derived from it: a quarter of the memory available when the index is built
(each kind has its own index: both exact, they take half)
(/proc/meminfo MemAvailable; the physical memory where that is unknown), or DINOSEEK_INDEX_MEMORY
(bytes, or a number with K/M/G/T) where the user says so.
"""

from __future__ import annotations

import os
import re

from .errors import InvalidArgumentError

ENV = "DINOSEEK_INDEX_MEMORY"
AVAILABLE_SHARE = 0.25  # per kind; the other half: the catalog, the encoder, blocks, the OS cache
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def parse_bytes(text: str) -> int:
    """'4G', '512M', '1500000000' -> bytes; InvalidArgumentError otherwise."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", text, re.IGNORECASE)
    if not match:
        raise InvalidArgumentError(f"{ENV} must be a size like 4G or 512M or a number of bytes, got {text!r}")
    return int(float(match.group(1)) * _UNITS[match.group(2).upper()])


def available_bytes() -> int:
    """Memory the kernel says can be used without swapping (MemAvailable), else physical memory."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def memory_budget() -> int:
    """Bytes one exact index may take (see the module docstring); read on every call, so a test or
    a user can change DINOSEEK_INDEX_MEMORY between builds."""
    configured = os.environ.get(ENV)
    if configured:
        return parse_bytes(configured)
    return int(available_bytes() * AVAILABLE_SHARE)


VALUE_BYTES = {"Flat": 4, "SQfp16": 2}  # bytes per stored value of the exact index factories auto builds


def exact_index_bytes(count: int, dim: int, factory: str = "Flat") -> int:
    """Resident size of an exact IndexIDMap2 (`factory`: Flat or SQfp16) of `count` vectors: the
    vectors (VALUE_BYTES per value), the id list (8 B) and the reverse map (an unordered_map node
    and bucket, ~40 B)."""
    return count * (VALUE_BYTES[factory] * dim + 48)


def exact_fits(count: int, dim: int, budget: int | None = None, factory: str = "Flat") -> bool:
    return exact_index_bytes(count, dim, factory) <= (memory_budget() if budget is None else budget)

"""Duplicate groups for the review page: candidate pairs searched once, grouped again per threshold.

`dinoseek dedup` (retrieval.dedup.find_duplicates) searches candidate pairs at its threshold and
links them. A page with a threshold slider would repeat that search on every move, so here the
pairs are searched once, FLOOR_MARGIN below the first threshold asked (again only when a lower one
is asked), kept until the catalog's change token moves, and each threshold links the pairs at or
above it. Every pair's score is the exact cosine (grouping.rescored_pairs), and the search is
monotone in its threshold, so the pairs at a threshold are exactly those `find_duplicates` finds
there: the groups are the same, which tests/test_serve_api.py checks against it.

Pairs of contents marked "not a duplicate" are dropped from the candidates before linking by the
same `marks.drop_marked` as `find_duplicates`; marks are catalog writes, so they move the token too.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, replace
from functools import cached_property

from dinoseek.indexer.library import Library
from dinoseek.indexer.tuning import DEDUP_BLOCK, DEDUP_NPROBE
from dinoseek.retrieval.dedup import Group, candidate_search, exact_pairs, groups_from_links
from dinoseek.retrieval.errors import InvalidArgumentError
from dinoseek.retrieval.grouping import linked_groups
from dinoseek.retrieval.marks import drop_marked
from dinoseek.retrieval.report import plan_summary

KIND = "cls"  # what `dinoseek dedup` compares by default
FLOOR_MARGIN = 0.02  # a slider moved down by up to this much needs no new candidate search
CACHED_PLANS = 8  # thresholds x actions kept grouped
ACTIONS = ("move", "hardlink", "symlink")


class StaleReviewError(Exception):
    """A reviewed plan names groups that no longer exist (the catalog changed since the page loaded)."""


@dataclass(frozen=True)
class Plan:
    threshold: float
    action: str
    groups: list[Group]
    keys: list[str]  # group_key of each group
    summary: dict  # report.plan_summary: files and bytes leaving the photo folder, the quarantine

    @cached_property
    def version(self) -> str:
        """Names these groups with these keepers: a page sends it back with its review, and a plan
        that changed meanwhile (a new group, another default keeper) is refused, never applied unseen."""
        text = ";".join(f"{key}:{group.keeper.id}" for key, group in zip(self.keys, self.groups))
        return hashlib.sha256(f"{self.threshold}|{text}".encode()).hexdigest()[:32]


def group_key(group: Group) -> str:
    """A stable name for a group between page and server: sha256 of its sorted member ids."""
    return hashlib.sha256(",".join(str(m.id) for m in group.members).encode()).hexdigest()


@dataclass
class _Pairs:
    token: tuple
    floor: float
    pairs: list[tuple[int, int, float]]  # (a, b, exact cosine), a < b, score >= floor, in search order


class GroupCache:
    """Candidate pairs per change token, plans per (token, threshold, action); safe across threads
    (one search at a time: a second request for the same pairs waits for the first one's)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pairs: _Pairs | None = None
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()

    def plan(self, library: Library, token: tuple, threshold: float, action: str = "move") -> Plan:
        if not 0 < threshold <= 1:
            raise InvalidArgumentError(f"must be in (0, 1], got {threshold}", argument="threshold")
        if action not in ACTIONS:
            raise InvalidArgumentError(f"must be one of {', '.join(ACTIONS)}, got {action!r}", argument="action")
        key = (token, threshold, action)
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
            pairs = self._pairs_for(library, token, threshold)
            groups = groups_from_pairs(library, pairs, threshold)
            summary = plan_summary(library, groups, action).to_dict() if groups else _empty_summary(library, action)
            plan = Plan(threshold, action, groups, [group_key(g) for g in groups], summary)
            self._plans[key] = plan
            while len(self._plans) > CACHED_PLANS:
                self._plans.popitem(last=False)
            return plan

    def _pairs_for(self, library: Library, token: tuple, threshold: float) -> list[tuple[int, int, float]]:
        cached = self._pairs
        if cached is None or cached.token != token or cached.floor > threshold:
            floor = max(threshold - FLOOR_MARGIN, 1e-6)
            cached = self._pairs = _Pairs(token, floor, candidate_pairs(library, floor))
            self._plans.clear()
        return cached.pairs


def _empty_summary(library: Library, action: str) -> dict:
    return plan_summary(library, [], action).to_dict()


def candidate_pairs(library: Library, floor: float) -> list[tuple[int, int, float]]:
    """Every pair of embedded images at exact cosine >= floor, as find_duplicates searches them."""
    with contextlib.closing(candidate_search(library, KIND, floor, block=DEDUP_BLOCK, nprobe=DEDUP_NPROBE)) as found:
        return list(found)


def groups_from_pairs(library: Library, pairs: list[tuple[int, int, float]], threshold: float) -> list[Group]:
    """find_duplicates' groups at `threshold` (default keep order, no --protect or --in-folder) from
    candidate pairs searched at or below it."""
    byte_copy_pairs = exact_pairs(library.catalog.exact_hash_groups())
    candidates = drop_marked((p for p in pairs if p[2] >= threshold), library)
    linked, scores = linked_groups(itertools.chain(byte_copy_pairs, candidates))
    return groups_from_links(library, linked, scores, kind=KIND)


def reviewed(plan: Plan, keepers: dict[str, int], skip: list[str], version: str | None = None) -> list[Group]:
    """The plan's groups as the page left them: `skip` groups left out, `keepers` overriding who stays;
    `version` (Plan.version as the page got it), where given, must still be the plan's.

    StaleReviewError where a key names no current group (the page must reload before acting);
    InvalidArgumentError where a keeper is not a member of its group."""
    if version is not None and version != plan.version:
        raise StaleReviewError(f"the duplicate groups at threshold {plan.threshold} changed since the page loaded "
                               f"them (the library changed): reload the page and review again")
    known = set(plan.keys)
    unknown = [k for k in itertools.chain(keepers, skip) if k not in known]
    if unknown:
        raise StaleReviewError(f"{len(unknown)} reviewed group(s) no longer exist at threshold {plan.threshold} "
                               f"(the library changed): reload the page and review again")
    skipped = set(skip)
    out = []
    for key, group in zip(plan.keys, plan.groups):
        if key in skipped:
            continue
        if key in keepers:
            group = with_keeper(group, keepers[key])
        out.append(group)
    return out


def with_keeper(group: Group, member_id: int) -> Group:
    """The group with another member kept, chosen by the person reviewing it."""
    if member_id == group.keeper.id:
        return group
    chosen = next((m for m in group.members if m.id == member_id), None)
    if chosen is None:
        raise InvalidArgumentError(f"{member_id} is not a member of the group keeping {group.keeper.path}",
                                   argument="keepers")
    return replace(group, keeper=chosen, reason="chosen in the review page", reasons={}, similarities={},
                   crop_similarities={})


def group_json(group: Group, key: str, action: str) -> dict:
    """One group for the page: the keeper first, then the others; names are plain JSON strings (the
    page escapes them)."""
    def role(m) -> str:
        if m.id == group.keeper.id:
            return "keep"
        return "protected" if m.id in group.protected_ids else action

    def similarity(m):
        value = group.similarity_to_keeper(m)
        return None if value is None else round(value, 6)

    ordered = [group.keeper, *(m for m in group.members if m.id != group.keeper.id)]
    return {"key": key, "kind": group.kind, "min_similarity": round(group.min_similarity, 6),
            "keeper": group.keeper.id,
            "members": [{"id": m.id, "path": m.path, "folder": os.path.dirname(m.path), "width": m.width,
                         "height": m.height, "bytes": m.size, "format": m.format, "captured_at": m.captured_at,
                         "camera": m.camera, "similarity": similarity(m), "reason": group.reason_for(m),
                         "role": role(m)} for m in ordered]}

"""Duplicate groups for the review page: candidate pairs searched once, grouped again per threshold.

`dinoseek dedup` (retrieval.dedup.find_duplicates) searches candidate pairs at its threshold and
links them. A page with a threshold slider would repeat that search on every move, so here the
pairs are searched once, FLOOR_MARGIN below the first threshold asked (again only when a lower one
is asked), kept until the catalog's change token moves, and each threshold links the pairs at or
above it. Every pair's score is the exact cosine (grouping.rescored_pairs), and the search is
monotone in its threshold, so the pairs at a threshold are exactly those `find_duplicates` finds
there: the groups are the same, which tests/test_serve_api.py checks against it.

Pairs of contents marked "not a duplicate" are dropped from the candidates before linking by the
same `marks.drop_marked` as `find_duplicates`: the pairs are kept by the images' state alone, the
groups by that state and the marks' (library_access.Token), so a mark regroups without a new search.
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
from dinoseek.retrieval.sidecars import one_listing_per_folder

KIND = "cls"  # what `dinoseek dedup` compares by default
FLOOR_MARGIN = 0.02  # a slider moved down by up to this much needs no new candidate search
CACHED_PLANS = 8  # groupings (thresholds) and plans (thresholds x actions) kept
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
    images: tuple  # Token.images the pairs were searched at
    floor: float
    pairs: list[tuple[int, int, float]]  # (a, b, exact cosine), a < b, score >= floor, in search order


class GroupCache:
    """Candidate pairs per images token; groups per (images, marks, threshold), made once for every
    action (only the roles differ); plans per (images, marks, threshold, action). Safe across threads
    (one search at a time: a second request for the same pairs waits for the first one's).

    A mark moves only the marks token: the next plan regroups the cached pairs (drop_marked), with no
    new candidate search."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pairs: _Pairs | None = None
        self._grouped: OrderedDict[tuple, tuple[list[Group], list[str]]] = OrderedDict()
        self._plans: OrderedDict[tuple, Plan] = OrderedDict()

    def plan(self, library: Library, token, threshold: float, action: str = "move") -> Plan:
        """`token`: the reader's (library_access.Token) for `library`."""
        if not 0 < threshold <= 1:
            raise InvalidArgumentError(f"must be in (0, 1], got {threshold}", argument="threshold")
        if action not in ACTIONS:
            raise InvalidArgumentError(f"must be one of {', '.join(ACTIONS)}, got {action!r}", argument="action")
        grouped_key = (token.images, token.marks, threshold)
        key = (*grouped_key, action)
        with self._lock:
            if key in self._plans:
                self._plans.move_to_end(key)
                return self._plans[key]
            # one listing per folder (as the CLI's dedup): keep rules and summary look up sidecars
            with one_listing_per_folder():
                groups, keys = self._groups_for(library, token.images, grouped_key, threshold)
                summary = plan_summary(library, groups, action).to_dict()
            plan = Plan(threshold, action, groups, keys, summary)
            _remember(self._plans, key, plan)
            return plan

    def _groups_for(self, library: Library, images: tuple, key: tuple,
                    threshold: float) -> tuple[list[Group], list[str]]:
        pairs = self._pairs_for(library, images, threshold)
        if key in self._grouped:
            self._grouped.move_to_end(key)
            return self._grouped[key]
        groups = groups_from_pairs(library, pairs, threshold)
        grouped = (groups, [group_key(g) for g in groups])
        _remember(self._grouped, key, grouped)
        return grouped

    def _pairs_for(self, library: Library, images: tuple, threshold: float) -> list[tuple[int, int, float]]:
        cached = self._pairs
        if cached is None or cached.images != images or cached.floor > threshold:
            floor = max(threshold - FLOOR_MARGIN, 1e-6)
            cached = self._pairs = _Pairs(images, floor, candidate_pairs(library, floor))
            self._grouped.clear()
            self._plans.clear()
        return cached.pairs


def _remember(cache: OrderedDict, key: tuple, value) -> None:
    cache[key] = value
    while len(cache) > CACHED_PLANS:
        cache.popitem(last=False)


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


def reviewed(plan: Plan, keepers: dict[str, int], skip: list[str], version: str, shown: list[str]) -> list[Group]:
    """The plan's groups as the page left them: only the `shown` groups (those the page showed the
    person, every page visited; the others are left alone, never acted on unseen), less the `skip`
    ones, with `keepers` overriding who stays. `version` (Plan.version as the page got it) must
    still be the plan's.

    StaleReviewError where the version changed or a key names no current group (the page must reload
    before acting); InvalidArgumentError where a keeper or skip names a group not shown, or a keeper
    is not a member of its group."""
    if version != plan.version:
        raise StaleReviewError(f"the duplicate groups at threshold {plan.threshold} changed since the page loaded "
                               f"them (the library changed): reload the page and review again")
    known = set(plan.keys)
    unknown = {k for k in itertools.chain(shown, keepers, skip) if k not in known}
    if unknown:
        raise StaleReviewError(f"{len(unknown)} reviewed group(s) no longer exist at threshold {plan.threshold} "
                               f"(the library changed): reload the page and review again")
    seen = set(shown)
    unseen = {k for k in itertools.chain(keepers, skip) if k not in seen}
    if unseen:
        raise InvalidArgumentError(f"name {len(unseen)} group(s) missing from groups (the groups shown)",
                                   argument="keepers and skip")
    skipped = set(skip)
    out = []
    for key, group in zip(plan.keys, plan.groups):
        if key not in seen or key in skipped:
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

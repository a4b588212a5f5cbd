"""Duplicate reports: JSON and CSV for scripts, a self-contained HTML page for people; and what a
plan would take out of the photo folder (PlanSummary), for dry runs and reports alike."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dinoseek.indexer.decode import DecodeError, read_image
from dinoseek.indexer.library import Library
from dinoseek.indexer.paths import display_path
from dinoseek.model.progress import progress

from .dedup import Group
from .errors import InvalidArgumentError
from .journal import QUARANTINE
from .keep import Member


@dataclass(frozen=True)
class PlanSummary:
    """What a plan takes out of the photo folder, and where it goes.

    Nothing leaves the disk when the quarantine shares the photos' filesystem: a move there frees no
    space at all until `dinoseek purge` deletes the quarantined copies. On another filesystem the
    space is freed on the photos' disk at once, and taken on the quarantine's until the purge.
    """

    action: str  # move | hardlink | symlink; "report" plans are summarised as a move would do them
    applied: bool
    files: int  # duplicates that leave the photo folder
    bytes: int
    sidecars: int  # files that travel with them (XMP, AAE, a RAW, a Live Photo's MOV; `move` only)
    sidecar_bytes: int
    quarantine: Path
    same_filesystem: bool | None  # None: neither the quarantine nor a folder above it could be read

    def to_dict(self) -> dict:
        return {"action": self.action, "applied": self.applied, "files": self.files, "bytes": self.bytes,
                "sidecars": self.sidecars, "sidecar_bytes": self.sidecar_bytes,
                "quarantine": os.fsdecode(self.quarantine), "same_filesystem": self.same_filesystem,
                "bytes_freed_before_purge": 0 if self.same_filesystem is not False else self.bytes + self.sidecar_bytes}

    def text(self) -> str:
        """One line: counts, destination, and when the space comes back."""
        total = self.bytes + self.sidecar_bytes
        with_sidecars = ""
        if self.sidecars:
            with_sidecars = f" and {self.sidecars} sidecar files ({human_bytes(self.sidecar_bytes)})"
        what = f"{self.files} files ({human_bytes(self.bytes)}){with_sidecars}"
        if self.action == "report":
            verb = "would leave the photo folder with --action move --apply, for"
        else:
            verb = "leave the photo folder for" if self.applied else "would leave the photo folder for"
        if self.same_filesystem:
            disk = "the same filesystem as the photos: no space is freed until `dinoseek purge`"
        elif self.same_filesystem is False:
            disk = (f"another filesystem: {human_bytes(total)} freed beside the photos, held in the quarantine "
                    f"until `dinoseek purge`")
        else:
            disk = "space is freed only when `dinoseek purge` empties the quarantine"
        return f"{what} {verb} {self.quarantine} ({disk})"


def human_bytes(count: int) -> str:
    """1234567 -> "1.2 MB" (decimal units, as file managers show them)."""
    value = float(count)
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if value < 1000 or unit == "TB":
            return f"{count:,} bytes" if unit == "bytes" else f"{value:.1f} {unit}"
        value /= 1000
    raise AssertionError("unreachable")


def _device(path: Path) -> int | None:
    """st_dev of `path`, or of the nearest folder above it that exists (a quarantine is created on
    first use)."""
    for candidate in (path, *path.parents):
        try:
            return os.stat(candidate).st_dev
        except OSError:
            continue
    return None


def plan_summary(library: Library, groups: list[Group], action: str = "report",
                 quarantine: Path | str | None = None, applied: bool = False) -> PlanSummary:
    """Files and bytes the plan takes out of the photo folder (catalog sizes; sidecars as they are
    on disk now), the quarantine they go to (as actions.apply resolves it), and whether it shares
    the photos' filesystem (st_dev)."""
    from .actions import planned_sidecars

    target = Path(quarantine or library.folder / QUARANTINE).resolve()
    moving = "move" if action == "report" else action
    files = sum(len(g.others) for g in groups)
    size = sum(m.size for g in groups for m in g.others)
    sidecars = [p for g in groups for paths in planned_sidecars(library, g, moving).values() for p in paths]
    sidecar_bytes = 0
    for path in sidecars:
        try:
            sidecar_bytes += os.lstat(path).st_size
        except OSError:
            pass  # gone since it was listed: apply will not move it either
    root, there = _device(library.root), _device(target)
    same = None if root is None or there is None else root == there
    return PlanSummary(action, applied, files, size, len(sidecars), sidecar_bytes, target, same)


def member_note(group: Group, member: Member) -> str:
    """"similarity 0.993: lower resolution (800x600 vs 1600x1200)": a member's score against the
    keeper and why it goes (or stays), as the terminal and the HTML page show it."""
    similarity = group.similarity_to_keeper(member)
    score = "" if similarity is None else f"similarity {similarity:.3f}"
    if member.id in group.crop_similarities:
        score += f" (crop match {group.crop_similarities[member.id]:.3f})"
    return f"{score}: {group.reason_for(member)}" if score else group.reason_for(member)


def to_json(groups: list[Group], action: str = "report", summary: PlanSummary | None = None,
            sidecars: Mapping[bytes, list[Path]] | None = None, applied: dict | None = None) -> str:
    """The plan as JSON. `sidecars` (actions.planned_sidecars of each group, for `move`): every member
    that goes also lists, under "sidecars", the files that would move with it (paths relative to the
    root, like its own; [] when none). `applied` (actions.ApplyResult.to_dict): what an apply did."""
    data = {"action": action, "groups": [_group_dict(g, sidecars) for g in groups],
            "files_to_act_on": sum(len(g.others) for g in groups)}
    if summary is not None:
        data["summary"] = summary.to_dict()
    if applied is not None:
        data["applied"] = applied
    return json.dumps(data, indent=2)


def _group_dict(group: Group, sidecars: Mapping[bytes, list[Path]] | None) -> dict:
    data = group.to_dict()
    if sidecars is None:
        return data
    for member, entry in zip(group.members, data["members"]):  # to_dict keeps the members' order
        if not group.keeps(member):
            folder = os.path.dirname(member.raw_path)
            entry["sidecars"] = [display_path(os.path.join(folder, os.fsencode(p.name)))
                                 for p in sidecars.get(member.raw_path, ())]
    return data


# A cell starting with one of these is a formula to Excel, LibreOffice and Google Sheets (tab and CR
# too, as some of them strip leading whitespace first). OWASP "CSV Injection": prefix a single quote.
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


def _cell(value) -> object:
    """A CSV cell that a spreadsheet shows as text: numbers stay numbers, text that could start a
    formula (a file named `=HYPERLINK(...).jpg`) gets a leading `'`."""
    if value is None or isinstance(value, (int, float)):
        return "" if value is None else value
    text = str(value)
    return "'" + text if text.startswith(_FORMULA_START) else text


def to_csv(groups: list[Group]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["group", "kind", "min_similarity", "keep", "path", "similarity", "bytes", "width", "height",
                     "format", "captured_at", "camera", "sha256", "reason"])
    for number, group in enumerate(groups, 1):
        for m in group.members:
            similarity = group.similarity_to_keeper(m)
            row = [number, group.kind, f"{group.min_similarity:.4f}", int(group.keeps(m)), m.path,
                   None if similarity is None else f"{similarity:.4f}", m.size, m.width, m.height, m.format,
                   m.captured_at, m.camera, m.sha256, group.reason_for(m)]
            writer.writerow([_cell(value) for value in row])
    return out.getvalue()


def _thumbnail(path: Path, side: int = 160) -> str | None:
    """A small JPEG as a data: URI, or None if the file cannot be read any more."""
    try:
        image = read_image(path, min_side=side).image
    except DecodeError:
        return None
    image.thumbnail((side, side))
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def to_html(groups: list[Group], root: Path, title: str = "dinoseek duplicates",
            summary: PlanSummary | None = None) -> str:
    """One page, no external files: thumbnails are embedded as data URIs (the long part: reported
    as the step "report: thumbnails", in images)."""
    esc = html.escape
    parts = [f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;background:#fafafa}}
.group{{background:#fff;border:1px solid #ddd;border-radius:8px;padding:1em;margin:0 0 1.5em}}
.cards{{display:flex;flex-wrap:wrap;gap:1em}} .card{{width:180px}} .card img{{max-width:160px;max-height:160px;display:block}}
.keep{{outline:3px solid #2a2}} .drop{{opacity:.85;outline:1px dashed #c33}} .meta{{color:#555;font-size:12px;word-break:break-all}}
.why{{font-size:12px;margin-top:.3em}} h2{{font-size:16px;margin:0 0 .5em}}</style></head><body>
<h1>{esc(title)}</h1><p>{len(groups)} groups, {sum(len(g.others) for g in groups)} files that could go.
Green: kept. Dashed red: duplicates.</p>"""]
    if summary is not None:
        parts.append(f'<p class="summary">{esc(summary.text())}</p>')
    with progress(sum(len(g.members) for g in groups), "report: thumbnails", unit="images") as step:
        for number, group in enumerate(groups, 1):
            parts.append(f'<div class="group"><h2>Group {number}: {group.kind}, lowest similarity '
                         f'{group.min_similarity:.3f}</h2><p>Keeps <b>{esc(group.keeper.path)}</b>: {esc(group.reason)}</p>'
                         f'<div class="cards">')
            for m in group.members:
                uri = _thumbnail(root / os.fsdecode(m.raw_path))
                step.update()
                img = f'<img src="{uri}" alt="">' if uri else "<i>(unreadable now)</i>"
                css = "keep" if group.keeps(m) else "drop"
                why = group.reason if m.id == group.keeper.id else member_note(group, m)
                parts.append(f'<div class="card {css}">{img}<div class="meta">{esc(m.path)}<br>{m.width}x{m.height} '
                             f'{esc(m.format)}, {m.size:,} bytes<br>{esc(m.captured_at or "")}</div>'
                             f'<div class="why">{"kept: " if group.keeps(m) else "goes: "}{esc(why)}</div></div>')
            parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(groups: list[Group], path: Path, root: Path, action: str = "report",
                 summary: PlanSummary | None = None, sidecars: Mapping[bytes, list[Path]] | None = None) -> None:
    """Format chosen by extension: .json, .csv or .html (JSON and HTML carry the summary too; CSV
    has one row per member, whose bytes and keep columns add up to it; JSON lists `sidecars`, see
    to_json)."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = to_json(groups, action, summary, sidecars)
    elif suffix == ".csv":
        text = to_csv(groups)
    elif suffix in (".html", ".htm"):
        text = to_html(groups, root, summary=summary)
    else:
        raise InvalidArgumentError(f"report file must end in .json, .csv or .html, got {path.name}")
    path.write_text(text, encoding="utf-8")

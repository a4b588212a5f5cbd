"""Duplicate reports: JSON and CSV for scripts, a self-contained HTML page for people."""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from pathlib import Path

from dinoseek.indexer.decode import DecodeError, read_image

from .dedup import Group
from .errors import InvalidArgumentError


def to_json(groups: list[Group], action: str = "report") -> str:
    return json.dumps({"action": action, "groups": [g.to_dict() for g in groups],
                       "files_to_act_on": sum(len(g.others) for g in groups)}, indent=2)


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
    writer.writerow(["group", "kind", "min_similarity", "keep", "path", "bytes", "width", "height", "format",
                     "captured_at", "sha256", "reason"])
    for number, group in enumerate(groups, 1):
        for m in group.members:
            row = [number, group.kind, f"{group.min_similarity:.4f}", int(group.keeps(m)), m.path,
                   m.size, m.width, m.height, m.format, m.captured_at, m.sha256, group.reason]
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


def to_html(groups: list[Group], root: Path, title: str = "dinoseek duplicates") -> str:
    """One page, no external files: thumbnails are embedded as data URIs."""
    esc = html.escape
    parts = [f"""<!doctype html><html><head><meta charset="utf-8"><title>{esc(title)}</title>
<style>body{{font:14px system-ui,sans-serif;margin:2em;background:#fafafa}}
.group{{background:#fff;border:1px solid #ddd;border-radius:8px;padding:1em;margin:0 0 1.5em}}
.cards{{display:flex;flex-wrap:wrap;gap:1em}} .card{{width:180px}} .card img{{max-width:160px;max-height:160px;display:block}}
.keep{{outline:3px solid #2a2}} .drop{{opacity:.85;outline:1px dashed #c33}} .meta{{color:#555;font-size:12px;word-break:break-all}}
h2{{font-size:16px;margin:0 0 .5em}}</style></head><body>
<h1>{esc(title)}</h1><p>{len(groups)} groups, {sum(len(g.others) for g in groups)} files that could go.
Green: kept. Dashed red: duplicates.</p>"""]
    for number, group in enumerate(groups, 1):
        parts.append(f'<div class="group"><h2>Group {number}: {group.kind}, lowest similarity '
                     f'{group.min_similarity:.3f}</h2><p>Keeps <b>{esc(group.keeper.path)}</b>: {esc(group.reason)}</p>'
                     f'<div class="cards">')
        for m in group.members:
            uri = _thumbnail(root / os.fsdecode(m.raw_path))
            img = f'<img src="{uri}" alt="">' if uri else "<i>(unreadable now)</i>"
            css = "keep" if group.keeps(m) else "drop"
            parts.append(f'<div class="card {css}">{img}<div class="meta">{esc(m.path)}<br>{m.width}x{m.height} '
                         f'{m.format}, {m.size:,} bytes<br>{esc(m.captured_at or "")}</div></div>')
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(groups: list[Group], path: Path, root: Path, action: str = "report") -> None:
    """Format chosen by extension: .json, .csv or .html."""
    suffix = path.suffix.lower()
    if suffix == ".json":
        text = to_json(groups, action)
    elif suffix == ".csv":
        text = to_csv(groups)
    elif suffix in (".html", ".htm"):
        text = to_html(groups, root)
    else:
        raise InvalidArgumentError(f"report file must end in .json, .csv or .html, got {path.name}")
    path.write_text(text, encoding="utf-8")

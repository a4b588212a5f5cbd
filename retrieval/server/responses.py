"""JSON responses that can carry any file name.

A path that is not UTF-8 reaches Python as a str with surrogate escapes (os.fsdecode), which JSON
(UTF-8) cannot encode: every response shows such names in their printable form (`caf\\xe9.jpg`), as
the CLI does, instead of failing with a 500 after the work was done (an undo's result, a group).
"""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse as _PlainJSONResponse


def displayable(value: Any) -> Any:
    """`value` with every string JSON can encode: surrogate escapes become \\xNN text."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return value.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        return value
    if isinstance(value, dict):
        return {displayable(k): displayable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [displayable(v) for v in value]
    return value


class JSONResponse(_PlainJSONResponse):
    def render(self, content: Any) -> bytes:
        return super().render(displayable(content))

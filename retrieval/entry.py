"""The `dinoseek` executable: Ctrl-C while the heavy modules (torch, FAISS) are still importing
ends with one line and exit 130, like Ctrl-C at any later moment (handled in the CLI itself)."""

from __future__ import annotations

import sys


def run() -> None:
    try:
        from dinoseek.retrieval.cli import main
    except KeyboardInterrupt:
        print("Aborted!", file=sys.stderr)
        sys.exit(130)
    main()

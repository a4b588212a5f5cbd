"""Query layer: search, duplicates, and the `dinoseek` command line."""

from .errors import JournalError, QueryError, RetrievalError

__all__ = ["Filters", "Hit", "JournalError", "LibrarySearch", "QueryError", "RetrievalError", "open_library"]


def __getattr__(name: str):
    # The search API pulls in torch and FAISS; importing it lazily keeps `import retrieval` (and the
    # `dinoseek` entry point, which must catch Ctrl-C from its first instant) light.
    if name in ("Filters", "Hit", "LibrarySearch", "open_library"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

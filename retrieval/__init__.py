"""Query layer: search, duplicates, and the `dinoseek` command line."""

from .api import Filters, Hit, LibrarySearch, open_library
from .errors import JournalError, QueryError, RetrievalError

__all__ = ["Filters", "Hit", "JournalError", "LibrarySearch", "QueryError", "RetrievalError", "open_library"]

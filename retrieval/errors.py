"""Typed errors raised by the query layer; the CLI turns them into one-line messages."""


class RetrievalError(Exception):
    """Base class for every error the retrieval package raises."""


class QueryError(RetrievalError):
    """A query could not be turned into a vector (unreadable image, wrong dimension, unknown path)."""


class JournalError(RetrievalError):
    """A dedup journal is missing, damaged, or cannot be undone as recorded."""

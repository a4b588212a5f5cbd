"""Typed errors raised by the query layer; the CLI turns them into one-line messages."""


class RetrievalError(Exception):
    """Base class for every error the retrieval package raises."""


class InvalidArgumentError(RetrievalError, ValueError):
    """An argument is out of range, of the wrong kind, or names something that is not there. Also a
    ValueError, as these were before they had a type of their own."""

    def __init__(self, problem: str, *, argument: str | None = None) -> None:
        super().__init__(f"{argument} {problem}" if argument else problem)
        self.problem = problem
        self.argument = argument  # the parameter at fault, if one is: the CLI names its option instead


class CalibrationError(RetrievalError, ValueError):
    """Too few of the library's photos could be read to calibrate on."""


class QueryError(RetrievalError):
    """A query could not be turned into a vector (unreadable image, wrong dimension, unknown path)."""


class ActionError(RetrievalError):
    """An apply stopped part-way; the steps done so far are journaled and can be undone."""


class JournalError(RetrievalError):
    """A dedup journal is missing, damaged, or cannot be undone as recorded."""

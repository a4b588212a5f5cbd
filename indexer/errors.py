"""Typed errors raised by the indexer; the CLI turns them into one-line messages."""


class IndexerError(Exception):
    """Base class for every error the indexer raises."""


class DecodeError(IndexerError):
    """A file could not be turned into an image; `status` says which kind of failure it was."""

    def __init__(self, status: str, reason: str) -> None:
        super().__init__(reason)
        self.status = status  # one of decode.FAILURE_STATUSES
        self.reason = reason


class InvalidArgumentError(IndexerError, ValueError):
    """An argument the indexer cannot use (a FAISS factory string). Also a ValueError, as these
    were before they had a type of their own."""


class LibraryError(IndexerError):
    """A library folder is missing, unreadable, or inconsistent beyond automatic repair."""


class NotIndexedError(LibraryError):
    """There is no library, or no vectors in it, yet: indexing `root` makes them."""

    def __init__(self, message: str, root) -> None:
        super().__init__(message)
        self.root = root  # the photo folder to index


class NeedsRepairError(LibraryError):
    """The catalog must be upgraded or repaired, which a writer does (`Library.repair`)."""

    def __init__(self, message: str, root=None) -> None:
        super().__init__(message)
        self.root = root  # the library's photo folder, where known


class NeedsUpgradeError(NeedsRepairError):
    """The catalog was written by an older dinoseek: a writer migrates it (backing it up first)."""


class CatalogTooNewError(LibraryError):
    """The catalog was written by a newer dinoseek whose schema this version does not know."""


class LibraryLockedError(LibraryError):
    """Another process is writing to this library."""


class LibraryMismatchError(LibraryError):
    """The library folder and the catalog belong to two different libraries (their library ids differ)."""


class ModelMismatchError(LibraryError):
    """The library was built with another model than the one requested."""


class SweepRefusedError(IndexerError):
    """A run would mark most of the library deleted (unmounted disk?) and was stopped."""


class RayUnavailableError(IndexerError):
    """`--ray` was asked for but Ray is not installed (it is an optional extra)."""


class RayClusterError(IndexerError):
    """The Ray cluster could not be reached, or a distributed run failed on it."""


def first_line(error: BaseException) -> str:
    """An exception's first line for a one-line message (its type where it has no text)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__

"""Typed errors raised by the model package; the CLI turns them into one-line messages."""


class ModelError(Exception):
    """Base class for every error the model package raises."""


class InvalidArgumentError(ModelError, ValueError):
    """An argument is out of range or does not fit (input mode and size, preset name, config value).
    Also a ValueError, as these were before they had a type of their own."""


class CheckpointError(ModelError):
    """A weights file is missing, unreadable, partial, or does not fit the architecture."""


class WeightsNotFoundError(ModelError):
    """A preset's weights are neither cached locally nor downloadable."""


class PrecisionError(ModelError):
    """A precision or device is unknown, absent, or not supported on the requested device."""


class DeviceUnavailableError(PrecisionError):
    """CUDA was asked for on a machine without it."""


class PrecisionUnsupportedError(PrecisionError):
    """The device cannot run the precision asked for (bf16 before Ampere)."""

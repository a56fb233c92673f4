"""Exceptions raised by the engine. Every message is meant to be shown to a user as it is."""


class ModelMergerError(Exception):
    """Base class: a problem the user can act on (bad input, bad setting, no room)."""


class BadFileError(ModelMergerError):
    """An input file is not a readable safetensors file (truncated, corrupt header, ...)."""


class ManifestError(ModelMergerError):
    """A manifest is malformed or names something that cannot be used."""


class ScanError(ModelMergerError):
    """A scan pattern matched nothing or named something unusable."""


class IncompatibleModelsError(ModelMergerError):
    """The inputs of a merge do not share keys and shapes (or architecture)."""

    def __init__(self, message, report=None):
        super().__init__(message)
        self.report = report


class DeviceError(ModelMergerError):
    """A device string names no device that exists here."""


class OutputError(ModelMergerError):
    """The output cannot be written: it exists, its folder is not writable, the disk is full."""


class NonFiniteError(ModelMergerError):
    """A key's merged values are NaN or Inf, or beyond the output dtype's range, and the plan says to stop
    (``nonfinite="error"``). The message names the key and the inputs that hold such values."""


class MergeCancelled(ModelMergerError):
    """The run was cancelled through the cancel callback (or Ctrl-C)."""

    def __init__(self, message="merge cancelled; no output was written"):
        super().__init__(message)

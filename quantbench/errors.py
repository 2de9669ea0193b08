"""Errors a user can act on. Their message says what is wrong and what to do; the bench prints it without a traceback."""


class QuantbenchError(Exception):
    """Base class: a clear, actionable problem with the request or the environment."""


class ConfigError(QuantbenchError, ValueError):
    """The request is impossible: unknown method/model/task, bad bit width, a shape a transform cannot handle."""


class UnavailableError(QuantbenchError, RuntimeError):
    """A model or dataset is not available here (offline, not cached, optional package missing, damaged files)."""


class NumericalError(QuantbenchError, FloatingPointError):
    """NaN or inf where a finite number belongs; the message names the tensor, module, task or window."""


class StorageError(QuantbenchError, OSError):
    """A file that must be written could not be (a full disk, no permission); the message names it."""

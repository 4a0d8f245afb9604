"""Typed errors. Each is a user-facing mistake with a one-line message;
the CLI prints ``error: <message>`` and exits non-zero, with no traceback."""


class EecError(Exception):
    """Base class of every error eec raises on purpose."""


class InputError(EecError, ValueError):
    """A path, option or prompt the user gave is not usable. A ``ValueError`` too,
    which is what Python callers expect of a bad argument."""


class InputTypeError(InputError, TypeError):
    """An argument of the wrong type (bytes for a prompt, text for a threshold); also a ``TypeError``."""


class UnsupportedModelError(EecError):
    """The model's architecture or configuration is not one eec compiles."""


class ArtifactError(EecError):
    """An artifact is missing, malformed or tampered with."""


class CompileError(EecError):
    """Compilation failed for a reason other than the user's input."""


class Overloaded(EecError):
    """A request was refused because the engine's queue is full; the caller should retry later."""

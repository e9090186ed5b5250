"""The project's own error family.

Every error that means "the user's input, files or environment are not what a run
needs" derives from :class:`MergebenchError`; the command line reports these as one
line naming the option, file, key or tensor at fault. Anything else is a bug and keeps
its traceback.
"""
from __future__ import annotations


class MergebenchError(Exception):
    """Base of the errors the command line reports as a one-line message."""


class UnknownNameError(MergebenchError, KeyError):
    """An unknown plugin name; the message lists the valid ones."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class HyperparameterError(MergebenchError, ValueError):
    """A hyperparameter or run option out of its declared type or bounds."""


class NotApplicableError(MergebenchError):
    """A method that cannot merge a backbone's kind of task (e.g. AdaMerging's entropy
    objective on a detector): reported as not applicable, and no result is recorded."""


class CheckpointError(MergebenchError, ValueError):
    """A checkpoint that does not fit the pretrained model, is corrupt, or fails its manifest."""


class CorruptArtifactError(MergebenchError, ValueError):
    """A stored or cached artifact that is truncated, corrupt or inconsistent."""


class MissingResourceError(MergebenchError, FileNotFoundError):
    """A checkpoint or dataset is not on this machine and cannot be fetched. The message
    names what is missing and how to provide it (``--checkpoint-dir`` / ``--data-dir``)."""


class NonFiniteError(MergebenchError, ValueError):
    """A merged tensor, a logit or a metric that is NaN or infinite: nothing is recorded."""


class RecordError(MergebenchError, ValueError):
    """A result record that is malformed or contradicts itself (file:line, field, reason)."""


class ResultsWriteError(MergebenchError, OSError):
    """A result that could not be written; the message says where it was saved instead."""


class InsufficientMemoryError(MergebenchError, MemoryError):
    """A method whose estimated footprint exceeds the memory free where it would run,
    refused before it starts (``mergebench.memory.check_fits``)."""

"""The errors mergescope raises for bad input: each carries a one-line message that names the problem.

The CLI prints ``error: <message>`` for any :class:`MergescopeError` and exits with status 2; everything else
is a bug and keeps its traceback.
"""


class MergescopeError(Exception):
    """Base class: bad input or an unsupported situation, explained in one line."""


class DatasetError(MergescopeError):
    """A dataset is missing, unreadable or not what was asked for."""


class CheckpointError(MergescopeError):
    """A checkpoint is corrupt, not safetensors, or does not fit the architecture."""


class ArchitectureError(MergescopeError):
    """Models that should share one architecture don't, or a model's graph can't be handled."""


class NumericsError(MergescopeError):
    """NaN/Inf activations or statistics where finite numbers are required."""

"""The one-pass probe: tapped models, streaming statistics, per-channel top-k images, stored results.

:func:`probe` runs every model over a dataset once and records, per channel of every layer, the top-k images,
the activation's mean/std and (optionally) its values on a fixed subset; :func:`load_probe` reads a stored
result, and :func:`state_sha256` is the model fingerprint stored results record. The building blocks —
:func:`tap_model`, :func:`run_pass`, :class:`Moments`, :class:`CoMoments`, :class:`StreamingTopK` — serve the
other one-pass statistics (matching, REPAIR) too.
"""
from .engine import run_pass
from .probe import probe
from .reduce import reduce_activation, tap_reduced
from .result import LayerProbe, ProbeResult
from .stats import CoMoments, Moments, as_samples
from .store import load_probe, save_probe, state_sha256
from .taps import tap_model
from .topk import StreamingTopK

__all__ = [
    "CoMoments", "LayerProbe", "Moments", "ProbeResult", "StreamingTopK", "as_samples", "load_probe", "probe",
    "reduce_activation", "run_pass", "save_probe", "state_sha256", "tap_model", "tap_reduced",
]

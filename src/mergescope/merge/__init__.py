"""Merging: interpolation along α, REPAIR and RESET."""
from .interpolate import alpha_grid, interpolate_model, interpolate_state
from .repair import repair_and_reset

__all__ = ["alpha_grid", "interpolate_model", "interpolate_state", "repair_and_reset"]

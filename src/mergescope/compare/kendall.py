"""Kendall's τ-b between channel c of one model and channel c of another, for every channel at once.

Definition (DESIGN "Kendall-τ(c)", thesis 000 §3.1.4): rank the images of the subset D′ by channel c's activation
in model A and in aligned B; τ-b between the two rankings. Over the n(n−1)/2 pairs of images i < j:

    P   = pairs ordered the same way by x and y          (concordant)
    Q   = pairs ordered oppositely                        (discordant)
    T_x = pairs tied in x only,  T_y = pairs tied in y only  (pairs tied in both count nowhere)

    τ_b = (P − Q) / sqrt((P + Q + T_x) · (P + Q + T_y))

which is ``scipy.stats.kendalltau(x, y, variant="b")`` (also its clipping to [−1, 1]). Where column c of x or of
y is constant (a dead ReLU), or n < 2, the denominator is 0 and scipy returns NaN; here ``tau`` is 0.0 and
``defined`` is False instead, so no NaN ever appears unflagged.

Algorithm (exact; all integer counting): P + Q + T_x = N₀ − U_x with N₀ = n(n−1)/2 and U_x the pairs tied in x
(Σ t(t−1)/2 over tie groups), likewise for y, and P − Q = N₀ − U_x − U_y + U_xy − 2Q with U_xy the pairs tied
in both. The tie counts come from sorting: y is sorted once (stable radix sort of an order-preserving unsigned
key, 16 bits per pass, numpy's ``argsort(kind="stable")`` on uint16), then x is radix-sorted starting from that
order, which yields the (x, y)-lexicographic order of every column. Q is then the number of strict inversions of
the dense y ranks in that order, counted per column by scipy's compiled Fenwick-tree kernel (the one
``kendalltau`` itself uses), or, should that private kernel ever disappear, by a vectorized bottom-up merge count.
Sorting is done with numpy on the CPU because its radix sort is several times faster there than ``torch.sort``;
inputs on another device are copied to the CPU and the result is returned on the input's device.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from ..errors import MergescopeError, NumericsError

_BLOCK = 32  # columns sorted together: their working arrays stay in cache


@dataclass(frozen=True)
class KendallResult:
    """Kendall's τ-b per channel.

    Attributes:
        tau: float64 [C]; 0.0 where not defined.
        defined: bool [C]; False where column c of x or of y is constant (or there are fewer than 2 images):
            τ-b is 0/0 there (scipy returns NaN).
    """

    tau: torch.Tensor
    defined: torch.Tensor

    def tau_or_nan(self) -> torch.Tensor:
        """float64 [C]: ``tau`` with NaN where not defined (scipy's convention)."""
        return torch.where(self.defined, self.tau, torch.full_like(self.tau, float("nan")))

    def to_dict(self) -> dict:
        """JSON-ready: ``{"tau": [float | None per channel], "defined": int}``."""
        return {"tau": [float(t) if d else None for t, d in zip(self.tau.tolist(), self.defined.tolist())],
                "defined": int(self.defined.sum())}


def kendall_tau_b(x, y) -> KendallResult:
    """Kendall's τ-b between column c of ``x`` and column c of ``y``, for every column c.

    τ_b = (P − Q) / sqrt((P + Q + T_x)(P + Q + T_y)), P/Q concordant/discordant pairs, T_x/T_y pairs tied only in
    x/only in y; equal to ``scipy.stats.kendalltau(x[:, c], y[:, c]).statistic`` (see the module docstring).

    Args:
        x, y: [n, C] activations of n images (rows, same images in the same order) × C channels: model A and
            aligned model B, e.g. ``LayerProbe.subset``. Any real dtype; compared exactly as given.

    Returns:
        :class:`KendallResult` with float64 ``tau`` [C] and bool ``defined`` [C] on the device of ``x``.

    Raises:
        MergescopeError: shapes differ or are not 2-D.
        NumericsError: NaN in x or y.

    Example:
        >>> x = torch.tensor([[1., 0.], [2., 0.], [3., 0.]])
        >>> kendall_tau_b(x, x).tau.tolist(), kendall_tau_b(x, x).defined.tolist()
        ([1.0, 0.0], [True, False])
    """
    device = x.device if isinstance(x, torch.Tensor) else torch.device("cpu")
    x, y = torch.as_tensor(x).detach(), torch.as_tensor(y).detach()
    if x.ndim != 2 or x.shape != y.shape:
        raise MergescopeError(f"kendall_tau_b needs x and y of one shape [n, C]; got {tuple(x.shape)} and "
                              f"{tuple(y.shape)}")
    n, channels = x.shape
    xa, ya = _channels_first(x, "x"), _channels_first(y, "y")  # [C, n] numpy
    total = n * (n - 1) // 2
    xt, yt, nt, dis = (np.zeros(channels, np.int64) for _ in range(4))
    if n >= 2:
        for c0 in range(0, channels, _BLOCK):
            sl = slice(c0, c0 + _BLOCK)
            xt[sl], yt[sl], nt[sl], dis[sl] = _pair_counts(_sort_keys(xa[sl]), _sort_keys(ya[sl]))
    defined = (total - xt > 0) & (total - yt > 0)
    s = total - xt - yt + nt - 2 * dis  # P − Q
    with np.errstate(divide="ignore", invalid="ignore"):
        tau = s / np.sqrt((total - xt).astype(np.float64) * (total - yt))  # one sqrt: identical ranks give 1.0
    tau = np.where(defined, np.clip(tau, -1.0, 1.0), 0.0)
    return KendallResult(torch.from_numpy(tau).to(device), torch.from_numpy(defined).to(device))


def _channels_first(t: torch.Tensor, name: str) -> np.ndarray:
    """[n, C] tensor -> contiguous [C, n] CPU numpy array; small dtypes widened exactly; NaN rejected."""
    if t.dtype in (torch.bool, torch.uint8, torch.int8, torch.int16, torch.float16, torch.bfloat16):
        t = t.float()  # every value exact in float32
    if t.is_complex():
        raise MergescopeError(f"kendall_tau_b needs real-valued {name}, got {t.dtype}")
    if t.is_floating_point() and torch.isnan(t).any():
        raise NumericsError(f"{name} contains NaN; Kendall's tau needs every activation to be a number")
    return t.cpu().T.contiguous().numpy()  # torch transposes faster than numpy


def _sort_keys(a: np.ndarray) -> np.ndarray:
    """Unsigned integer keys [C, n] that order exactly like the values of ``a`` (−0.0 = +0.0, as in numpy)."""
    a = np.ascontiguousarray(a)
    if a.dtype.kind in "iu" and a.size and -2**24 <= int(a.min()) and int(a.max()) <= 2**24:
        a = a.astype(np.float32)  # exact
    if a.dtype == np.float64:
        with np.errstate(over="ignore"):
            a32 = a.astype(np.float32)
        if np.array_equal(a32, a):
            a = a32  # same order, half the radix passes
    if a.dtype in (np.float32, np.float64):
        bits = a.dtype.itemsize * 8
        signed, unsigned = (np.int32, np.uint32) if bits == 32 else (np.int64, np.uint64)
        i = (a + a.dtype.type(0)).view(signed)  # +0 turns −0.0 into +0.0
        flip = i >> (bits - 1)  # all ones for negative numbers
        flip &= signed(2 ** (bits - 1) - 1)
        i ^= flip  # negative: larger magnitude -> smaller integer
        key = i.view(unsigned)
        key ^= unsigned(1 << (bits - 1))  # signed order -> unsigned order
        return key
    if a.dtype.kind == "i" or (a.dtype.kind == "u" and a.max() < 2**63):
        return a.astype(np.int64).view(np.uint64) ^ np.uint64(1 << 63)
    raise MergescopeError(f"kendall_tau_b cannot order values of dtype {a.dtype}")


def _radix_order(key: np.ndarray) -> np.ndarray:
    """Flat indices into ``key.ravel()`` that sort each row stably (LSD radix sort, 16 bits a pass)."""
    rows, n = key.shape
    offsets = (np.arange(rows, dtype=np.int64) * n)[:, None]  # [rows,1]
    order = None
    for shift in range(0, key.dtype.itemsize * 8, 16):
        digit = (key >> key.dtype.type(shift)).astype(np.uint16)  # [rows,n]
        if order is not None:
            digit = np.take(digit, order)
        step = np.argsort(digit, axis=1, kind="stable") + offsets  # numpy: radix sort for 16-bit keys
        order = step if order is None else np.take(order, step)
    return order


def _pair_counts(kx: np.ndarray, ky: np.ndarray) -> tuple[np.ndarray, ...]:
    """Per row: pairs tied in x, tied in y, tied in both, and discordant pairs (int64 [rows] each)."""
    oy = _radix_order(ky)  # [rows,n] flat: y ascending
    new_y = _run_starts(np.take(ky, oy))
    ry = np.cumsum(new_y, axis=1, dtype=np.int32)  # [rows,n] 1-based dense y ranks, y-sorted
    kx_y = np.take(kx, oy)  # [rows,n] x in y order
    oxy = _radix_order(kx_y)  # stable: x ascending, ties by y
    new_x = _run_starts(np.take(kx_y, oxy))
    sx = np.cumsum(new_x, axis=1, dtype=np.int32)  # [rows,n] dense x ranks in (x, y) order
    sy = np.take(ry, oxy)  # [rows,n] dense y ranks in (x, y) order
    new_xy = new_x | _run_starts(sy)  # runs of equal (x, y)
    return _tied_pairs(new_x), _tied_pairs(new_y), _tied_pairs(new_xy), _discordant()(sx, sy)


def _run_starts(s: np.ndarray) -> np.ndarray:
    """bool [rows,n]: True where a row-sorted ``s`` starts a new value."""
    new = np.empty(s.shape, bool)
    new[:, 0] = True
    np.not_equal(s[:, 1:], s[:, :-1], out=new[:, 1:])
    return new


def _tied_pairs(starts: np.ndarray) -> np.ndarray:
    """int64 [rows]: Σ t(t−1)/2 over the runs of each row, given where runs start (bool [rows,n], column 0 True)."""
    rows, n = starts.shape
    at = np.flatnonzero(starts)  # flat run starts, ascending; row r's first is r·n
    length = np.diff(at, append=rows * n)  # run lengths
    first = np.searchsorted(at, np.arange(rows) * n)  # index of each row's first run
    return np.add.reduceat(length * (length - 1) // 2, first)


@functools.lru_cache(maxsize=None)
def _discordant() -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Discordant-pair counter: scipy's compiled kernel if present and correct, else the vectorized one."""
    try:
        from scipy.stats._stats import _kendall_dis  # private, stable since scipy 1.0
        probe = _kendall_dis(np.array([1, 1, 2, 3], np.intp), np.array([1, 2, 3, 1], np.intp))
        if int(probe) == 2:
            return _discordant_compiled
    except Exception:  # noqa: BLE001 -- any failure means: don't use it
        pass
    return _discordant_vectorized


def _discordant_compiled(sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Per row, pairs with x_i < x_j and y_i > y_j; rows sorted by (sx, sy), sy 1-based dense ranks."""
    from scipy.stats._stats import _kendall_dis
    sx, sy = sx.astype(np.intp), sy.astype(np.intp)
    return np.array([_kendall_dis(sx[r], sy[r]) for r in range(sx.shape[0])], dtype=np.int64)


def _discordant_vectorized(sx: np.ndarray, sy: np.ndarray) -> np.ndarray:
    """Same count as :func:`_discordant_compiled`: strict inversions of each row of ``sy``, by bottom-up merging.

    Pairs tied in x are in ascending y order, so they are no inversions. Level h merges sorted halves of length
    h: each right-half element at merged position t, with r right-half elements before it, has t − r left-half
    elements ≤ it before it, so the inversions it closes are h − (t − r).
    """
    rows, n = sy.shape
    levels = max(1, int(np.ceil(np.log2(n))))
    size = 1 << levels
    a = np.full((rows, size), int(sy.max()) + 1, np.int64)  # padding: larger than all, at the end: no inversions
    a[:, :n] = sy
    inv = np.zeros(rows, np.int64)
    for b in range(levels):
        h = 1 << b
        segments = size // (2 * h)
        key = (a << 1).reshape(rows, segments, 2 * h)  # low bit 1 marks the right half; left wins ties
        key[:, :, h:] |= 1
        key.sort(axis=2, kind="stable")
        right = (key & 1).reshape(rows, size).astype(np.float64)
        t = np.tile(np.arange(2 * h, dtype=np.float64), segments)
        left_before = np.rint(right @ t).astype(np.int64) - segments * (h * (h - 1) // 2)
        inv += segments * h * h - left_before
        a = (key >> 1).reshape(rows, size)
    return inv

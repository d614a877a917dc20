"""Reconstruction: updating the weights that stay so a pruned layer still computes what it did.

This module owns the math that turns calibration statistics (:mod:`onnxprune.calibration.statistics`'s
``H = X^T X`` and input sums) into new weight values, always on the logical view ``W[out, in]``:

* :func:`sparsegpt_prune` — SparseGPT (Frantar & Alistarh, 2023): one sweep over the input
  columns that prunes a column and spreads its error onto the columns not yet visited (the
  Optimal Brain Surgeon update, read off the upper Cholesky factor of ``H^-1``), choosing the
  mask as it goes. Unstructured, NxM blocks and N:M.
* :func:`asymmetric_target` — the weights that best reproduce a *reference* layer's outputs
  (the dense model's) from the inputs the layer gets *now* (upstream already pruned): SparseGPT
  then prunes toward that target, so each layer also undoes the error of the layers before it,
  instead of only its own. With ``kept`` it is also the least-squares refit of a layer whose
  *input* channels were removed (channel pruning of its producer).
* :func:`centered_cross` and :func:`asymmetric_bias` — the centered moments and the bias shift
  for a layer whose bias absorbs the mean of what changed.
* :func:`heldout_error` — how far a candidate ``W*`` (and bias shift) lands from the reference
  layer's outputs on samples it was not fit on, from those samples' moments alone (how the
  channel refit picks its strength, :func:`onnxprune.calibration.sequential.refit_toward_dense`).

Everything is computed in float64 and returned in the input's dtype. A Hessian may be
``[in, in]`` or, for a grouped Conv, ``[g, in, in]``: one per group of ``out/g`` consecutive
rows (:attr:`LayerStats.sparsegpt_hessian`).
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from onnxprune.errors import OptionError, PatternError
from onnxprune.masking.patterns import NM, Blocks, Channel, Pattern, Unstructured, parse_pattern
from onnxprune.ops.quant import stored_values

__all__ = ["sparsegpt_prune", "sparsegpt_factor", "asymmetric_target", "centered_cross",
           "asymmetric_bias", "heldout_error", "heldout_scorer", "ridge_path"]

PatternLike = Union[str, Pattern]


def _pattern(pattern: PatternLike) -> Pattern:
    return pattern if isinstance(pattern, Pattern) else parse_pattern(pattern)


def _stack_hessian(hessian: np.ndarray, rows: int, cols: int) -> np.ndarray:
    h = np.asarray(hessian, dtype=np.float64)
    if h.ndim == 2:
        h = h[None]
    if h.ndim != 3 or h.shape[1:] != (cols, cols):
        raise ValueError(f"Hessian of shape {np.shape(hessian)} does not fit a weight with "
                         f"{cols} input columns; expected [{cols}, {cols}] or [g, {cols}, {cols}]")
    if rows % h.shape[0]:
        raise ValueError(f"{h.shape[0]} Hessian groups do not divide {rows} output rows")
    return h


def sparsegpt_factor(hessian: np.ndarray, damp: float = 0.01) -> Tuple[np.ndarray, np.ndarray]:
    """What :func:`sparsegpt_prune` factors its Hessian into (pass it as ``factor=`` to prune
    one layer at several sparsities with one factorization)."""
    h = np.asarray(hessian, dtype=np.float64)
    return _upper_cholesky_of_inverse(h[None] if h.ndim == 2 else h, damp)


def _upper_cholesky_of_inverse(h: np.ndarray, damp: float) -> Tuple[np.ndarray, np.ndarray]:
    """(U, dead): ``H^-1 = U^T U`` per group after dampening; dead = inputs never active.

    A dead input (``H_jj = 0``) gets ``H_jj = 1`` so the matrix stays invertible; it has no
    cross terms, so pruning it moves nothing and nothing moves it. Dampening adds
    ``damp * mean(live diag)`` to the diagonal; if the Cholesky factorization still fails
    (numerically indefinite ``H``), the dampening grows tenfold up to 4 times.

    With ``J`` the index-reversal: if ``J H J = L L^T`` then ``H^-1 = (J L^-1 J)^T (J L^-1 J)``
    and ``J L^-1 J`` is upper triangular with a positive diagonal, i.e. *the* upper Cholesky
    factor of ``H^-1``: one factorization and one triangular inverse, never ``H^-1`` itself.
    """
    h = h.copy()
    g, n, _ = h.shape
    idx = np.arange(n)
    diag = h[:, idx, idx]
    dead = diag <= 0
    h[:, idx, idx] = np.where(dead, 1.0, diag)
    live_mean = np.array([d[~m].mean() if (~m).any() else 1.0 for d, m in zip(diag, dead)])
    flipped = h[:, ::-1, ::-1]
    for attempt in range(5):
        lam = damp * (10.0 ** attempt) * live_mean
        damped = flipped.copy()
        damped[:, idx, idx] += lam[:, None]
        try:
            lower = np.linalg.cholesky(damped)
        except np.linalg.LinAlgError:
            continue
        upper = np.stack([_lower_triangular_inverse(m) for m in lower])[:, ::-1, ::-1]
        return np.ascontiguousarray(upper), dead
    raise np.linalg.LinAlgError("Hessian is not positive definite even with 10^4 x dampening")


def _lower_triangular_inverse(lower: np.ndarray) -> np.ndarray:
    """Inverse of a lower-triangular matrix by 2x2 blocks (matrix products only, ~n^3/3):
    ``[[A, 0], [C, D]]^-1 = [[A^-1, 0], [-D^-1 C A^-1, D^-1]]``."""
    n = lower.shape[0]
    if n <= 128:
        return np.tril(np.linalg.inv(lower))
    k = n // 2
    a_inv = _lower_triangular_inverse(lower[:k, :k])
    d_inv = _lower_triangular_inverse(lower[k:, k:])
    out = np.zeros_like(lower)
    out[:k, :k] = a_inv
    out[k:, k:] = d_inv
    out[k:, :k] = -d_inv @ (lower[k:, :k] @ a_inv)
    return out


def sparsegpt_prune(w2d: np.ndarray, hessian: np.ndarray, pattern: PatternLike,
                    zeros_needed: Union[int, None], damp: float = 0.01,
                    blocksize: int = 128, factor=None) -> Tuple[np.ndarray, np.ndarray]:
    """Prune ``w2d`` (``W[out, in]``) to ``pattern`` and update the kept weights (SparseGPT).

    Returns ``(new_w2d, keep)``: ``new_w2d`` in ``w2d``'s dtype, exactly 0 where ``keep`` is
    False; only kept entries differ from ``w2d`` otherwise. ``hessian`` is ``X^T X``
    (``[in, in]``, or ``[g, in, in]`` for ``g`` groups of consecutive rows).

    The sweep goes over the columns in blocks of ``blocksize``: within a block each column is
    pruned and its error ``(w - q) / [U]_jj`` is spread over the block's later columns at once;
    the block's accumulated errors reach the columns after it in one matrix product (lazy batch
    update). Masks are chosen by the OBS saliency ``w^2 / [U]_jj^2`` on the weights as updated
    so far:

    * **unstructured / NxM blocks** (``zeros_needed`` = zeros the layer ends with, existing
      zeros included; the mask's False count): at the start of each column block, over all its
      rows. The count is split across column blocks in proportion to their size by cumulative
      rounding, so the total is exact for unstructured; for NxM each block takes the number of
      whole units closest to its running share, which is exact whenever ``zeros_needed`` is a
      multiple of the unit size and units are not ragged (off by less than one unit otherwise).
      A unit's saliency is the sum over its elements.
    * **N:M**: every M columns, per row, the N most salient stay (a ragged tail of r < M
      columns keeps min(N, r)); ``zeros_needed`` is ignored.

    Dead inputs (``H_jj = 0``: never active on the calibration data) cost nothing to prune and
    rank below every live weight. ``channel`` is not a SparseGPT pattern: a whole pruned row
    has no kept weight to compensate with (refit the consumer with :func:`asymmetric_target` and
    ``kept`` instead).
    """
    pat = _pattern(pattern)
    if isinstance(pat, Channel):
        raise PatternError("SparseGPT cannot prune whole output channels (a pruned row keeps "
                           "no weight to absorb its error); use pattern 'channel' with the "
                           "least-squares refit of the consumer instead")
    if not isinstance(pat, (Unstructured, Blocks, NM)):
        raise PatternError(f"SparseGPT has no rule for pattern '{pat.spec}'")
    if blocksize < 1:
        raise OptionError(f"SparseGPT block size must be positive, got {blocksize}")
    w2d = np.asarray(w2d)
    rows, cols = w2d.shape
    h = _stack_hessian(hessian, rows, cols)
    groups = h.shape[0]
    if isinstance(pat, NM):
        unit_r, unit_c = 1, pat.m
    elif isinstance(pat, Blocks):
        unit_r, unit_c = pat.rows, pat.cols
    else:
        unit_r, unit_c = 1, 1
        if zeros_needed is None:
            raise OptionError("SparseGPT with an unstructured pattern needs the number of zeros")
    if not isinstance(pat, NM):
        if zeros_needed is None:
            raise OptionError(f"SparseGPT with pattern '{pat.spec}' needs the number of zeros")
        zeros_needed = int(min(max(int(zeros_needed), 0), rows * cols))
    # Column blocks must not cut a unit: round the block size up to a multiple of its width.
    blocksize = -(-max(blocksize, unit_c) // unit_c) * unit_c

    # factor: sparsegpt_factor(hessian, damp), reused when one layer is pruned several times
    upper, dead = factor if factor is not None else _upper_cholesky_of_inverse(h, damp)
    w = w2d.astype(np.float64).reshape(groups, rows // groups, cols)
    keep = np.ones((groups, rows // groups, cols), dtype=bool)
    d_all = upper[:, np.arange(cols), np.arange(cols)]  # [G, C]
    pruned_so_far = 0
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        width = i2 - i1
        w1 = w[:, :, i1:i2].copy()
        q1 = np.zeros_like(w1)
        err1 = np.zeros_like(w1)
        u1 = upper[:, i1:i2, i1:i2]
        d1 = d_all[:, i1:i2]
        dead1 = dead[:, i1:i2]
        keep1 = keep[:, :, i1:i2]
        if not isinstance(pat, NM):
            share = (zeros_needed * i2 * rows) // (rows * cols)  # cumulative rounding
            sal = _saliency(w1, d1, dead1).reshape(rows, width)
            block_keep, n_pruned = _select_units(sal, unit_r, unit_c, share - pruned_so_far)
            keep1[...] = block_keep.reshape(keep1.shape)
            pruned_so_far += n_pruned
        for i in range(width):
            if isinstance(pat, NM) and i % unit_c == 0:
                j2 = min(i + unit_c, width)
                sal = _saliency(w1[:, :, i:j2], d1[:, i:j2], dead1[:, i:j2])
                keep1[:, :, i:j2] = _nm_keep(sal, pat.n)
            col = w1[:, :, i]
            q = np.where(keep1[:, :, i], col, 0.0)
            err = (col - q) / d1[:, i][:, None]
            w1[:, :, i:] -= err[:, :, None] * u1[:, None, i, i:]
            q1[:, :, i] = q
            err1[:, :, i] = err
        w[:, :, i1:i2] = q1
        if i2 < cols:
            w[:, :, i2:] -= np.matmul(err1, upper[:, i1:i2, i2:])
    keep2d = keep.reshape(rows, cols)
    out = w.reshape(rows, cols)
    out[~keep2d] = 0.0  # already exact; kept as a guard against -0.0 and round-off
    return stored_values(out, w2d.dtype), keep2d


def _saliency(w: np.ndarray, d: np.ndarray, dead: np.ndarray) -> np.ndarray:
    """OBS saliency ``w^2 / d^2`` ([G, R, B]); dead inputs rank below every live weight
    (negative, the smaller magnitudes first)."""
    sal = np.square(w) / np.square(d)[:, None, :]
    if dead.any():
        dead_sal = -1.0 / (1.0 + np.square(w))
        sal = np.where(dead[:, None, :], dead_sal, sal)
    return sal


def _select_units(sal: np.ndarray, unit_r: int, unit_c: int, need: int
                  ) -> Tuple[np.ndarray, int]:
    """KEEP mask for one column block and the number of elements pruned.

    The lowest-saliency units go; the count of whole units is the one whose element total is
    closest to ``need`` (ties to fewer), never more than the block holds.
    """
    r, c = sal.shape
    if need <= 0:
        return np.ones((r, c), dtype=bool), 0
    if unit_r == 1 and unit_c == 1:
        flat = sal.reshape(-1)
        k = min(need, flat.size)
        keep = np.ones(flat.size, dtype=bool)
        if k:
            order = np.argsort(flat, kind="stable")
            keep[order[:k]] = False
        return keep.reshape(r, c), k
    row_starts = np.arange(0, r, unit_r)
    col_starts = np.arange(0, c, unit_c)
    scores = np.add.reduceat(np.add.reduceat(sal, row_starts, axis=0), col_starts, axis=1)
    heights = np.minimum(unit_r, r - row_starts)
    widths = np.minimum(unit_c, c - col_starts)
    sizes = (heights[:, None] * widths[None, :]).reshape(-1)
    order = np.argsort(scores.reshape(-1), kind="stable")
    cum = np.concatenate([[0], np.cumsum(sizes[order])])
    k = int(np.argmin(np.abs(cum - need)))  # first minimum: ties go to fewer units
    prune = np.zeros(sizes.size, dtype=bool)
    prune[order[:k]] = True
    keep_units = ~prune.reshape(len(row_starts), len(col_starts))
    keep = np.repeat(np.repeat(keep_units, heights, axis=0), widths, axis=1)
    return keep, int(cum[k])


def _nm_keep(sal: np.ndarray, n: int) -> np.ndarray:
    """KEEP mask ([G, R, w], w <= M): the ``n`` most salient of each row's group stay."""
    width = sal.shape[-1]
    keep = np.ones(sal.shape, dtype=bool)
    if width > n:
        order = np.argsort(sal, axis=-1, kind="stable")
        np.put_along_axis(keep, order[..., : width - n], False, axis=-1)
    return keep


def _refit_terms(w2d, hessian, cross, kept):
    """What both refit solvers start from: ``W`` as ``[g, out/g, in]`` (float64), ``H``
    restricted to the ``kept`` columns (``[g, kk, kk]``), the cross moment ``[g, in, in]``, the
    kept column indices, and per group the mean of ``H``'s live diagonal (``lam``'s unit)."""
    w2d = np.asarray(w2d, dtype=np.float64)
    rows, cols = w2d.shape
    h = _stack_hessian(hessian, rows, cols)
    c = _stack_hessian(cross, rows, cols)
    k = np.arange(cols) if kept is None else np.asarray(kept, dtype=np.int64).reshape(-1)
    w = w2d.reshape(h.shape[0], rows // h.shape[0], cols)
    h = h[:, k[:, None], k[None, :]]
    diag = np.einsum("gii->gi", h)
    live = diag > 0
    mean = np.array([d[m].mean() if m.any() else 1.0 for d, m in zip(diag, live)])
    return w, h, c, k, mean


def asymmetric_target(w2d: np.ndarray, hessian: np.ndarray, cross: np.ndarray,
                      damp: float = 0.01, kept: Optional[Sequence[int]] = None) -> np.ndarray:
    """``W*`` minimizing ``||X_ref W^T - X W*^T||^2 + lam ||W* - W||^2`` (float64).

    ``X`` is the layer's input now, ``X_ref`` the reference model's on the same samples,
    ``hessian = X^T X`` and ``cross = X^T X_ref`` (``[in, in]``, or ``[g, in, in]`` per group of
    consecutive rows): ``W* = (W C^T + lam W) (H + lam I)^-1`` with ``C = cross`` and
    ``lam = damp * mean(diag H)`` over live inputs. Because ``||X_ref W^T - X Q^T||^2`` equals
    ``||X (W* - Q)^T||^2`` plus a constant for every ``Q``, pruning ``W*`` with Hessian ``H``
    (:func:`sparsegpt_prune`) minimizes the error against the reference's output.

    When ``X = X_ref`` (nothing upstream changed), ``W* = W``. Pulling toward ``W`` rather than
    toward 0 keeps weights on inputs the calibration never excited (``H_jj = 0``) as they were.
    Centered moments (:func:`centered_cross`; with ``X_ref = X`` it is the centered Hessian)
    give the target for a layer whose bias absorbs the means (:func:`asymmetric_bias`).

    ``kept``: fit on these input columns only (the others are gone: removed input channels);
    the result is ``[out, len(kept)]`` and still reproduces ``X_ref W^T`` with all of ``W``.
    """
    w, h, c, k, mean = _refit_terms(w2d, hessian, cross, kept)
    rows = w2d.shape[0]
    lam = damp * mean
    a = h + lam[:, None, None] * np.eye(k.size)[None]
    rhs = np.matmul(c[:, k, :], w.transpose(0, 2, 1)) + \
        lam[:, None, None] * w[:, :, k].transpose(0, 2, 1)
    return np.linalg.solve(a, rhs).transpose(0, 2, 1).reshape(rows, k.size)


def centered_cross(cross: np.ndarray, sums: np.ndarray, ref_sums: np.ndarray, count: int
                   ) -> np.ndarray:
    """``(X - mean)^T (X_ref - mean_ref) = X^T X_ref - n mean mean_ref^T`` (per group when the
    sums are ``[g, in]``)."""
    n = max(int(count), 1)
    mean = np.asarray(sums, dtype=np.float64) / n
    ref = np.asarray(ref_sums, dtype=np.float64) / n
    return np.asarray(cross, dtype=np.float64) - n * mean[..., :, None] * ref[..., None, :]


def asymmetric_bias(w_ref: np.ndarray, w_new: np.ndarray, mean: np.ndarray,
                    ref_mean: np.ndarray) -> np.ndarray:
    """What to add to the bias (``[out]``) so the layer's mean output is the reference's:
    ``W_ref mean_ref - W_new mean``. Means are ``[in]`` or ``[g, in]`` (one per group of
    consecutive rows)."""
    w_ref = np.asarray(w_ref, dtype=np.float64)
    rows, cols = w_ref.shape
    mean = np.asarray(mean, dtype=np.float64).reshape(-1, cols)
    ref_mean = np.asarray(ref_mean, dtype=np.float64).reshape(-1, cols)
    g = mean.shape[0]
    old = np.einsum("gri,gi->gr", w_ref.reshape(g, rows // g, cols), ref_mean)
    new = np.einsum("gri,gi->gr", np.asarray(w_new, dtype=np.float64).reshape(g, rows // g, cols),
                    mean)
    return (old - new).reshape(rows)


def ridge_path(w2d: np.ndarray, hessian: np.ndarray, cross: np.ndarray,
               damps: Sequence[float], kept: Optional[Sequence[int]] = None) -> List[np.ndarray]:
    """:func:`asymmetric_target` for each of ``damps`` at the cost of one: one eigendecomposition
    ``H_kk = V diag(e) V^T`` per row group, then ``W*^T = V diag(1 / (e + lam)) V^T (C_k W^T +
    lam W_k^T)`` for every ``lam`` by products only. Returns ``[out, len(kept)]`` per damp."""
    w, h, c, k, mean = _refit_terms(w2d, hessian, cross, kept)
    rows = w2d.shape[0]
    e, v = np.linalg.eigh(h)  # [g, kk], [g, kk, kk]
    vt = v.transpose(0, 2, 1)
    p = np.matmul(vt, np.matmul(c[:, k, :], w.transpose(0, 2, 1)))  # V^T C_k W^T  [g, kk, r]
    q = np.matmul(vt, w[:, :, k].transpose(0, 2, 1))  # V^T W_k^T  [g, kk, r]
    out = []
    for damp in damps:
        lam = (damp * mean)[:, None]
        z = (p + lam[:, :, None] * q) / (e + lam)[:, :, None]
        out.append(np.matmul(v, z).transpose(0, 2, 1).reshape(rows, k.size))
    return out


def heldout_scorer(w_ref: np.ndarray, hessian: np.ndarray, cross: np.ndarray,
                   sums: Optional[np.ndarray] = None, ref_sums: Optional[np.ndarray] = None,
                   count: int = 0, kept: Optional[Sequence[int]] = None):
    """:func:`heldout_error` for many candidates on the same held-out moments: returns
    ``score(w_kept, shift=None) -> float`` for candidates ``w_kept`` ``[out, len(kept)]`` (the
    other input columns zero), with the terms that do not depend on the candidate computed once.
    """
    w = np.asarray(w_ref, dtype=np.float64)
    rows, cols = w.shape
    h = _stack_hessian(hessian, rows, cols)
    c = _stack_hessian(cross, rows, cols)
    k = np.arange(cols) if kept is None else np.asarray(kept, dtype=np.int64).reshape(-1)
    g = h.shape[0]
    wr = w.reshape(g, rows // g, cols)
    hk = h[:, k[:, None], k[None, :]]
    m = np.matmul(wr, c[:, k, :].transpose(0, 2, 1))  # W C_k^T  [g, r, kk]
    s = sr = w_sref = None
    if sums is not None:
        s = np.asarray(sums, dtype=np.float64).reshape(-1, cols)[:, k]
        sr = np.asarray(ref_sums, dtype=np.float64).reshape(-1, cols)
        w_sref = np.einsum("gri,gi->gr", wr, sr)

    def score(w_kept: np.ndarray, shift: Optional[np.ndarray] = None) -> float:
        wn = np.asarray(w_kept, dtype=np.float64).reshape(g, rows // g, k.size)
        err = float(np.einsum("grk,grk->", np.matmul(wn, hk), wn)
                    - 2.0 * np.einsum("grk,grk->", wn, m))
        if shift is not None:
            d = np.asarray(shift, dtype=np.float64).reshape(g, rows // g)
            total = w_sref - np.einsum("grk,gk->gr", wn, s)
            err += float(-2.0 * np.sum(d * total) + int(count) * np.sum(d * d))
        return err

    return score


def heldout_error(w_ref: np.ndarray, w_new: np.ndarray, hessian: np.ndarray, cross: np.ndarray,
                  sums: Optional[np.ndarray] = None, ref_sums: Optional[np.ndarray] = None,
                  count: int = 0, shift: Optional[np.ndarray] = None) -> float:
    """``||X_ref W^T - X W*^T - 1 shift^T||^2 - ||X_ref W^T||^2`` from moments (float).

    ``X``/``X_ref`` are rows the candidate ``W* = w_new`` (``[out, in]``, removed input columns
    zero) was *not* fit on: ``hessian = X^T X``, ``cross = X^T X_ref`` (``[in, in]`` or
    ``[g, in, in]`` per group of consecutive rows), ``sums``/``ref_sums`` the column sums of
    ``X``/``X_ref`` (``[in]`` or ``[g, in]``) over ``count`` rows (per group), needed only with
    a bias ``shift`` (``[out]``, added to the layer's output). With ``a_i = W x_ref_i - W* x_i``
    (``W = w_ref``), the error is ``sum_i ||a_i - shift||^2`` and

    ``sum_i ||a_i||^2 = ||X_ref W^T||^2 - 2 tr(W* C W^T) + tr(W* H W*^T)``,
    ``sum_i a_i = W s_ref - W* s``,

    so ``tr(W* H W*^T) - 2 tr(W* C W^T) - 2 shift^T (W s_ref - W* s) + n ||shift||^2`` is the
    error less ``||X_ref W^T||^2``, which no candidate changes (it needs ``X_ref^T X_ref``, not
    collected): compare candidates by it, the smallest is the best.
    """
    return heldout_scorer(w_ref, hessian, cross, sums, ref_sums, count)(w_new, shift)

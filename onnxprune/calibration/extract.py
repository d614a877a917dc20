"""Forming the matrix ``X`` a weight multiplies, from one activation batch of its consumer.

This module owns the per-op **activation extractors**: for a prunable weight and the node that
consumes it, an :class:`Extractor` (:func:`extractor_for`, driven by the op registry's
``activation_of``) turns the node's activation batch into row blocks of ``X`` (``[G, rows, in]``,
one row per sample and output position, columns in exactly the order of :meth:`Layout.to_2d`'s
``in``), streamed in blocks of a given byte size so that a big im2col is never held whole.
:func:`activation_rows` returns the whole ``X`` of one batch (tests, debugging).

**Sampled rows** (Conv only): a Hessian ``X^T X`` needs thousands of rows, not the millions a
high-resolution Conv input gives (64 images at 416x416 hold 11 M output positions each). Given
``positions`` (``[n, k]`` flat output-position indices per sample of the batch, from
:func:`sample_positions`: seeded, deterministic, sorted, without replacement),
:meth:`ConvExtractor.blocks` gathers exactly those im2col rows and no others, so the sums are
those of exactly the sampled rows. :meth:`Extractor.positions` says how many output positions
one sample has (what the caller caps).
:mod:`onnxprune.calibration.statistics` reduces these blocks into layer statistics.

How ``X`` is formed, per op (the node's *activation* operand is the one that is not the weight):

* **Conv** ``[Cout, Cin/g, k...]``: im2col of the input honoring ``pads``/``auto_pad``
  (SAME_UPPER, SAME_LOWER, VALID), ``strides``, ``dilations`` and ``group``; columns ordered
  ``(k..., Cin/g)`` with the input channel innermost. With ``group > 1`` the rows of group ``i``
  only ever see group ``i``'s channels, so one ``[in, in]`` matrix cannot be exact for every
  row: one row group per Conv group (``Extractor.groups``), so the statistics keep each
  group's own ``X_i^T X_i`` in ``group_hessians[i]`` (``[g, in, in]``, what
  :func:`onnxprune.calibration.reconstruct.sparsegpt_prune` wants, see
  :attr:`onnxprune.calibration.statistics.LayerStats.sparsegpt_hessian`) and ``hessian`` is their
  sum, i.e. ``X^T X`` of all groups' rows stacked.
* **ConvTranspose** ``[Cin, Cout/g, k...]`` (view: ``out = Cout/g``, ``in = (k..., Cin)``): the
  gather form of the transposed convolution (each output position reads the input positions its
  kernel taps land on; stride, dilation, pads, ``output_padding``, ``output_shape``/``auto_pad``
  honored). Row ``co`` of the view serves output channel ``co`` of every group, each time seeing
  only that group's input channels, so the exact ``H`` is ``X^T X`` with the cross-group blocks
  zeroed. Exact, not just norms.
* **Gemm**: the other operand, transposed per ``transA``/``transB`` so rows are samples.
* **MatMul** ``x @ W``: every leading dim of ``x`` flattened into rows; ``W @ x``: the rows are
  the columns of ``x``. A weight with batch dims (``[B, K, N]``) gets one ``H`` summed over the
  batch (exact when the activation broadcasts over ``B``, an average otherwise).
* **LSTM / GRU / RNN** ``W``: every (step, batch) position of the sequence input (the registry's
  activation rule). ``R [dirs, G*H, H]`` reads the previous hidden state, which is no graph
  tensor: :class:`RecurrentStateExtractor` rebuilds it from the op's own output ``Y`` shifted
  by one step (forward: step ``t`` reads ``Y[t-1]``; reverse: ``Y[t+1]``), one row group per
  direction (direction ``d`` owns rows ``d`` of ``R``'s 2-D view), rows in step order. The
  first step each direction takes reads ``initial_h``: zeros when the op has none (exact), its
  rows left out when it has one (not a tensor of this batch). With ``sequence_lens``, the states
  of padded steps are included (an approximation). ``Y`` must be a named output.
"""

from __future__ import annotations

import zlib
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
from numpy.lib.stride_tricks import as_strided

from onnxprune.errors import InputDataError
from onnxprune.model.index import attr
from onnxprune.ops.recurrent import GATES
from onnxprune.ops.weights import Weight
from onnxprune.ops.registry import ConvGeometry, activation_of

__all__ = ["Extractor", "MatrixExtractor", "ConvExtractor", "RecurrentStateExtractor",
           "extractor_for", "activation_rows", "row_blocks", "sample_positions"]


class Extractor:
    """Turns one node's activation batch into row blocks of ``X`` (``[G, rows, in]``)."""

    groups = 1  # G: row groups with separate Hessians (grouped Conv)
    col_groups = 1  # ConvTranspose: channel groups whose cross blocks of H are zero
    col_group_of: Optional[np.ndarray] = None

    def __init__(self, activation: str, in_dim: int) -> None:
        self.activation = activation
        self.in_dim = in_dim

    @property
    def signature(self) -> tuple:
        return (type(self).__name__, self.activation, self.in_dim)

    def blocks(self, x: np.ndarray, block_bytes: int, dtype=np.float64,
               positions: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
        """Row blocks ``[G, rows, in]`` of ``X`` for the batch ``x``; with ``positions``
        (:meth:`positions` > 0 only), just the rows of those output positions per sample."""
        raise NotImplementedError

    def positions(self, shape: Sequence[int]) -> int:
        """Output positions (rows of ``X`` per row group) one sample of an activation of
        ``shape`` gives, where rows can be sampled per position; 0 where they cannot."""
        return 0

    def moments(self, x: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
        """``(sums [G, in], squared sums [G, in], rows per group)`` of ``X`` for this batch
        without forming ``X``, or None where there is no shortcut (then blocks are summed)."""
        return None


class MatrixExtractor(Extractor):
    """Gemm/MatMul: the activation is (a transpose of) X itself."""

    def __init__(self, activation: str, in_dim: int, rows_last: bool, shift: float = 0.0) -> None:
        super().__init__(activation, in_dim)
        self.rows_last = rows_last  # True: X is the activation's last-two-axes transpose
        self.shift = shift  # subtracted from every value: an integer operand's zero point

    @property
    def signature(self) -> tuple:
        return super().signature + (self.rows_last, self.shift)

    def blocks(self, x: np.ndarray, block_bytes: int, dtype=np.float64,
               positions: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
        if positions is not None:
            raise ValueError("Gemm/MatMul rows are not sampled")
        if x.ndim == 1:
            x = x[None, :]  # a vector operand is one row, on either side
        elif self.rows_last:
            x = np.swapaxes(x, -1, -2)
        if x.shape[-1] != self.in_dim:
            raise InputDataError(f"the calibration inputs do not fit the model: activation "
                                 f"'{self.activation}' has shape {x.shape} but the weight reads "
                                 f"{self.in_dim} input columns; pass inputs of the shapes the "
                                 "model was exported for (--input-shape NAME:DIMS for "
                                 "generated ones)")
        x2 = x.reshape(-1, self.in_dim) if x.flags.c_contiguous else None
        if x2 is None:
            x2 = np.ascontiguousarray(x).reshape(-1, self.in_dim)
        step = max(1, block_bytes // (np.dtype(dtype).itemsize * self.in_dim))
        for r0 in range(0, x2.shape[0], step):
            rows = x2[r0:r0 + step].astype(dtype)
            yield (rows - np.dtype(dtype).type(self.shift) if self.shift else rows)[None]


class RecurrentStateExtractor(Extractor):
    """LSTM/GRU/RNN ``R``: the hidden states each step reads, from the op's output ``Y``."""

    def __init__(self, activation: str, hidden: int, dirs: int, reverse: Sequence[bool],
                 batch_first: bool, initial: bool) -> None:
        super().__init__(activation, hidden)
        self.groups = dirs
        self.reverse = tuple(bool(r) for r in reverse)  # per direction
        self.batch_first = batch_first
        self.initial = initial  # the op reads an initial_h: its step is left out

    @property
    def signature(self) -> tuple:
        return super().signature + (self.groups, self.reverse, self.batch_first, self.initial)

    def states(self, y: np.ndarray) -> np.ndarray:
        """``[dirs, rows, H]``: direction ``d``'s previous state for every step it reads one
        from this batch, in step order (rows step-major, then batch)."""
        y = np.asarray(y)
        if self.batch_first:  # [batch, seq, dirs, H] -> [seq, dirs, batch, H]
            y = np.transpose(y, (1, 2, 0, 3)) if y.ndim == 4 else y
        if y.ndim != 4 or y.shape[1] != self.groups or y.shape[3] != self.in_dim:
            raise InputDataError(f"the calibration inputs do not fit the model: the recurrent "
                                 f"output '{self.activation}' has shape {np.shape(y)}, not "
                                 f"[seq, {self.groups}, batch, {self.in_dim}]")
        parts = []
        for d, reverse in enumerate(self.reverse):
            yd = y[:, d]  # [seq, batch, H]
            zero = [] if self.initial else [np.zeros_like(yd[:1])]
            steps = [yd[1:]] + zero if reverse else zero + [yd[:-1]]
            parts.append(np.concatenate(steps, axis=0).reshape(-1, self.in_dim))
        return np.stack(parts)

    def blocks(self, x: np.ndarray, block_bytes: int, dtype=np.float64,
               positions: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
        if positions is not None:
            raise ValueError("recurrent state rows are not sampled")
        v = self.states(x)
        step = max(1, block_bytes // (np.dtype(dtype).itemsize * self.in_dim * self.groups))
        for r0 in range(0, v.shape[1], step):
            yield v[:, r0:r0 + step].astype(dtype)


def recurrent_state_extractor(weight: Weight, node) -> Tuple[Optional[Extractor], str]:
    """The extractor of an LSTM/GRU/RNN ``R`` (see :class:`RecurrentStateExtractor`)."""
    if len(node.output) < 1 or not node.output[0]:
        return None, (f"{node.op_type} input 2 (R) reads the previous hidden state, taken from "
                      "the op's output Y, which this node does not name")
    dirs, hidden = int(weight.shape[0]), int(weight.shape[2])
    direction = attr(node, "direction", b"forward")
    direction = direction.decode() if isinstance(direction, bytes) else str(direction)
    reverse = [False, True] if direction == "bidirectional" else [direction == "reverse"]
    if len(reverse) != dirs:
        return None, f"{node.op_type} R has {dirs} directions but direction={direction}"
    initial = len(node.input) > 5 and bool(node.input[5])
    return RecurrentStateExtractor(node.output[0], hidden, dirs, reverse,
                                   int(attr(node, "layout", 0)) == 1, initial), ""


class ConvExtractor(Extractor):
    """Conv (and, with ``transpose``, ConvTranspose): im2col in layout column order."""

    def __init__(self, activation: str, geometry: ConvGeometry, wshape: Tuple[int, ...]) -> None:
        transpose = geometry.transpose
        self.transpose = transpose
        self.kernel = geometry.kernel
        nd = len(self.kernel)
        self.nd = nd
        self.group = geometry.group
        self.strides = geometry.strides
        self.dilations = geometry.dilations
        self.pads = geometry.pads
        self.auto_pad = geometry.auto_pad
        self.output_padding = geometry.output_padding
        self.output_shape = geometry.output_shape
        k = int(np.prod(self.kernel))
        if transpose:
            self.cin = int(wshape[0])  # all input channels, every group
            self.cg = self.cin
            in_dim = k * self.cin
            self.col_groups = self.group
            self.col_group_of = np.tile(np.arange(self.cin) // (self.cin // self.group), k)
        else:
            self.cg = int(wshape[1])
            self.cin = self.cg * self.group
            in_dim = k * self.cg
            self.groups = self.group
        super().__init__(activation, in_dim)

    @property
    def signature(self) -> tuple:
        return super().signature + (self.transpose, self.kernel, self.group, self.strides,
                                    self.dilations, self.pads, self.auto_pad,
                                    self.output_padding, self.output_shape)

    # -- geometry: per spatial axis (pad_begin, pad_end, out) ---------------------------------
    def _conv_geometry(self, spatial: Sequence[int]) -> List[Tuple[int, int, int]]:
        geo = []
        for i, size in enumerate(spatial):
            k, s, d = self.kernel[i], self.strides[i], self.dilations[i]
            span = (k - 1) * d + 1
            if self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out = -(-size // s)
                total = max(0, (out - 1) * s + span - size)
                begin = total // 2 if self.auto_pad == "SAME_UPPER" else total - total // 2
                end = total - begin
            elif self.auto_pad == "VALID":
                begin = end = 0
                out = (size - span) // s + 1
            else:
                begin, end = self.pads[i], self.pads[i + self.nd]
                out = (size + begin + end - span) // s + 1
            geo.append((begin, end, out))
        return geo

    def _transpose_geometry(self, spatial: Sequence[int]) -> List[Tuple[int, int, int]]:
        geo = []
        out_shape = self.output_shape[-self.nd:] if self.output_shape else None
        for i, size in enumerate(spatial):
            k, s, d = self.kernel[i], self.strides[i], self.dilations[i]
            op = self.output_padding[i]
            full = s * (size - 1) + op + (k - 1) * d + 1
            if out_shape is not None or self.auto_pad in ("SAME_UPPER", "SAME_LOWER"):
                out = int(out_shape[i]) if out_shape is not None else size * s
                total = full - out
                # ONNX: SAME_UPPER puts the odd pad at the end, anything else at the start.
                if self.auto_pad == "SAME_UPPER":
                    begin = total // 2
                else:
                    begin = total - total // 2
                end = total - begin
            elif self.auto_pad == "VALID":
                begin = end = 0
                out = full
            else:
                begin, end = self.pads[i], self.pads[i + self.nd]
                out = full - begin - end
            geo.append((begin, end, out))
        return geo

    def blocks(self, x: np.ndarray, block_bytes: int, dtype=np.float64,
               positions: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
        if x.ndim != self.nd + 2 or x.shape[1] != self.cin:
            raise InputDataError(f"activation '{self.activation}' has shape {x.shape}; the "
                                 f"weight expects [N, {self.cin}, {self.nd} spatial dims]")
        if self.transpose:
            if positions is not None:
                raise ValueError("ConvTranspose rows are not sampled")
            yield from self._transpose_blocks(x, block_bytes, dtype)
        else:
            yield from self._conv_blocks(x, block_bytes, dtype, positions)

    def positions(self, shape: Sequence[int]) -> int:
        if self.transpose or len(shape) != self.nd + 2:
            return 0
        out = [o for _, _, o in self._conv_geometry(shape[2:])]
        return int(np.prod(out, dtype=np.int64)) if min(out) >= 1 else 0

    def moments(self, x: np.ndarray) -> Optional[Tuple[np.ndarray, np.ndarray, int]]:
        # Column (kernel offset k, channel j of group g) of im2col sums one strided slice of the
        # padded input: no im2col copy, one slice per kernel offset.
        if self.transpose:
            return None
        if x.ndim != self.nd + 2 or x.shape[1] != self.cin:
            return None  # blocks() raises the proper error
        geo = self._conv_geometry(x.shape[2:])
        out = [o for _, _, o in geo]
        sums = np.zeros((self.cin, int(np.prod(self.kernel))))
        sq = np.zeros_like(sums)
        rows = x.shape[0] * int(np.prod(out)) if min(out) >= 1 else 0
        if rows:
            # Summing over samples first commutes with the slicing: per offset the work is
            # C x positions, not N x C x positions.
            xp = np.pad(x.astype(np.float64), [(0, 0), (0, 0)] + [(b, e) for b, e, _ in geo])
            total, total_sq = xp.sum(axis=0), np.square(xp).sum(axis=0)  # [C, *padded]
            spatial = tuple(range(1, 1 + self.nd))
            for k, offset in enumerate(np.ndindex(*self.kernel)):
                index = (slice(None),) + tuple(
                    slice(o * d, o * d + s * (n - 1) + 1, s) for o, d, s, n in
                    zip(offset, self.dilations, self.strides, out))
                sums[:, k] = total[index].sum(axis=spatial)
                sq[:, k] = total_sq[index].sum(axis=spatial)
        # [C, K] -> [G, (K, cg)] with the channel innermost, as to_2d orders the columns
        def cols(a):
            return a.reshape(self.group, self.cg, -1).transpose(0, 2, 1).reshape(self.group, -1)
        return cols(sums), cols(sq), rows

    def _windows(self, xp: np.ndarray, out: Sequence[int], strides: Sequence[int]
                 ) -> np.ndarray:
        """[N, C, *out, *kernel] view of padded ``xp``."""
        st = xp.strides
        shape = xp.shape[:2] + tuple(out) + self.kernel
        strides_ = (st[0], st[1]) + tuple(st[2 + i] * strides[i] for i in range(self.nd)) + \
            tuple(st[2 + i] * self.dilations[i] for i in range(self.nd))
        return as_strided(xp, shape, strides_, writeable=False)

    def _conv_blocks(self, x: np.ndarray, block_bytes: int, dtype,
                     positions: Optional[np.ndarray] = None) -> Iterator[np.ndarray]:
        geo = self._conv_geometry(x.shape[2:])
        out = [o for _, _, o in geo]
        if min(out) < 1:
            return
        xp = np.pad(x, [(0, 0), (0, 0)] + [(b, e) for b, e, _ in geo])
        v = self._windows(xp, out, self.strides)  # [N, C, *O, *K]
        n = x.shape[0]
        v = v.reshape((n, self.group, self.cg) + v.shape[2:])
        nd = self.nd
        # -> [g, N, *O, *K, cg]: rows (N, *O), columns (*K, cg) with the channel innermost.
        v = v.transpose((1, 0) + tuple(range(3, 3 + 2 * nd)) + (2,))
        if positions is None:
            yield from row_blocks(v, self.groups, self.in_dim, block_bytes, dtype)
            return
        positions = np.asarray(positions, dtype=np.int64)
        if positions.ndim != 2 or positions.shape[0] != n:
            raise ValueError(f"positions must be [{n}, k], got {positions.shape}")
        k = positions.shape[1]
        per_row = np.dtype(dtype).itemsize * self.in_dim * self.groups
        step = max(1, block_bytes // max(per_row * max(k, 1), 1))  # samples per block
        for n0 in range(0, n, step):
            chosen = positions[n0:n0 + step]
            samples = np.repeat(np.arange(n0, n0 + chosen.shape[0]), k)
            index = np.unravel_index(chosen.reshape(-1), out)
            rows = v[(slice(None), samples) + tuple(index)]  # [g, rows, *K, cg], a copy
            yield rows.reshape(self.groups, -1, self.in_dim).astype(dtype, copy=False)

    def _transpose_blocks(self, x: np.ndarray, block_bytes: int, dtype
                          ) -> Iterator[np.ndarray]:
        # Output p reads input q = (p + pad_begin - k*d) / s where integral: a stride-1
        # correlation of the zero-upsampled input, placed at offset (k-1)*d - pad_begin, with
        # the kernel flipped (window tap k' is kernel index k-1-k').
        geo = self._transpose_geometry(x.shape[2:])
        out = [o for _, _, o in geo]
        if min(out) < 1:
            return
        n = x.shape[0]
        lengths = [o + (k - 1) * d for o, k, d in zip(out, self.kernel, self.dilations)]
        u = np.zeros((n, self.cin) + tuple(lengths), dtype=x.dtype)
        dst, src = [slice(None), slice(None)], [slice(None), slice(None)]
        for i, (begin, _, _) in enumerate(geo):
            s, size = self.strides[i], x.shape[2 + i]
            offset = (self.kernel[i] - 1) * self.dilations[i] - begin
            q0 = (-offset + s - 1) // s if offset < 0 else 0  # first q with q*s+offset >= 0
            q1 = min(size, (lengths[i] - 1 - offset) // s + 1)
            if q1 <= q0:
                return  # no input position reaches the output: X is all zeros
            t0 = q0 * s + offset
            dst.append(slice(t0, t0 + (q1 - q0 - 1) * s + 1, s))
            src.append(slice(q0, q1))
        u[tuple(dst)] = x[tuple(src)]
        v = self._windows(u, out, (1,) * self.nd)  # [N, Cin, *O, *K']
        v = v[(slice(None), slice(None)) + (slice(None),) * self.nd +
              (slice(None, None, -1),) * self.nd]
        v = v.transpose((0,) + tuple(range(2, 2 + 2 * self.nd)) + (1,))[None]
        yield from row_blocks(v, 1, self.in_dim, block_bytes, dtype)


def row_blocks(v: np.ndarray, groups: int, in_dim: int, block_bytes: int, dtype
                ) -> Iterator[np.ndarray]:
    """Copy row blocks of the view ``v`` ``[G, N, *O, *cols]`` into ``dtype`` ``[G, rows, in]``."""
    n = v.shape[1]
    nd = (v.ndim - 2) // 2 if v.ndim > 3 else 0
    out_shape = v.shape[2:2 + nd] if nd else ()
    per_sample = int(np.prod(out_shape, dtype=np.int64)) if nd else 1
    rows_per_block = max(1, block_bytes // (np.dtype(dtype).itemsize * in_dim * groups))
    if per_sample <= rows_per_block:
        step = max(1, rows_per_block // per_sample)
        for n0 in range(0, n, step):
            chunk = v[:, n0:n0 + step]
            buf = np.empty(chunk.shape, dtype=dtype)
            buf[...] = chunk
            yield buf.reshape(groups, -1, in_dim)
        return
    per_row0 = per_sample // out_shape[0]
    step = max(1, rows_per_block // per_row0)
    for i in range(n):
        for o0 in range(0, out_shape[0], step):
            chunk = v[:, i:i + 1, o0:o0 + step]
            buf = np.empty(chunk.shape, dtype=dtype)
            buf[...] = chunk
            yield buf.reshape(groups, -1, in_dim)


def sample_positions(total: int, k: int, seed: int, key: str, first: int, n: int
                     ) -> np.ndarray:
    """``[n, k]`` output-position indices (of ``total`` per sample), sorted, without
    replacement, for samples ``first .. first + n - 1`` of the calibration set.

    A pure function of ``(seed, key, sample index, total, k)``: the same sample gets the same
    positions in every run and in both models of a paired collection (the pruned model and
    its dense reference read the same rows). ``key`` names the activation, so layers of equal
    size do not all read the same positions. ``k >= total`` takes every position.
    """
    if k >= total:
        return np.broadcast_to(np.arange(total, dtype=np.int64), (n, total))
    salt = zlib.crc32(key.encode("utf-8"))
    out = np.empty((n, k), dtype=np.int64)
    for i in range(n):
        rng = np.random.default_rng((seed, salt, first + i))
        out[i] = np.sort(rng.choice(total, size=k, replace=False))
    return out


#: Ops whose output quantizes their float input 0 (what a ``quantized`` activation reads).
QUANTIZERS = ("DynamicQuantizeLinear", "QuantizeLinear")


def extractor_for(weight: Weight, consumer, producer=None, constant=None
                  ) -> Tuple[Optional[Extractor], str]:
    """How ``X`` of ``weight`` is read at ``consumer`` (or None and why). ``producer(name)``
    (the graph index's) finds the quantizer behind an integer activation operand: its float
    input is what the statistics read; without one, ``constant(name)`` (a stored value or
    None) reads the operand's zero point and the rows are the integers minus it."""
    node, index = consumer.node, consumer.input_index
    act = activation_of(node, index, weight.shape)
    if act is None and index == 2 and node.op_type in GATES and len(weight.shape) == 3:
        return recurrent_state_extractor(weight, node)  # R: the state from Y, shifted
    if act is None:
        return None, f"no activation rule for {node.op_type} input {index}"
    name = node.input[act.index]
    shift = 0.0
    if act.quantized:
        source = producer(name) if producer is not None else None
        if source is not None and source.op_type in QUANTIZERS and source.domain in ("", "ai.onnx"):
            name = source.input[0]
        else:
            zp_name = (node.input[act.zero_point] if act.zero_point is not None
                       and act.zero_point < len(node.input) else "")
            zp = constant(zp_name) if zp_name and constant is not None else (
                np.zeros(()) if not zp_name else None)
            if zp is None or np.size(zp) != 1:
                return None, (f"its input '{name}' holds quantized integers with no quantizer "
                              f"in this graph and no constant per-tensor zero point, so the "
                              f"values they stand for cannot be read")
            shift = float(np.asarray(zp).reshape(()))
    if act.conv is not None:
        return ConvExtractor(name, act.conv, weight.shape), ""
    return MatrixExtractor(name, weight.layout.shape2d[1], act.rows_last, shift), ""


def activation_rows(weight: Weight, activation: np.ndarray, consumer: int = 0) -> np.ndarray:
    """``X`` (float64 ``[G, rows, in]``) for one activation batch of ``weight``'s consumer.

    The matrix :func:`collect_layer_stats` reduces; ``X[g] @ W2d[rows of group g].T``
    reproduces the node's output (before bias) position by position. Meant for tests and
    debugging: it holds the whole im2col of the batch.
    """
    ex, why = extractor_for(weight, weight.consumers[consumer])
    if ex is None:
        raise ValueError(why)
    blocks = list(ex.blocks(np.asarray(activation), 1 << 62))
    return np.concatenate(blocks, axis=1)

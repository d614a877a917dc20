"""Small quantized models for the quant-family tests (onnx.helper, seeded): QDQ per-channel Conv
and MatMul, QLinearConv, QLinearMatMul, MatMulInteger + DynamicQuantizeLinear, MatMulNBits."""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from channel_models import G


def q_sym(w: np.ndarray, axis: int):
    """Symmetric int8 quantization of ``w`` per ``axis`` (None: per tensor): (q, scale, zp)."""
    red = tuple(i for i in range(w.ndim) if i != axis) if axis is not None else None
    amax = np.abs(w).max(axis=red) if red is not None else np.abs(w).max()
    scale = (np.maximum(amax, 1e-6) / 127.0).astype(np.float32)
    shape = [1] * w.ndim
    if axis is not None:
        shape[axis] = -1
    q = np.clip(np.round(w / np.reshape(scale, shape)), -127, 127).astype(np.int8)
    return q, scale, np.zeros(np.shape(scale), np.int8)


class QG(G):
    """:class:`G` with quantized weights."""

    def qweight(self, shape, axis):
        """A stored int8 weight and its per-axis (or per-tensor) scale / zero point names."""
        w = self.rng.standard_normal(shape) / np.sqrt(max(int(np.prod(shape[1:])), 1))
        q, s, z = q_sym(w.astype(np.float32), axis)
        return self.c(q, self.name("q")), self.c(s, self.name("s")), self.c(z, self.name("z"))

    def dq_weight(self, shape, axis):
        q, s, z = self.qweight(shape, axis)
        return self.op("DequantizeLinear", [q, s, z], axis=axis if axis is not None else 1)

    def qdq_act(self, x, scale=0.05, zp=128):
        s = self.c(np.array(scale, np.float32))
        z = self.c(np.array(zp, np.uint8))
        return self.op("DequantizeLinear", [self.op("QuantizeLinear", [x, s, z]), s, z])


def qdq_conv():
    """QDQ: int8 per-channel Conv weights behind DequantizeLinear, uint8 activations QDQ."""
    g = QG(1)
    x = g.qdq_act("x")
    h = g.op("Conv", [x, g.dq_weight([8, 3, 3, 3], 0), g.w([8], 0.1)], kernel_shape=[3, 3],
             pads=[1] * 4)
    h = g.qdq_act(g.op("Relu", [h]))
    h = g.op("Conv", [h, g.dq_weight([6, 8, 3, 3], 0), g.w([6], 0.1)], kernel_shape=[3, 3],
             pads=[1] * 4)
    h = g.qdq_act(g.op("Relu", [h]))
    y = g.op("Conv", [h, g.dq_weight([4, 6, 1, 1], 0)], kernel_shape=[1, 1])
    return g.model([("x", [1, 3, 8, 8])], [y], opset=13)


def qdq_matmul():
    """QDQ MatMul: W int8 [K, N] per column (axis 1), then per tensor."""
    g = QG(2)
    h = g.op("MatMul", [g.qdq_act("x"), g.dq_weight([16, 12], 1)])
    h = g.qdq_act(g.op("Relu", [g.op("Add", [h, g.w([12], 0.1)])]))
    y = g.op("MatMul", [h, g.dq_weight([12, 5], None)])
    return g.model([("x", [4, 16])], [y], opset=13)


def qlinear_conv():
    """QOperator: QuantizeLinear -> QLinearConv (per-channel w scale, int32 bias) x2 -> DQ."""
    g = QG(3)
    xs, xz = g.c(np.array(0.05, np.float32)), g.c(np.array(128, np.uint8))
    q = g.op("QuantizeLinear", ["x", xs, xz])

    def qconv(q, cin, cout, k):
        w, ws, wz = g.qweight([cout, cin, k, k], 0)
        ys, yz = g.c(np.array(0.1, np.float32)), g.c(np.array(128, np.uint8))
        b = g.c((g.rng.standard_normal(cout) * 20).astype(np.int32))
        return g.op("QLinearConv", [q, xs, xz, w, ws, wz, ys, yz, b], kernel_shape=[k, k],
                    pads=[k // 2] * 4), ys, yz

    h, hs, hz = qconv(q, 3, 8, 3)
    xs, xz = hs, hz
    h, hs, hz = qconv(h, 8, 6, 3)
    xs, xz = hs, hz
    h, hs, hz = qconv(h, 6, 4, 1)
    y = g.op("DequantizeLinear", [h, hs, hz])
    return g.model([("x", [1, 3, 8, 8])], [y], opset=13)


def qlinear_matmul():
    """QOperator: QLinearMatMul x2 with per-column b scale (the ORT CPU kernel takes it)."""
    g = QG(4)
    xs, xz = g.c(np.array(0.05, np.float32)), g.c(np.array(128, np.uint8))
    q = g.op("QuantizeLinear", ["x", xs, xz])

    def qmm(q, xs, xz, k, n):
        w, ws, wz = g.qweight([k, n], None)
        ys, yz = g.c(np.array(0.05, np.float32)), g.c(np.array(128, np.uint8))
        return g.op("QLinearMatMul", [q, xs, xz, w, ws, wz, ys, yz]), ys, yz

    h, hs, hz = qmm(q, xs, xz, 16, 12)
    h, hs, hz = qmm(h, hs, hz, 12, 5)
    y = g.op("DequantizeLinear", [h, hs, hz])
    return g.model([("x", [4, 16])], [y], opset=13)


def dynamic_matmul_integer(dims=(4, 16), act="Relu"):
    """Dynamic quantization as onnxruntime's quantize_dynamic writes it: DynamicQuantizeLinear
    -> MatMulInteger (int8 weight, zero point 0) -> Cast -> Mul(scale_x * scale_w), twice, with
    ``act`` between (``Sigmoid``: a removed channel is 0.5 where the second quantizer reads)."""
    g = QG(5)

    def layer(x, k, n):
        q, s, z = g.op("DynamicQuantizeLinear", [x], n_out=3)
        w, ws, wz = g.qweight([k, n], None)
        acc = g.op("MatMulInteger", [q, w, z, wz])
        f = g.op("Cast", [acc], to=TensorProto.FLOAT)
        return g.op("Mul", [f, g.op("Mul", [s, ws])])

    h = g.op(act, [g.op("Add", [layer("x", dims[-1], 12), g.w([12], 0.1)])])
    y = layer(h, 12, 5)
    return g.model([("x", list(dims))], [y], opset=13)


def matmul_nbits(n=12, k=32, block=16, asym=True, pre=False):
    """com.microsoft MatMulNBits (4-bit, uint8 packed zero points) then a float MatMul (with
    ``pre``, a float MatMul + Relu produces its K input channels)."""
    g = QG(6)
    nb = (k + block - 1) // block
    q = g.rng.integers(0, 16, size=(n, nb, block)).astype(np.uint8)
    packed = (q[..., 0::2] | (q[..., 1::2] << 4)).astype(np.uint8)
    scales = (g.rng.random(n * nb) * 0.02 + 0.01).astype(np.float32)
    x = g.op("Relu", [g.op("MatMul", ["x", g.w([k, k])])]) if pre else "x"
    ins = [x, g.c(packed, "B"), g.c(scales, "scales")]
    if asym:
        zq = g.rng.integers(4, 12, size=(n, nb)).astype(np.uint8)
        zq = np.pad(zq, ((0, 0), (0, nb % 2)))
        ins.append(g.c((zq[:, 0::2] | (zq[:, 1::2] << 4)).astype(np.uint8).ravel(), "zp"))
    h = g.op("MatMulNBits", ins, domain="com.microsoft", K=k, N=n, bits=4, block_size=block)
    r = g.op("Relu", [h])
    y = g.op("MatMul", [r, g.w([n, 5])])
    m = g.model([("x", [4, k])], [y], opset=17)
    # ONNX's shape inference does not know com.microsoft ops: declare what onnxruntime infers.
    m.graph.value_info.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, [4, n])
                               for t in (h, r)])
    m.graph.value_info.extend([helper.make_tensor_value_info(t, TensorProto.FLOAT, [4, k])
                               for t in m.graph.node[0].output if pre])
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [4, 5]))
    return m


def dq_lstm(hidden=8, feat=8, per_row=False, batch=2, seq=5):
    """com.microsoft DynamicQuantizeLSTM (bidirectional, int8 W [2, I, 4H] / R [2, H, 4H],
    per-direction or per-row scales, zero initial states from ConstantOfShape -> Slice as
    onnxruntime's quantizer leaves them), then Transpose -> Reshape -> MatMul."""
    g = QG(10)
    x = g.op("Relu", [g.op("MatMul", ["x", g.w([feat, feat])])])
    params = []
    for shape in ([2, feat, 4 * hidden], [2, hidden, 4 * hidden]):
        w = g.rng.standard_normal(shape).astype(np.float32) / np.sqrt(shape[1])
        if per_row:
            scale = (np.abs(w).max(axis=1) / 127).astype(np.float32)  # [2, 4H]
            q = np.round(w / scale[:, None, :]).astype(np.int8)
        else:
            scale = (np.abs(w).reshape(2, -1).max(axis=1) / 127).astype(np.float32)  # [2]
            q = np.round(w / scale[:, None, None]).astype(np.int8)
        params.append((g.c(q, g.name("q")), g.c(scale, g.name("s")),
                       g.c(np.zeros(scale.shape, np.int8), g.name("z"))))
    zeros = g.op("ConstantOfShape", [g.c(np.array([4, batch, hidden], np.int64))])
    h0 = g.op("Slice", [zeros, g.c(np.array([0], np.int64)), g.c(np.array([2], np.int64)),
                        g.c(np.array([0], np.int64))])
    c0 = g.op("Slice", [zeros, g.c(np.array([2], np.int64)), g.c(np.array([4], np.int64)),
                        g.c(np.array([0], np.int64))])
    b = g.w([2, 8 * hidden], 0.1)
    (wq, ws, wz), (rq, rs, rz) = params
    y = g.op("DynamicQuantizeLSTM", [x, wq, rq, b, "", h0, c0, "", ws, wz, rs, rz], n_out=3,
             domain="com.microsoft", hidden_size=hidden, direction="bidirectional")[0]
    t = g.op("Transpose", [y], perm=[0, 2, 1, 3])
    flat = g.op("Reshape", [t, g.c(np.array([0, 0, -1], np.int64))])
    out = g.op("MatMul", [flat, g.w([2 * hidden, 3])])
    m = g.model([("x", [seq, batch, feat])], [out], opset=17)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT,
                                                        [seq, batch, 3]))
    return m


def lstm_zero_state(hidden=8, feat=8, batch=2, seq=5):
    """An ONNX LSTM whose initial states are ConstantOfShape zeros (what exporters write when
    no state is given): the states are dropped on resize."""
    g = QG(11)
    x = g.op("Relu", [g.op("MatMul", ["x", g.w([feat, feat])])])
    zeros = g.op("ConstantOfShape", [g.c(np.array([1, batch, hidden], np.int64))])
    y = g.op("LSTM", [x, g.w([1, 4 * hidden, feat]), g.w([1, 4 * hidden, hidden]),
                      g.w([1, 8 * hidden], 0.1), "", zeros, zeros], n_out=3,
             hidden_size=hidden)[0]
    flat = g.op("Reshape", [y, g.c(np.array([seq, batch, hidden], np.int64))])
    out = g.op("MatMul", [flat, g.w([hidden, 3])])
    return g.model([("x", [seq, batch, feat])], [out], opset=17)


def qdq_per_axis_activation():
    """A per-channel activation QuantizeLinear -> DequantizeLinear (axis 1, scale [C], uint8
    zero points) between two QDQ Convs: its scale and zero point are sliced with the channels."""
    g = QG(12)
    h = g.op("Conv", ["x", g.dq_weight([8, 3, 3, 3], 0)], kernel_shape=[3, 3], pads=[1] * 4)
    h = g.op("Relu", [h])
    s = g.c(np.linspace(0.02, 0.09, 8).astype(np.float32))
    z = g.c(np.full(8, 3, np.uint8))
    h = g.op("DequantizeLinear", [g.op("QuantizeLinear", [h, s, z], axis=1), s, z], axis=1)
    y = g.op("Conv", [h, g.dq_weight([4, 8, 1, 1], 0)], kernel_shape=[1, 1])
    return g.model([("x", [1, 3, 8, 8])], [y], opset=13)


def qlinear_depthwise():
    """QLinearConv 3->8, depthwise QLinearConv (group 8, per-channel w scale), QLinearConv 8->4."""
    g = QG(13)
    xs, xz = g.c(np.array(0.05, np.float32)), g.c(np.array(128, np.uint8))
    q = g.op("QuantizeLinear", ["x", xs, xz])

    def qconv(q, xs, xz, cin_g, cout, k, group=1):
        w, ws, wz = g.qweight([cout, cin_g, k, k], 0)
        ys, yz = g.c(np.array(0.1, np.float32)), g.c(np.array(128, np.uint8))
        return g.op("QLinearConv", [q, xs, xz, w, ws, wz, ys, yz], kernel_shape=[k, k],
                    pads=[k // 2] * 4, group=group), ys, yz

    h, s, z = qconv(q, xs, xz, 3, 8, 3)
    h, s, z = qconv(h, s, z, 1, 8, 3, group=8)
    h, s, z = qconv(h, s, z, 8, 4, 1)
    return g.model([("x", [1, 3, 8, 8])], [g.op("DequantizeLinear", [h, s, z])], opset=13)


def conv_integer(wdtype=np.int8):
    """DynamicQuantizeLinear -> ConvInteger (weight zero point 0; onnxruntime takes it per tensor) -> Cast ->
    Mul(scale), twice: onnxruntime's dynamic quantization of Convs."""
    g = QG(14)

    def layer(x, cin, cout, k):
        q, s, z = g.op("DynamicQuantizeLinear", [x], n_out=3)
        w = g.rng.integers(-60, 60, size=(cout, cin, k, k)).astype(wdtype) if wdtype == np.int8 \
            else g.rng.integers(0, 120, size=(cout, cin, k, k)).astype(wdtype)
        wz = np.zeros((), wdtype)
        acc = g.op("ConvInteger", [q, g.c(w, g.name("q")), z, g.c(wz, g.name("z"))],
                   kernel_shape=[k, k], pads=[k // 2] * 4)
        f = g.op("Cast", [acc], to=TensorProto.FLOAT)
        return g.op("Mul", [f, g.op("Mul", [s, g.c(np.array(0.01, np.float32))])])

    h = g.op("Relu", [layer("x", 3, 8, 3)])
    y = layer(h, 8, 4, 1)
    return g.model([("x", [1, 3, 8, 8])], [y], opset=13)


def ms_matmuls():
    """com.microsoft DynamicQuantizeMatMul (per-column b scale, bias) then
    MatMulIntegerToFloat (after a DynamicQuantizeLinear)."""
    g = QG(15)
    w, ws, wz = g.qweight([16, 12], 1)
    h = g.op("DynamicQuantizeMatMul", ["x", w, ws, wz, g.w([12], 0.1)], domain="com.microsoft")
    h = g.op("Relu", [h])
    q, s, z = g.op("DynamicQuantizeLinear", [h], n_out=3)
    w2, ws2, wz2 = g.qweight([12, 5], 1)
    y = g.op("MatMulIntegerToFloat", [q, w2, s, ws2, z, wz2], domain="com.microsoft")
    m = g.model([("x", [4, 16])], [y], opset=17)
    m.graph.value_info.extend([helper.make_tensor_value_info(h, TensorProto.FLOAT, [4, 12])])
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(y, TensorProto.FLOAT, [4, 5]))
    return m


def qoperator_net():
    """What onnxruntime's static QOperator quantization writes: QLinearConv x2 with a residual
    com.microsoft QLinearAdd, QLinearGlobalAveragePool, Flatten, QGemm (transB, per-row b scale,
    int32 bias), DequantizeLinear."""
    g = QG(18)
    ms = "com.microsoft"

    def p(scale, zp=128):
        return g.c(np.array(scale, np.float32)), g.c(np.array(zp, np.uint8))

    xs, xz = p(0.05)
    q = g.op("QuantizeLinear", ["x", xs, xz])

    def qconv(q, xs, xz, cin, cout, k):
        w, ws, wz = g.qweight([cout, cin, k, k], 0)
        ys, yz = p(0.02)
        b = g.c((g.rng.standard_normal(cout) * 20).astype(np.int32))
        return g.op("QLinearConv", [q, xs, xz, w, ws, wz, ys, yz, b], kernel_shape=[k, k],
                    pads=[k // 2] * 4), ys, yz

    c1, s1, z1 = qconv(q, xs, xz, 3, 8, 3)
    c2, s2, z2 = qconv(c1, s1, z1, 8, 8, 3)
    ss, sz = p(0.03)
    r = g.op("QLinearAdd", [c1, s1, z1, c2, s2, z2, ss, sz], domain=ms)
    ps, pz = p(0.01)
    pooled = g.op("QLinearGlobalAveragePool", [r, ss, sz, ps, pz], domain=ms, channels_last=0)
    flat = g.op("Flatten", [pooled])
    w, ws, wz = g.qweight([5, 8], 0)  # transB: [N, K], per-row scale
    ys, yz = p(0.002)
    b = g.c((g.rng.standard_normal(5) * 20).astype(np.int32))
    y = g.op("QGemm", [flat, ps, pz, w, ws, wz, b, ys, yz], domain=ms, transB=1)
    out = g.op("DequantizeLinear", [y, ys, yz])
    m = g.model([("x", [1, 3, 8, 8])], [out], opset=13)
    del m.graph.output[:]
    m.graph.output.append(helper.make_tensor_value_info(out, TensorProto.FLOAT, [1, 5]))
    return m


def lstm_dynamic_head(hidden=8, feat=8, batch=2, seq=5, activations=None):
    """An ONNX LSTM (zero initial states from ConstantOfShape, as exporters write them) whose
    output is quantized by DynamicQuantizeLinear for a MatMulInteger head, as onnxruntime's
    quantize_dynamic leaves a float LSTM followed by a linear layer."""
    g = QG(12)
    x = g.op("Relu", [g.op("MatMul", ["x", g.w([feat, feat])])])
    zeros = g.op("ConstantOfShape", [g.c(np.array([1, batch, hidden], np.int64))])
    attrs = {} if activations is None else {"activations": activations}
    y = g.op("LSTM", [x, g.w([1, 4 * hidden, feat]), g.w([1, 4 * hidden, hidden]),
                      g.w([1, 8 * hidden], 0.3), "", zeros, zeros], n_out=3,
             hidden_size=hidden, **attrs)[0]
    flat = g.op("Reshape", [y, g.c(np.array([seq, batch, hidden], np.int64))])
    q, s, z = g.op("DynamicQuantizeLinear", [flat], n_out=3)
    w, ws, wz = g.qweight([hidden, 3], None)
    acc = g.op("Cast", [g.op("MatMulInteger", [q, w, z, wz])], to=TensorProto.FLOAT)
    out = g.op("Mul", [acc, g.op("Mul", [s, ws])])
    return g.model([("x", [seq, batch, feat])], [out], opset=17)

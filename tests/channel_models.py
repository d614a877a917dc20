"""Small seeded models, one per channel rule case, and the masked-vs-resized check, shared by
the channel and op-rule tests.

Each builder returns an ``onnx.ModelProto`` whose last op feeds the graph output (so that
output's group is frozen) and whose middle has prunable groups.
"""

from __future__ import annotations

import copy

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.resize import mask_channels, resize_channels
from onnxprune.channels.select import select_channels
from onnxprune.model.io import load


class G:
    """A tiny graph builder with seeded weights."""

    def __init__(self, seed: int = 0) -> None:
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits, self.k = [], [], 0

    def name(self, p: str) -> str:
        self.k += 1
        return f"{p}{self.k}"

    def w(self, shape, scale=None, name=None, positive=False) -> str:
        fan = int(np.prod(shape[1:])) if len(shape) > 1 else 1
        scale = scale if scale is not None else 1.0 / np.sqrt(max(fan, 1))
        arr = self.rng.standard_normal(shape) * scale
        if positive:
            arr = np.abs(arr) + 0.5
        arr = arr.astype(np.float32)
        name = name or self.name("w")
        self.inits.append(numpy_helper.from_array(arr, name))
        return name

    def c(self, arr, name=None) -> str:
        name = name or self.name("c")
        self.inits.append(numpy_helper.from_array(np.asarray(arr), name))
        return name

    def op(self, op, inputs, n_out=1, domain=None, **attrs):
        outs = [self.name(op.lower()) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, inputs, outs, name=self.name(op + "_"),
                                           domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def conv(self, x, cin, cout, k=3, group=1, pad=None, bias=True, stride=1):
        pad = k // 2 if pad is None else pad
        ins = [x, self.w([cout, cin // group, k, k])]
        if bias:
            ins.append(self.w([cout], scale=0.1))
        return self.op("Conv", ins, kernel_shape=[k, k], pads=[pad] * 4, group=group,
                       strides=[stride, stride])

    def bn(self, x, c):
        return self.op("BatchNormalization", [x, self.w([c], positive=True), self.w([c], 0.1),
                                              self.w([c], 0.1), self.w([c], positive=True)])

    def typed_model(self, name: str, inputs, outputs, opset=17) -> onnx.ModelProto:
        """A checked model (full check) of the nodes so far, with the given ``(name, elem
        type, shape)`` inputs and outputs, shapes possibly symbolic (``["batch", "seq", 32]``)."""
        vi = helper.make_tensor_value_info
        graph = helper.make_graph(self.nodes, name, [vi(*i) for i in inputs],
                                  [vi(*o) for o in outputs], self.inits)
        m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        onnx.checker.check_model(m, full_check=True)
        return m

    def model(self, inputs, outputs, opset=17) -> onnx.ModelProto:
        g = helper.make_graph(
            self.nodes, "m",
            [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in inputs],
            [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
            self.inits)
        m = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)])
        m.ir_version = 8
        for dom in sorted({n.domain for n in self.nodes if n.domain}):
            m.opset_import.append(helper.make_opsetid(dom, 1))
        inferred = onnx.shape_inference.infer_shapes(m)
        types = {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
        for o in m.graph.output:
            if o.name in types:
                o.type.CopyFrom(types[o.name])
        return m


IMG = [("x", [1, 3, 16, 16])]


def conv_bn_relu():
    g = G(1)
    y = g.op("Relu", [g.bn(g.conv("x", 3, 16), 16)])
    y = g.op("Relu", [g.bn(g.conv(y, 16, 24), 24)])
    return g.model(IMG, [g.conv(y, 24, 8, k=1)])


def depthwise():
    g = G(2)
    y = g.op("Clip", [g.bn(g.conv("x", 3, 16, k=1), 16), g.c(np.float32(0)),
                      g.c(np.float32(6))])
    y = g.op("Relu", [g.bn(g.conv(y, 16, 16, group=16), 16)])
    y = g.op("Relu", [g.conv(y, 16, 32, group=16)])  # depthwise multiplier 2
    return g.model(IMG, [g.conv(y, 32, 8, k=1)])


def grouped():
    g = G(3)
    y = g.op("Relu", [g.conv("x", 3, 16, k=1)])
    y = g.op("Relu", [g.conv(y, 16, 32, group=4)])
    return g.model(IMG, [g.conv(y, 32, 8, k=1)])


def residual():
    g = G(4)
    a = g.op("Relu", [g.conv("x", 3, 16)])
    b = g.bn(g.conv(a, 16, 16), 16)
    s = g.op("Relu", [g.op("Add", [a, b])])
    t = g.op("Add", [g.conv(s, 16, 16, k=1), s])
    t = g.op("Mul", [t, g.w([16, 1, 1], positive=True)])  # per-channel constant
    t = g.op("Add", [t, g.c(np.float32(0.25))])  # scalar constant passes through
    return g.model(IMG, [g.conv(t, 16, 8, k=1)])


def se_block():
    g = G(5)
    x = g.op("HardSwish", [g.conv("x", 3, 16)])
    s = g.op("GlobalAveragePool", [x])
    s = g.op("Relu", [g.conv(s, 16, 8, k=1)])
    s = g.op("HardSigmoid", [g.conv(s, 8, 16, k=1)])
    y = g.op("Mul", [x, s])
    return g.model(IMG, [g.conv(y, 16, 8, k=1)])


def silu():
    g = G(6)
    x = g.conv("x", 3, 16)
    y = g.op("Mul", [x, g.op("Sigmoid", [x])])
    return g.model(IMG, [g.conv(y, 16, 8, k=1)])


def concat():
    g = G(7)
    a = g.op("Relu", [g.conv("x", 3, 8)])
    b = g.op("Relu", [g.conv("x", 3, 12, k=1)])
    y = g.op("Relu", [g.bn(g.op("Concat", [a, b], axis=1), 20)])
    return g.model(IMG, [g.conv(y, 20, 8, k=1)])


def split_slice():
    g = G(8)
    x = g.op("Relu", [g.conv("x", 3, 16)])
    p, q = g.op("Split", [x, g.c(np.array([6, 10], np.int64))], n_out=2, axis=1)
    y = g.op("Add", [g.conv(p, 6, 8, k=1), g.conv(q, 10, 8, k=1)])
    z = g.op("Relu", [g.conv("x", 3, 16, k=1)])
    z = g.op("Slice", [z, g.c(np.array([4], np.int64)), g.c(np.array([12], np.int64)),
                       g.c(np.array([1], np.int64))])
    y = g.op("Add", [y, g.conv(z, 8, 8, k=1)])
    return g.model(IMG, [g.conv(y, 8, 4, k=1)])


def flatten_gemm():
    g = G(9)
    y = g.op("MaxPool", [g.op("Relu", [g.conv("x", 3, 8, stride=2)])], kernel_shape=[2, 2],
             strides=[2, 2])
    y = g.op("Flatten", [y], axis=1)
    y = g.op("Relu", [g.op("Gemm", [y, g.w([32, 8 * 4 * 4]), g.w([32], 0.1)], transB=1)])
    y = g.op("Reshape", [y, g.c(np.array([1, -1], np.int64))])
    return g.model(IMG, [g.op("Gemm", [y, g.w([32, 10]), g.w([10], 0.1)])])


def attention():
    g = G(10)
    d, h, t = 32, 4, 6
    x = "x"

    def proj(x, n):
        return g.op("Add", [g.op("MatMul", [x, g.w([d, n])]), g.w([n], 0.1)])

    def heads(y):
        y = g.op("Reshape", [y, g.c(np.array([1, t, h, d // h], np.int64))])
        return g.op("Transpose", [y], perm=[0, 2, 1, 3])
    q, k, v = heads(proj(x, d)), heads(proj(x, d)), heads(proj(x, d))
    s = g.op("MatMul", [q, g.op("Transpose", [k], perm=[0, 1, 3, 2])])
    s = g.op("Softmax", [g.op("Mul", [s, g.c(np.float32(0.35))])], axis=-1)
    o = g.op("Transpose", [g.op("MatMul", [s, v])], perm=[0, 2, 1, 3])
    o = g.op("Reshape", [o, g.c(np.array([1, t, d], np.int64))])
    o = g.op("Add", [g.op("MatMul", [o, g.w([d, d])]), x])
    n = g.op("LayerNormalization", [o, g.w([d], positive=True), g.w([d], 0.1)], axis=-1)
    m = proj(n, 64)
    m = g.op("Mul", [m, g.op("Add", [g.op("Erf", [g.op("Div", [m, g.c(np.float32(1.41421))])]),
                                     g.c(np.float32(1.0))])])
    m = g.op("Add", [g.op("MatMul", [m, g.w([64, d])]), n])
    return g.model([("x", [1, t, d])], [m])


def transpose_nhwc():
    g = G(11)
    y = g.op("Relu", [g.conv("x", 3, 16)])
    y = g.op("Transpose", [y], perm=[0, 2, 3, 1])
    y = g.op("Relu", [g.op("MatMul", [y, g.w([16, 12])])])
    return g.model(IMG, [g.op("MatMul", [y, g.w([12, 8])])])


def conv_transpose():
    g = G(12)
    y = g.op("Relu", [g.conv("x", 3, 16)])
    y = g.op("ConvTranspose", [y, g.w([16, 12, 2, 2]), g.w([12], 0.1)], kernel_shape=[2, 2],
             strides=[2, 2])
    y = g.op("Relu", [y])
    y = g.op("ConvTranspose", [y, g.w([12, 1, 3, 3]), g.w([12], 0.1)], kernel_shape=[3, 3],
             pads=[1, 1, 1, 1], group=12)  # depthwise transpose
    return g.model(IMG, [g.conv(g.op("Relu", [y]), 12, 8, k=1)])


def constant_weight():
    g = G(13)
    w = g.rng.standard_normal([16, 3, 3, 3]).astype(np.float32) * 0.3
    wc = g.op("Constant", [], value=numpy_helper.from_array(w))
    wc16 = g.op("Cast", [g.op("Constant", [], value=numpy_helper.from_array(
        (g.rng.standard_normal([8, 16, 1, 1]) * 0.3).astype(np.float16)))], to=1)
    y = g.op("Relu", [g.op("Conv", ["x", wc], kernel_shape=[3, 3], pads=[1, 1, 1, 1])])
    y = g.op("Relu", [g.op("Conv", [y, wc16], kernel_shape=[1, 1])])
    return g.model(IMG, [g.conv(y, 8, 4, k=1)])


def unknown_op():
    g = G(14)
    y = g.op("Relu", [g.conv("x", 3, 16)])
    y = g.op("Mystery", [y], domain="com.example")
    y = g.op("Relu", [g.conv(y, 16, 12)])
    return g.model(IMG, [g.conv(y, 12, 8, k=1)])


def output_conv():
    g = G(15)
    a = g.op("Relu", [g.conv("x", 3, 16)])
    b = g.conv(a, 16, 12)
    return g.model(IMG, [b, g.conv(g.op("Relu", [b]), 12, 8, k=1)])


def misc_ops():
    g = G(16)
    y = g.op("InstanceNormalization", [g.conv("x", 3, 16), g.w([16], positive=True),
                                       g.w([16], 0.1)])
    y = g.op("LeakyRelu", [y], alpha=0.1)
    y = g.op("Pad", [y, g.c(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))], mode="reflect")
    y = g.op("AveragePool", [y], kernel_shape=[3, 3])
    y = g.op("Resize", [y, "", g.c(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    r = g.op("ReduceMean", [y], axes=[2, 3], keepdims=1)
    y = g.op("Tanh", [g.op("Sub", [y, r])])
    y = g.op("Softplus", [g.conv(y, 16, 12)])
    return g.model(IMG, [g.conv(y, 12, 8, k=1)])


BUILDERS = {f.__name__: f for f in [
    conv_bn_relu, depthwise, grouped, residual, se_block, silu, concat, split_slice,
    flatten_gemm, attention, transpose_nhwc, conv_transpose, constant_weight, unknown_op,
    output_conv, misc_ops]}


def run(model: onnx.ModelProto, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def feeds_for(model: onnx.ModelProto, seed: int = 0):
    rng = np.random.default_rng(seed)
    out = {}
    for vi in model.graph.input:
        if vi.name in {t.name for t in model.graph.initializer}:
            continue
        shape = [d.dim_value or 1 for d in vi.type.tensor_type.shape.dim]
        out[vi.name] = rng.standard_normal(shape).astype(np.float32)
    return out


def assert_close(got, want):
    for g, w in zip(got, want):
        assert g.shape == w.shape
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, atol=1e-5 * scale, rtol=1e-4)


def masked_and_resized_with_graph(model, shapes=None, **kw):
    """(channel graph, masked model, resized model, removed units, resized tensor shapes) for
    the channels ``select_channels(**kw)`` picks, the graphs built on input ``shapes``."""
    masked = load(copy.deepcopy(model))
    graph = build_channel_graph(masked, shapes)
    removed = select_channels(masked, graph, **kw)
    mask_channels(masked, removed, graph)
    resized = load(copy.deepcopy(masked.model))
    graph2 = build_channel_graph(resized, shapes)
    assert [g.size for g in graph2.groups] == [g.size for g in graph.groups]
    sizes = resize_channels(resized, graph2, removed)
    return graph, masked.model, resized.model, removed, sizes


def masked_and_resized(model, **kw):
    return masked_and_resized_with_graph(model, None, **kw)[1:]

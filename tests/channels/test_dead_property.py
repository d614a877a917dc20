"""Differential property test of dead-channel removal: random small graphs built from ops with
channel rules in the registry, random all-zero producer rows whose nonzero biases make dead
channels carry constants; removing the dead channels (fold + resize, the real path of the
RemoveDeadChannels pass) must leave the outputs equal to the zeroed-but-unresized model's, and
the result must pass onnx's full check. A fold the registry cannot prove exact keeps the channel
(kept_nonzero_const), which is always allowed; an inexact fold fails the comparison.

CI runs a small derandomized budget; ``ONNXPRUNE_SLOW=1`` runs a larger one.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels.dead import remove_dead_channels
from onnxprune.model.io import load
from channel_models import assert_close, run

SLOW = os.environ.get("ONNXPRUNE_SLOW") == "1"
EXAMPLES = 400 if SLOW else 40
HW = 5

STAGES = ("act", "bn", "addc", "mulc", "pad", "pool", "conv", "gconv", "dwconv", "concat",
          "split", "residual")
FEEDS = {"x": np.random.default_rng(7).standard_normal((1, 3, HW, HW)).astype(np.float32)}
HEADS = ("flatten_gemm", "reshape_matmul", "gap_gemm", "batched_matmul", "conv_out")


class _Builder:
    def __init__(self, data, opset: int, seed: int) -> None:
        self.data, self.opset = data, opset
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.n = 0
        self.hw = HW  # the current spatial size

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def init(self, prefix: str, arr) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, np.float32), name))
        return name

    def node(self, op: str, inputs, n_out: int = 1, **attrs):
        outs = [self.name(op.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs if n_out > 1 else outs[0]

    def rows(self, w: np.ndarray, axis: int) -> np.ndarray:
        """Zero a random subset of the weight's output rows (each row with probability p)."""
        p = self.data.draw(st.sampled_from([0.0, 0.5, 0.8]), label="zero fraction")
        dead = self.rng.random(w.shape[axis]) < p
        sl = [slice(None)] * w.ndim
        sl[axis] = dead
        w[tuple(sl)] = 0
        return w

    def conv(self, x: str, cin: int, cout: int, group: int = 1, k: int = 1, pad: int = 0,
             bias: bool = True) -> str:
        w = self.rows(self.rng.standard_normal((cout, cin // group, k, k)), 0)
        inputs = [x, self.init("W", w)]
        if bias:
            inputs.append(self.init("B", self.rng.standard_normal(cout) + 1.0))
        return self.node("Conv", inputs, kernel_shape=[k, k], group=group, pads=[pad] * 4)

    def const_input(self, arr, op_prefix: str) -> str:
        return self.init(op_prefix, np.asarray(arr))

    # -- stages --------------------------------------------------------------------------
    def stage(self, kind: str, y: str, c: int):
        d, r = self.data, self.rng
        if kind == "act":
            op = d.draw(st.sampled_from(["Relu", "Sigmoid", "LeakyRelu"]), label="act")
            attrs = {"alpha": 0.1} if op == "LeakyRelu" else {}
            return self.node(op, [y], **attrs), c
        if kind == "bn" and d.draw(st.booleans(), label="instance norm"):
            return self.node("InstanceNormalization",
                             [y, self.init("in", r.standard_normal(c)),
                              self.init("in", r.standard_normal(c))], epsilon=1e-5), c
        if kind == "bn":
            params = [r.standard_normal(c), r.standard_normal(c), r.standard_normal(c),
                      r.random(c) + 0.5]
            return self.node("BatchNormalization", [y] + [self.init("bn", p) for p in params],
                             epsilon=1e-5), c
        if kind in ("addc", "mulc"):
            op = "Add" if kind == "addc" else "Mul"
            return self.node(op, [y, self.init("k", r.standard_normal((c, 1, 1)))]), c
        if kind == "pad":
            p = d.draw(st.integers(0, 1), label="pad")
            value = d.draw(st.sampled_from([0.0, 0.5, -1.0]), label="pad value")
            pads = [0, 0, p, p, 0, 0, p, p]
            self.hw += 2 * p
            if self.opset < 11:
                return self.node("Pad", [y], pads=pads, mode="constant", value=value), c
            ins = [y, self.name("pads")]
            self.inits.append(numpy_helper.from_array(np.array(pads, np.int64), ins[1]))
            ins.append(self.init("pv", np.array(value, np.float32)))
            return self.node("Pad", ins, mode="constant"), c
        if kind == "pool":
            op = d.draw(st.sampled_from(["MaxPool", "AveragePool"]), label="pool")
            p = d.draw(st.integers(0, 1), label="pool pad")
            attrs = {"kernel_shape": [2, 2], "strides": [1, 1], "pads": [p] * 4}
            self.hw += 2 * p - 1
            if op == "AveragePool":
                attrs["count_include_pad"] = d.draw(st.integers(0, 1), label="count pad")
            return self.node(op, [y], **attrs), c
        if kind == "conv":
            cout = d.draw(st.sampled_from([2, 4, 6]), label="cout")
            k = d.draw(st.sampled_from([1, 3]), label="k")
            pad = d.draw(st.integers(0, 1), label="conv pad") if k == 3 else 0
            self.hw -= 2 * (1 - pad) if k == 3 else 0
            return self.conv(y, c, cout, 1, k, pad), cout
        if kind == "gconv":
            if c % 2:
                return y, c
            cout = d.draw(st.sampled_from([2, 4, 6]), label="gcout")
            k = d.draw(st.sampled_from([1, 3]), label="gk")
            return self.conv(y, c, cout, 2, k, 1 if k == 3 else 0), cout
        if kind == "dwconv":
            mult = d.draw(st.sampled_from([1, 2]), label="multiplier")
            k = d.draw(st.sampled_from([1, 3]), label="dk")
            return self.conv(y, c, c * mult, c, k, 1 if k == 3 else 0), c * mult
        if kind == "concat":
            c2 = d.draw(st.sampled_from([1, 2, 3]), label="concat c")
            other = self.conv(y, c, c2)
            order = [y, other] if d.draw(st.booleans(), label="concat order") else [other, y]
            return self.node("Concat", order, axis=1), c + c2
        if kind == "split":
            if c % 2:
                return y, c
            if self.opset < 13:
                a, b = self.node("Split", [y], 2, axis=1, split=[c // 2, c // 2])
            else:
                s = self.name("split")
                self.inits.append(numpy_helper.from_array(np.array([c // 2] * 2, np.int64), s))
                a, b = self.node("Split", [y, s], 2, axis=1)
            if d.draw(st.booleans(), label="split join"):
                return self.node("Add", [a, b]), c // 2
            return self.node("Concat", [b, a], axis=1), c

        if kind == "residual":
            op = d.draw(st.sampled_from(["Add", "Sum", "Mean"]), label="residual op")
            return self.node(op, [y, self.conv(y, c, c)]), c
        raise AssertionError(kind)

    def head(self, kind: str, y: str, c: int) -> str:
        r = self.rng
        if kind == "flatten_gemm":
            f = self.node("Flatten", [y], axis=1)
            trans = int(self.data.draw(st.booleans(), label="transB"))
            w = r.standard_normal((c * self.hw * self.hw, 3))
            w = w.T.copy() if trans else w
            return self.node("Gemm", [f, self.init("G", w), self.init("C", r.standard_normal(3))],
                             transB=trans)
        if kind == "reshape_matmul":
            s = self.name("shape")
            self.inits.append(numpy_helper.from_array(np.array([1, -1], np.int64), s))
            f = self.node("Reshape", [y, s])
            m = self.init("M", r.standard_normal((c * self.hw * self.hw, 3)))
            return self.node("MatMul", [f, m])
        if kind == "gap_gemm":
            g = self.node("GlobalAveragePool", [y])
            f = self.node("Flatten", [g], axis=1)
            w = self.rows(r.standard_normal((c, 4)), 1)
            cshape = self.data.draw(st.sampled_from([(4,), (1,), (1, 4)]), label="C shape")
            h = self.node("Gemm", [f, self.init("G", w), self.init("C", r.standard_normal(cshape))])
            h = self.node("Relu", [h])
            return self.node("Gemm", [h, self.init("G", r.standard_normal((4, 2))),
                                      self.init("C", np.zeros(2))])
        if kind == "batched_matmul":
            t = self.node("Transpose", [y], perm=[0, 2, 3, 1])  # [1, H, W, C]
            return self.node("MatMul", [t, self.init("M", r.standard_normal((self.hw, c, 3)))])
        if kind == "conv_out":
            return self.conv(y, c, 2)
        raise AssertionError(kind)


def build(data) -> onnx.ModelProto:
    opset = data.draw(st.sampled_from([10, 13, 17]), label="opset")
    b = _Builder(data, opset, data.draw(st.integers(0, 2 ** 16), label="seed"))
    c = data.draw(st.sampled_from([2, 4, 6]), label="c0")
    y = b.conv("x", 3, c, k=3, pad=1)
    for kind in data.draw(st.lists(st.sampled_from(STAGES), min_size=1, max_size=4),
                          label="stages"):
        y, c = b.stage(kind, y, c)
    out = b.head(data.draw(st.sampled_from(HEADS), label="head"), y, c)
    graph = helper.make_graph(b.nodes, "prop",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                             [1, 3, HW, HW])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                              b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    shape = run(model, FEEDS)[0].shape
    graph.output[0].CopyFrom(helper.make_tensor_value_info(out, TensorProto.FLOAT, shape))
    model.graph.output[0].CopyFrom(graph.output[0])
    onnx.checker.check_model(model, full_check=True)
    return model


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_dead_channel_removal_equals_the_zeroed_model(data):
    model = build(data)
    want = run(model, FEEDS)
    handle = load(copy.deepcopy(model))
    rec = remove_dead_channels(handle)
    onnx.checker.check_model(handle.model, full_check=True)
    got = run(handle.model, FEEDS)
    assert_close(got, want)
    assert all(isinstance(k, str) for k in rec.kept_nonzero_const)


def _keep_masks(model):
    """Keep-masks of every prunable weight that keep exactly its nonzeros (the zero rows the
    builder made stay zero; nothing else is pruned)."""
    from onnxprune.ops.weights import find_weights
    handle = load(copy.deepcopy(model))
    weights, _ = find_weights(handle)
    masks = {w.name: np.asarray(handle.read(w.tensor)) != 0 for w in weights}
    return {k: v for k, v in masks.items() if v.any()}  # an all-zero weight is not selected


@settings(max_examples=EXAMPLES // 2, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_prune_default_equals_no_resize(data):
    """The API end to end: ``resize`` (dead channels folded and removed) vs ``resize=False``."""
    import onnxprune

    from onnxprune.errors import OnnxPruneError

    model = build(data)
    masks = _keep_masks(model)
    try:
        kept = onnxprune.prune(copy.deepcopy(model), masks=masks, resize=False)
    except OnnxPruneError as e:  # masks that prune nothing: no run to compare
        assume(not str(e))
    resized = onnxprune.prune(copy.deepcopy(model), masks=masks, resize=True)
    onnx.checker.check_model(resized.model, full_check=True)
    assert_close(run(resized.model, FEEDS), run(kept.model, FEEDS))
    assert_close(run(kept.model, FEEDS), run(model, FEEDS))

"""Differential property test of dead-channel removal: random small graphs built from ops with
channel rules in the registry, random all-zero producer rows whose nonzero biases make dead
channels carry constants; removing the dead channels (fold + resize, the real path of the
RemoveDeadChannels pass) must leave the outputs equal to the zeroed-but-unresized model's, and
the result must pass onnx's full check and run. A fold the registry cannot prove exact keeps the
channel (kept_nonzero_const), which is always allowed; an inexact fold fails the comparison.
Only dead units go: every removed unit has all its producer rows zero (or is read by nobody),
and every dead unit is removed or named in the record.

The ops: Conv (plain, grouped, depthwise, padded), ConvTranspose (producer and consumer, strided,
grouped), Gemm/MatMul heads after Flatten/Reshape/GlobalAveragePool and batched, BN and
InstanceNorm, activations, Add/Mul constants, Concat (of the same and of different producers),
Split, Pad (constant/reflect/edge/wrap, opset-10 attribute form, opset-18 axes), pooling,
Resize (nearest, linear, cubic, antialiased; by scales, or by sizes with opset-18 axes), Slice
(channel window, spatial), Gather (channel axis, spatial axis), Cast fp16 round trips, Transpose
(NHWC round trip, spatial swap).

CI runs a small derandomized budget; ``ONNXPRUNE_SLOW=1`` runs a larger one.
"""

from __future__ import annotations

import copy
import os
import re

import numpy as np
import onnx
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels.dead import find_dead, remove_dead_channels
from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from onnxprune.ops._channel import CONSUMER, PRODUCER
from onnxprune.ops.registry import activation_of
from channel_models import assert_close, run

SLOW = os.environ.get("ONNXPRUNE_SLOW") == "1"
EXAMPLES = 800 if SLOW else 200
HW = 5

STAGES = ("act", "bn", "addc", "mulc", "pad", "pool", "conv", "gconv", "dwconv", "concat",
          "split", "residual", "convt", "resize", "slice", "gather", "cast", "transpose",
          "concat2")
FEEDS = {"x": np.random.default_rng(7).standard_normal((1, 3, HW, HW)).astype(np.float32)}
HEADS = ("flatten_gemm", "reshape_matmul", "flatten_matmul", "gap_gemm", "batched_matmul",
         "conv_out", "convt_out")


class _Builder:
    def __init__(self, data, opset: int, seed: int) -> None:
        self.data, self.opset = data, opset
        self.rng = np.random.default_rng(seed)
        self.nodes, self.inits = [], []
        self.n = 0
        self.h = self.w = HW  # the current spatial size

    def draw(self, strategy, label):
        return self.data.draw(strategy, label=label)

    def pick(self, options, label):
        return self.draw(st.sampled_from(list(options)), label)

    def name(self, prefix: str) -> str:
        self.n += 1
        return f"{prefix}{self.n}"

    def init(self, prefix: str, arr, dtype=np.float32) -> str:
        name = self.name(prefix)
        self.inits.append(numpy_helper.from_array(np.asarray(arr, dtype), name))
        return name

    def node(self, op: str, inputs, n_out: int = 1, **attrs):
        outs = [self.name(op.lower() + "_") for _ in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=self.name(op), **attrs))
        return outs if n_out > 1 else outs[0]

    def rows(self, w: np.ndarray, axis: int) -> np.ndarray:
        """Zero a random subset of the weight's output rows (each row with probability p; one
        stays alive unless p is 1)."""
        p = self.pick([0.5, 0.0, 0.8, 1.0], "zero fraction")
        dead = self.rng.random(w.shape[axis]) < p
        if dead.all() and p < 1:
            dead[self.rng.integers(len(dead))] = False
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

    def conv_transpose(self, x: str, cin: int, cout: int) -> str:
        """ConvTranspose W [cin, cout/g, k, k] (zero rows on its output axis 1), strided where
        the map is small; the spatial size becomes (n - 1) * s + k - 2p."""
        d = self.draw
        group = self.pick([1, 2] if cin % 2 == 0 and cout % 2 == 0 else [1], "ct group")
        k = self.pick([1, 2, 3], "ct k")
        s = self.pick([1, 2] if max(self.h, self.w) <= 4 else [1], "ct stride")
        p = d(st.integers(0, (k - 1) // 2), "ct pad")
        w = self.rows(self.rng.standard_normal((cin, cout // group, k, k)), 1)
        ins = [x, self.init("T", w)]
        if d(st.booleans(), "ct bias"):
            ins.append(self.init("TB", self.rng.standard_normal(cout) + 1.0))
        self.h, self.w = ((n - 1) * s + k - 2 * p for n in (self.h, self.w))
        return self.node("ConvTranspose", ins, kernel_shape=[k, k], strides=[s, s],
                         pads=[p] * 4, group=group)

    def ints(self, prefix: str, values) -> str:
        return self.init(prefix, np.asarray(values), np.int64)

    # -- stages --------------------------------------------------------------------------
    def stage(self, kind: str, y: str, c: int):
        d, r = self.draw, self.rng
        if kind == "act":
            op = self.pick(["Relu", "Sigmoid", "LeakyRelu"], "act")
            attrs = {"alpha": 0.1} if op == "LeakyRelu" else {}
            return self.node(op, [y], **attrs), c
        if kind == "bn" and d(st.booleans(), "instance norm"):
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
            return self.pad(y), c
        if kind == "pool":
            op = self.pick(["MaxPool", "AveragePool"], "pool")
            p = d(st.integers(0 if min(self.h, self.w) >= 2 else 1, 1), "pool pad")
            attrs = {"kernel_shape": [2, 2], "strides": [1, 1], "pads": [p] * 4}
            self.h, self.w = self.h + 2 * p - 1, self.w + 2 * p - 1
            if op == "AveragePool":
                attrs["count_include_pad"] = d(st.integers(0, 1), "count pad")
            return self.node(op, [y], **attrs), c
        if kind == "conv":
            cout = self.pick([2, 4, 6], "cout")
            k = self.pick([1, 3], "k")
            pad = d(st.integers(0 if min(self.h, self.w) >= 3 else 1, 1), "conv pad") \
                if k == 3 else 0
            if k == 3 and pad == 0:
                self.h, self.w = self.h - 2, self.w - 2
            return self.conv(y, c, cout, 1, k, pad), cout
        if kind == "gconv":
            if c % 2:
                return y, c
            cout = self.pick([2, 4, 6], "gcout")
            k = self.pick([1, 3], "gk")
            return self.conv(y, c, cout, 2, k, 1 if k == 3 else 0), cout
        if kind == "dwconv":
            mult = self.pick([1, 2], "multiplier")
            k = self.pick([1, 3], "dk")
            return self.conv(y, c, c * mult, c, k, 1 if k == 3 else 0), c * mult
        if kind == "concat":
            c2 = self.pick([1, 2, 3], "concat c")
            other = self.conv(y, c, c2)
            order = [y, other] if d(st.booleans(), "concat order") else [other, y]
            return self.node("Concat", order, axis=1), c + c2
        if kind == "concat2":  # two different producers, both reading y
            c1, c2 = self.pick([1, 2, 3], "concat2 c1"), self.pick([1, 2, 3], "concat2 c2")
            if d(st.booleans(), "concat2 grouped"):
                c2 = c1  # a group=2 consumer reads a[i] and b[i] as one unit
            a, b = self.conv(y, c, c1), self.conv(y, c, c2)
            if d(st.booleans(), "concat2 relu"):
                b = self.node("Relu", [b])
            cat = self.node("Concat", [a, b], axis=1)
            if c1 == c2:
                return self.conv(cat, 2 * c1, 2, group=2), 2
            return cat, c1 + c2
        if kind == "split":
            if c % 2:
                return y, c
            if self.opset < 13:
                a, b = self.node("Split", [y], 2, axis=1, split=[c // 2, c // 2])
            else:
                a, b = self.node("Split", [y, self.ints("split", [c // 2] * 2)], 2, axis=1)
            if d(st.booleans(), "split join"):
                return self.node("Add", [a, b]), c // 2
            return self.node("Concat", [b, a], axis=1), c
        if kind == "residual":
            op = self.pick(["Add", "Sum", "Mean"], "residual op")
            return self.node(op, [y, self.conv(y, c, c)]), c
        if kind == "convt":
            cout = self.pick([2, 4], "ct cout")
            return self.conv_transpose(y, c, cout), cout
        if kind == "resize":
            return self.resize(y, c), c
        if kind == "slice":
            return self.slice(y, c)
        if kind == "gather":
            return self.gather(y, c)
        if kind == "cast":  # fp32 -> fp16 -> fp32: the constant is rounded on the way
            h = self.node("Cast", [y], to=TensorProto.FLOAT16)
            return self.node("Cast", [h], to=TensorProto.FLOAT), c
        if kind == "transpose":
            if d(st.booleans(), "nhwc"):
                t = self.node("Transpose", [y], perm=[0, 2, 3, 1])  # [1, H, W, C]
                op = self.pick(["Add", "Mul", "Relu"], "nhwc op")
                t = self.node(op, [t] if op == "Relu" else [t, self.init("k", r.standard_normal(c))])
                return self.node("Transpose", [t], perm=[0, 3, 1, 2]), c
            self.h, self.w = self.w, self.h
            return self.node("Transpose", [y], perm=[0, 1, 3, 2]), c
        raise AssertionError(kind)

    def pad(self, y: str) -> str:
        d = self.draw
        modes = ["constant", "reflect", "edge"] + (["wrap"] if self.opset >= 19 else [])
        mode = self.pick(modes, "pad mode")
        p = d(st.integers(0, 1), "pad")
        if mode in ("reflect", "wrap") and min(self.h, self.w) < 2:
            mode = "edge"
        value = self.pick([0.0, 0.5, -1.0], "pad value") if mode == "constant" else 0.0
        pads = [0, 0, p, p, 0, 0, p, p]
        self.h, self.w = self.h + 2 * p, self.w + 2 * p
        if self.opset < 11:
            return self.node("Pad", [y], pads=pads, mode=mode, value=value)
        axes = self.opset >= 18 and d(st.booleans(), "pad axes")
        ins = [y, self.ints("pads", [p, p, p, p] if axes else pads)]
        if mode == "constant" or axes:
            ins.append(self.init("pv", np.array(value, np.float32)) if mode == "constant" else "")
        if axes:
            ins.append(self.ints("pax", [2, -1]))
        return self.node("Pad", ins, mode=mode)

    def resize(self, y: str, c: int) -> str:
        modes = ["nearest", "linear"] + (["cubic"] if self.opset >= 11 else [])
        mode = self.pick(modes, "resize mode")
        scale = 2.0 if max(self.h, self.w) <= 5 else 0.5
        h, w = int(self.h * scale), int(self.w * scale)
        attrs = {}
        if self.opset >= 18 and self.draw(st.booleans(), "resize by sizes"):
            axes = self.pick([[2, 3], [1, 2, 3], [-1, 1, -2], None], "resize axes")
            full = {0: 1, 1: c, 2: h, 3: w}
            named = [0, 1, 2, 3] if axes is None else [a % 4 for a in axes]
            ins = [y, "", "", self.ints("sizes", [full[a] for a in named])]
            if axes is not None:
                attrs["axes"] = axes
        else:
            scales = self.init("scales", [1, 1, scale, scale])
            ins = [y, scales] if self.opset < 11 else [y, "", scales]
        self.h, self.w = h, w
        if self.opset >= 18 and mode != "nearest":
            attrs["antialias"] = int(self.draw(st.booleans(), "antialias"))
        return self.node("Resize", ins, mode=mode, **attrs)

    def slice(self, y: str, c: int):
        d = self.draw
        if c >= 3 and d(st.booleans(), "slice channels"):
            start = d(st.integers(0, 1), "slice start")
            end = d(st.integers(start + 2, c), "slice end")
            ins = [y, self.ints("st", [start]), self.ints("en", [end]), self.ints("ax", [1])]
            return self.node("Slice", ins), end - start
        if self.h < 3:
            return y, c
        step = self.pick([1, 2], "slice step")
        ins = [y, self.ints("st", [1]), self.ints("en", [self.h]), self.ints("ax", [2]),
               self.ints("sp", [step])]
        self.h = len(range(1, self.h, step))
        return self.node("Slice", ins), c

    def gather(self, y: str, c: int):
        d = self.draw
        if d(st.booleans(), "gather channels"):
            idx = d(st.lists(st.integers(0, c - 1), min_size=2, max_size=c + 1), "gather idx")
            return self.node("Gather", [y, self.ints("gi", idx)], axis=1), len(idx)
        axis = self.pick([2, 3], "gather axis")
        n = self.h if axis == 2 else self.w
        idx = d(st.lists(st.integers(0, n - 1), min_size=1, max_size=n), "gather spatial")
        if axis == 2:
            self.h = len(idx)
        else:
            self.w = len(idx)
        return self.node("Gather", [y, self.ints("gi", idx)], axis=axis), c

    def head(self, kind: str, y: str, c: int) -> str:
        r = self.rng
        area = self.h * self.w
        if kind == "flatten_gemm":
            f = self.node("Flatten", [y], axis=1)
            trans = int(self.draw(st.booleans(), "transB"))
            w = r.standard_normal((c * area, 3))
            w = w.T.copy() if trans else w
            return self.node("Gemm", [f, self.init("G", w), self.init("C", r.standard_normal(3))],
                             transB=trans)
        if kind in ("reshape_matmul", "flatten_matmul"):
            if kind == "reshape_matmul":
                f = self.node("Reshape", [y, self.ints("shape", [1, -1])])
            else:
                f = self.node("Flatten", [y], axis=1)
            m = self.init("M", r.standard_normal((c * area, 3)))
            return self.node("MatMul", [f, m])
        if kind == "gap_gemm":
            g = self.node("GlobalAveragePool", [y])
            f = self.node("Flatten", [g], axis=1)
            w = self.rows(r.standard_normal((c, 4)), 1)
            cshape = self.pick([(4,), (1,), (1, 4)], "C shape")
            h = self.node("Gemm", [f, self.init("G", w), self.init("C", r.standard_normal(cshape))])
            h = self.node("Relu", [h])
            return self.node("Gemm", [h, self.init("G", r.standard_normal((4, 2))),
                                      self.init("C", np.zeros(2))])
        if kind == "batched_matmul":
            t = self.node("Transpose", [y], perm=[0, 2, 3, 1])  # [1, H, W, C]
            return self.node("MatMul", [t, self.init("M", r.standard_normal((self.h, c, 3)))])
        if kind == "conv_out":
            return self.conv(y, c, 2)
        if kind == "convt_out":
            return self.conv_transpose(y, c, 2)
        raise AssertionError(kind)


def build(data, stages=STAGES, heads=HEADS, max_stages: int = 4) -> onnx.ModelProto:
    opset = data.draw(st.sampled_from([10, 13, 17, 19]), label="opset")
    b = _Builder(data, opset, data.draw(st.integers(0, 2 ** 16), label="seed"))
    c = data.draw(st.sampled_from([2, 4, 6]), label="c0")
    y = b.conv("x", 3, c, k=3, pad=1)
    # Stages and head are picked uniformly by the drawn seed (hypothesis favours the first
    # entries of a sampled_from), and drawn again as constants so a failure prints them.
    n = data.draw(st.integers(1, max_stages), label="stage count")
    kinds = [str(k) for k in b.rng.choice(stages, n)]
    for kind in data.draw(st.just(kinds), label="stages"):
        y, c = b.stage(kind, y, c)
    out = b.head(data.draw(st.just(str(b.rng.choice(heads))), label="head"), y, c)
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


def dead_units(model: onnx.ModelProto):
    """Per prunable group id of ``model``'s channel graph: (units whose every producer row is
    zero, units nobody reads: every consumer slice zero, or no consumer and no sink), read from
    the weights themselves."""
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    out = {}
    for g in graph.prunable():
        arrays = {m.tensor: np.asarray(handle.read(graph.stored[m.tensor]))
                  for m in g.members if m.stored}

        def zero(role, g=g):
            flags = np.ones(g.size, bool)
            found = False
            for m in g.members:
                if m.stored and role in m.roles:
                    found = True
                    for u in range(g.size):
                        flags[u] &= not np.take(arrays[m.tensor], m.index_map[u], m.axis).any()
            return flags if found else np.zeros(g.size, bool)

        sinks = any("sink" in m.roles for m in g.members)
        unread = np.zeros(g.size, bool) if sinks else (
            zero(CONSUMER) if g.consumers else np.ones(g.size, bool))
        out[g.id] = (set(np.flatnonzero(zero(PRODUCER)).tolist()),
                     set(np.flatnonzero(unread).tolist()), g.size)
    return out


def check_removed(model, rec) -> None:
    """Only dead units go, and every dead unit is removed or has a note saying why it stays."""
    dead = dead_units(model)
    for gid, units in rec.removed.items():
        assert gid in dead, f"group {gid} is not a prunable group of the input"
        zero, unread, size = dead[gid]
        assert set(units) <= zero | unread, (gid, units, zero, unread)
        assert len(units) < size  # one unit always stays
    for gid, (zero, unread, size) in dead.items():
        gone = set(rec.removed.get(gid, []))
        notes = [k for k in rec.kept_nonzero_const if k.startswith(f"group {gid} ")]
        kept = {int(m.group(1)) for k in notes for m in [re.search(r" channel (\d+):", k)] if m}
        whole = any("all channels dead" in k for k in notes)
        missing = (zero | unread) - gone - kept
        assert len(missing) <= (1 if whole else 0), (gid, sorted(missing), notes)


def close(model, got, want) -> None:
    """Outputs equal within float tolerance: fp32's, or where the model rounds to fp16 (a Cast)
    fp16's. The live channels are rounded there too, and a resized producer's fp32 result may
    differ in its last bit and round to the next fp16 value: one fp16 step of the output is the
    model's own precision (check_fold_constants checks the folded values finely)."""
    if not any(n.op_type == "Cast" for n in model.graph.node):
        assert_close(got, want)
        return
    for g, w in zip(got, want):
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, atol=2.0 ** -9 * scale, rtol=2.0 ** -9)


def check_fold_constants(model) -> None:
    """Every constant the first round folds is the value the model computes there: the unit's
    channels of the consumer's activation, run through onnxruntime, hold it at every position.
    (This checks the constant walk directly, finer than the outputs can where an fp16 Cast
    rounds the live channels too.)"""
    handle = load(copy.deepcopy(model))
    graph = build_channel_graph(handle)
    want = []  # (activation, axis, channel indices, constant)
    for group, _, folds, _ in find_dead(handle, graph):
        acts = {m.tensor: m for m in group.members if not m.stored}
        for u, m, node, idx, k in folds:
            if k == 0:
                continue
            act = activation_of(node, idx, graph.stored[m.tensor].dims)
            a = acts[node.input[act.index]]
            want.append((a.tensor, a.axis, a.index_map[u], k))
    if not want:
        return
    probe = copy.deepcopy(model)
    names = sorted({w[0] for w in want})
    probe.graph.output.extend(helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                              for n in names)
    values = dict(zip(names, run(probe, FEEDS)[1:]))
    for name, axis, channels, k in want:
        got = np.take(values[name], channels, axis=axis)
        np.testing.assert_allclose(got, k, rtol=1e-5, atol=1e-6, err_msg=name)


def _removal_equals_the_zeroed_model(model):
    want = run(model, FEEDS)
    handle = load(copy.deepcopy(model))
    rec = remove_dead_channels(handle)
    onnx.checker.check_model(handle.model, full_check=True)
    close(model, run(handle.model, FEEDS), want)
    assert all(isinstance(k, str) for k in rec.kept_nonzero_const)
    check_removed(model, rec)
    check_fold_constants(model)
    for op in {n.op_type for n in model.graph.node}:
        event(f"op {op}")
    event(f"removed {min(rec.channels_removed, 3)}, folded {min(len(rec.folded), 3)}, "
          f"kept {min(len(rec.kept_nonzero_const), 3)}")
    for note in rec.folded:
        event("folded into " + note.split(" folded into ")[1].split(" ")[0])
    for note in rec.kept_nonzero_const:
        event("kept: " + re.sub(r"'[^']*'|\[[^]]*\]|[-\d.]+", "#", note.split("]", 1)[1])[:90])


@settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_dead_channel_removal_equals_the_zeroed_model(data):
    _removal_equals_the_zeroed_model(build(data))


#: Ops that move a constant from a producer to a consumer (each may keep it, change it or make
#: it unknown), and consumers whose fold rules differ: short chains of them, so that a dead
#: channel's constant meets each op often within the CI budget.
PATH_STAGES = ("cast", "pad", "resize", "slice", "gather", "transpose", "pool", "bn", "act",
               "addc", "mulc", "concat2", "split", "convt", "conv", "gconv", "dwconv")
PATH_HEADS = ("conv_out", "convt_out", "flatten_gemm", "flatten_matmul", "gap_gemm",
              "batched_matmul")


@settings(max_examples=EXAMPLES * 3 // 2, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.data())
def test_a_dead_constant_through_value_moving_ops_folds_exactly_or_stays(data):
    _removal_equals_the_zeroed_model(build(data, PATH_STAGES, PATH_HEADS, max_stages=3))


def _keep_masks(model):
    """Keep-masks of every prunable weight that keep exactly its nonzeros (the zero rows the
    builder made stay zero; nothing else is pruned)."""
    from onnxprune.ops.weights import find_weights
    handle = load(copy.deepcopy(model))
    weights, _ = find_weights(handle)
    masks = {w.name: np.asarray(handle.read(w.tensor)) != 0 for w in weights}
    return {k: v for k, v in masks.items() if v.any()}  # an all-zero weight is not selected


@settings(max_examples=EXAMPLES // 5, deadline=None, derandomize=True,
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
    close(model, run(resized.model, FEEDS), run(kept.model, FEEDS))
    close(model, run(kept.model, FEEDS), run(model, FEEDS))

"""--fold-scalars (onnxprune/passes/fold.py): scalar Mul/Div/Add folded into weighted ops exactly.

Each test builds a model, folds it, and checks which nodes remain (exact op lists) and that the
outputs equal the unfolded model's to float tolerance; the refusals (a shift before a padded
Conv, a shared weight, a scalar result that is a graph output) leave the node in place.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import builders as B
from onnxprune import prune
from onnxprune.model import io as mio
from onnxprune.passes.fold import fold_scalars


def _c(name, value):
    return numpy_helper.from_array(np.asarray(value, np.float32), name)


def _conv(name, x, w, b, out, pads=0, group=1):
    ins = [x, w] + ([b] if b else [])
    return helper.make_node("Conv", ins, [out], name=name, pads=[pads] * 4, group=group)


def _lab_model(pad_last: int = 0):
    """Conv → Mul(a) → Add(b) → Relu → Div(6) → Mul(c) → Add(d) → Conv(1x1 or 3x3 pad 1),
    the PP-LCNet "learnable affine block" layout, scalars as initializers and Constant nodes."""
    k = 3 if pad_last else 1
    nodes = [
        _conv("c1", "x", "w1", "b1", "t1", pads=1),
        helper.make_node("Mul", ["a", "t1"], ["t2"]),
        helper.make_node("Add", ["t2", "b"], ["t3"]),
        helper.make_node("Relu", ["t3"], ["t4"]),
        helper.make_node("Constant", [], ["six"], value=_c("six_v", [6.0])),
        helper.make_node("Div", ["t4", "six"], ["t5"]),
        helper.make_node("Mul", ["t5", "c"], ["t6"]),
        helper.make_node("Add", ["t6", "d"], ["t7"]),
        _conv("c2", "t7", "w2", "", "y", pads=pad_last),
    ]
    inits = [B.tensor("w1", (8, 3, 3, 3), 1), B.tensor("b1", (8,), 2),
             B.tensor("w2", (5, 8, k, k), 3), _c("a", 1.7), _c("b", [-0.3]), _c("c", [0.8]),
             _c("d", 0.25)]
    return B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [1, 3, 10, 10])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5, 10, 10])],
                        inits)


def _fold(model):
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    handle = mio.load(copy)
    counts = fold_scalars(handle)
    onnx.checker.check_model(handle.model, full_check=True)
    return handle.model, counts


def _ops(model):
    return [n.op_type for n in model.graph.node]


def _same(a, b):
    x = B.rng(5).standard_normal((1, 3, 10, 10)).astype(np.float32)
    ya, yb = B.run(a, {"x": x})[0], B.run(b, {"x": x})[0]
    np.testing.assert_allclose(yb, ya, rtol=1e-5, atol=1e-5)


def test_affine_after_conv_and_before_unpadded_conv_fold_away():
    dense = _lab_model(pad_last=0)
    folded, counts = _fold(dense)
    # after c1: Mul + Add; Div(6)·Mul(c) merged, the merged scale folded into c2, Add(d) into
    # c2's new bias (1x1, no padding): only the Convs and the Relu are left
    assert counts == {"after": 2, "before": 1, "bias": 1, "merge": 1}
    assert _ops(folded) == ["Conv", "Relu", "Conv"]
    assert {t.name for t in folded.graph.initializer} == {"w1", "b1", "w2", "y_folded_bias"}
    _same(dense, folded)


def test_shift_before_padded_conv_stays_and_its_scale_too():
    dense = _lab_model(pad_last=1)
    folded, counts = _fold(dense)
    # zero padding: Add(d) does not fold into c2's bias; the merged scale sits before it
    assert counts == {"after": 2, "merge": 1}
    assert _ops(folded) == ["Conv", "Relu", "Mul", "Add", "Conv"]
    mul = folded.graph.node[2]
    scale = [numpy_helper.to_array(t) for t in folded.graph.initializer if t.name == mul.input[1]]
    np.testing.assert_allclose(scale[0], [0.8 / 6.0], rtol=1e-6)
    _same(dense, folded)


def test_shared_weight_and_graph_output_are_left_alone():
    # w is read by two Convs: scaling it in place for one would change the other
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]),
             _conv("c1", "xs", "w", "", "y1"), _conv("c2", "x", "w", "", "y2"),
             helper.make_node("Mul", ["y2", "s"], ["y3"])]
    model = B.make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 6, 6])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, [1, 4, 6, 6])
         for n in ("y1", "y3", "xs")],
        [B.tensor("w", (4, 4, 1, 1), 1), _c("s", 2.0)])
    x = B.rng(1).standard_normal((1, 4, 6, 6)).astype(np.float32)
    folded, counts = _fold(model)
    assert counts == {}
    assert _ops(folded) == ["Mul", "Conv", "Conv", "Mul"]
    for a, b in zip(B.run(model, {"x": x}), B.run(folded, {"x": x})):
        np.testing.assert_array_equal(a, b)


def test_gemm_alpha_beta_and_depthwise_scale():
    # Gemm: y = 0.5 * (x W^T) + 2 * C, then * 3 and + 1; depthwise Conv (group 4) after a scale
    nodes = [helper.make_node("Mul", ["x", "s"], ["xs"]),
             _conv("dw", "xs", "wd", "bd", "t", pads=1, group=4),
             helper.make_node("Flatten", ["t"], ["f"]),
             helper.make_node("Gemm", ["f", "wg", "cg"], ["g"], alpha=0.5, beta=2.0, transB=1),
             helper.make_node("Mul", ["g", "three"], ["g3"]),
             helper.make_node("Add", ["one", "g3"], ["y"])]
    model = B.make_model(
        nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4, 3, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 5])],
        [B.tensor("wd", (4, 1, 3, 3), 1), B.tensor("bd", (4,), 2), B.tensor("wg", (5, 36), 3),
         B.tensor("cg", (5,), 4), _c("s", -1.5), _c("three", 3.0), _c("one", 1.0)])
    folded, counts = _fold(model)
    assert counts == {"after": 2, "before": 1}
    assert _ops(folded) == ["Conv", "Flatten", "Gemm"]
    x = B.rng(2).standard_normal((1, 4, 3, 3)).astype(np.float32)
    np.testing.assert_allclose(B.run(folded, {"x": x})[0], B.run(model, {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_prune_option_reports_the_fold_on_its_own_line(tmp_path):
    dense = _lab_model(pad_last=0)
    plain = prune(dense, pattern="channel", sparsity=0.25)
    folded = prune(dense, pattern="channel", sparsity=0.25, fold_scalars=True)
    assert [n.op_type for n in folded.model.graph.node] == ["Conv", "Relu", "Conv"]
    assert [n for n in plain.report.notes if n.startswith("fold-scalars")] == []
    line = [n for n in folded.report.notes if n.startswith("fold-scalars")]
    assert line == ["fold-scalars: 5 scalar Mul/Div/Add nodes folded into weights and biases "
                    "(2 after a weighted op, 1 scales before one, 1 shifts into a bias, 1 merged "
                    "scale pairs); a graph optimization, not pruning: the same outputs up to "
                    "float rounding"]
    _same(plain.model, folded.model)


def test_ppocr_det_learnable_affine_blocks(corpus_model):
    path = corpus_model("ppocr/ch_PP-OCRv4_det_infer")
    dense = onnx.load(str(path))
    folded, counts = _fold(dense)
    # 28 Conv → Mul → Add after the Convs, 24 HardSwish Div(6) merged into the scale after it;
    # the 10 before a 1x1 Conv fold into it with their shift, the others stay (padded dw Conv)
    assert counts == {"after": 56, "before": 10, "bias": 10, "merge": 24}
    before = {t: _ops(dense).count(t) for t in ("Mul", "Add", "Div", "Conv")}
    after = {t: _ops(folded).count(t) for t in ("Mul", "Add", "Div", "Conv")}
    assert before == {"Mul": 86, "Add": 89, "Div": 24, "Conv": 62}
    assert after == {"Mul": 48, "Add": 51, "Div": 0, "Conv": 62}
    x = B.rng(3).random((1, 3, 64, 64), dtype=np.float32)
    np.testing.assert_allclose(B.run(folded, {"x": x})[0], B.run(dense, {"x": x})[0],
                               atol=1e-4)

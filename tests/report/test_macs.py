"""MAC formulas against hand-computed numbers, and count_macs on whole graphs."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.model import io
from onnxprune.model.external import is_external
from onnxprune.errors import OptionError
from onnxprune.report.macs import count_macs, counted_op_types, node_label, weight_densities

OPSET = [helper.make_opsetid("", 17)]


def _model(nodes, inputs, outputs, inits=(), opset=OPSET):
    graph = helper.make_graph(nodes, "g", inputs, outputs, list(inits))
    return helper.make_model(graph, opset_imports=opset)


def _w(name, shape, seed=0):
    return numpy_helper.from_array(
        np.random.default_rng(seed).standard_normal(shape).astype(np.float32), name)


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _single(op, x_shape, w_shape, y_shape=None, **attrs):
    node = helper.make_node(op, ["x", "W"], ["y"], name="n", **attrs)
    return _model([node], [_vi("x", x_shape)], [_vi("y", y_shape)], [_w("W", w_shape)])


@pytest.mark.parametrize("x_shape, w_shape, attrs, expected", [
    # group=1, same padding: out 1x4x8x8 = 256 elements, each a dot of 3*3*3.
    ((1, 3, 8, 8), (4, 3, 3, 3), dict(pads=[1, 1, 1, 1]), 256 * 27),
    # depthwise: out 1x8x8x8 = 512, each 1*3*3.
    ((1, 8, 10, 10), (8, 1, 3, 3), dict(group=8), 512 * 9),
    # grouped, strided, padded, batch 2: out spatial (6+2-3)//2+1 = 3 -> 2x12x3x3 = 216, each 4*3*3.
    ((2, 8, 6, 6), (12, 4, 3, 3), dict(group=2, strides=[2, 2], pads=[1, 1, 1, 1]), 216 * 36),
    # 1-D conv: out 1x5x8 = 40, each 2*3.
    ((1, 2, 10), (5, 2, 3), {}, 40 * 6),
])
def test_conv(x_shape, w_shape, attrs, expected):
    count = count_macs(_single("Conv", x_shape, w_shape, **attrs))
    assert count.total == expected
    assert count.per_node == {"n": expected}
    assert count.unknown == []


@pytest.mark.parametrize("x_shape, w_shape, attrs, expected", [
    # every input element (1*4*5*5 = 100) scatters through Cout/g * k*k = 6*9.
    ((1, 4, 5, 5), (4, 6, 3, 3), dict(strides=[2, 2]), 100 * 54),
    # grouped: W [Cin=4, Cout/g=3, 2, 2], group 2: 100 * 3*2*2.
    ((1, 4, 5, 5), (4, 3, 2, 2), dict(group=2), 100 * 12),
])
def test_conv_transpose(x_shape, w_shape, attrs, expected):
    assert count_macs(_single("ConvTranspose", x_shape, w_shape, **attrs)).total == expected


@pytest.mark.parametrize("trans_a", [0, 1])
@pytest.mark.parametrize("trans_b", [0, 1])
def test_gemm_transposes(trans_a, trans_b):
    m, k, n = 3, 5, 7
    a_shape = (k, m) if trans_a else (m, k)
    b_shape = (n, k) if trans_b else (k, n)
    node = helper.make_node("Gemm", ["a", "B", "C"], ["y"], name="fc", transA=trans_a,
                            transB=trans_b)
    model = _model([node], [_vi("a", a_shape)], [_vi("y", None)],
                   [_w("B", b_shape), _w("C", (n,))])
    assert count_macs(model).total == m * n * k


@pytest.mark.parametrize("a_shape, b_shape, expected", [
    ((4, 5), (5, 6), 4 * 6 * 5),
    ((2, 1, 4, 5), (3, 5, 6), 2 * 3 * 4 * 6 * 5),  # batch dims broadcast to (2, 3)
    ((5,), (5, 6), 6 * 5),  # 1-D A is [1, K]
    ((3, 4, 5), (5,), 3 * 4 * 5),  # 1-D B is [K, 1]
])
def test_matmul_batched(a_shape, b_shape, expected):
    node = helper.make_node("MatMul", ["a", "b"], ["y"], name="mm")
    model = _model([node], [_vi("a", a_shape), _vi("b", b_shape)], [_vi("y", None)])
    assert count_macs(model).total == expected


def _mlp(batch_dim="N"):
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"], name="fc1"),
             helper.make_node("Relu", ["h"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "W2"], ["y"], name="fc2")]
    return _model(nodes, [_vi("x", [batch_dim, 16])], [_vi("y", [batch_dim, 4])],
                  [_w("W1", (16, 8)), _w("W2", (8, 4), seed=1)])


def test_dynamic_batch_defaults_and_overrides():
    model = _mlp()
    per_row = 16 * 8 + 8 * 4
    assert count_macs(model).total == per_row  # unknown batch -> 1
    assert count_macs(model, batch=3).total == 3 * per_row
    assert count_macs(model, {"x": (5, 16)}).total == 5 * per_row
    count = count_macs(model, {"x": (5, 16)})
    assert count.per_node == {"fc1": 5 * 128, "fc2": 5 * 32}  # Relu has no formula
    assert count.input_shapes == {"x": (5, 16)}
    assert count.per_op_type() == {"MatMul": 5 * per_row}


def test_unknown_override_name_lists_inputs():
    with pytest.raises(OptionError, match="its inputs are: x"):
        count_macs(_mlp(), {"images": (1, 16)})


def test_densities_scale_sparse_total():
    model = _mlp()
    count = count_macs(model, densities={"fc1": 0.25, "not-a-node": 0.5})
    assert count.total == 160
    assert count.sparse_total == 128 // 4 + 32
    assert count_macs(model).sparse_total == 160
    with pytest.raises(ValueError):
        count_macs(model, densities={"fc1": 1.5})


def test_weight_densities_from_handle():
    model = _mlp()
    w1 = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[:, :4] = 0  # half the elements
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w1, "W1"))
    densities = weight_densities(io.load(model))
    assert densities == {"fc1": 0.5, "fc2": 1.0}
    assert count_macs(model, densities=densities).sparse_total == 64 + 32


def test_conv_net_through_reshape_and_gemm():
    # Conv -> Relu -> Reshape (constant shape, needs data propagation) -> Gemm.
    nodes = [helper.make_node("Conv", ["x", "W", "b"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("Reshape", ["r", "shape"], ["f"]),
             helper.make_node("Gemm", ["f", "fcW"], ["y"], transB=1)]
    inits = [_w("W", (4, 3, 3, 3)), _w("b", (4,)),
             numpy_helper.from_array(np.array([0, -1], dtype=np.int64), "shape"),
             _w("fcW", (10, 4 * 6 * 6))]
    model = _model(nodes, [_vi("x", ["N", 3, 6, 6])], [_vi("y", ["N", 10])], inits)
    count = count_macs(model, batch=2)
    conv = 2 * 4 * 6 * 6 * 27
    gemm = 2 * 10 * 144
    assert count.per_node == {"Conv(c)": conv, "Gemm(y)": gemm}
    assert count.total == conv + gemm
    assert node_label(model.graph.node[0]) == "Conv(c)"


def test_image_input_gets_default_spatial_size():
    model = _single("Conv", ["N", 3, "H", "W"], (8, 3, 1, 1))
    assert count_macs(model).total == 8 * 224 * 224 * 3


def test_unknown_shapes_are_listed():
    node = helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")
    model = _model([node], [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                   [_vi("y", None)], [_w("W", (4, 4))])
    count = count_macs(model)
    assert count.total == 0
    assert count.unknown == ["mm"]
    assert any("declare no shape" in n for n in count.notes)
    assert count_macs(model, {"x": (2, 4)}).total == 2 * 4 * 4


def test_subgraph_with_matmul_is_unknown_and_trivial_one_counts_zero():
    def branch(op):
        nodes = ([helper.make_node("MatMul", ["x", "W"], ["o"])] if op == "MatMul"
                 else [helper.make_node("Relu", ["x"], ["o"])])
        return helper.make_graph(nodes, op, [], [_vi("o", None)])

    def model(op):
        node = helper.make_node("If", ["cond"], ["y"], name="if", then_branch=branch(op),
                                else_branch=branch("Relu"))
        return _model([node], [_vi("cond", [], TensorProto.BOOL), _vi("x", [2, 4])],
                      [_vi("y", None)], [_w("W", (4, 4))])

    assert count_macs(model("MatMul")).unknown == ["if"]
    assert count_macs(model("Relu")).unknown == []
    assert count_macs(model("Relu")).total == 0


def test_recurrent_and_einsum():
    hidden, inp, seq, batch = 4, 3, 5, 2
    lstm = helper.make_node("LSTM", ["x", "W", "R"], ["y"], name="lstm", hidden_size=hidden)
    model = _model([lstm], [_vi("x", [seq, batch, inp])], [_vi("y", None)],
                   [_w("W", (1, 4 * hidden, inp)), _w("R", (1, 4 * hidden, hidden))])
    assert count_macs(model).total == seq * batch * (4 * hidden * inp + 4 * hidden * hidden)

    ein = helper.make_node("Einsum", ["a", "b"], ["y"], name="e", equation="bij,bjk->bik")
    model = _model([ein], [_vi("a", [2, 3, 4]), _vi("b", [2, 4, 5])], [_vi("y", None)])
    assert count_macs(model).total == 2 * 3 * 4 * 5


def test_caller_model_is_not_mutated():
    model = _mlp()
    before = model.SerializeToString()
    count_macs(model, {"x": (7, 16)})
    assert model.SerializeToString() == before


def test_external_data_model_from_path(tmp_path):
    model = _mlp()
    path = tmp_path / "mlp.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="mlp.data",
                    size_threshold=0)
    handle = io.load(path)
    assert all(is_external(t) for t in handle.model.graph.initializer)
    assert count_macs(path, {"x": (2, 16)}).total == 2 * 160
    assert count_macs(handle.model, {"x": (2, 16)}).total == 2 * 160  # dims suffice


def test_registry_lists_core_ops():
    assert {"Conv", "ConvTranspose", "Gemm", "MatMul"} <= set(counted_op_types())


def test_to_dict_is_plain():
    d = count_macs(_mlp()).to_dict()
    assert d["total"] == 160 and d["per_op_type"] == {"MatMul": 160}
    assert d["input_shapes"] == {"x": [1, 16]}


def test_old_opset_shape_chains_resolve():
    # paddle2onnx / old torch style: Reshape's shape computed by Shape -> Slice -> Concat at
    # opset 11, where onnx propagates no shape values; counting upgrades a weightless copy.
    ints = {"st": [0], "en": [2], "ax": [0], "m1": [-1]}
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Slice", ["s", "st", "en", "ax"], ["sl"]),
             helper.make_node("Concat", ["sl", "m1"], ["cc"], axis=0),
             helper.make_node("Reshape", ["x", "cc"], ["r"]),
             helper.make_node("MatMul", ["r", "W"], ["y"], name="mm")]
    inits = [numpy_helper.from_array(np.array(v, np.int64), k) for k, v in ints.items()]
    model = _model(nodes, [_vi("x", [1, 12, 2, 5])], [_vi("y", None)],
                   inits + [_w("W", (10, 3))], opset=[helper.make_opsetid("", 11)])
    count = count_macs(model)
    assert count.unknown == []
    assert count.total == 12 * 3 * 10
    assert model.opset_import[0].version == 11


def _runtime_macs(path, shapes=None):
    """MACs from the formulas applied to the shapes onnxruntime actually produces."""
    import onnxruntime as ort

    from onnxprune.inputs.generate import make_inputs
    from onnxprune.ops.registry import field_of

    model = onnx.load(str(path))
    counted = [n for n in model.graph.node if field_of(n, "macs") is not None]
    actual = {t.name: tuple(t.dims) for t in model.graph.initializer}
    for n in model.graph.node:
        if n.op_type == "Constant":
            actual[n.output[0]] = tuple(n.attribute[0].t.dims)
    wanted = {name for n in counted for name in list(n.input) + list(n.output) if name}
    outputs = {o.name for o in model.graph.output}
    for name in sorted(wanted - set(actual) - outputs):
        model.graph.output.add().name = name
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    inputs = make_inputs(model, shapes)
    values = session.run(None, inputs)
    actual.update({o.name: v.shape for o, v in zip(session.get_outputs(), values)})
    actual.update({k: v.shape for k, v in inputs.items()})
    return sum(field_of(n, "macs")(n, actual) for n in counted)


@pytest.mark.parametrize("name", ["digits_cnn", "mobilenetv3_block", "mobilenetv3_block_fp16",
                                  "transformer_mlp", "yolo_block"])
def test_static_count_matches_runtime_shapes(models_dir, name):
    path = models_dir / f"{name}.onnx"
    if not path.exists():
        pytest.skip(f"{path} not built (run python tools/make_fixtures.py)")
    assert count_macs(path).total == _runtime_macs(path)


@pytest.mark.slow
@pytest.mark.parametrize("name, shapes", [
    ("light/light_resnet50", None), ("light/light_inception_v2", None),
    ("light/light_shufflenet", None),
    ("ppocr/ch_PP-OCRv4_rec_infer", {"x": (1, 3, 48, 320)}),
    ("ppocr/ch_PP-OCRv4_det_infer", {"x": (1, 3, 160, 160)}),
    ("ppocr/ch_ppocr_mobile_v2.0_cls_infer", {"x": (1, 3, 48, 192)}),
])
def test_corpus_count_matches_runtime_shapes(corpus_model, name, shapes):
    path = corpus_model(name)
    count = count_macs(path, shapes)
    assert count.unknown == []
    assert count.total == _runtime_macs(path, shapes)

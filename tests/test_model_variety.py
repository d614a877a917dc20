"""Models of every age and kind a user may hold: opsets 7 to the newest, ai.onnx.ml and custom
domains, QDQ (float and int8 weights), fp16 behind Cast, bf16. Each test asserts exactly what
onnxprune does with them: zero counts, dtypes and bytes kept, skip reasons stated.

Behaviour recorded here (see the strict xfails for what is still wrong):

* opsets 7, 9, 11, 13, 17 and ``onnx.defs.onnx_opset_version()``: pruned, opset/IR kept;
* ai.onnx.ml nodes (Normalizer, LinearClassifier) after a MatMul: pruned and validated in
  onnxruntime (which implements ai.onnx.ml); ``--pattern channel`` leaves the MatMul's channels
  alone because no rule maps them through an ai.onnx.ml node (listed in ``report.frozen``);
* a custom-domain node onnxruntime does not know: onnx.checker passes, onnxruntime cannot load
  the model, so it cannot be run: onnxprune prunes it, checks the output with onnx.checker
  only and says so in the report (a ``--max-error`` gate cannot be measured and fails);
* QDQ: a float weight behind QuantizeLinear -> DequantizeLinear is pruned and its zeros come out
  of DequantizeLinear as exact zeros; an int8 weight behind DequantizeLinear is skipped with an
  "INT8 ... only float weights are pruned" reason in ``report.skipped``;
* fp16 (the committed mobilenetv3_block_fp16.onnx) and bf16 weights keep their dtype, and the
  kept elements keep their exact bits.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import builders as B
import onnxprune
from onnxprune.cli import main
from onnxprune.errors import SelectionError
from onnxprune.model.io import iter_tensors
from onnxprune.inputs.generate import make_inputs
from onnxprune.runtime.session import run_model

NEWEST = onnx.defs.onnx_opset_version()


def vi(name, elem, shape):
    return helper.make_tensor_value_info(name, elem, shape)


def arrays(model):
    return {t.name: numpy_helper.to_array(t) for t in iter_tensors(model.graph) if t.name}


def zeros(a) -> int:
    return int(a.size - np.count_nonzero(a))


def model_for(nodes, inputs, outputs, inits, opsets, check_full=True):
    graph = helper.make_graph(nodes, "variety", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = helper.find_min_ir_version_for(list(opsets), ignore_unknown=True)
    if model.ir_version < 4:  # IR 3 (opset <= 8): every initializer is also a graph input
        model.graph.input.extend(vi(t.name, t.data_type, list(t.dims)) for t in inits)
    onnx.checker.check_model(model, full_check=check_full)
    return model


def assert_runs_like(original, pruned):
    """Pruned model runs in onnxruntime on the original's generated inputs, same output
    names, shapes and dtypes."""
    feeds = make_inputs(original, seed=0)
    want, got = run_model(original, feeds), run_model(pruned, feeds)
    assert list(got) == list(want)
    for name in want:
        assert (got[name].shape, got[name].dtype) == (want[name].shape, want[name].dtype), name


# -- opsets ------------------------------------------------------------------------------------
def opset_model(opset: int) -> onnx.ModelProto:
    """x[1,4,6,6] -> Conv(8, 3x3) -> Relu -> Flatten -> Gemm(10, transB=1) -> MatMul([10, 6]),
    written with ops every opset from 7 on has (Gemm-7 still needs its C input)."""
    r = B.rng(opset)
    inits = [numpy_helper.from_array(r.standard_normal(s).astype(np.float32), n) for n, s in
             (("conv.w", (8, 4, 3, 3)), ("conv.b", (8,)), ("fc.w", (10, 288)), ("fc.b", (10,)),
              ("mm.w", (10, 6)))]
    nodes = [helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1],
                              kernel_shape=[3, 3], name="conv"),
             helper.make_node("Relu", ["c"], ["r"], name="relu"),
             helper.make_node("Flatten", ["r"], ["f"], axis=1, name="flatten"),
             helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["g"], transB=1, name="fc"),
             helper.make_node("MatMul", ["g", "mm.w"], ["y"], name="mm")]
    return model_for(nodes, [vi("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                     [vi("y", TensorProto.FLOAT, [1, 6])], inits,
                     [helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17, NEWEST], ids=lambda o: f"opset{o}")
def test_opsets_unstructured_exact(opset):
    model = opset_model(opset)
    res = onnxprune.prune(model, sparsity=0.5, resize=False)
    a = arrays(res.model)
    for name in ("conv.w", "fc.w", "mm.w"):
        assert zeros(a[name]) == round(0.5 * a[name].size), name
    assert zeros(a["conv.b"]) == 0 and zeros(a["fc.b"]) == 0
    assert [(o.domain, o.version) for o in res.model.opset_import] == [("", opset)]
    assert res.model.ir_version == model.ir_version
    onnx.checker.check_model(res.model, full_check=True)
    assert_runs_like(model, res.model)


@pytest.mark.parametrize("opset", [7, 9, 11, 13, 17, NEWEST], ids=lambda o: f"opset{o}")
def test_opsets_channel_removal_stays_valid(opset):
    model = opset_model(opset)
    res = onnxprune.prune(model, pattern="channel", sparsity=0.5)
    onnx.checker.check_model(res.model, full_check=True)
    assert [(o.domain, o.version) for o in res.model.opset_import] == [("", opset)]
    assert_runs_like(model, res.model)
    # conv's 8 channels feed Flatten -> Gemm (coupled through Flatten's c -> c*H*W block) and
    # the Gemm's 10 feed the MatMul; every coupled tensor agrees, whatever was removed. The
    # MatMul's outputs are the graph output: never resized.
    s = {t.name: tuple(t.dims) for t in res.model.graph.initializer}
    conv, fc = s["conv.w"][0], s["fc.w"][0]
    assert s["conv.w"] == (conv, 4, 3, 3) and s["conv.b"] == (conv,)
    assert s["fc.w"] == (fc, conv * 36) and s["fc.b"] == (fc,) and s["mm.w"] == (fc, 6)
    assert (conv, fc) == (4, 5), "both groups halved (local scope, 0.5)"


# -- ai.onnx.ml and custom domains ------------------------------------------------------------
def ml_model(kind: str) -> onnx.ModelProto:
    r = B.rng(1)
    w = numpy_helper.from_array(r.standard_normal((16, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm")]
    if kind == "Normalizer":
        nodes.append(helper.make_node("Normalizer", ["h"], ["y"], domain="ai.onnx.ml",
                                      norm="L2", name="norm"))
        outputs = [vi("y", TensorProto.FLOAT, [2, 8])]
    else:
        nodes.append(helper.make_node(
            "LinearClassifier", ["h"], ["label", "score"], domain="ai.onnx.ml", name="clf",
            coefficients=[float(v) for v in r.standard_normal(24)], intercepts=[0.1, 0.0, -0.1],
            classlabels_ints=[0, 1, 2]))
        outputs = [vi("label", TensorProto.INT64, [2]), vi("score", TensorProto.FLOAT, [2, 3])]
    return model_for(nodes, [vi("x", TensorProto.FLOAT, [2, 16])], outputs, [w],
                     [helper.make_opsetid("", 17), helper.make_opsetid("ai.onnx.ml", 3)])


@pytest.mark.parametrize("kind", ["Normalizer", "LinearClassifier"])
def test_ai_onnx_ml_node_after_matmul(kind):
    model = ml_model(kind)
    res = onnxprune.prune(model, sparsity=0.5)
    assert zeros(arrays(res.model)["W"]) == 64
    assert res.report.comparison is not None  # onnxruntime ran both models (it has ai.onnx.ml)
    assert {(o.domain, o.version) for o in res.model.opset_import} == {("", 17),
                                                                         ("ai.onnx.ml", 3)}
    ml_nodes = [n for n in res.model.graph.node if n.domain == "ai.onnx.ml"]
    assert [n.SerializeToString() for n in ml_nodes] == [
        n.SerializeToString() for n in model.graph.node if n.domain == "ai.onnx.ml"]
    assert_runs_like(model, res.model)


def test_ai_onnx_ml_consumer_freezes_channels():
    """No channel rule exists for ai.onnx.ml ops: the MatMul's output channels stay whole."""
    model = ml_model("Normalizer")
    res = onnxprune.prune(model, pattern="channel", sparsity=0.5)
    assert tuple(arrays(res.model)["W"].shape) == (16, 8)
    assert res.report.frozen
    assert_runs_like(model, res.model)


CUSTOM_DOMAIN = "com.example.unknown"


def custom_model() -> onnx.ModelProto:
    w = numpy_helper.from_array(B.rng(2).standard_normal((16, 8)).astype(np.float32), "W")
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
             helper.make_node("FancyAct", ["h"], ["y"], domain=CUSTOM_DOMAIN, name="fancy")]
    return model_for(nodes, [vi("x", TensorProto.FLOAT, [2, 16])],
                     [vi("y", TensorProto.FLOAT, [2, 8])], [w],
                     [helper.make_opsetid("", 17), helper.make_opsetid(CUSTOM_DOMAIN, 1)])


def test_custom_domain_checker_passes_onnxruntime_cannot_load():
    model = custom_model()
    onnx.checker.check_model(model, full_check=True)
    import onnxruntime as ort

    with pytest.raises(Exception, match="FancyAct"):
        ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_custom_domain_pruned_without_validation():
    model = custom_model()
    res = onnxprune.prune(model, sparsity=0.5, validate=False)
    assert zeros(arrays(res.model)["W"]) == 64
    assert res.report.comparison is None
    assert any(n.domain == CUSTOM_DOMAIN and n.op_type == "FancyAct" for n in res.model.graph.node)
    onnx.checker.check_model(res.model, full_check=True)


def test_custom_domain_with_validation_is_checked_and_noted():
    res = onnxprune.prune(custom_model(), sparsity=0.5)
    assert res.report.comparison is None
    assert any("onnxruntime cannot load the input model" in n for n in res.report.notes)
    onnx.checker.check_model(res.model, full_check=True)


def test_custom_domain_cli_writes_checked_model_and_says_it_was_not_run(tmp_path):
    path = tmp_path / "custom.onnx"
    onnx.save(custom_model(), str(path))
    res = CliRunner().invoke(main, [str(path)])
    assert res.exit_code == 0, res.output
    assert "onnxruntime cannot load the input model" in " ".join(res.output.split())
    onnx.checker.check_model(str(tmp_path / "custom.pruned.onnx"), full_check=True)
    res = CliRunner().invoke(main, [str(path), "--max-error", "0.1", "-o", str(tmp_path / "g.onnx")])
    assert res.exit_code == 1 and "cannot be measured" in res.output
    assert not (tmp_path / "g.onnx").exists()


# -- QDQ --------------------------------------------------------------------------------------
def qdq_float_model(probe: bool = False) -> onnx.ModelProto:
    """float cw -> QuantizeLinear -> DequantizeLinear -> Conv; with ``probe`` the dequantized
    weight is also a graph output (the test adds it to the pruned model to read what the Conv
    really sees: a weight that is also a graph output is left alone)."""
    r = B.rng(3)
    inits = [numpy_helper.from_array(r.standard_normal((8, 4, 3, 3)).astype(np.float32), "cw"),
             numpy_helper.from_array(np.array(0.02, np.float32), "s"),
             numpy_helper.from_array(np.array(0, np.int8), "zp")]
    nodes = [helper.make_node("QuantizeLinear", ["cw", "s", "zp"], ["cwq"], name="q"),
             helper.make_node("DequantizeLinear", ["cwq", "s", "zp"], ["cwd"], name="dq"),
             helper.make_node("Conv", ["x", "cwd"], ["y"], pads=[1, 1, 1, 1], name="conv")]
    return model_for(nodes, [vi("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                     [vi("y", TensorProto.FLOAT, [1, 8, 6, 6])] +
                     ([vi("cwd", TensorProto.FLOAT, [8, 4, 3, 3])] if probe else []), inits,
                     [helper.make_opsetid("", 17)])


def _probe(model: onnx.ModelProto) -> onnx.ModelProto:
    probed = onnx.ModelProto()
    probed.CopyFrom(model)
    probed.graph.output.append(vi("cwd", TensorProto.FLOAT, [8, 4, 3, 3]))
    return probed


def test_qdq_float_weight_pruned_and_zeros_survive_dequantize():
    model = qdq_float_model(probe=True)
    res = onnxprune.prune(qdq_float_model(), sparsity=0.5, resize=False)
    a = arrays(res.model)
    assert zeros(a["cw"]) == 144
    assert [r.name for r in res.report.rows] == ["cw"]
    np.testing.assert_array_equal(a["s"], np.float32(0.02))
    np.testing.assert_array_equal(a["zp"], np.int8(0))
    x = {"x": np.ones((1, 4, 6, 6), np.float32)}
    dequantized = run_model(_probe(res.model), x)["cwd"]
    # every pruned element reaches the Conv as an exact 0 (zero -> zero point -> 0); kept ones
    # whose magnitude is under half a quantization step also round to 0, as they did before
    np.testing.assert_array_equal(dequantized[a["cw"] == 0], 0.0)
    original = run_model(model, x)["cwd"]
    kept = a["cw"] != 0
    np.testing.assert_array_equal(dequantized[kept], original[kept])
    assert [n.op_type for n in res.model.graph.node] == ["QuantizeLinear", "DequantizeLinear",
                                                         "Conv"]


def test_qdq_weight_that_is_also_a_graph_output_is_left_alone():
    # the dequantized weight is an output too: pruning cw would change it silently
    with pytest.raises(SelectionError,
                       match="cw: also read by graph output 'cwd'"):
        onnxprune.prune(qdq_float_model(probe=True), sparsity=0.5, resize=False)


def int8_conv_nodes(prefix: str, r, zero_point: int = 3):
    """An int8 Conv weight behind DequantizeLinear; with a nonzero zero point onnxprune leaves
    it alone (ops/quant.py: only zero point 0 is pruned)."""
    q = r.integers(-127, 128, (8, 4, 3, 3)).astype(np.int8)
    inits = [numpy_helper.from_array(q, f"{prefix}q"),
             numpy_helper.from_array(np.array(0.02, np.float32), f"{prefix}s"),
             numpy_helper.from_array(np.array(zero_point, np.int8), f"{prefix}zp")]
    nodes = [helper.make_node("DequantizeLinear", [f"{prefix}q", f"{prefix}s", f"{prefix}zp"],
                              [f"{prefix}d"], name=f"{prefix}dq")]
    return nodes, inits


def test_int8_weight_behind_dequantize_is_skipped_with_reason():
    r = B.rng(4)
    nodes, inits = int8_conv_nodes("cw", r)
    nodes.append(helper.make_node("Conv", ["x", "cwd"], ["c"], pads=[1, 1, 1, 1], name="conv"))
    nodes.append(helper.make_node("Flatten", ["c"], ["f"], name="flat"))
    nodes.append(helper.make_node("MatMul", ["f", "W"], ["y"], name="mm"))
    inits.append(numpy_helper.from_array(r.standard_normal((288, 5)).astype(np.float32), "W"))
    model = model_for(nodes, [vi("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                      [vi("y", TensorProto.FLOAT, [1, 5])], inits, [helper.make_opsetid("", 17)])
    res = onnxprune.prune(model, sparsity=0.5, resize=False)
    skipped = dict(res.report.skipped)
    assert skipped["cwq"].startswith("INT8 weight: its zero point is not 0")
    a, before = arrays(res.model), arrays(model)
    assert a["cwq"].dtype == np.int8 and np.array_equal(a["cwq"], before["cwq"])
    assert zeros(a["W"]) == 720
    assert [r.name for r in res.report.rows] == ["W"]


def test_symmetric_int8_weight_behind_dequantize_is_pruned_in_zero_point_terms():
    r = B.rng(4)
    nodes, inits = int8_conv_nodes("cw", r, zero_point=0)
    nodes.append(helper.make_node("Conv", ["x", "cwd"], ["y"], pads=[1, 1, 1, 1], name="conv"))
    model = model_for(nodes, [vi("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                      [vi("y", TensorProto.FLOAT, [1, 8, 6, 6])], inits,
                      [helper.make_opsetid("", 17)])
    res = onnxprune.prune(model, sparsity=0.5, resize=False)
    a, before = arrays(res.model), arrays(model)
    assert a["cwq"].dtype == np.int8 and zeros(a["cwq"]) == 144  # the zero point, half of 288
    kept = a["cwq"] != 0
    assert np.array_equal(a["cwq"][kept], before["cwq"][kept])
    assert [n.op_type for n in res.model.graph.node] == ["DequantizeLinear", "Conv"]


def int8_only_model() -> onnx.ModelProto:
    nodes, inits = int8_conv_nodes("cw", B.rng(5))
    nodes.append(helper.make_node("Conv", ["x", "cwd"], ["y"], pads=[1, 1, 1, 1], name="conv"))
    return model_for(nodes, [vi("x", TensorProto.FLOAT, [1, 4, 6, 6])],
                     [vi("y", TensorProto.FLOAT, [1, 8, 6, 6])], inits,
                     [helper.make_opsetid("", 17)])


def test_int8_only_model_refused_as_nothing_to_prune():
    with pytest.raises(SelectionError, match="no prunable weights"):
        onnxprune.prune(int8_only_model())


def test_int8_only_model_error_names_the_quantized_weight():
    with pytest.raises(SelectionError, match="cwq"):
        onnxprune.prune(int8_only_model())


def test_nan_weight_left_alone_by_channel_pattern_too():
    model = B.conv_gemm_model()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[3, 0, 0, 0] = np.nan
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "conv.w"))
    assert "conv.w" in dict(onnxprune.prune(model, sparsity=0.5).report.skipped)  # as it is
    res = onnxprune.prune(model, pattern="channel", sparsity=0.5)
    assert "conv.w" in dict(res.report.skipped)


# -- fp16 and bf16 ----------------------------------------------------------------------------
def test_fp16_fixture_keeps_dtype_casts_and_exact_counts(models_dir):
    path = models_dir / "mobilenetv3_block_fp16.onnx"
    original = onnx.load(str(path))
    res = onnxprune.prune(path, sparsity=0.5, resize=False)
    before, after = arrays(original), arrays(res.model)
    assert len(res.report.rows) == 24
    for row in res.report.rows:
        assert after[row.name].dtype == np.float16, row.name
        assert zeros(after[row.name]) == round(0.5 * after[row.name].size), row.name
        kept = after[row.name] != 0
        # kept values are the original fp16 bits, untouched by a trip through float32
        assert np.array_equal(after[row.name][kept].view(np.uint16),
                              before[row.name][kept].view(np.uint16)), row.name
    for t_before, t_after in zip(original.graph.initializer, res.model.graph.initializer):
        assert (t_before.name, t_before.data_type) == (t_after.name, t_after.data_type)
    casts = [n for n in res.model.graph.node if n.op_type == "Cast"]
    assert len(casts) == len([n for n in original.graph.node if n.op_type == "Cast"]) == 96
    assert_runs_like(path, res.model)


def test_bf16_weight_keeps_dtype_and_bits():
    r = B.rng(6)
    values = r.standard_normal((16, 8)).astype(ml_dtypes.bfloat16)
    wb = numpy_helper.from_array(values, "Wb")
    assert wb.data_type == TensorProto.BFLOAT16
    nodes = [helper.make_node("Cast", ["Wb"], ["W"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    model = model_for(nodes, [vi("x", TensorProto.FLOAT, [2, 16])],
                      [vi("y", TensorProto.FLOAT, [2, 8])], [wb], [helper.make_opsetid("", 17)])
    res = onnxprune.prune(model, sparsity=0.75, resize=False)
    (tensor,) = res.model.graph.initializer
    assert tensor.data_type == TensorProto.BFLOAT16
    after = numpy_helper.to_array(tensor)
    assert after.dtype == ml_dtypes.bfloat16
    assert zeros(after) == 96
    kept = after != 0
    assert np.array_equal(after[kept].view(np.uint16), values[kept].view(np.uint16))
    assert_runs_like(model, res.model)

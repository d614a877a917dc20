"""Calibration rows for a recurrent ``R``: the previous hidden states, rebuilt from ``Y`` shifted
by one step per direction (calibration/extract.py ``RecurrentStateExtractor``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune import prune
from onnxprune.calibration.extract import activation_rows, extractor_for
from onnxprune.model.io import load
from onnxprune.ops.weights import find_weights
from onnxprune.runtime.session import run_model

SEQ, BATCH, FEAT, H = 5, 3, 4, 8


def rnn_model(direction: str, initial: bool = False, layout: int = 0, op: str = "RNN",
              batch_major: bool = False):
    """x -> one RNN/GRU node (W, R, B, [initial_h]) with its Y as the graph output; with
    ``batch_major`` x is ``[batch, seq, feat]``, transposed for the op."""
    rng = np.random.default_rng(0)
    dirs = 2 if direction == "bidirectional" else 1
    gates = {"RNN": 1, "GRU": 3, "LSTM": 4}[op]
    inits = [numpy_helper.from_array(rng.standard_normal((dirs, gates * H, FEAT)).astype(np.float32)
                                     * 0.5, "W"),
             numpy_helper.from_array(rng.standard_normal((dirs, gates * H, H)).astype(np.float32)
                                     * 0.5, "R"),
             numpy_helper.from_array(rng.standard_normal((dirs, 2 * gates * H)).astype(np.float32)
                                     * 0.3, "B")]
    ins = ["x", "W", "R", "B"]
    if initial:
        shape = (BATCH, dirs, H) if layout else (dirs, BATCH, H)
        inits.append(numpy_helper.from_array(rng.standard_normal(shape).astype(np.float32), "h0"))
        ins += ["", "h0"]
    nodes = [helper.make_node(op, ins, ["Y"], hidden_size=H, direction=direction,
                              layout=layout)]
    xshape = [BATCH, SEQ, FEAT] if layout else [SEQ, BATCH, FEAT]
    if batch_major:
        nodes.insert(0, helper.make_node("Transpose", ["xb"], ["x"], perm=[1, 0, 2]))
        xshape = ["batch", SEQ, FEAT]
    x_in = helper.make_tensor_value_info("xb" if batch_major else "x", TensorProto.FLOAT, xshape)
    graph = helper.make_graph(nodes, "rnn", [x_in],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT,
                                                             [SEQ, None, None, H])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    model.ir_version = 8
    return model


def _weights(model):
    weights, _ = find_weights(load(model))
    return {w.name: w for w in weights}


@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
@pytest.mark.parametrize("layout", [0])  # onnxruntime runs no layout=1 recurrent op
def test_state_rows_reproduce_the_recurrence(direction, layout):
    """tanh(X_W W^T + X_R R^T + Wb + Rb) is Y, row by row, for every direction: the R rows are
    exactly the states each step reads, aligned with W's rows."""
    model = rnn_model(direction, layout=layout)
    x = np.random.default_rng(1).standard_normal(
        (BATCH, SEQ, FEAT) if layout else (SEQ, BATCH, FEAT)).astype(np.float32)
    y = run_model(model, {"x": x})["Y"]
    ws = _weights(model)
    xr = activation_rows(ws["R"], y)  # [dirs, SEQ*BATCH, H]
    xw = activation_rows(ws["W"], x)[0]  # [rows, FEAT] (every (step, batch) position)
    if layout:  # W's rows follow x's [batch, seq] order; put both in step order
        xw = xw.reshape(BATCH, SEQ, FEAT).transpose(1, 0, 2).reshape(-1, FEAT)
    y4 = np.transpose(y, (1, 2, 0, 3)) if layout else y  # [seq, dirs, batch, H]
    W, R, B = (numpy_helper.to_array(t) for t in load(model).model.graph.initializer[:3])
    assert xr.shape == (W.shape[0], SEQ * BATCH, H)
    for d in range(W.shape[0]):
        pre = xw @ W[d].T + xr[d] @ R[d].T + B[d, :H] + B[d, H:]
        np.testing.assert_allclose(np.tanh(pre), y4[:, d].reshape(-1, H), atol=1e-5)


def test_initial_state_rows_left_out():
    model = rnn_model("bidirectional", initial=True)
    x = np.random.default_rng(2).standard_normal((SEQ, BATCH, FEAT)).astype(np.float32)
    y = run_model(model, {"x": x})["Y"]
    w = _weights(model)["R"]
    xr = activation_rows(w, y)
    assert xr.shape == (2, (SEQ - 1) * BATCH, H)
    np.testing.assert_array_equal(xr[0], y[:-1, 0].reshape(-1, H))  # forward: steps 1.. read t-1
    np.testing.assert_array_equal(xr[1], y[1:, 1].reshape(-1, H))   # reverse: steps ..T-2 read t+1


def test_unnamed_y_has_no_rows():
    model = rnn_model("forward")
    node = model.graph.node[0]
    node.output[0] = ""
    node.output.append("Y_h")
    model.graph.output[0].name = "Y_h"
    w = _weights(model)["R"]
    ex, why = extractor_for(w, w.consumers[0])
    assert ex is None and why == ("RNN input 2 (R) reads the previous hidden state, taken from the "
                                  "op's output Y, which this node does not name")


def test_calibrated_pruning_reaches_r(tmp_path):
    """Layer-by-layer 2:4 with calibration now prunes a GRU's R on its recorded states (before,
    R was skipped: no activation rule for GRU input 2)."""
    model = rnn_model("bidirectional", op="GRU", batch_major=True)
    path = tmp_path / "gru.onnx"
    onnx.save(model, str(path))
    npz = tmp_path / "x.npz"
    np.savez(npz, xb=np.random.default_rng(3).standard_normal((16, SEQ, FEAT)).astype(np.float32))
    result = prune(str(path), pattern="2:4", criterion="sparsegpt", calibration=str(npz),
                   calibration_samples=12, validation_samples=4)
    rows = {r["name"]: r for r in result.report.to_dict()["rows"]}
    assert set(rows) == {"W", "R"}
    assert rows["R"]["criterion"] == "sparsegpt"
    assert rows["R"]["nonzeros_after"] == 2 * 3 * H * H // 2
    r = numpy_helper.to_array({t.name: t for t in result.model.graph.initializer}["R"])
    assert ((r.reshape(-1, 4) != 0).sum(axis=1) <= 2).all()
    assert not result.report.skipped

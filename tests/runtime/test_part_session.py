"""A session of a piece of an in-memory model holds only what the piece reads: a separate proto
with the piece's nodes and the initializers they read, so a segment or a trial does not
serialize every weight of the model; the handle's own proto is left as it was."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

import builders as B
from onnxprune.model.io import load
from onnxprune.runtime import session as runtime_session


def test_a_piece_session_holds_only_the_initializers_it_reads(monkeypatch):
    model = B.relu_mlp3(3)
    handle = load(model)
    seen = []
    real = runtime_session.open_session

    def spy(h):
        seen.append(sorted(t.name for t in h.model.graph.initializer))
        return real(h)

    monkeypatch.setattr(runtime_session, "open_session", spy)
    nodes = list(handle.model.graph.node)
    # the middle piece, fed at its cut (r1), giving r2
    sess = runtime_session.part_session(handle, nodes[2:4], [onnx.ValueInfoProto(name="r2")],
                                        [helper.make_tensor_value_info("r1", TensorProto.FLOAT,
                                                                       ["n", 6])])
    assert seen == [["W2"]]
    r1 = np.random.default_rng(0).standard_normal((4, 6)).astype(np.float32)
    w2 = numpy_helper.to_array(model.graph.initializer[1])
    np.testing.assert_allclose(sess.run(None, {"r1": r1})[0], np.maximum(r1 @ w2, 0),
                               rtol=1e-5, atol=1e-6)
    # the first piece with the graph's own inputs: W1 only
    sess = runtime_session.part_session(handle, nodes[:2], [onnx.ValueInfoProto(name="r1")])
    assert seen[-1] == ["W1"]
    assert [t.name for t in handle.model.graph.initializer] == ["W1", "W2", "W3"]
    assert [n.name for n in handle.model.graph.node] == ["mm1", "relu1", "mm2", "relu2", "mm3"]


def _constant_weight_mlp(tmp_path=None):
    """y = relu(relu(x @ A) @ B) @ C, x [n, 32]: A and B stored in ``Constant`` nodes (as
    paddle2onnx writes PP-OCR's weights), C an initializer — written with external data when
    ``tmp_path`` is given."""
    r = np.random.default_rng(3)
    vals = [r.standard_normal((32, 32)).astype(np.float32) for _ in range(3)]
    nodes = [helper.make_node("Constant", [], [name], name=f"const_{name}",
                              value=numpy_helper.from_array(v, name + "_value"))
             for name, v in (("A", vals[0]), ("B", vals[1]))]
    nodes += [helper.make_node("MatMul", ["x", "A"], ["h1"], name="mm1"),
              helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
              helper.make_node("MatMul", ["r1", "B"], ["h2"], name="mm2"),
              helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
              helper.make_node("MatMul", ["r2", "C"], ["y"], name="mm3")]
    vi = helper.make_tensor_value_info
    model = B.make_model(nodes, [vi("x", TensorProto.FLOAT, ["n", 32])],
                         [vi("y", TensorProto.FLOAT, ["n", 32])],
                         [numpy_helper.from_array(vals[2], "C")])
    if tmp_path is None:
        return model
    path = tmp_path / "mlp.onnx"
    onnx.save_model(model, str(path), save_as_external_data=True, location="mlp.data",
                    size_threshold=0)
    return str(path)


def _stored_zeros(path) -> dict:
    model = onnx.load(str(path))
    got = {t.name: t for t in model.graph.initializer}
    got.update({n.output[0]: n.attribute[0].t for n in model.graph.node
                if n.op_type == "Constant"})
    return {k: int(np.count_nonzero(numpy_helper.to_array(t) == 0)) for k, t in got.items()}


import pytest  # noqa: E402


@pytest.mark.parametrize("external", [False, True])
def test_calibrated_pruning_writes_weights_held_in_constant_nodes(tmp_path, external):
    """Layer-by-layer pruning opens piece sessions between its writes; a weight in a
    ``Constant`` node must still be written into the model that is saved (a piece built by
    swapping the graph's nodes for copies once detached every later write: the saved model
    came out dense while the report said 50 %)."""
    from onnxprune.api import prune

    model = _constant_weight_mlp(tmp_path if external else None)
    x = np.random.default_rng(4).standard_normal((48, 32)).astype(np.float32)
    out = tmp_path / "pruned.onnx"
    result = prune(model, output=out, pattern="unstructured", sparsity=0.5,
                   criterion="sparsegpt", allocate="uniform", calibration={"x": x},
                   calibration_samples=32, validation_samples=16)
    zeros = _stored_zeros(out)
    rows = {r.name: r for r in result.report.rows}
    assert set(rows) == {"A", "B", "C"}
    for name, row in rows.items():
        assert row.params - row.nonzeros_after >= 512  # half of 32 x 32 (or a dead channel)
        assert zeros[name] == row.params_after - row.nonzeros_after, name


def test_a_result_the_model_does_not_hold_is_an_internal_error():
    """verify_layers finds the weights again from the graph and counts what is stored: a
    record the model does not match stops the run before anything is written."""
    from onnxprune.ops.weights import find_weights
    from onnxprune.passes.base import LayerResult, PruneState, verify_layers

    state = PruneState.from_model(_constant_weight_mlp())
    w = {w.name: w for w in find_weights(state.handle)[0]}["A"]
    state.layers[w.key] = LayerResult(key=w.key, name="A", op_type="MatMul", shape=(32, 32),
                                      numel=1024, nonzeros_before=1024, nonzeros_after=512,
                                      pattern="unstructured", criterion="magnitude")
    with pytest.raises(RuntimeError, match="internal error: weight 'A' should hold 512 "
                                           "nonzeros after pruning, but the model holds 1024"):
        verify_layers(state)
    values = state.handle.read(w.tensor).copy()
    values.reshape(-1)[:512] = 0
    state.handle.write(w.tensor, values)
    verify_layers(state)  # now it holds what the record says
    # a record whose shape lags behind the model (all-zero channels removed through another
    # object) is brought up to date, not an error
    kept = values[:, :31] if values.shape == (32, 32) else values
    state.handle.write(w.tensor, kept)
    state.layers[w.key] = LayerResult(key=w.key, name="A", op_type="MatMul", shape=(32, 32),
                                      numel=1024, nonzeros_before=1024,
                                      nonzeros_after=int(np.count_nonzero(kept)),
                                      pattern="unstructured", criterion="magnitude")
    verify_layers(state)
    assert state.layers[w.key].shape_after == (32, 31)
    # fewer nonzeros than recorded (a later pass zeroed a dead channel in place): updated too
    fewer = kept.copy()
    fewer[fewer != 0] = 0  # every value gone
    state.handle.write(w.tensor, fewer)
    verify_layers(state)
    assert state.layers[w.key].nonzeros_after == 0

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

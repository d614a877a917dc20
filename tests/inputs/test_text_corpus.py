"""Token inputs on the real text models of the corpus (``tools/fetch_corpus.py --only text``; each
test skips when its model is not cached): every input's role as the graph says, generated feeds
that onnxruntime runs to finite outputs, and an int64 ids calibration on a real BiGRU encoder."""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
import pytest
from onnx import numpy_helper

from onnxprune import prune
from onnxprune.inputs.generate import make_inputs
from onnxprune.inputs.roles import input_roles

#: corpus model -> ({input: (role, high, or a mask's attend value)}, --input-shape dim bindings;
#: khmersm's export bakes batch 1 into its attention reshapes). The romanizer's src_mask is
#: ``ids == pad`` (true hides), khmersm's mask is true where a character is.
TEXT = {
    "text/minilm/model": ({"input_ids": ("ids", 30522), "attention_mask": ("mask", None),
                           "token_type_ids": ("type", None)}, {"batch": 2, "sequence": 9}),
    "text/dksplit/dksplit-int8": ({"chars": ("ids", 38)}, {"batch_size": 2, "seq_len": 11}),
    "text/romanizer/encoder": ({"src": ("ids", 160), "src_mask": ("mask", 0)},
                               {"batch": 2, "src_len": 7}),
    "text/romanizer/decoder": ({"prefix": ("ids", 160), "memory": ("plain", None),
                                "src_mask": ("mask", 0), "hidden": ("plain", None)},
                               {"batch": 2, "src_len": 7, "tgt_len": 3}),
    "text/khmersm/model": ({"x": ("ids", 126), "mask": ("mask", None)}, {"batch": 1, "seq": 13}),
    "text/text2tashkeel/rawi_v2.int8": ({"input": ("ids", 236)}, {"batch": 2, "seq": 10}),
}


@pytest.mark.parametrize("name", sorted(TEXT))
def test_roles_and_generated_feeds_on_real_models(corpus_model, name):
    path = corpus_model(name)
    expected, shapes = TEXT[name]
    roles = input_roles(str(path))
    assert {k: (r.kind, r.fill if r.kind == "mask" else r.high)
            for k, r in roles.items()} == {k: (v[0], 1 if v == ("mask", None) else v[1])
                                           for k, v in expected.items()}
    feed = make_inputs(str(path), shapes, seed=1)
    batch = shapes.get("batch", shapes.get("batch_size"))
    for key, (kind, high) in expected.items():
        if kind == "ids":
            assert feed[key].min() >= 0 and feed[key].max() < high
        elif kind == "mask":
            assert (feed[key] == (1 if high is None else high)).all()
        assert feed[key].shape[0] == batch
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for out in session.run(None, feed):
        if np.issubdtype(out.dtype, np.floating):
            assert np.isfinite(out).all()


def test_ids_calibration_on_the_romanizer_bigru(corpus_model, tmp_path):
    """Real token ids in an .npz (int64 src, bool mask) calibrate a layer-by-layer 2:4 pruning of
    a real model whose sequence length is symbolic; validation runs on held-out samples."""
    path = corpus_model("text/romanizer/encoder")
    rng = np.random.default_rng(0)
    src = rng.integers(33, 160, size=(12, 9)).astype(np.int64)  # past the special tokens
    npz = tmp_path / "names.npz"
    np.savez(npz, src=src, src_mask=np.zeros((12, 9), bool))  # src == pad: none
    result = prune(str(path), pattern="2:4", criterion="sparsegpt", calibration=str(npz),
                   calibration_samples=8, validation_samples=4, input_shapes={"src_len": 9})
    rows = [r for r in result.report.to_dict()["rows"] if r["pattern"] == "2:4"]
    assert rows and all(r["nonzeros_after"] * 2 == r["params"] for r in rows)
    comparison = result.state.comparison
    assert comparison.data_note == "4 calibration samples held out from the statistics"
    assert comparison.accuracy_estimate
    assert not any("data-free" in n for n in result.report.notes)
    stored = {t.name: t for t in result.model.graph.initializer}
    for row in rows:  # 2:4 along the input axis of each pruned Gemm/MatMul weight
        w = numpy_helper.to_array(stored[row["name"]])
        w = w.T if row["op_type"] == "MatMul" else w  # GRU W[dir, 3H, in]: the last axis is in
        assert ((w.reshape(-1, 4) != 0).sum(axis=1) <= 2).all()

"""Channel pruning on real models: fixtures in models/ and the cached corpus (skipped if absent).

For each model: resized == masked (exact), full checker pass, graph output shapes unchanged,
MACs and parameter count reduced when some group is prunable.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxprune.channels.graph import build_channel_graph
from onnxprune.channels.resize import mask_channels, resize_channels
from onnxprune.channels.select import select_channels
from onnxprune.model.io import iter_tensors, load
from onnxprune.report.macs import count_macs

# name -> (input shapes for dynamic dims, max freeze rate we accept: a regression guard)
FIXTURES = {
    "mobilenetv3_block": ({"input": [1, 3, 64, 64]}, 0.15),
    "mobilenetv3_block_fp16": ({"input": [1, 3, 64, 64]}, 0.15),
    "yolo_block": (None, 0.15),
    "transformer_mlp": (None, 0.4),
    "digits_cnn": ({"input": [1, 1, 8, 8]}, 0.25),
}
CORPUS = {
    "ppocr/ch_PP-OCRv4_det_infer": ({"x": [1, 3, 96, 96]}, 0.1),
    "ppocr/ch_PP-OCRv4_rec_infer": ({"x": [1, 3, 48, 160]}, 0.3),  # neck Reshape shape is computed at run time
    "ppocr/ch_ppocr_mobile_v2.0_cls_infer": ({"x": [1, 3, 48, 192]}, 0.1),
    "light/light_resnet50": (None, 0.05),
    "light/light_densenet121": (None, 0.05),
    "light/light_inception_v1": (None, 0.1),
    "light/light_inception_v2": (None, 0.05),
    "light/light_squeezenet": (None, 0.05),
    "light/light_shufflenet": (None, 1.0),  # channel shuffle couples everything (exactly)
}
SLOW = {
    "light/light_vgg19": (None, 0.1),
    "light/light_bvlc_alexnet": (None, 0.4),  # LRN mixes neighbouring channels: frozen
    "light/light_zfnet512": (None, 0.4),
}


def _feeds(model, shapes, seed=0):
    rng = np.random.default_rng(seed)
    inits = {t.name for t in model.graph.initializer}
    feeds = {}
    for vi in model.graph.input:
        if vi.name in inits:
            continue
        t = vi.type.tensor_type
        dims = (shapes or {}).get(vi.name) or [d.dim_value or 1 for d in t.shape.dim]
        if t.elem_type == onnx.TensorProto.INT64:
            feeds[vi.name] = rng.integers(0, 100, size=dims).astype(np.int64)
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    return feeds


def _run(model, feeds):
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), so,
                                providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _params(model):
    return sum(int(np.prod(t.dims)) for t in iter_tensors(model.graph))


def _check(path, shapes, max_freeze, sparsity):
    original = load(path).model
    handle = load(copy.deepcopy(original))
    graph = build_channel_graph(handle, shapes)
    assert graph.freeze_rate() <= max_freeze, graph.frozen()
    removed = select_channels(handle, graph, sparsity, round_to=8 if sparsity > 0.4 else 1)
    mask_channels(handle, removed, graph)
    masked = copy.deepcopy(handle.model)
    resize_channels(handle, graph, removed)
    resized = handle.model
    onnx.checker.check_model(resized, full_check=True)
    feeds = _feeds(original, shapes)
    want, got = _run(masked, feeds), _run(resized, feeds)
    for g, w, o in zip(got, want, _run(original, feeds)):
        assert g.shape == w.shape == o.shape
        # Removing channels reorders float sums; through ~100 layers and a softmax over 6625
        # classes (PP-OCR rec) that rounding reaches ~4e-5. Structural errors are O(1).
        scale = max(1.0, float(np.abs(w).max()))
        np.testing.assert_allclose(g, w, atol=1e-4 * scale, rtol=1e-3)
    if graph.prunable() and any(removed.values()):
        assert _params(resized) < _params(original)
        assert count_macs(resized, shapes).total < count_macs(original, shapes).total


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_fixture_models(models_dir, name, sparsity):
    path = models_dir / f"{name}.onnx"
    if not path.is_file():
        pytest.skip(f"{path} not made yet (tools/make_fixtures.py)")
    shapes, max_freeze = FIXTURES[name]
    _check(path, shapes, max_freeze, sparsity)


@pytest.mark.parametrize("sparsity", [0.3, 0.5])
@pytest.mark.parametrize("name", sorted(CORPUS))
def test_corpus_models(corpus_model, name, sparsity):
    shapes, max_freeze = CORPUS[name]
    _check(corpus_model(name), shapes, max_freeze, sparsity)


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("ONNXPRUNE_SLOW") != "1",
                    reason="VGG-19/AlexNet/ZFNet take ~100 s; set ONNXPRUNE_SLOW=1")
@pytest.mark.parametrize("name", sorted(SLOW))
def test_corpus_large_models(corpus_model, name):
    shapes, max_freeze = SLOW[name]
    _check(corpus_model(name), shapes, max_freeze, 0.3)

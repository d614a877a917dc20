"""A CI-sized slice of ``tools/corpus.py``: real exporter output from onnx's own test data
(``onnx/backend/test/data``: PyTorch-converted modules and the "simple" models), every pattern.

Each model x pattern must end in one of two ways: a valid output (onnx.checker, an onnxruntime
session, the same output names/shapes/dtypes as the original on the same generated inputs, the
input file untouched), or an :class:`~onnxprune.OnnxPruneError` with the expected reason. Any
other exception is a bug. The installed onnx wheel ships no If/Loop/Scan or RNN model in these
collections (``node/`` is not installed), so subgraphs and RNNs are covered by the built models of
``test_prune_api.py``/``test_model_variety.py`` instead.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune import OnnxPruneError
from onnxprune.inputs.generate import make_inputs
from onnxprune.runtime.session import run_model


def _test_data() -> Path:
    from importlib import resources

    return Path(str(resources.files("onnx") / "backend" / "test" / "data"))


DATA = _test_data()
PATTERNS = {  # id -> (pattern, sparsity), the corpus matrix
    "unstructured-0.5": ("unstructured", 0.5),
    "unstructured-0.9": ("unstructured", 0.9),
    "4x1-0.8": ("4x1", 0.8),
    "2:4": ("2:4", None),
    "channel-0.3": ("channel", 0.3),
}
NO_WEIGHTS = "no prunable weights"
#: An input onnxruntime cannot load (opset-6 Gemm with broadcast=1 has no kernel): pruned, held to
#: the checker only, and the report says the model was not run.
UNRUNNABLE = "unrunnable"

#: model -> expected outcome: "ok", UNRUNNABLE, or a substring of the OnnxPruneError message.
MODELS = {
    "pytorch-converted/test_Conv1d_groups": "ok",                      # Conv1d, group=2
    "pytorch-converted/test_Conv2d_depthwise_with_multiplier": "ok",   # depthwise, multiplier 2
    "pytorch-converted/test_Conv2d_no_bias": "ok",
    "pytorch-converted/test_Conv3d_dilated_strided": "ok",             # 5-D weight
    "pytorch-converted/test_ConvTranspose2d": "ok",                    # [Cin, Cout/g, kh, kw]
    "pytorch-operator/test_operator_convtranspose": "ok",
    "pytorch-converted/test_Linear": UNRUNNABLE,                       # Gemm opset 6
    "pytorch-converted/test_Linear_no_bias": "ok",                     # W -> Transpose -> MatMul
    "pytorch-converted/test_Embedding": NO_WEIGHTS,                    # Gather table: not pruned
    "pytorch-converted/test_BatchNorm2d_eval": NO_WEIGHTS,
    "simple/test_sequence_model3": NO_WEIGHTS,                         # sequence ops + initializers
    "simple/test_gradient_of_add": NO_WEIGHTS,                         # ai.onnx.preview.training
}


#: (model, pattern) pairs whose outcome differs from the model's: 2:4 cannot be laid on a conv
#: whose input channels are not a multiple of 4 (as sparse kernels read it), and these models'
#: only convs have 1-3 input channels per group.
NM_MISFIT = "multiples of 4"
PER_PATTERN = {(m, "2:4"): NM_MISFIT for m in (
    "pytorch-converted/test_Conv1d_groups", "pytorch-converted/test_Conv2d_depthwise_with_multiplier",
    "pytorch-converted/test_Conv2d_no_bias", "pytorch-converted/test_Conv3d_dilated_strided",
    "pytorch-converted/test_ConvTranspose2d", "pytorch-operator/test_operator_convtranspose")}


def _cases():
    for model, expected in MODELS.items():
        for pid in PATTERNS:
            yield pytest.param(model, pid, PER_PATTERN.get((model, pid), expected),
                               id=f"{model.split('/')[1].removeprefix('test_')}-{pid}")


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def reference():
    """Original outputs on generated inputs, once per model."""
    cache = {}

    def get(path: Path):
        if path not in cache:
            feeds = make_inputs(path, seed=0)
            cache[path] = (feeds, run_model(path, feeds))
        return cache[path]

    return get


@pytest.mark.parametrize("model,pattern_id,expected", list(_cases()))
def test_corpus_model(model, pattern_id, expected, tmp_path, reference):
    path = DATA / model / "model.onnx"
    if not path.is_file():
        pytest.skip(f"{path} is not in this onnx wheel")
    pattern, sparsity = PATTERNS[pattern_id]
    out = tmp_path / "pruned.onnx"
    digest = _sha256(path)
    try:
        result = onnxprune.prune(path, pattern=pattern, sparsity=sparsity, output=out)
    except OnnxPruneError as exc:
        assert expected != "ok", f"expected a pruned model, got {type(exc).__name__}: {exc}"
        assert expected in str(exc)
        assert not out.exists()
        return
    assert expected in ("ok", UNRUNNABLE), f"expected a refusal ({expected!r}), got a model"
    assert _sha256(path) == digest
    onnx.checker.check_model(str(out), full_check=True)
    if expected == UNRUNNABLE:
        assert any("onnxruntime cannot load the input model" in n for n in result.report.notes)
        assert result.report.comparison is None
        return
    ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    feeds, want = reference(path)
    got = run_model(out, feeds)
    assert list(got) == list(want)
    for name in want:
        assert (got[name].shape, got[name].dtype) == (want[name].shape, want[name].dtype)
    report = result.report
    assert report.comparison is not None
    if pattern == "unstructured":  # exact, per weight (these weights hold no zeros before)
        for row in report.rows:
            target = round(sparsity * row.params)
            if row.shape_after == row.shape:
                assert row.params - row.nonzeros_after == target, row.name
            else:  # dead channels were removed on top: zeros + removed reach the target
                assert row.params - row.nonzeros_after >= target, row.name
    elif pattern == "channel":
        # These models' prunable conv writes the graph output, whose shape never changes:
        # the group is left whole and listed, nothing is pruned.
        assert report.rows == [] and report.frozen
    else:
        assert report.rows
        for w in result.state.weights:
            m = w.layout.to_2d(result.state.handle.read(w.tensor)) != 0
            if pattern == "2:4":  # full groups of 4 along `in` keep exactly 2; a tail keeps <= 2
                full = m.shape[1] - m.shape[1] % 4
                groups = m[:, :full].reshape(m.shape[0], -1, 4).sum(axis=2)
                assert (groups == 2).all(), w.name
                assert (m[:, full:].sum(axis=1) <= 2).all(), w.name
            else:  # 4x1: 4 consecutive output rows x 1 input element (a ragged last block of
                # fewer rows), all kept or all zero
                for start in range(0, m.shape[0], 4):
                    block = m[start:start + 4]
                    assert (block.all(axis=0) | ~block.any(axis=0)).all(), w.name
                assert m.size - m.sum() >= round(sparsity * m.size), w.name

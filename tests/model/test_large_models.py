"""Large models on small inputs: the streaming global threshold equals the in-memory one, a tiny
memory budget (every streaming path) writes the same bytes as the default, rewritten external
tensors live in a spill file that is cleaned up, and saving copies tensor bytes without
materializing them. The >2 GB run itself is tools/bench_scale.py (not a test)."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import ml_dtypes
import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper
from onnx.external_data_helper import ExternalDataInfo

import builders as B
from onnxprune.model import external as ext
from onnxprune.model import io as mio
from onnxprune.report.macs import count_macs
from onnxprune.passes.base import DEFAULT_MEMORY_BUDGET, PruneState
from onnxprune.passes.masking import ApplyMasks, ScoreWeights
from onnxprune.passes.weights import FindWeights, SelectWeights
from onnxprune.masking.scope import UnitLayer, allocate_global, global_cut


# -- streaming global threshold == in-memory ----------------------------------------------------

def _layers(rng, n_layers, unit_max, tie_levels, dtypes):
    layers = []
    for _ in range(n_layers):
        n = int(rng.integers(0, 80))
        if tie_levels:
            scores = rng.integers(0, tie_levels, n).astype(np.float64)
        else:
            scores = rng.random(n) * 10.0 ** rng.integers(-3, 3)
        dtype = dtypes[int(rng.integers(0, len(dtypes)))]
        if dtype == np.float64 and rng.random() < 0.5:
            scores = scores + rng.integers(0, 3, n) * 1e-13  # differ below float32 precision
        counts = rng.integers(0, unit_max + 1, n)
        total = int(counts.sum())
        lo = int(rng.integers(0, total + 1)) if rng.random() < 0.3 else 0
        hi = int(rng.integers(0, total + 1)) if rng.random() < 0.5 else 1 << 62
        layers.append(UnitLayer(scores.astype(dtype), counts, lo, hi))
    return layers


def _streamed(layers, need, max_candidates):
    loads = []

    def load(i):
        loads.append(i)
        return layers[i]

    cut = global_cut(load, len(layers), need, max_candidates=max_candidates)
    assert loads[: len(layers)] == list(range(len(layers)))  # every pass goes in layer order
    return [cut.mask(i, layer) for i, layer in enumerate(layers)]


@pytest.mark.parametrize("unit_max", [1, 4])  # elements (0/1 counts) and blocks/rows
@pytest.mark.parametrize("tie_levels", [None, 3, 40])
@pytest.mark.parametrize("dtypes", [(np.float32,), (np.float16, np.float32),
                                    (np.float32, np.float64)])
def test_streaming_global_equals_in_memory(unit_max, tie_levels, dtypes):
    rng = np.random.default_rng(hash((unit_max, tie_levels, len(dtypes))) % 2**32)
    for trial in range(12):
        layers = _layers(rng, int(rng.integers(0, 6)), unit_max, tie_levels, dtypes)
        total = sum(int(np.sum(l.unit_counts)) for l in layers)
        need = int(rng.integers(-2, total + 3))
        want = allocate_global(layers, need)
        # 0 and 1 force the narrowing passes down to one exact value and its ties.
        for max_candidates in (0, 1, 7, 1 << 22):
            got = _streamed(layers, need, max_candidates)
            for g, w in zip(got, want):
                assert np.array_equal(g, w), (trial, max_candidates)


def test_streaming_global_zeros_needed_can_come_after_the_first_pass():
    layers = [UnitLayer(np.arange(6, dtype=np.float32)[::-1].copy(), np.ones(6, np.uint8)),
              UnitLayer(np.full(4, 2.5, dtype=np.float32), np.ones(4, np.uint8), 0, 2)]
    seen = []

    def load(i):
        seen.append(i)
        return layers[i]

    cut = global_cut(load, 2, lambda: len(seen) + 3)  # called once both layers were seen: 5
    masks = [cut.mask(i, l) for i, l in enumerate(layers)]
    assert [m.tolist() for m in masks] == [
        [False, False, False, True, True, True], [True, True, False, False]]
    assert all(np.array_equal(a, b) for a, b in zip(masks, allocate_global(layers, 5)))


def test_streaming_global_rejects_invalid_scores():
    layers = [UnitLayer(np.array([1.0, np.nan], dtype=np.float32), np.ones(2, np.uint8))]
    with pytest.raises(ValueError):
        global_cut(layers.__getitem__, 1, 1)


# -- external-data models: tiny memory budget == default, byte for byte ------------------------

def _mlp(seed=0, width=24, layers=4, dtype=np.float32):
    """MatMul / Gemm(transB) / Conv-free stack with some exact ties and existing zeros."""
    rng = B.rng(seed)
    nodes, inits = [], []
    current = "x"
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    for i in range(layers):
        w = rng.standard_normal((width, width)).astype(dtype)
        w.ravel()[::7] = 0  # zeros already there count toward the target
        w.ravel()[3::11] = dtype(0.5)  # exact ties across layers
        inits.append(numpy_helper.from_array(w, f"w{i}"))
        out = f"h{i}" if i + 1 < layers else "y"
        if i % 2:
            inits.append(numpy_helper.from_array(np.zeros(width, dtype), f"b{i}"))
            nodes.append(helper.make_node("Gemm", [current, f"w{i}", f"b{i}"], [out], transB=1))
        else:
            nodes.append(helper.make_node("MatMul", [current, f"w{i}"], [out]))
        current = out
    return B.make_model(nodes, [helper.make_tensor_value_info("x", elem, [2, width])],
                        [helper.make_tensor_value_info("y", elem, [2, width])], inits)


def _save_external(model, path: Path) -> Path:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=0)
    return path


def _prune_to_bytes(src: Path, out: Path, budget: int, scope: str, select: dict,
                    scores=None) -> bytes:
    state = PruneState.from_model(src, memory_budget=budget)
    passes = [FindWeights(), SelectWeights(**select), ScoreWeights(user_scores=scores),
              ApplyMasks(scope=scope)]
    records = [p(state).record for p in passes]
    if budget <= 1:
        assert not state.unit_scores and not records[2].scores_held
    mio.save(state.handle, out)
    data = out.with_name(out.name + ".data")
    model_bytes = out.read_bytes()
    state.handle.close()
    return model_bytes + data.read_bytes()


@pytest.mark.parametrize("scope,select", [
    ("global", dict(sparsity=0.7, max_sparsity=0.75)),
    ("global", dict(sparsity=0.6, min_sparsity=0.4, criterion="random")),
    ("global", dict(pattern="4x1", sparsity=0.5)),
    ("global", dict(pattern="channel", sparsity=0.3, criterion="l2")),
    ("local", dict(sparsity=0.8)),
    ("local", dict(pattern="2:4")),
    ("local", dict(pattern="1x4", sparsity=0.5)),
])
def test_tiny_memory_budget_writes_the_same_bytes(tmp_path, scope, select):
    src = _save_external(_mlp(), tmp_path / "m.onnx")
    default = _prune_to_bytes(src, tmp_path / "a.onnx", DEFAULT_MEMORY_BUDGET, scope, select)
    streamed = _prune_to_bytes(src, tmp_path / "b.onnx", 1, scope, select)
    assert default.replace(b"a.onnx.data", b"b.onnx.data") == streamed


def test_tiny_memory_budget_with_user_scores(tmp_path):
    src = _save_external(_mlp(seed=3), tmp_path / "m.onnx")
    scores = {f"w{i}": np.abs(B.rng(i).standard_normal((24, 24))).astype(np.float32)
              for i in range(4)}
    select = dict(sparsity=0.5, criterion="scores")
    a = _prune_to_bytes(src, tmp_path / "a.onnx", DEFAULT_MEMORY_BUDGET, "global", select,
                        scores)
    b = _prune_to_bytes(src, tmp_path / "b.onnx", 1, "global", select, scores)
    assert a.replace(b"a.onnx.data", b"b.onnx.data") == b


def test_scores_held_only_when_they_all_fit(tmp_path):
    src = _save_external(_mlp(), tmp_path / "m.onnx")
    for budget, held in ((1 << 20, True), (4 * 24 * 24 * 2, False)):
        state = PruneState.from_model(src, memory_budget=budget)
        for p in (FindWeights(), SelectWeights(sparsity=0.5)):
            p(state)
        record = ScoreWeights()(state).record
        assert record.scores_held is held
        assert len(state.unit_scores) == (4 if held else 0)
        if not held:
            assert "recomputed while masking" in record.summary


# -- the spill: rewritten external tensors on disk, cleaned up --------------------------------

def _external_handle(tmp_path, model=None):
    src = _save_external(model or _mlp(), tmp_path / "m.onnx")
    handle = mio.load(src)
    return handle, {t.name: t for t in handle.model.graph.initializer}


@pytest.fixture
def spill_dir(tmp_path, monkeypatch):
    """tempfile's folder for the test: the spill must never show up in it."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_writes_spill_to_disk_and_are_read_back(tmp_path, spill_dir):
    handle, tensors = _external_handle(tmp_path)
    assert handle.spilled_bytes == 0 and handle.rewritten_external == 0
    new = np.arange(24 * 24, dtype=np.float32).reshape(24, 24)
    handle.write(tensors["w0"], new)
    assert handle.spilled_bytes >= new.nbytes
    assert list(spill_dir.iterdir()) == []  # an unnamed file: nothing to leave behind
    got = handle.read(tensors["w0"])
    np.testing.assert_array_equal(got, new)
    got[0, 0] = -1  # a fresh array: changing it changes nothing stored
    np.testing.assert_array_equal(handle.read(tensors["w0"]), new)
    assert handle.is_rewritten(tensors["w0"]) and not handle.is_rewritten(tensors["w1"])
    assert handle.rewritten_external == 1
    assert [t.name for t, _ in handle.rewritten_values()] == ["w0"]

    size = handle.spilled_bytes
    handle.write(tensors["w0"], new[:12])  # channels removed: fits the slot, no growth
    assert handle.spilled_bytes == size and list(tensors["w0"].dims) == [12, 24]
    np.testing.assert_array_equal(handle.read(tensors["w0"]), new[:12])
    handle.write(tensors["w0"], np.ones((30, 24), np.float32))  # bigger: a new slot
    np.testing.assert_array_equal(handle.read(tensors["w0"]), np.ones((30, 24)))

    spill = handle._external_updates._file
    handle.close()
    assert spill.closed and handle.spilled_bytes == 0 and not handle._external_updates


def test_spill_freed_when_the_handle_is_collected(tmp_path, spill_dir):
    handle, tensors = _external_handle(tmp_path)
    handle.write(tensors["w1"], np.zeros((24, 24), np.float32))
    spill = handle._external_updates._file
    assert not spill.closed
    del handle, tensors
    gc.collect()
    assert spill.closed


def test_killed_process_leaves_no_spill(tmp_path, spill_dir):
    src = _save_external(_mlp(), tmp_path / "m.onnx")
    code = (f"import os, numpy as np\nfrom onnxprune.model import io\nh = io.load({str(src)!r})\n"
            "h.write(h.model.graph.initializer[0], np.zeros((24, 24), np.float32))\n"
            "assert h.spilled_bytes > 0\nos.kill(os.getpid(), 9)\n")
    env = dict(os.environ, TMPDIR=str(spill_dir))
    proc = subprocess.run([sys.executable, "-c", code], env=env)
    assert proc.returncode == -9
    assert list(spill_dir.iterdir()) == []


def test_context_manager_frees_spill(tmp_path, spill_dir):
    src = _save_external(_mlp(), tmp_path / "m.onnx")
    with mio.load(src) as handle:
        handle.write(handle.model.graph.initializer[0], np.zeros((24, 24), np.float32))
        spill = handle._external_updates._file
        mio.save(handle, tmp_path / "out.onnx")
        assert not spill.closed  # saving keeps the handle usable
    assert spill.closed
    saved = onnx.load(str(tmp_path / "out.onnx"))
    assert not numpy_helper.to_array(saved.graph.initializer[0]).any()
    assert list(spill_dir.iterdir()) == []


@pytest.mark.parametrize("copy", ["kernel", "user space", "kernel then user space"])
def test_save_copies_untouched_tensors_byte_for_byte(tmp_path, monkeypatch, copy):
    if copy == "user space":
        monkeypatch.delattr(os, "copy_file_range", raising=False)
    elif copy == "kernel then user space" and hasattr(os, "copy_file_range"):
        real = os.copy_file_range

        def fails_midway(src, dst, count, offset_src=None, offset_dst=None):
            if offset_src % 4096:  # a second call for the same tensor: another file system
                raise OSError(18, "Invalid cross-device link")
            return real(src, dst, min(count, 100), offset_src)

        monkeypatch.setattr(os, "copy_file_range", fails_midway)
    handle, tensors = _external_handle(tmp_path)
    new = np.full((24, 24), 3.0, np.float32)
    handle.write(tensors["w2"], new)
    out = mio.save(handle, tmp_path / "out.onnx")
    src_data = (tmp_path / "m.onnx.data").read_bytes()
    out_data = (tmp_path / "out.onnx.data").read_bytes()
    saved = onnx.load(str(out), load_external_data=False)
    assert all(ext.is_external(t) for t in saved.graph.initializer)
    assert {ExternalDataInfo(t).location for t in saved.graph.initializer} == {"out.onnx.data"}
    for t in saved.graph.initializer:
        info = ExternalDataInfo(t)
        assert info.offset % 4096 == 0
        got = out_data[info.offset: info.offset + info.length]
        if t.name == "w2":
            assert got == new.tobytes()
        else:
            orig = ExternalDataInfo(tensors[t.name])
            assert got == src_data[orig.offset: orig.offset + orig.length], t.name
    # the handle still points at the input's data file, and reads the rewritten values
    assert all(ExternalDataInfo(t).location == "m.onnx.data"
               for t in handle.model.graph.initializer)
    np.testing.assert_array_equal(handle.read(tensors["w2"]), new)
    np.testing.assert_array_equal(numpy_helper.to_array(onnx.load(str(out)).graph.initializer[0]),
                                  numpy_helper.to_array(_mlp().graph.initializer[0]))


def test_save_streams_without_reading_tensors(tmp_path, monkeypatch):
    handle, tensors = _external_handle(tmp_path)
    handle.write(tensors["w0"], np.zeros((24, 24), np.float32))

    def no_reads(*args, **kwargs):
        raise AssertionError("save must copy bytes, not read arrays")

    monkeypatch.setattr(ext, "read_external", no_reads)
    monkeypatch.setattr(ext.SpillStore, "read", no_reads)
    mio.save(handle, tmp_path / "out.onnx")
    with mio.materialized(handle) as path:  # what Validate checks and runs
        assert isinstance(path, Path) and (path.parent / "model.onnx.data").is_file()


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16, np.float64])
def test_spill_and_save_keep_dtypes(tmp_path, dtype):
    model = _mlp()
    for t in model.graph.initializer:
        t.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(dtype), t.name))
    handle, tensors = _external_handle(tmp_path, model)
    values = (np.arange(24 * 24) % 5).astype(dtype).reshape(24, 24)
    handle.write(tensors["w1"], values)
    assert handle.read(tensors["w1"]).dtype == np.dtype(dtype)
    np.testing.assert_array_equal(handle.read(tensors["w1"]), values)
    out = mio.save(handle, tmp_path / "out.onnx")
    saved = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    assert saved["w1"].dtype == np.dtype(dtype)
    np.testing.assert_array_equal(saved["w1"], values)


def test_checker_and_macs_never_read_big_weights(tmp_path, monkeypatch):
    model = _mlp(width=96)  # 9216-element weights: past what weightless copies keep
    src = _save_external(model, tmp_path / "m.onnx")
    real = ext.read_external

    def small_only(tensor, base_dir):
        assert int(np.prod(tensor.dims)) <= mio._KEEP_VALUES, tensor.name
        return real(tensor, base_dir)

    monkeypatch.setattr(ext, "read_external", small_only)
    handle = mio.load(src)
    assert mio.check_input(handle)
    assert count_macs(src).total == 4 * 2 * 96 * 96
    assert count_macs(handle.model).total == 4 * 2 * 96 * 96

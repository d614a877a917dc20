"""The report as JSON and on the terminal."""

from __future__ import annotations

import io
import json
import os

import numpy as np
import pytest
from rich.console import Console

from onnxprune.report.report import LayerRow, Report, format_bytes, format_count
from onnxprune.report.compare import compare


def _rows():
    return [
        LayerRow("conv1.weight", "Conv", (64, 3, 3, 3), (64, 3, 3, 3), 1728, 1728, 1728, 864,
                 pattern="2:4", criterion="magnitude"),
        LayerRow("conv2.weight", "Conv", (128, 64, 3, 3), (96, 64, 3, 3), 73728, 55296, 73728,
                 55296, pattern="channel", criterion="l2", channels=(128, 96),
                 macs_before=1000, macs_after=750),
        LayerRow("fc.weight", "Gemm", (10, 2048), (10, 2048), 20480, 20480, 20000, 4096,
                 pattern="4x1", note="[classifier] kept dense rows"),
    ]


def _report(**overrides):
    ref = {"logits": np.array([[1, 2, 3], [4, 5, 6]], np.float32)}
    cand = {"logits": ref["logits"] + np.array([[0, 0, 0.5], [0, 0, -1]], np.float32)}
    kwargs = dict(
        model="resnet.onnx", output="resnet.pruned.onnx", rows=_rows(),
        skipped=[("emb.weight", "int8 weight (quantized or integer)")],
        frozen=[("lstm_group", "LSTM has no channel rule")],
        macs_before=4_089_184_256, macs_after=2_044_592_128, sparse_macs_after=1_000_000_000,
        params_before=95_936, params_after=77_504, nonzeros_before=95_456,
        nonzeros_after=60_256, file_size_before=102_400_000, file_size_after=51_200_000,
        comparison=compare(ref, cand),
        options={"pattern": "2:4", "max_error": 0.2, "ratio": np.float32(0.5)},
        notes=["folded 3 dead channels into consumer biases"],
        timings={"load": 0.12, "mask": np.float64(1.5)},
        sections={"sensitivity": [{"layer": "conv1.weight", "sparsity": 0.5, "error": 0.01}]})
    kwargs.update(overrides)
    return Report(**kwargs)


def test_row_sparsity():
    row = _rows()[0]
    assert row.sparsity_before == 0.0 and row.sparsity_after == 0.5
    assert _rows()[2].sparsity_before == pytest.approx(1 - 20000 / 20480)
    assert LayerRow("z", "Gemm", (0,), (0,), 0, 0, 0, 0).sparsity_after == 0.0


def test_to_dict_round_trips_through_json():
    report = _report()
    d = json.loads(json.dumps(report.to_dict(), allow_nan=False))
    for key in ("model", "output", "rows", "skipped", "frozen", "macs_before", "macs_after",
                "sparse_macs_after", "params_before", "params_after", "nonzeros_before",
                "nonzeros_after", "sparsity_before", "sparsity_after", "file_size_before",
                "file_size_after", "comparison", "options", "notes", "timings", "sections"):
        assert key in d, key
    assert d["rows"][1]["shape"] == [128, 64, 3, 3]
    assert d["rows"][1]["shape_after"] == [96, 64, 3, 3]
    assert d["rows"][1]["channels"] == [128, 96]
    assert d["rows"][0]["sparsity_after"] == 0.5
    assert d["skipped"] == [{"name": "emb.weight", "reason": "int8 weight (quantized or integer)"}]
    assert d["frozen"][0]["name"] == "lstm_group"
    assert d["options"]["ratio"] == 0.5 and d["timings"]["mask"] == 1.5
    assert d["sparsity_after"] == pytest.approx(1 - 60_256 / 77_504)
    out = d["comparison"]["outputs"][0]
    assert out["name"] == "logits" and out["max_abs"] == 1.0 and out["top1_agreement"] == 0.5
    assert d["sections"]["sensitivity"][0]["error"] == 0.01


def test_to_dict_without_optional_parts():
    d = json.loads(json.dumps(Report(model="m.onnx").to_dict(), allow_nan=False))
    assert d["comparison"] is None and d["rows"] == [] and d["macs_before"] is None


def test_write_json_is_atomic(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("old")
    _report().write_json(path)
    assert json.loads(path.read_text())["model"] == "resnet.onnx"
    assert os.listdir(tmp_path) == ["report.json"]  # no temporary file left behind


def _render(report, max_rows=60):
    console = Console(record=True, width=120, color_system=None, file=io.StringIO())
    report.render(console, max_rows=max_rows)
    return console.export_text()


def test_render_contains_layers_and_totals():
    text = _render(_report())
    for name in ("conv1.weight", "conv2.weight", "fc.weight", "[classifier]"):
        assert name in text
    assert "128→96×64×3×3" in text  # only the changed dim gets an arrow
    assert "128 → 96" in text  # channels
    assert "0.0% → 50.0%" in text  # conv1 sparsity
    assert "95.9K → 77.5K (×0.81)" in text  # params
    assert "4.09G → 2.04G (×0.50)" in text  # MACs
    assert "with sparse kernels: 1G" in text
    assert "97.7 MiB → 48.8 MiB (×0.50)" in text  # file size
    assert "logits" in text and "0.167" in text and "50.0%" in text  # validation row
    assert "ok" in text  # under the 0.2 gate
    assert "emb.weight" in text and "LSTM has no channel rule" in text
    assert "folded 3 dead channels" in text
    assert "sensitivity" in text
    assert "load 0.12s" in text


def test_render_marks_failed_outputs():
    report = _report(options={"max_error": 0.1})
    assert "(rel err > --max-error 0.1)" in _render(report)
    report = _report(comparison=compare({"y": np.ones(3)}, {"y": np.ones(2)}))
    assert "broken: shape 2 differs" in _render(report)


def test_render_long_table_shows_head_and_tail():
    rows = [LayerRow(f"layer{i:03d}", "MatMul", (8, 8), (8, 8), 64, 64, 64, 32)
            for i in range(100)]
    text = _render(_report(rows=rows), max_rows=10)
    assert "layer000" in text and "layer004" in text
    assert "layer095" in text and "layer099" in text
    assert "layer050" not in text
    assert "… 90 more" in text


def test_render_inspect_style_report_shows_single_values():
    rows = [LayerRow("w", "Gemm", (4, 4), (4, 4), 16, 16, 8, 8, pattern="2:4")]
    text = _render(Report(model="m.onnx", rows=rows, params_before=16, params_after=16,
                          nonzeros_before=8, nonzeros_after=8))
    assert "50.0%" in text and "→" not in text.split("weights")[0]


def test_format_helpers():
    assert format_count(999) == "999"
    assert format_count(1234) == "1.23K"
    assert format_count(25_557_032) == "25.6M"
    assert format_count(4_089_184_256) == "4.09G"
    assert format_count(None) == "—"
    assert format_bytes(512) == "512 B"
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(3 * (1 << 30)) == "3.0 GiB"

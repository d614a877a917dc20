"""The CLI: the main job end to end, and every bad input answered with exit 2 and nothing written."""

import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import numpy_helper

import builders as B
from onnxprune.cli import main


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(B.conv_gemm_model(), str(path))
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _files(folder):
    return sorted(p.name for p in folder.iterdir())


def test_prune_writes_default_output_and_report(model_file, tmp_path):
    res = invoke(model_file, "--pattern", "4x1", "--sparsity", "0.8", "--report",
                 tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    out = tmp_path / "net.pruned.onnx"
    assert out.is_file()
    pruned = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    w2d = pruned["conv.w"].transpose(0, 2, 3, 1).reshape(16, -1)
    blocks = (w2d.reshape(4, 4, -1) != 0)
    assert (blocks.all(axis=1) | ~blocks.any(axis=1)).all()  # every 4x1 block all-zero or not
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["rows"] and report["comparison"] is not None
    assert "conv.w" in res.output


def test_existing_output_needs_force(model_file, tmp_path):
    assert invoke(model_file).exit_code == 0
    before = (tmp_path / "net.pruned.onnx").read_bytes()
    res = invoke(model_file, "--sparsity", "0.9")
    assert res.exit_code == 2 and "--force" in res.output
    assert (tmp_path / "net.pruned.onnx").read_bytes() == before
    assert invoke(model_file, "--sparsity", "0.9", "--force").exit_code == 0


def test_inspect_reports_without_writing(model_file, tmp_path):
    res = invoke("inspect", model_file)
    assert res.exit_code == 0 and "conv.w" in res.output
    assert _files(tmp_path) == ["net.onnx"]


@pytest.mark.parametrize("args,match", [
    (["--pattern", "3y2"], "pattern"),
    (["--pattern", "4:4"], "pattern"),
    (["--pattern", "5:4"], "pattern"),
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.1"], "sparsity"),
    (["--pattern", "2:4", "--sparsity", "0.7"], "implies"),
    (["--include", "no_such_layer"], "--include"),
    (["--exclude", "."], "--exclude"),
    (["--include", "("], "regex"),
    (["--op-types", "Relu"], "op-types"),
    (["--criterion", "bogus"], "criterion"),
    (["--input-shape", "x:1xAx3"], "input-shape"),
    (["--input-shape", "nope:1x8x10x10"], "nope"),
])
def test_bad_options_exit_2_nothing_written(model_file, tmp_path, args, match):
    res = invoke(model_file, *args)
    assert res.exit_code == 2, res.output
    assert match.lower() in res.output.lower()
    assert "Traceback" not in res.output
    assert _files(tmp_path) == ["net.onnx"]


@pytest.mark.parametrize("make,match", [
    (lambda p: p.write_bytes(b""), "empty"),
    (lambda p: p.write_bytes(b"\x08\x07garbage" * 50), "onnx"),
    (lambda p: p.write_bytes(B.conv_gemm_model().SerializeToString()[:300]), "onnx"),
])
def test_bad_model_files_exit_2(tmp_path, make, match):
    path = tmp_path / "bad.onnx"
    make(path)
    res = invoke(path)
    assert res.exit_code == 2 and match in res.output.lower()
    assert _files(tmp_path) == ["bad.onnx"]


def test_missing_file_and_directory(tmp_path):
    res = invoke(tmp_path / "missing.onnx")
    assert res.exit_code == 2 and "does not exist" in res.output
    res = invoke(tmp_path)
    assert res.exit_code == 2 and "directory" in res.output


def test_output_equal_to_input_refused(model_file):
    before = model_file.read_bytes()
    res = invoke(model_file, "-o", model_file, "--force")
    assert res.exit_code == 2 and "input" in res.output
    assert model_file.read_bytes() == before


def test_unwritable_output_folder(model_file, tmp_path):
    res = invoke(model_file, "-o", tmp_path / "nope" / "out.onnx")
    assert res.exit_code == 2 and "does not exist" in res.output


def test_invalid_model_refused(tmp_path):
    model = B.conv_gemm_model()
    model.graph.node[0].input[0] = "undefined_tensor"
    path = tmp_path / "invalid.onnx"
    path.write_bytes(model.SerializeToString())
    res = invoke(path)
    assert res.exit_code == 2 and "invalid" in res.output.lower()
    assert _files(tmp_path) == ["invalid.onnx"]


def test_no_prunable_weights(tmp_path):
    from onnx import TensorProto, helper
    model = B.make_model([helper.make_node("Relu", ["x"], ["y"])],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    path = tmp_path / "relu.onnx"
    onnx.save(model, str(path))
    res = invoke(path)
    assert res.exit_code == 2 and "no prunable weights" in res.output


def test_max_error_gate_fails_and_writes_nothing(model_file, tmp_path):
    res = invoke(model_file, "--sparsity", "0.95", "--max-error", "1e-9")
    assert res.exit_code == 1 and "max-error" in res.output
    assert _files(tmp_path) == ["net.onnx"]


def test_inputs_npz_used_and_checked(model_file, tmp_path):
    np.savez(tmp_path / "in.npz", x=np.ones((1, 8, 10, 10), np.float32))
    assert invoke(model_file, "--inputs", tmp_path / "in.npz").exit_code == 0
    np.savez(tmp_path / "bad.npz", wrong=np.ones((1, 8, 10, 10), np.float32))
    res = invoke(model_file, "--inputs", tmp_path / "bad.npz", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 2 and "x" in res.output
    assert not (tmp_path / "o.onnx").exists()


def test_config_file_rules(model_file, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps({"defaults": {"sparsity": 0.5},
                               "rules": [{"op_types": ["Gemm"], "pattern": "2:4"},
                                         {"op_names": ["conv"], "sparsity": 0.75}]}))
    res = invoke(model_file, "--config", cfg, "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads((tmp_path / "r.json").read_text())["rows"]}
    assert rows["conv.w"]["nonzeros_after"] == 16 * 72 - round(0.75 * 16 * 72)
    assert rows["fc.w"]["nonzeros_after"] == 10 * 16 // 2
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"op_nam": ["x"]}]))
    res = invoke(model_file, "--config", bad, "-o", tmp_path / "o.onnx")
    assert res.exit_code == 2 and "op_nam" in res.output


def test_python_dash_m_entry_point(model_file):
    import subprocess
    import sys
    res = subprocess.run([sys.executable, "-m", "onnxprune", "inspect", str(model_file), "-q"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr

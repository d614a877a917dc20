"""The user's own metric (``--eval-script FILE.py:FUNCTION`` / ``evaluate=callable``): measured on
the dense model first and on the pruned one, shown in the report, gating with --min-metric and
--max-metric-drop, and every bad script answered with exit 2, one line, nothing written."""

import json
import math
import re
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune import api
from onnxprune.cli import main
from onnxprune.errors import OptionError, ValidationFailed
from onnxprune.options import PruneOptions
from onnxprune.runtime.evaluate import Metric, as_number, load_metric

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
TEST = ROOT / "models" / "digits_test.npz"

METRIC = f'''
import numpy as np

def accuracy(session):
    data = np.load({str(TEST)!r})
    logits = session.run(None, {{"input": data["input"]}})[0]
    return float((logits.argmax(axis=1) == data["labels"]).mean())
'''


def accuracy_of(model) -> float:
    """Top-1 accuracy on the digits test split, with a session of our own."""
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    data = np.load(TEST)
    logits = session.run(None, {"input": data["input"]})[0]
    return float((logits.argmax(axis=1) == data["labels"]).mean())


@pytest.fixture
def script(tmp_path):
    folder = tmp_path / "scripts"
    folder.mkdir()
    path = folder / "metric.py"
    path.write_text(METRIC)
    return path


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def written(folder: Path):
    return sorted(p.name for p in folder.iterdir() if p.name != "scripts")


# -- the metric in the report -------------------------------------------------------------------

def test_dense_and_pruned_metric_equal_direct_onnxruntime_evaluations(script, tmp_path):
    out = tmp_path / "out.onnx"
    res = invoke(DIGITS, "-o", out, "--sparsity", "0.4", "--eval-script", f"{script}:accuracy",
                 "--report", tmp_path / "r.json")
    assert res.exit_code == 0, res.output
    metric = json.loads((tmp_path / "r.json").read_text())["metric"]
    assert metric["source"] == f"{script}:accuracy"
    assert metric["dense"] == accuracy_of(DIGITS)  # exactly: same model, same data, same runtime
    assert metric["pruned"] == accuracy_of(out)  # the file written is the one measured
    assert metric["drop"] == metric["dense"] - metric["pruned"]
    assert metric["dense"] == pytest.approx(792 / 797)  # models/README.md: 792 of 797 right
    line = next(l for l in res.output.splitlines() if l.startswith("metric"))
    assert f"{metric['dense']:.6g}" in line and f"{metric['pruned']:.6g}" in line
    assert "metric.py:accuracy)" in "".join(res.output.split())  # a long path may fold


def test_api_takes_a_callable_and_measures_dense_once_then_pruned(tmp_path):
    seen = []

    def accuracy(session):
        assert isinstance(session, ort.InferenceSession)
        assert session.get_providers() == ["CPUExecutionProvider"]
        seen.append(session)
        data = np.load(TEST)
        logits = session.run(None, {"input": data["input"]})[0]
        return np.float32((logits.argmax(axis=1) == data["labels"]).mean())  # numpy is fine

    res = onnxprune.prune(str(DIGITS), sparsity=0.5, evaluate=accuracy)
    assert len(seen) == 2  # the dense model, then the pruned one
    metric = res.report.metric
    assert metric["dense"] == pytest.approx(accuracy_of(DIGITS), abs=1e-7)
    assert metric["pruned"] == pytest.approx(accuracy_of(res.model), abs=1e-7)
    assert metric["source"].endswith("accuracy")
    assert res.report.options["eval_script"] == metric["source"]
    assert res.report.to_dict()["metric"] == metric


def test_api_takes_a_script_string_too_and_refuses_both(script):
    res = onnxprune.prune(DIGITS, sparsity=0.3, eval_script=f"{script}:accuracy")
    assert res.report.metric["pruned"] == accuracy_of(res.model)
    with pytest.raises(OptionError, match="not both"):
        onnxprune.prune(DIGITS, evaluate=len, eval_script=f"{script}:accuracy")


def test_a_run_without_a_metric_has_none():
    res = onnxprune.prune(DIGITS, sparsity=0.3)
    assert res.report.metric is None and res.report.to_dict()["metric"] is None
    assert not any(r.name == "evaluate" for r in res.state.records)


# -- bad scripts: exit 2, one line, nothing written, before any pruning --------------------------

BAD = {
    "missing file": (None, "nope.py:accuracy", "does not exist"),
    "no function part": (METRIC, "{script}", "expected FILE.py:FUNCTION"),
    "empty function part": (METRIC, "{script}:", "expected FILE.py:FUNCTION"),
    "function missing": (METRIC, "{script}:acc", "has no function 'acc' (it defines accuracy)"),
    "not callable": ("threshold = 0.5\n", "{script}:threshold", "is a float, not a function"),
    "raises on import": ("raise RuntimeError('no data folder')\n", "{script}:f",
                         "raised RuntimeError: no data folder"),
    "exits on import": ("import sys\nsys.exit(3)\n", "{script}:f", "raised SystemExit: 3"),
    "returns a list": ("def f(s):\n    return [0.9]\n", "{script}:f",
                       "returned [0.9] (a list) for the dense model, not a number"),
    "returns a bool": ("def f(s):\n    return True\n", "{script}:f",
                       "returned True (a bool) for the dense model, not a number"),
    "returns None": ("def f(s):\n    pass\n", "{script}:f", "returned None (a NoneType)"),
    "returns nan": ("def f(s):\n    return float('nan')\n", "{script}:f",
                    "returned nan for the dense model; it must return a finite number"),
    "returns inf": ("def f(s):\n    return float('inf')\n", "{script}:f",
                    "returned inf for the dense model"),
    "raises": ("def f(s):\n    return 1 / 0\n", "{script}:f",
               "raised on the dense model: ZeroDivisionError: division by zero"),
    "takes no session": ("def f():\n    return 1.0\n", "{script}:f",
                         "raised on the dense model: TypeError"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_scripts_exit_2_with_one_line_and_nothing_written(case, tmp_path):
    text, spec, message = BAD[case]
    folder = tmp_path / "scripts"
    folder.mkdir()
    path = folder / "metric.py"
    if text is not None:
        path.write_text(text)
    spec = spec.format(script=path) if "{script}" in spec else str(folder / spec)
    res = invoke(DIGITS, "-o", tmp_path / "out.onnx", "--eval-script", spec,
                 "--report", tmp_path / "r.json", "--search", "--min-metric", "0.9")
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --eval-script"), res.output
    assert message in lines[0]
    assert str(path.name) in lines[0] or "nope.py" in lines[0]
    assert written(tmp_path) == []


@pytest.mark.parametrize("case", ["returns nan", "raises", "returns a list"])
def test_a_failing_metric_stops_the_run_before_any_pruning(case, tmp_path, monkeypatch):
    text, spec, message = BAD[case]
    path = tmp_path / "m.py"
    path.write_text(text)

    def no_pruning(*args, **kwargs):
        raise AssertionError("pruned before the dense metric was checked")

    monkeypatch.setattr(api, "_run", no_pruning)
    with pytest.raises(OptionError, match=re.escape(message.split(" for ")[0])):
        onnxprune.prune(DIGITS, eval_script=f"{path}:f", search=True, min_metric=0.5)


def test_a_script_is_its_own_module_and_leaves_sys_path_alone(tmp_path):
    for name in ("a", "b"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "helper_mod.py").write_text(f"VALUE = {name!r}\n")
        (tmp_path / name / "metric.py").write_text(
            "import helper_mod\nV = helper_mod.VALUE\ndef f(session):\n    return 1.0\n")
    path_before, modules_before = list(sys.path), set(sys.modules)
    first = load_metric(f"{tmp_path / 'a' / 'metric.py'}:f")
    sys.modules.pop("helper_mod", None)  # as another script's sibling would be found
    second = load_metric(f"{tmp_path / 'b' / 'metric.py'}:f")
    assert sys.path == path_before  # the folder was on sys.path only while importing
    assert sys.modules[first.function.__module__].V == "a"
    assert sys.modules[second.function.__module__].V == "b"
    assert first.function.__module__ != second.function.__module__  # same file name, two modules
    assert "metric" not in set(sys.modules) - modules_before
    sys.modules.pop("helper_mod", None)


def test_option_checks():
    with pytest.raises(OptionError, match="--min-metric bounds the metric of --eval-script"):
        PruneOptions(min_metric=0.9)
    with pytest.raises(OptionError, match="--max-metric-drop bounds the metric"):
        PruneOptions(max_metric_drop=0.01)
    with pytest.raises(OptionError, match="--search .* give --max-error .*--min-metric or "
                                          "--max-metric-drop"):
        PruneOptions(search=True)
    with pytest.raises(OptionError, match="--search"):
        PruneOptions(search=True, eval_script=lambda s: 1.0)  # a metric but no bound
    for bad in (float("nan"), float("inf"), "0.9", True):
        with pytest.raises(OptionError, match="--min-metric must be a finite number"):
            PruneOptions(min_metric=bad, eval_script=lambda s: 1.0)
    with pytest.raises(OptionError, match="--max-metric-drop must be at least 0"):
        PruneOptions(max_metric_drop=-0.1, eval_script=lambda s: 1.0)
    with pytest.raises(OptionError, match="eval_script must be 'file.py:function' or a callable"):
        PruneOptions(eval_script=3)
    opts = PruneOptions(eval_script=lambda s: 1.0, min_metric=-2, search=True)
    assert isinstance(opts.eval_script, Metric)
    assert PruneOptions(search=True, eval_script=opts.eval_script, max_metric_drop=0
                        ).eval_script is opts.eval_script  # resolved once, kept by replace()


def test_as_number():
    assert as_number(np.float32(0.5)) == 0.5 and as_number(np.array(3)) == 3.0
    assert as_number(2) == 2.0 and as_number(np.int64(7)) == 7.0
    for bad in (True, np.bool_(True), "1", None, [1.0], np.array([1.0]), np.array("x"), 1j):
        assert as_number(bad) is None


# -- gates without --search ---------------------------------------------------------------------

def test_min_metric_gate_fails_with_the_measured_value_and_writes_nothing(script, tmp_path):
    pruned = onnxprune.prune(DIGITS, sparsity=0.5).model
    measured = accuracy_of(pruned)
    assert measured < 0.9  # 50 % magnitude pruning costs the digits CNN much of its accuracy
    res = invoke(DIGITS, "-o", tmp_path / "out.onnx", "--sparsity", "0.5", "--eval-script",
                 f"{script}:accuracy", "--min-metric", "0.9", "--report", tmp_path / "r.json")
    assert res.exit_code == 1, res.output
    error = [l for l in res.output.splitlines() if l.startswith("error:")]
    assert len(error) == 1
    assert f"is {measured:.6g}" in error[0] and "at least 0.9 (--min-metric)" in error[0]
    assert "nothing written" in error[0]
    assert written(tmp_path) == ["r.json"]  # the report of the failed run, and no model
    metric = json.loads((tmp_path / "r.json").read_text())["metric"]
    assert metric["pruned"] == measured and metric["dense"] == accuracy_of(DIGITS)


def test_max_metric_drop_gate(script, tmp_path):
    dense = accuracy_of(DIGITS)
    with pytest.raises(ValidationFailed) as info:
        onnxprune.prune(DIGITS, sparsity=0.5, eval_script=f"{script}:accuracy",
                        max_metric_drop=0.01, output=tmp_path / "out.onnx")
    metric = info.value.report.metric  # the report of the failed run carries the metric
    assert metric["dense"] == dense and metric["drop"] > 0.01
    assert f"drop {metric['drop']:.6g}" in str(info.value)
    assert "(--max-metric-drop)" in str(info.value)
    assert not (tmp_path / "out.onnx").exists()
    # a drop within the bound passes and writes
    res = onnxprune.prune(DIGITS, sparsity=0.1, eval_script=f"{script}:accuracy",
                          max_metric_drop=0.01, output=tmp_path / "out.onnx")
    assert res.report.metric["drop"] <= 0.01 and (tmp_path / "out.onnx").is_file()


def test_gates_pass_at_their_bounds_exactly(script):
    res = onnxprune.prune(DIGITS, sparsity=0.3, eval_script=f"{script}:accuracy")
    m = res.report.metric
    onnxprune.prune(DIGITS, sparsity=0.3, eval_script=f"{script}:accuracy",
                    min_metric=m["pruned"], max_metric_drop=m["dense"] - m["pruned"])


def test_non_finite_metric_of_a_pruned_model_fails_its_bounds():
    calls = []

    def metric(session):
        calls.append(1)
        return 1.0 if len(calls) == 1 else float("nan")

    res = onnxprune.prune(DIGITS, sparsity=0.3, evaluate=metric)  # no bound: reported
    assert math.isnan(res.report.metric["pruned"])
    assert res.report.to_dict()["metric"]["pruned"] is None  # JSON has no NaN
    assert any("the pruned model is likely broken" in n for n in res.report.notes)
    calls.clear()
    with pytest.raises(ValidationFailed, match="is nan"):
        onnxprune.prune(DIGITS, sparsity=0.3, evaluate=metric, min_metric=-1e9)


def test_a_model_onnxruntime_cannot_run_is_an_error_for_the_metric():
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((16, 8), np.float32), "W")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm"),
         helper.make_node("FancyAct", ["h"], ["y"], domain="com.example.unknown", name="fancy")],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.example.unknown", 1)])
    model.ir_version = 8
    with pytest.raises(OptionError, match="needs onnxruntime to run the model, but it cannot "
                                          "load the input model .*FancyAct"):
        onnxprune.prune(model, sparsity=0.5, evaluate=lambda session: 1.0)

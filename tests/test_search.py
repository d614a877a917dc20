"""--search: one bisection for every bound (--max-error, and the user's metric with --min-metric
or --max-metric-drop); the dense metric measured once; the answer a probed, passing sparsity
whose next probed higher sparsity failed."""

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune.cli import main
from onnxprune.errors import OptionError
from onnxprune.search import search_sparsity

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"
TEST = ROOT / "models" / "digits_test.npz"


def accuracy(session):
    data = np.load(TEST)
    logits = session.run(None, {"input": data["input"]})[0]
    return float((logits.argmax(axis=1) == data["labels"]).mean())


def accuracy_of(model) -> float:
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    return accuracy(ort.InferenceSession(source, providers=["CPUExecutionProvider"]))


def sparsity_of(model) -> float:
    from onnx import numpy_helper

    weights = [numpy_helper.to_array(t) for t in model.graph.initializer if len(t.dims) > 1]
    return 1 - sum(int(np.count_nonzero(w)) for w in weights) / sum(w.size for w in weights)


def search_probes(report):
    (title,) = [k for k in report["sections"] if k.startswith("sparsity search")]
    return title, report["sections"][title]


def check_bisection(probes, best):
    """``best`` is a probed, passing sparsity and the next probed one above it failed."""
    at_best = [p for p in probes if p["sparsity"] == round(best, 4)]
    assert at_best and all(p["passed"] for p in at_best)
    above = [p for p in probes if p["sparsity"] > round(best, 4)]
    assert above, "the search must have probed above its answer"
    assert not min(above, key=lambda p: p["sparsity"])["passed"]


# -- the bisection itself -------------------------------------------------------------------------

def test_search_sparsity_bisects_on_passed_and_keeps_the_measured_columns():
    threshold = 0.61

    def run(s):
        return {"metric": 1 - s, "rel_error": s / 10}, s <= threshold

    best, probes = search_sparsity(run, high=0.95, steps=7)
    assert [p["sparsity"] for p in probes][:3] == [0.95, 0.475, 0.7125]
    assert list(probes[0]) == ["sparsity", "metric", "rel_error", "passed"]
    assert all(p["passed"] == (p["sparsity"] <= threshold) for p in probes)
    assert all(p["metric"] == pytest.approx(1 - p["sparsity"], abs=1e-4) for p in probes)
    assert best <= threshold and threshold - best < 0.95 / 2 ** 7
    check_bisection(probes, best)


def test_search_sparsity_edges():
    best, probes = search_sparsity(lambda s: ({}, True), high=0.8)
    assert best == 0.8 and probes == [{"sparsity": 0.8, "passed": True}]
    best, probes = search_sparsity(lambda s: ({}, False), high=0.8, steps=3)
    assert best == 0.0 and len(probes) == 4 and not any(p["passed"] for p in probes)


# -- with the user's metric -------------------------------------------------------------------------

def test_cli_search_min_metric_finds_the_highest_sparsity_keeping_it(tmp_path):
    script = tmp_path / "metric.py"
    script.write_text(f"import numpy as np\n\n"
                      f"def accuracy(session):\n"
                      f"    data = np.load({str(TEST)!r})\n"
                      f"    logits = session.run(None, {{'input': data['input']}})[0]\n"
                      f"    return float((logits.argmax(axis=1) == data['labels']).mean())\n")
    out, report_path = tmp_path / "out.onnx", tmp_path / "r.json"
    bound = 0.97
    res = CliRunner().invoke(main, [str(DIGITS), "-o", str(out), "--search", "--min-metric",
                                    str(bound), "--eval-script", f"{script}:accuracy",
                                    "--no-resize", "--report",
                                    str(report_path)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(report_path.read_text())
    best = report["options"]["sparsity"]
    title, probes = search_probes(report)
    assert title == "sparsity search (metric, relative max error per probe)"
    assert 0.1 < best < 0.95  # the digits CNN keeps 97 % only at a moderate sparsity
    check_bisection(probes, best)
    assert all(p["passed"] == (p["metric"] >= bound) for p in probes)
    final = onnx.load(str(out))
    measured = accuracy_of(final)  # the written model, measured by the test itself
    assert measured >= bound
    assert report["metric"]["pruned"] == measured
    (probed,) = [p["metric"] for p in probes if p["sparsity"] == round(best, 4)]
    assert probed == measured  # the final run prunes exactly as its probe did
    assert sparsity_of(final) == pytest.approx(best, abs=0.01)
    assert any(n.startswith("search: highest sparsity with metric") and f"{best:.4f}" in n
               for n in report["notes"])


def test_api_search_max_metric_drop_measures_the_dense_model_once():
    calls = []

    def counted(session):
        calls.append(session)
        return accuracy(session)

    res = onnxprune.prune(DIGITS, search=True, evaluate=counted, max_metric_drop=0.02,
                          validate=False)
    _, probes = search_probes(res.report.to_dict())
    assert len(calls) == 1 + len(probes) + 1  # dense once, each probe, the final run
    dense = accuracy_of(DIGITS)
    assert res.report.metric["dense"] == dense
    best = res.report.options["sparsity"]
    check_bisection(probes, best)
    assert all(p["passed"] == (dense - p["metric"] <= 0.02 + 1e-12) for p in probes)
    assert res.report.metric["drop"] <= 0.02
    assert accuracy_of(res.model) == res.report.metric["pruned"]


def test_search_keeps_every_bound_given():
    metric_only = onnxprune.prune(DIGITS, search=True, evaluate=accuracy, min_metric=0.9)
    both = onnxprune.prune(DIGITS, search=True, evaluate=accuracy, min_metric=0.9,
                           max_error=0.05)
    _, probes = search_probes(both.report.to_dict())
    assert all(p["passed"] == (p["metric"] >= 0.9 and p["rel_error"] <= 0.05) for p in probes)
    check_bisection(probes, both.report.options["sparsity"])
    # the error bound is the tighter one on this model
    assert both.report.options["sparsity"] < metric_only.report.options["sparsity"]
    assert both.report.comparison.max_rel_error <= 0.05
    assert both.report.metric["pruned"] >= 0.9


def test_search_with_max_error_alone_is_unchanged():
    res = onnxprune.prune(DIGITS, search=True, max_error=0.1)
    title, probes = search_probes(res.report.to_dict())
    assert title == "sparsity search (relative max error per probe)"
    assert all(list(p) == ["sparsity", "rel_error", "passed"] for p in probes)
    assert all(p["passed"] == (p["rel_error"] <= 0.1) for p in probes)
    check_bisection(probes, res.report.options["sparsity"])
    assert res.report.metric is None


def test_search_refuses_a_fixed_sparsity_pattern():
    with pytest.raises(OptionError, match="fixes its sparsity"):
        onnxprune.prune(DIGITS, pattern="2:4", search=True, evaluate=accuracy, min_metric=0.5)

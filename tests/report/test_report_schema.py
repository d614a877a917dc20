"""Every report validates against the JSON Schema shipped in the package
(``onnxprune/report/report.schema.json``, Draft 2020-12), and the schema names exactly the keys
:meth:`Report.to_dict` writes: real runs of each pattern, inspect, a search, a sensitivity
allocation, and a model onnxruntime cannot load."""

from __future__ import annotations

import copy
import json
from importlib import resources

import pytest
from click.testing import CliRunner

import onnxprune
from onnxprune.cli import main
from onnxprune.report.report import SCHEMA_VERSION, LayerRow, Report

jsonschema = pytest.importorskip("jsonschema", reason="pip install jsonschema (the test extra)")


@pytest.fixture(scope="module")
def schema():
    text = resources.files("onnxprune.report").joinpath("report.schema.json").read_text("utf-8")
    return json.loads(text)


@pytest.fixture(scope="module")
def validator(schema):
    jsonschema.Draft202012Validator.check_schema(schema)
    return jsonschema.Draft202012Validator(schema)


def _errors(validator, data):
    return sorted(f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(data))


def test_schema_is_draft_2020_12_and_strict_where_keys_are_stable(schema):
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    assert schema["additionalProperties"] is False
    assert schema["$defs"]["layer_row"]["additionalProperties"] is False
    assert schema["$defs"]["comparison"]["additionalProperties"] is False
    assert schema["$defs"]["comparison_output"]["additionalProperties"] is False
    assert schema["properties"]["schema_version"] == {
        "description": schema["properties"]["schema_version"]["description"],
        "const": SCHEMA_VERSION}


def test_schema_names_exactly_the_keys_reports_have(schema):
    d = Report(model="m.onnx", rows=[LayerRow("w", "MatMul", (2, 2), (2, 2), 4, 4, 4, 2)]
               ).to_dict()
    assert set(schema["properties"]) == set(schema["required"]) == set(d)
    row = schema["$defs"]["layer_row"]
    assert set(row["properties"]) == set(row["required"]) == set(d["rows"][0])
    import numpy as np
    from onnxprune.report.compare import compare
    cmp = compare({"y": np.ones((2, 3))}, {"y": np.ones((2, 3))}).to_dict()
    for key, value in (("comparison", cmp), ("comparison_output", cmp["outputs"][0])):
        part = schema["$defs"][key]
        assert set(part["properties"]) == set(part["required"]) == set(value), key


def test_schema_rejects_what_a_parser_could_not_rely_on(validator, models_dir):
    d = onnxprune.prune(models_dir / "digits_cnn.onnx", validate=True).report.to_dict()
    assert _errors(validator, d) == []
    extra = dict(d, surprise=1)
    assert any("surprise" in e for e in _errors(validator, extra))
    missing = {k: v for k, v in d.items() if k != "rows"}
    assert any("'rows' is a required property" in e for e in _errors(validator, missing))
    bad_row = copy.deepcopy(d)
    bad_row["rows"][0]["params"] = "many"
    assert _errors(validator, bad_row) == ["['rows', 0, 'params']: 'many' is not of type "
                                           "'integer'"]
    # keys the validation work adds to the comparison validate as they are
    grown = copy.deepcopy(d)
    grown["comparison"].update(samples=32, data="held-out", verdict="ok")
    grown["comparison"]["outputs"][0].update(verdict="ok", top5_agreement=1.0)
    assert _errors(validator, grown) == []


def _prune(models_dir, **kwargs):
    return onnxprune.prune(models_dir / "digits_cnn.onnx", **kwargs).report.to_dict()


@pytest.mark.parametrize("kwargs", [
    dict(),  # unstructured, default sparsity, dead channels removed
    dict(pattern="4x1", sparsity=0.8),
    dict(pattern="2:4"),  # the first conv is skipped with a reason
    dict(pattern="channel", sparsity=0.5),  # resized; a frozen group
    dict(pattern="unstructured", resize=False, validate=False),
    dict(max_error=0.3, search=True),
], ids=["unstructured", "4x1", "2:4", "channel", "no-resize-no-validation", "search"])
def test_pruning_reports_validate(validator, models_dir, kwargs):
    d = _prune(models_dir, **kwargs)
    assert _errors(validator, d) == []
    assert d["rows"] and d["options"]["sparsity"] is not None


def test_reports_with_skipped_frozen_and_sections_validate(validator, models_dir):
    d = _prune(models_dir, pattern="channel", sparsity=0.5)
    assert d["frozen"]
    assert _errors(validator, d) == []
    d = _prune(models_dir, pattern="2:4")
    assert d["skipped"]
    assert _errors(validator, d) == []
    d = _prune(models_dir, calibration=models_dir / "digits_calib.npz", allocate="sensitivity")
    assert any(k.startswith("sensitivity") for k in d["sections"])
    assert _errors(validator, d) == []
    d = _prune(models_dir, max_error=0.3, search=True)
    assert any(k.startswith("sparsity search") for k in d["sections"])


def test_report_of_a_model_onnxruntime_cannot_load_validates(validator):
    from test_model_variety import custom_model

    d = onnxprune.prune(custom_model(), sparsity=0.5).report.to_dict()
    assert d["comparison"] is None and d["model"] == "<in-memory model>"
    assert any("onnxruntime cannot load" in n for n in d["notes"])
    assert _errors(validator, d) == []


def test_cli_json_reports_validate(validator, models_dir, tmp_path):
    runner = CliRunner()
    model = str(models_dir / "digits_cnn.onnx")
    for args, name in ((["prune", model, "-o", str(tmp_path / "p.onnx")], "prune.json"),
                       (["inspect", model], "inspect.json"),
                       (["prune", model, "-o", str(tmp_path / "q.onnx"), "--pattern", "4x1"],
                        "report.txt")):
        path = tmp_path / name
        res = runner.invoke(main, args + ["--report", str(path), "-q"])
        assert res.exit_code == 0, res.output
        d = json.loads(path.read_text())  # any suffix but .html/.htm is JSON
        assert _errors(validator, d) == []
        assert d["tool"]["name"] == "onnxprune" and d["schema_version"] == SCHEMA_VERSION
    inspected = json.loads((tmp_path / "inspect.json").read_text())
    assert inspected["output"] is None and all(r["macs_before"] for r in inspected["rows"])

"""Every example in README.md runs: each ```bash line that starts with ``onnxprune`` (through
the real CLI), each ```yaml/```json config (through the real config loader, then applied), each
```python block (exec'd). Lines that cannot run here are skipped by a listed reason.

The examples name placeholder files; each runs in a temporary folder where they stand for:

==============  ============================================================================
``model.onnx``  a copy of ``models/digits_cnn.onnx`` (the bundled digits CNN)
``calib.npz``   a copy of ``models/digits_calib.npz`` (256 samples of the input ``input``)
``val.npz``     the first 64 samples of ``models/digits_test.npz``, input ``input`` only
==============  ============================================================================

Each ``onnxprune`` line runs in a fresh folder (the examples are alternatives, each written for
a folder of its own), except the no-MODEL demo lines, which share one folder in README order:
the README says that running the demo again writes ``-2``. A path that a line's comment says
it writes (``writes X.onnx``, ``./X.onnx``) must exist afterwards.
"""

import re
import shlex
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import builders as B
from onnxprune import prune
from onnxprune.cli import main
from onnxprune.masking.selection import load_config

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
MODELS = ROOT / "models"

#: Lines of ```bash blocks not run here (matched by their start), with the reason.
NOT_RUN = {
    "python3 -m venv": "creates a virtual environment and installs packages from the network",
    "pip install": "installs packages from the network",
    "python -m pytest": "runs the test suite this test is part of",
}


def _blocks(lang: str):
    return [m.group(1) for m in re.finditer(rf"^```{lang}\n(.*?)^```", README, re.S | re.M)]


def _bash_lines():
    lines = []
    for block in _blocks("bash"):
        for line in block.splitlines():
            if line.strip():
                lines.append(line)
    return lines


def _placeholders(folder: Path) -> None:
    shutil.copy(MODELS / "digits_cnn.onnx", folder / "model.onnx")
    shutil.copy(MODELS / "digits_calib.npz", folder / "calib.npz")
    test = np.load(MODELS / "digits_test.npz")
    np.savez(folder / "val.npz", input=test["input"][:64])
    # examples run from the repository root name models/...; a python block that starts with
    # "# NAME.py:" is the file of that name the examples use (the --eval-script metric)
    (folder / "models").mkdir(exist_ok=True)
    for name in ("digits_cnn.onnx", "digits_test.npz", "digits_calib.npz"):
        shutil.copy(MODELS / name, folder / "models" / name)
    # the pair the --with examples prune together (a GRU encoder and its decoder)
    import joint_models
    onnx.save(joint_models.encoder(), folder / "encoder.onnx")
    onnx.save(joint_models.decoder(), folder / "decoder.onnx")
    (folder / "out").mkdir(exist_ok=True)
    for block in _blocks("python"):
        first = block.lstrip().splitlines()[0]
        match = re.match(r"#\s*([\w.-]+\.py):", first)
        if match:
            (folder / match.group(1)).write_text(block)


def _written(comment: str):
    """The files a line's comment says it writes."""
    return re.findall(r"(?:\./|writes )([\w.\-]+\.(?:onnx|json))", comment)


def test_readme_has_examples():
    lines = _bash_lines()
    assert sum(line.startswith("onnxprune") for line in lines) >= 10
    assert _blocks("yaml") and _blocks("python")


def test_every_bash_line_is_run_or_skipped_for_a_reason():
    for line in _bash_lines():
        assert line.startswith("onnxprune") or any(line.startswith(k) for k in NOT_RUN), line


def _cli_lines():
    return [line for line in _bash_lines() if line.startswith("onnxprune")]


@pytest.fixture(scope="module")
def demo_folder(tmp_path_factory):
    return tmp_path_factory.mktemp("demo")


@pytest.mark.parametrize("line", _cli_lines(),
                         ids=[" ".join(line.split("#")[0].split()) for line in _cli_lines()])
def test_cli_example(line, tmp_path, demo_folder, monkeypatch):
    command, _, comment = line.partition("#")
    args = shlex.split(command)[1:]
    demo = not args or args[0].startswith("-")  # no MODEL: the bundled digits CNN
    folder = demo_folder if demo else tmp_path
    _placeholders(folder)
    monkeypatch.chdir(folder)
    res = CliRunner().invoke(main, args, catch_exceptions=False)
    assert res.exit_code == 0, f"{line}\n{res.output}"
    for name in _written(comment):
        assert (folder / name).is_file(), f"{line}: {name} not written"


# -- config examples ---------------------------------------------------------------------------

def _readme_config(tmp_path) -> Path:
    (yaml_text,) = [b for b in _blocks("yaml")]
    path = tmp_path / "config.yaml"
    path.write_text(yaml_text)
    return path


def test_yaml_example_loads_and_runs(tmp_path, monkeypatch):
    path = _readme_config(tmp_path)
    cfg = load_config(path)
    assert cfg.defaults == {"pattern": "4x1", "sparsity": 0.8} and len(cfg.rules) == 3
    _placeholders(tmp_path)
    monkeypatch.chdir(tmp_path)
    res = CliRunner().invoke(main, ["model.onnx", "--config", str(path), "-q"])
    assert res.exit_code == 0, res.output


def _backbone_neck_head():
    """x[1,8,8,8] -> Conv backbone.conv (8->16) -> Conv neck.conv (16->16) -> Conv head.conv
    (16->8) -> GAP -> Flatten -> Gemm fc (8->10): one weight for each rule of the example."""
    nodes = [
        helper.make_node("Conv", ["x", "backbone.conv.w"], ["a"], pads=[1] * 4,
                         name="backbone.conv"),
        helper.make_node("Conv", ["a", "neck.conv.w"], ["b"], pads=[1] * 4, name="neck.conv"),
        helper.make_node("Conv", ["b", "head.conv.w"], ["c"], pads=[1] * 4, name="head.conv"),
        helper.make_node("GlobalAveragePool", ["c"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w"], ["y"], transB=1, name="fc"),
    ]
    inits = [B.tensor("backbone.conv.w", (16, 8, 3, 3), 1), B.tensor("neck.conv.w", (16, 16, 3, 3), 2),
             B.tensor("head.conv.w", (8, 16, 3, 3), 3), B.tensor("fc.w", (12, 8), 4)]
    return B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 8, 8])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12])], inits)


def test_yaml_example_means_what_the_readme_says(tmp_path):
    """Each rule of the README's example takes effect; the 2:4 rule does not inherit the
    defaults' 0.8 (it failed with 'config rule 0 sparsity=0.8 conflicts' before)."""
    result = prune(_backbone_neck_head(), config=_readme_config(tmp_path), resize=False)
    rows = {r.name: r for r in result.report.rows}
    weights = {t.name: onnx.numpy_helper.to_array(t) for t in result.model.graph.initializer}
    backbone = weights["backbone.conv.w"].transpose(0, 2, 3, 1).reshape(16, -1, 4)
    assert ((backbone != 0).sum(-1) == 2).all()  # 2:4 at its own 50 %
    assert rows["backbone.conv.w"].sparsity_after == 0.5
    assert rows["neck.conv.w"].sparsity_after == pytest.approx(0.8, abs=1 / 36)  # defaults 4x1
    neck = weights["neck.conv.w"].transpose(0, 2, 3, 1).reshape(4, 4, -1) != 0
    assert (neck.all(axis=1) | ~neck.any(axis=1)).all()
    assert rows["fc.w"].sparsity_after == 0.5  # Gemm rule: 4x1 at 0.5
    assert "head.conv.w" not in rows
    assert [r for n, r in result.report.skipped if n == "head.conv.w"][0].startswith(
        "skipped by config rule 2")


def test_json_examples_parse():
    import json

    for block in _blocks("json"):
        data = json.loads(block)
        if isinstance(data, list) or (isinstance(data, dict) and "rules" in data):
            load_config(data)


# -- python examples ---------------------------------------------------------------------------

@pytest.mark.parametrize("index", range(len(_blocks("python"))))
def test_python_example(index, tmp_path, monkeypatch):
    _placeholders(tmp_path)
    monkeypatch.chdir(tmp_path)
    exec(compile(_blocks("python")[index], f"README.md python block {index}", "exec"), {})

"""Names with terminal escape sequences (and other control characters) are printed escaped:
in the text report, in notes and skipped reasons, in the ``error:`` line and the ``wrote``
line. No raw C0/C1 control character a model carries reaches stdout or stderr."""

from __future__ import annotations

import re
import subprocess
import sys

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import builders as B
from onnxprune.cli import main
from onnxprune.text import printable

HOSTILE = ["\x1b[2J", "\x1b]0;title\x07", "a\rb", "\x9b31m", "\x00nul", "bidi\u202e", "tab\t",
           "nl\nx", "\x7fdel"]
#: any C0 control except the newline and tab rich lays out with, DEL, C1, bidi overrides
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


def test_printable_escapes_every_control_character():
    assert printable("\x1b[2J") == "\\x1b[2J"
    assert printable("\x1b]0;title\x07") == "\\x1b]0;title\\x07"
    assert printable("\x9b\u202e\x00") == "\\x9b\\u202e\\x00"
    assert printable("a\nb") == "a\\nb" and printable("a\nb", keep_newlines=True) == "a\nb"
    assert printable("conv.weight/ü·名") == "conv.weight/ü·名"  # everything else unchanged
    for name in HOSTILE:
        assert not RAW.search(printable(name)) and "\n" not in printable(name)


def _hostile_model() -> onnx.ModelProto:
    """Two MatMuls whose weights, nodes and tensors carry escape sequences; the second weight is
    also a graph output (so it is skipped with a reason quoting its name)."""
    w1, w2 = "W\x1b[2J" + HOSTILE[1], "V\x9b31m\u202e"
    r = B.rng(0)
    inits = [numpy_helper.from_array(r.standard_normal((16, 8)).astype(np.float32), w1),
             numpy_helper.from_array(r.standard_normal((8, 4)).astype(np.float32), w2)]
    nodes = [helper.make_node("MatMul", ["x", w1], ["h\x1b[31m"], name="mm\x1b]0;pwned\x07"),
             helper.make_node("MatMul", ["h\x1b[31m", w2], ["y\r"], name="mm2\x00")]
    vi = helper.make_tensor_value_info
    graph = helper.make_graph(nodes, "g\x1b[2J", [vi("x", TensorProto.FLOAT, [2, 16])],
                              [vi("y\r", TensorProto.FLOAT, [2, 4]),
                               vi(w2, TensorProto.FLOAT, [8, 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def _assert_clean(text: str) -> None:
    bad = RAW.findall(text)
    assert not bad, f"raw control characters reached the terminal: {bad!r}"


def test_report_and_notes_print_names_escaped(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_hostile_model(), str(src))
    res = CliRunner().invoke(main, [str(src), "-o", str(tmp_path / "o\x1b[2J.onnx"),
                                    "--sparsity", "0.5"], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    _assert_clean(res.output)
    flat = "".join(res.output.split())
    assert "W\\x1b[2J\\x1b]0;title\\x07" in flat  # the pruned weight's row
    assert "V\\x9b31m\\u202e" in flat  # the skipped weight and its reason
    assert "o\\x1b[2J.onnx" in flat  # the wrote line


def test_inspect_prints_names_escaped(tmp_path):
    src = tmp_path / "m.onnx"
    onnx.save(_hostile_model(), str(src))
    res = CliRunner().invoke(main, ["inspect", str(src)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    _assert_clean(res.output)
    assert "W\\x1b[2J" in "".join(res.output.split())


@pytest.mark.parametrize("args", [
    ["--exclude", "nothing-matches", "--include", "also\x1b[2J-nothing"],  # selection error
    ["--input-shape", "x\x1b[2J:2x16"],  # an unknown input named in the message
])
def test_error_line_escapes_names(tmp_path, args):
    src = tmp_path / "m.onnx"
    onnx.save(_hostile_model(), str(src))
    res = CliRunner().invoke(main, [str(src), "-o", str(tmp_path / "o.onnx"), *args],
                             catch_exceptions=False)
    assert res.exit_code == 2
    assert res.output.startswith("error: ") and res.output.count("\n") == 1
    _assert_clean(res.output)
    assert "\\x1b[2J" in res.output


def test_real_terminal_streams_carry_no_raw_escapes(tmp_path):
    """The whole CLI in a subprocess (real stdout/stderr), an error and a report alike."""
    src = tmp_path / "m.onnx"
    onnx.save(_hostile_model(), str(src))
    for extra in (["--sparsity", "0.5"], ["--input-shape", "bad\x1b]0;t\x07:1"]):
        proc = subprocess.run([sys.executable, "-m", "onnxprune", str(src), "-o",
                               str(tmp_path / "o.onnx"), "--force", *extra],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode in (0, 2), proc.stderr
        _assert_clean(proc.stdout)
        _assert_clean(proc.stderr)


def test_clicks_own_usage_errors_escape_what_the_user_typed(tmp_path):
    import subprocess
    import sys

    bad = "x\x1b]0;title\x07\x1b[2J"
    proc = subprocess.run([sys.executable, "-m", "onnxprune", "inspect", str(tmp_path / "m.onnx"),
                           "--input-shape", bad], capture_output=True, text=True)
    proc2 = subprocess.run([sys.executable, "-m", "onnxprune", str(tmp_path / "m.onnx"),
                            "--criterion", bad], capture_output=True, text=True)
    for p in (proc, proc2):
        assert p.returncode == 2
        assert "\x1b" not in p.stdout + p.stderr and "\x07" not in p.stdout + p.stderr
    assert "\\x1b" in proc2.stderr and "prune --help' for help." in proc2.stderr

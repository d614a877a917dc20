"""The CLI as people and pipelines read it: full-width lines off a terminal, logging, --version,
the help (every option explained, choices listed), Polygraphy's --input-shape, the no-MODEL demo
run twice, "nothing was pruned" (exit 3 / --allow-noop), config rules that inherit no
incompatible sparsity, and the optional extras."""

import json
import logging
import re
import subprocess
import sys
from pathlib import Path

import click
import onnx
import pytest
from click.testing import CliRunner

import builders as B
from onnxprune import prune
from onnxprune.cli import EXIT_NOOP, build_main, main, version
from onnxprune.errors import OptionError
from onnxprune.inputs.signature import parse_input_shapes
from onnxprune.report.report import NOOP_NOTE

ROOT = Path(__file__).resolve().parents[1]
DIGITS = ROOT / "models" / "digits_cnn.onnx"


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


@pytest.fixture
def model_file(tmp_path):
    path = tmp_path / "net.onnx"
    onnx.save(B.conv_gemm_model(), str(path))
    return path


def _long_named_digits(path: Path, prefix: str) -> dict:
    """The digits CNN with every weight renamed ``prefix + name`` (longer than a terminal);
    returns {new name: op type}."""
    model = onnx.load(str(DIGITS))
    renamed = {}
    for init in model.graph.initializer:
        if init.name.endswith("weight") or "Conv" in init.name:
            renamed[init.name] = prefix + init.name.replace("::", "_")
            init.name = renamed[init.name]
    ops = {}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
                if i == 1:  # the weight operand (the rest are biases)
                    ops[renamed[name]] = node.op_type
    onnx.save(model, str(path))
    return ops


# -- 1. off a terminal: plain full-width lines -------------------------------------------------

def _assert_full_lines(text: str, ops: dict) -> None:
    lines = text.splitlines()
    assert "…" not in text  # no ellipsised cell
    assert all(line == line.rstrip() for line in lines)  # no padding to a console width
    for name, op in ops.items():
        rows = [line for line in lines if name in line]
        assert len(rows) == 1, (name, rows)  # the name is never folded onto a second line
        cells = rows[0].split()
        # every column of the row is on the name's line: layer, op, shape, sparsity, params
        assert cells[0] == name and cells[1] == op, rows[0]
        assert re.search(r"\d+\.\d% → \d+\.\d%", rows[0]), rows[0]
        assert len(rows[0]) > 80
    time_lines = [line for line in lines if line.startswith("time:")]
    assert len(time_lines) == 1 and "validate" in time_lines[0]  # one unwrapped line


def test_piped_report_is_one_line_per_row(tmp_path):
    ops = _long_named_digits(tmp_path / "m.onnx", "backbone.stage_one.block_two." * 3)
    res = invoke(tmp_path / "m.onnx", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 0, res.output
    _assert_full_lines(res.stdout, ops)


def test_real_pipe_full_lines_and_long_note(tmp_path):
    """Through real pipes (not a terminal): the report on stdout and, with --report -, on
    stderr; the long "nothing was pruned" note stays one line."""
    ops = _long_named_digits(tmp_path / "m.onnx", "encoder.layers.11.attention.output.dense." * 2)
    res = subprocess.run([sys.executable, "-m", "onnxprune", str(tmp_path / "m.onnx"),
                          "-o", str(tmp_path / "o.onnx"), "--sparsity", "0", "--allow-noop"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    rows = [line for line in res.stdout.splitlines() if any(n in line for n in ops)]
    assert len(rows) == len(ops)
    assert f"  • {NOOP_NOTE}" in res.stdout.splitlines()
    res = subprocess.run([sys.executable, "-m", "onnxprune", str(tmp_path / "m.onnx"),
                          "-o", str(tmp_path / "o2.onnx"), "--report", "-"],
                         capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["noop"] is False
    _assert_full_lines(res.stderr.split("wrote ")[0], ops)


def test_piped_report_shows_every_row(tmp_path):
    """A terminal shows the first and last rows of a long table; a log gets every row."""
    from onnx import TensorProto, helper

    n = 70
    nodes = [helper.make_node("MatMul", [f"h{i}", f"w{i}"], [f"h{i + 1}"], name=f"mm{i}")
             for i in range(n)]
    inits = [B.tensor(f"w{i}", (4, 4), i) for i in range(n)]
    model = B.make_model(nodes, [helper.make_tensor_value_info("h0", TensorProto.FLOAT, [2, 4])],
                         [helper.make_tensor_value_info(f"h{n}", TensorProto.FLOAT, [2, 4])],
                         inits)
    onnx.save(model, str(tmp_path / "deep.onnx"))
    res = invoke("inspect", tmp_path / "deep.onnx")
    assert res.exit_code == 0, res.output
    lines = res.stdout.splitlines()
    for i in range(n):
        assert sum(line.split()[:1] == [f"w{i}"] for line in lines) == 1, i
    assert "more" not in res.stdout


# -- 2. logging ----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags,info,debug", [
    ([], False, False),
    (["-v"], True, False),
    (["-vv"], True, True),
    (["--log-level", "debug"], True, True),
    (["-v", "--log-level", "warning"], False, False),
    (["--log-level", "error"], False, False),
])
def test_verbosity(model_file, tmp_path, flags, info, debug):
    root = logging.getLogger("onnxprune")
    handlers, level = list(root.handlers), root.level
    res = invoke(model_file, "-o", tmp_path / "o.onnx", "-q", *flags)
    assert res.exit_code == 0, res.output
    assert res.stdout == ""  # --quiet still quiet: log lines go to stderr only
    assert ("INFO onnxprune.passes.base: pass select:" in res.stderr) == info
    assert ("INFO onnxprune.passes.base: pipeline done in" in res.stderr) == info
    assert ("DEBUG onnxprune.passes.base: pass mask: start" in res.stderr) == debug
    assert root.handlers == handlers and root.level == level  # configured for the command only


def test_logging_options_before_the_command(model_file):
    res = invoke("-v", "--log-level=info", "inspect", model_file, "-q")
    assert res.exit_code == 0, res.output
    assert "INFO onnxprune.cli: inspecting" in res.stderr


# -- 3. --version ----------------------------------------------------------------------------

def test_version():
    from importlib.metadata import version as dist_version

    res = invoke("--version")
    assert res.exit_code == 0
    assert res.output == f"onnxprune {dist_version('onnxprune')}\n" == f"onnxprune {version()}\n"


# -- 4. help ---------------------------------------------------------------------------------

def _commands():
    group = build_main()
    return [(group.name, group, click.Context(group))] + [
        (name, cmd, click.Context(cmd, info_name=name)) for name, cmd in group.commands.items()]


def _flat(text: str) -> str:
    # no whitespace at all: help text may wrap anywhere, even after a hyphen (--max-\nerror)
    return "".join(text.split())


def test_top_level_help_lists_the_prune_options_and_commands():
    res = invoke("--help")
    assert res.exit_code == 0
    text = _flat(res.output)
    group = build_main()
    prune_cmd = group.commands["prune"]
    ctx = click.Context(prune_cmd, info_name="prune")
    for param in prune_cmd.get_params(ctx):
        if isinstance(param, click.Option):
            decl, help_ = param.get_help_record(ctx)
            assert _flat(decl) in text and _flat(help_) in text, decl
    for name, cmd in group.commands.items():
        assert re.search(rf"\b{name}\b", res.output.split("Commands:")[1])
    assert "--version" in text


def test_every_option_has_help_and_choices_are_listed():
    for name, cmd, ctx in _commands():
        for param in cmd.get_params(ctx):
            if not isinstance(param, click.Option):
                continue
            assert param.help and param.help.strip(), (name, param.opts)
            decl, help_ = param.get_help_record(ctx)
            if isinstance(param.type, click.Choice):
                shown = _flat(decl + " " + help_)
                for choice in param.type.choices:
                    assert str(choice) in shown, (name, param.opts, choice)


def test_registry_backed_options_list_their_choices():
    from onnxprune.masking.criteria import criterion_names
    from onnxprune.ops.layouts import prunable_op_types

    text = _flat(invoke("prune", "--help").output)
    assert "--criterion[" + "|".join(criterion_names()) + "]" in text
    assert "--scope[local|global]" in text
    assert "--allocate[auto|uniform|sensitivity]" in text
    for form in ("unstructured", "NxM", "N:M", "channel"):
        assert form in text.split("--pattern")[1].split("--sparsity")[0]
    assert ",".join(prunable_op_types()) in text


# -- 5. --input-shape, Polygraphy's form -----------------------------------------------------

def test_parse_polygraphy_shapes():
    assert parse_input_shapes(["x:[1,3,224,224] y:[1,10]", "input:0:[1,3]", "ids:1x8",
                               "s:[]", "z:[ 2, 5 ]"]) == {
        "x": (1, 3, 224, 224), "y": (1, 10), "input:0": (1, 3), "ids": (1, 8), "s": (),
        "z": (2, 5)}


@pytest.mark.parametrize("bad,piece", [
    ("x:[1,3", "'x:[1,3'"), ("x:[1,a]", "'x:[1,a]'"), ("[1,3]", "'[1,3]'"),
    ("x:[1]y:[2]", "'x:[1]y:[2]'"), ("x:[1] y", "'y'"), ("x:[1,0]", "'x:[1,0]'"),
])
def test_parse_polygraphy_shapes_names_the_bad_piece(bad, piece):
    with pytest.raises(OptionError, match=re.escape(piece)):
        parse_input_shapes([bad])


def _dynamic_batch(path):
    model = B.conv_gemm_model()
    model.graph.input[0].type.tensor_type.shape.dim[0].dim_param = "N"
    model.graph.output[0].type.tensor_type.shape.dim[0].dim_param = "N"
    onnx.save(model, str(path))
    return path


def test_cli_input_shape_polygraphy(tmp_path):
    path = _dynamic_batch(tmp_path / "dyn.onnx")

    def macs(*shape_args):
        res = invoke("inspect", path, "--report", "-", *shape_args)
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["macs_before"]

    assert macs("--input-shape", "x:[4,8,10,10]") == 4 * macs("--input-shape", "x:1x8x10x10")
    res = invoke(path, "--input-shape", "x:[1,8,10,10] nope:[1]", "-o", tmp_path / "o.onnx")
    assert res.exit_code == 2 and "nope" in res.output  # both pieces read; 'nope' is no input
    assert not (tmp_path / "o.onnx").exists()
    res = invoke("inspect", path, "--input-shape", "x:[1,8,10")
    assert res.exit_code == 2 and "error: --input-shape 'x:[1,8,10'" in res.output


# -- 7. the no-MODEL demo, twice ---------------------------------------------------------------

def test_demo_runs_twice_and_never_overwrites(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert invoke("-q").exit_code == 0
    first = (tmp_path / "digits_cnn.pruned.onnx").read_bytes()
    (tmp_path / "digits_cnn.pruned-2.onnx").write_bytes(b"mine")  # not the demo's to overwrite
    res = invoke("--sparsity", "0.7")
    assert res.exit_code == 0, res.output
    assert "digits_cnn.pruned-3.onnx" in res.output
    assert (tmp_path / "digits_cnn.pruned.onnx").read_bytes() == first
    assert (tmp_path / "digits_cnn.pruned-2.onnx").read_bytes() == b"mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "digits_cnn.pruned-2.onnx", "digits_cnn.pruned-3.onnx", "digits_cnn.pruned.onnx"]
    res = invoke("-q", "--force", "--sparsity", "0.7")  # --force: the first name, rewritten
    assert res.exit_code == 0
    assert (tmp_path / "digits_cnn.pruned.onnx").read_bytes() != first
    assert len(list(tmp_path.iterdir())) == 3


def test_demo_numbering_is_only_for_the_demo(model_file, tmp_path):
    assert invoke(model_file, "-q").exit_code == 0
    res = invoke(model_file, "-q")
    assert res.exit_code == 2 and "--force" in res.output
    assert not (tmp_path / "net.pruned-2.onnx").exists()


# -- 8. nothing was pruned ------------------------------------------------------------------------

def test_noop_exits_3_with_a_warning_and_writes(model_file, tmp_path):
    res = invoke(model_file, "--sparsity", "0", "--report", tmp_path / "r.json")
    assert res.exit_code == EXIT_NOOP == 3
    assert f"warning: {NOOP_NOTE}; exit 3" in res.stderr
    assert "warning" not in res.stdout.split("notes")[0]
    assert (tmp_path / "net.pruned.onnx").is_file()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["noop"] is True and NOOP_NOTE in report["notes"]


def test_noop_on_an_already_pruned_model(model_file, tmp_path):
    assert invoke(model_file, "-q", "--sparsity", "0.6").exit_code == 0
    res = invoke(tmp_path / "net.pruned.onnx", "-q", "--sparsity", "0.6")
    assert res.exit_code == 3 and "nothing was pruned" in res.stderr
    res = invoke(tmp_path / "net.pruned.onnx", "-q", "--sparsity", "0.6", "--allow-noop",
                 "--force")
    assert res.exit_code == 0 and "(accepted: --allow-noop)" in res.stderr
    assert invoke(tmp_path / "net.pruned.onnx", "-q", "--sparsity", "0.7",
                  "--force").exit_code == 0


def test_noop_in_the_api(model_file, tmp_path):
    out = tmp_path / "o.onnx"
    result = prune(model_file, sparsity=0.0, output=out)  # returns normally
    assert result.report.noop is True and NOOP_NOTE in result.report.notes
    assert result.report.to_dict()["noop"] is True and out.is_file()
    result = prune(model_file, sparsity=0.0, allow_noop=True)
    assert result.report.noop is True
    result = prune(model_file, sparsity=0.5)
    assert result.report.noop is False and NOOP_NOTE not in result.report.notes


# -- 9. config rules -------------------------------------------------------------------------

def _rows(path):
    return {r["name"]: r for r in json.loads(Path(path).read_text())["rows"]}


def test_nm_rule_does_not_inherit_the_default_sparsity(model_file, tmp_path):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text('defaults: {pattern: 4x1, sparsity: 0.75}\n'
                   'rules:\n  - op_names: ["conv"]\n    pattern: "2:4"\n')
    res = invoke(model_file, "--config", cfg, "--report", tmp_path / "r.json", "-q")
    assert res.exit_code == 0, res.output
    rows = _rows(tmp_path / "r.json")
    w = onnx.numpy_helper.to_array(next(t for t in onnx.load(str(tmp_path / "net.pruned.onnx"))
                                        .graph.initializer if t.name == "conv.w"))
    groups = w.transpose(0, 2, 3, 1).reshape(16, -1, 4)
    assert ((groups != 0).sum(-1) <= 2).all()  # 2:4 at its own 50 %
    assert rows["conv.w"]["nonzeros_after"] == 16 * 72 // 2
    assert rows["fc.w"]["nonzeros_after"] == 10 * 16 // 4  # the defaults: 4x1 at 0.75


def test_run_sparsity_reaches_only_free_patterns(model_file, tmp_path):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps([{"op_types": ["Gemm"], "pattern": "2:4"}]))
    res = invoke(model_file, "--config", cfg, "--sparsity", "0.75", "--report",
                 tmp_path / "r.json", "-q")
    assert res.exit_code == 0, res.output
    rows = _rows(tmp_path / "r.json")
    assert rows["fc.w"]["nonzeros_after"] == 10 * 16 // 2
    assert rows["conv.w"]["nonzeros_after"] == 16 * 72 - round(0.75 * 16 * 72)


@pytest.mark.parametrize("config,where", [
    ([{"op_names": ["conv"], "pattern": "2:4", "sparsity": 0.8}], "config rule 0 sparsity"),
    ({"defaults": {"pattern": "2:4"}, "rules": [{"op_types": ["Gemm"], "sparsity": 0.8}]},
     "config rule 0 sparsity"),
    ({"defaults": {"pattern": "2:4", "sparsity": 0.8}}, "config defaults sparsity"),
])
def test_explicit_conflicting_sparsity_names_the_level(model_file, tmp_path, config, where):
    cfg = tmp_path / "cfg.json"
    cfg.write_text(json.dumps(config))
    res = invoke(model_file, "--config", cfg, "-o", tmp_path / "o.onnx")
    assert res.exit_code == 2
    assert f"{where}=0.8 conflicts" in res.output and "implies sparsity 0.5" in res.output
    assert not (tmp_path / "o.onnx").exists()


# -- 6. optional extras ------------------------------------------------------------------------

def test_optional_extras_declared():
    text = (ROOT / "pyproject.toml").read_text()
    section = text.split("[project.optional-dependencies]")[1].split("\n[")[0]
    extras = {}
    for line in section.splitlines():
        m = re.match(r"(\w+) = \[(.*)\]", line.strip())
        if m:
            extras[m.group(1)] = [s.strip().strip('"') for s in m.group(2).split(",")]
    assert "Pillow>=9" in extras["images"]
    assert "matplotlib>=3.7" in extras["report"]
    assert "jsonschema>=4" in extras["test"]
    images = (ROOT / "onnxprune" / "inputs" / "images.py").read_text()
    assert "pip install onnxprune[images]" in images


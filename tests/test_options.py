"""PruneOptions and the CLI generated from it: every field is on the command line with the same
default or marked API-only, choices are the registries' names, and every flag has its help."""

from dataclasses import fields

import click
import onnx
import numpy as np
import pytest
from click.testing import CliRunner

from onnxprune import cli
from onnxprune.inputs.images import ImagePreprocess
from onnxprune.errors import InputDataError, OptionError
from onnxprune.masking import criteria, patterns
from onnxprune.masking.scope import SCOPES
from onnxprune.ops.layouts import prunable_op_types
from onnxprune.options import (ALLOCATIONS, Flag, FlagGroup, PruneOptions, cli_fields, cli_spec,
                               from_cli)
from onnxprune.passes.base import DEFAULT_MEMORY_BUDGET

#: Flags of the commands that are no option of a run (where to write, what to print).
NOT_OPTIONS = {"prune": {"model", "output", "report_path", "force", "quiet", "verbose",
                         "log_level"},
               "inspect": {"model", "report_path", "force", "quiet", "verbose", "log_level"}}


def command(name, main=None):
    return (main or cli.main).commands[name]


def defaults(name, main=None):
    """What the command's parameters hold when nothing but a model is given."""
    return command(name, main).make_context(name, ["m.onnx"]).params


def flags_of(spec):
    return list(spec.flags.values()) if isinstance(spec, FlagGroup) else [spec]


def test_every_field_is_on_the_cli_or_marked_api_only():
    for f in fields(PruneOptions):
        assert "cli" in f.metadata, f"{f.name}: declare option(...) or api_only(...)"
        spec = cli_spec(f)
        if spec is None:
            assert f.metadata["api_only"].strip(), f"{f.name}: say why it is API-only"
        else:
            assert isinstance(spec, (Flag, FlagGroup)) and "prune" in spec.commands


@pytest.mark.parametrize("name", ["prune", "inspect"])
def test_cli_defaults_are_the_dataclass_defaults(name):
    values = from_cli(defaults(name), name)
    exposed = [f for f, _ in cli_fields(name)]
    assert values == {f.name: f.default for f in exposed}
    if name == "prune":  # the run a bare `onnxprune MODEL` makes is PruneOptions()'s
        assert PruneOptions(**values) == PruneOptions()


@pytest.mark.parametrize("name", ["prune", "inspect"])
def test_every_cli_option_maps_to_a_field(name):
    params = {p.name for p in command(name).params}
    keys = set(from_cli(defaults(name), name))
    assert keys <= {f.name for f in fields(PruneOptions)}
    generated = params - NOT_OPTIONS[name]
    group_params = {p for p in generated if "__" in p}
    assert {p.split("__")[0] for p in group_params} | (generated - group_params) == keys


@pytest.mark.parametrize("name", ["prune", "inspect"])
def test_every_option_has_help_and_shows_in_help(name):
    res = CliRunner().invoke(cli.main, [name, "--help"], terminal_width=200)
    assert res.exit_code == 0
    for param in command(name).params:
        if isinstance(param, click.Option):
            assert param.help and param.help.strip(), param.name
            assert param.opts[0] in res.output
    for f, spec in cli_fields(name):
        for key, flag in (spec.flags.items() if isinstance(spec, FlagGroup)
                          else [(f.name, spec)]):
            assert flag.flag(key) in res.output


def test_choices_are_the_registries_names():
    params = {p.name: p for p in command("prune").params}
    assert list(params["criterion"].type.choices) == criteria.criterion_names()
    assert list(params["scope"].type.choices) == list(SCOPES)
    assert list(params["allocate"].type.choices) == list(ALLOCATIONS)
    for f, spec in cli_fields("prune"):  # every choice list is the one its flag declares
        for key, flag in (spec.flags.items() if isinstance(spec, FlagGroup)
                          else [(None, spec)]):
            name = f.name if key is None else f"{f.name}__{key}"
            if flag.choices is not None:
                assert list(params[name].type.choices) == list(flag.choices())
    assert params["pattern"].help == patterns.pattern_help()
    assert ", ".join(prunable_op_types()) in params["op_types"].help


def test_image_choices_are_what_image_preprocess_accepts():
    params = {p.name: p for p in command("prune").params}
    for key in ("layout", "channel_order"):
        for choice in params[f"image_preprocess__{key}"].type.choices:
            assert getattr(ImagePreprocess(**{key: choice}), key) == choice
        with pytest.raises(OptionError):
            ImagePreprocess(**{key: "bogus"})


def test_a_registered_criterion_is_a_cli_choice_without_cli_edits(monkeypatch):
    class Dummy(criteria.Criterion):
        name = "dummy_for_test"

        def scores(self, w2d, ctx):
            return np.ones(w2d.shape, np.float32)

    monkeypatch.setitem(criteria._CRITERIA, Dummy.name, Dummy())
    main = cli.build_main()
    choices = {p.name: p for p in command("prune", main).params}["criterion"].type.choices
    assert Dummy.name in choices and list(choices) == criteria.criterion_names()
    ctx = command("prune", main).make_context("prune", ["--criterion", Dummy.name])
    assert from_cli(ctx.params)["criterion"] == Dummy.name
    res = CliRunner().invoke(main, ["prune", "--help"], terminal_width=200)
    assert Dummy.name in res.output


def test_a_registered_pattern_shows_in_the_cli_help(monkeypatch):
    monkeypatch.setattr(patterns, "_PARSERS", list(patterns._PARSERS))
    patterns.register_pattern(r"dummy", "dummy: a test pattern")(lambda m: None)
    main = cli.build_main()
    assert "dummy: a test pattern" in {p.name: p for p in command("prune", main).params
                                       }["pattern"].help


def test_parsers_turn_text_into_field_values(tmp_path):
    np.savez(tmp_path / "s.npz", w=np.arange(4.0))
    ctx = command("prune").make_context("prune", [
        "--scores", str(tmp_path / "s.npz"), "--input-shape", "x:1x3x8x8",
        "--memory-budget", "3", "--prune-fixed", "--no-validate", "--search", "--refit",
        "--no-bias-correction", "--no-resize", "--op-types", "Conv,Gemm",
        "--image-size", "48x320", "--image-mean", "0.5,0.5,0.5"])
    values = from_cli(ctx.params)
    assert list(values["scores"]) == ["w"] and values["scores"]["w"].tolist() == [0, 1, 2, 3]
    assert values["input_shapes"] == {"x": (1, 3, 8, 8)}
    assert values["memory_budget"] == 3 << 20
    assert values["guard_fixed"] is False and values["validate"] is False
    assert values["search"] is True and values["refit"] is True
    assert values["bias_correction"] is False and values["resize"] is False
    assert values["op_types"] == "Conv,Gemm"  # the API splits and checks it
    assert values["image_preprocess"] == ImagePreprocess(size=(48, 320), mean=(0.5, 0.5, 0.5))
    assert DEFAULT_MEMORY_BUDGET == defaults("prune")["memory_budget"] << 20


def test_any_image_flag_alone_builds_the_preprocessing():
    ctx = command("prune").make_context("prune", ["--image-layout", "NHWC"])
    assert from_cli(ctx.params)["image_preprocess"] == ImagePreprocess(layout="NHWC")


@pytest.mark.parametrize("args,match", [
    (["--image-size", "48by320"], "--image-size"),
    (["--image-mean", "a,b,c"], "--image-mean"),
    (["--scores", "missing.npz"], "--scores"),
    (["--masks", "missing.npz"], "--masks"),
    (["--input-shape", "x"], "--input-shape"),
])
def test_parser_errors_name_the_flag(args, match):
    # A bad value is an OptionError; an unreadable data file an InputDataError (both exit 2).
    ctx = command("prune").make_context("prune", args)
    with pytest.raises((OptionError, InputDataError), match=match):
        from_cli(ctx.params)


def test_readme_cli_synopsis_lists_every_flag():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    synopsis = readme.split("## CLI", 1)[1].split("```")[1]
    for name in ("prune", "inspect"):
        for param in command(name).params:
            if isinstance(param, click.Option):
                assert param.opts[-1] in synopsis, f"README's CLI synopsis lacks {param.opts}"


BOUNDED = [f for f in fields(PruneOptions) if f.metadata.get("bounds")]


def test_bounded_fields_accept_their_defaults_and_bounds():
    assert {f.name for f in BOUNDED} >= {"seed", "max_error", "min_sparsity", "max_sparsity",
                                          "calibration_samples", "round_to", "min_channels",
                                          "max_group_sparsity", "memory_budget"}
    for f in BOUNDED:
        lo, hi = f.metadata["bounds"]
        for value in (lo, hi) if hi != float("inf") else (lo, 1e9):
            PruneOptions(**{f.name: value})


@pytest.mark.parametrize("name,value", [(f.name, v) for f in BOUNDED
                                        for v in (float("nan"), float("inf"), -1, True)])
def test_bounded_fields_refuse_non_finite_negative_and_bool(name, value):
    lo, hi = next(f for f in BOUNDED if f.name == name).metadata["bounds"]
    if value == float("inf") and hi == float("inf"):
        value = float("-inf")
    flag = "--" + name.replace("_", "-")
    with pytest.raises(OptionError, match=flag):
        PruneOptions(**{name: value})


@pytest.mark.parametrize("args", [["--seed", "-1"], ["--max-error", "nan"],
                                  ["--max-sparsity", "inf"], ["--calibration-samples", "0"]])
def test_odd_numbers_on_the_cli_are_one_error_line_and_exit_2(tmp_path, args):
    import builders as B

    src = tmp_path / "m.onnx"
    onnx.save(B.conv_gemm_model(), str(src))
    out = tmp_path / "out.onnx"
    res = CliRunner().invoke(cli.main, [str(src), "-o", str(out), "-q", *args])
    assert res.exit_code == 2, res.output
    assert args[0] in res.output and "Traceback" not in res.output
    assert not out.exists()

"""Token inputs: ``--input-shape`` dim names (``batch=1,seq=32``), the roles of generated inputs
(ids from the embedding table's row range, masks, token types, positions, past keys/values) and
int64 ids calibration end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

from onnxprune import prune
from onnxprune.cli import main
from onnxprune.errors import OptionError
from onnxprune.inputs.dataset import generated_calibration
from onnxprune.inputs.generate import generated_notes, make_inputs
from onnxprune.inputs.roles import INT_HIGH, input_roles
from onnxprune.inputs.signature import (bind_input_shapes, parse_input_shapes,
                                        resolve_input_shapes)

VOCAB, HIDDEN = 37, 8
MODELS = Path(__file__).resolve().parents[2] / "models"


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def token_model(past: bool = False) -> onnx.ModelProto:
    """ids -> Gather(emb[VOCAB, H]) -> MatMul W; mask -> Cast -> Sub(1, m) -> Mul(-1e4) added to
    the scores; token types -> Gather(type_emb[2, H]); position ids -> Gather(pos[64, H]); with
    ``past``: a [batch, 2, past_seq, H] past key summed over its sequence axis."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((VOCAB, HIDDEN)).astype(np.float32),
                                     "emb"),
             numpy_helper.from_array(rng.standard_normal((2, HIDDEN)).astype(np.float32),
                                     "type_emb"),
             numpy_helper.from_array(rng.standard_normal((64, HIDDEN)).astype(np.float32),
                                     "pos_emb"),
             numpy_helper.from_array(rng.standard_normal((HIDDEN, HIDDEN)).astype(np.float32),
                                     "W"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(-1e4, np.float32), "neg"),
             numpy_helper.from_array(np.array([2], np.int64), "axis2")]
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["e"]),
             helper.make_node("Gather", ["type_emb", "token_type_ids"], ["t"]),
             helper.make_node("Gather", ["pos_emb", "position_ids"], ["p"]),
             helper.make_node("Add", ["e", "t"], ["et"]),
             helper.make_node("Add", ["et", "p"], ["etp"]),
             helper.make_node("MatMul", ["etp", "W"], ["h"]),
             helper.make_node("Cast", ["mask"], ["mf"], to=TensorProto.FLOAT),
             helper.make_node("Sub", ["one", "mf"], ["inv"]),
             helper.make_node("Mul", ["inv", "neg"], ["add_mask"]),
             helper.make_node("Unsqueeze", ["add_mask", "axis2"], ["m3"]),
             helper.make_node("Add", ["h", "m3"], ["y"])]
    inputs = [_vi("input_ids", ["batch", "seq"], TensorProto.INT64),
              _vi("mask", ["batch", "seq"], TensorProto.INT64),
              _vi("token_type_ids", ["batch", "seq"], TensorProto.INT64),
              _vi("position_ids", ["batch", "seq"], TensorProto.INT64)]
    outputs = [_vi("y", ["batch", "seq", HIDDEN])]
    if past:
        inputs.append(_vi("past_key", ["batch", 2, "past_seq", HIDDEN]))
        inits.append(numpy_helper.from_array(np.array([1, 2], np.int64), "axes12"))
        nodes.append(helper.make_node("ReduceSum", ["past_key", "axes12"], ["pk"], keepdims=0))
        outputs.append(_vi("pk", ["batch", HIDDEN]))
    graph = helper.make_graph(nodes, "tokens", inputs, outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


# -- --input-shape with dim names ---------------------------------------------------------------
def test_parse_dim_names_alone_and_mixed():
    assert parse_input_shapes(["batch=1,seq=32"]) == {"batch": 1, "seq": 32}
    assert parse_input_shapes(["batch=2 seq=4"]) == {"batch": 2, "seq": 4}
    assert parse_input_shapes(["batch=1,seq=8;x:1x3x224x224", "y:[1,2] n=3"]) == {
        "batch": 1, "seq": 8, "x": (1, 3, 224, 224), "y": (1, 2), "n": 3}


@pytest.mark.parametrize("bad, match", [("batch=0", "positive integer"),
                                        ("batch=two", "positive integer"),
                                        ("batch=1,seq", "is not NAME:DIMS"),
                                        ("batch=1;batch=2", "dim 'batch' twice")])
def test_parse_dim_names_rejects(bad, match):
    with pytest.raises(OptionError, match=match):
        parse_input_shapes([bad])


def test_dim_names_apply_to_every_input_declaring_them():
    model = token_model(past=True)
    shapes = resolve_input_shapes(model, {"batch": 3, "seq": 5})
    assert shapes == {"input_ids": (3, 5), "mask": (3, 5), "token_type_ids": (3, 5),
                      "position_ids": (3, 5), "past_key": (3, 2, 1, HIDDEN)}
    # bound per input: only the inputs that declare a bound symbol, each whole
    assert bind_input_shapes(model, {"seq": 5}) == {
        "input_ids": (1, 5), "mask": (1, 5), "token_type_ids": (1, 5), "position_ids": (1, 5)}
    assert bind_input_shapes(model, {"past_key": (1, 2, 4, HIDDEN), "seq": 2})["past_key"] == (
        1, 2, 4, HIDDEN)
    assert bind_input_shapes(model, {"input_ids": (1, 4)}) == {"input_ids": (1, 4)}


def test_unknown_dim_name_names_the_declared_ones():
    with pytest.raises(OptionError) as err:
        resolve_input_shapes(token_model(), {"sequence": 32})
    assert str(err.value) == ("--input-shape binds dim 'sequence', which no input of the model "
                              "declares; the symbolic dims its inputs declare are: batch, seq")


def test_dim_name_conflicting_with_a_whole_shape():
    with pytest.raises(OptionError, match="bound to 4 by --input-shape seq=4"):
        resolve_input_shapes(token_model(), {"seq": 4, "input_ids": (1, 6)})


def test_cli_dim_names(tmp_path):
    path = tmp_path / "tok.onnx"
    onnx.save(token_model(), str(path))
    runner = CliRunner()

    def macs(*args):
        res = runner.invoke(main, ["inspect", str(path), "--report", "-", *args],
                            catch_exceptions=False)
        assert res.exit_code == 0, res.output
        return json.loads(res.stdout)["macs_before"]

    assert macs("--input-shape", "batch=2,seq=10") == 2 * 10 * HIDDEN * HIDDEN
    assert macs("--input-shape", "seq=10;input_ids:[2,10]") == 2 * 10 * HIDDEN * HIDDEN
    res = runner.invoke(main, [str(path), "--input-shape", "batch=1,sequence=8", "-o",
                               str(tmp_path / "o.onnx")], catch_exceptions=False)
    assert res.exit_code == 2
    assert res.output.strip().splitlines()[-1] == (
        "error: --input-shape binds dim 'sequence', which no input of the model declares; "
        "the symbolic dims its inputs declare are: batch, seq")
    assert not (tmp_path / "o.onnx").exists()
    res = runner.invoke(main, [str(path), "--input-shape", "batch=2,seq=6", "-o",
                               str(tmp_path / "p.onnx"), "--report", "-", "--sparsity", "0.5"],
                        catch_exceptions=False)
    assert res.exit_code == 0, res.output
    report = json.loads(res.stdout)
    # validation fed the bound shapes, and says what it generated for the token inputs
    assert any(n.startswith("generated inputs: input_ids [2x6]: token ids in 0..36 ")
               for n in report["notes"]), report["notes"]


# -- roles ---------------------------------------------------------------------------------------
def test_roles_from_graph_use():
    roles = input_roles(token_model(past=True))
    assert {k: (r.kind, r.high) for k, r in roles.items()} == {
        "input_ids": ("ids", VOCAB), "mask": ("mask", None), "token_type_ids": ("type", None),
        "position_ids": ("position", None), "past_key": ("past", None)}
    assert roles["mask"].why == "combined toward an additive mask"  # graph use, not its name


def test_generated_token_inputs():
    feed = make_inputs(token_model(past=True), {"batch": 4, "seq": 50}, seed=3)
    ids = feed["input_ids"]
    assert ids.dtype == np.int64 and ids.shape == (4, 50)
    assert ids.min() >= 0 and ids.max() < VOCAB and ids.max() >= INT_HIGH  # the table's range
    assert (feed["mask"] == 1).all() and (feed["token_type_ids"] == 0).all()
    assert (feed["position_ids"] == np.arange(50)[None]).all()
    assert feed["past_key"].shape == (4, 2, 1, HIDDEN)
    notes = generated_notes(token_model(), {"seq": 5})
    assert notes == [
        "input_ids [1x5]: token ids in 0..36 (indexes an embedding table of 37 rows)",
        "mask [1x5]: all ones (attend everywhere) (combined toward an additive mask)",
        "token_type_ids [1x5]: all zeros (indexes a table of 2 rows)",
        "position_ids [1x5]: 0, 1, 2, ... along the last axis (named as positions)"]


def test_ids_behind_dequantized_table_and_fallback():
    """A table stored int8 and dequantized (Cast -> Mul) still gives the row range; an integer
    input with no table keeps the small fallback range."""
    q = numpy_helper.from_array(np.ones((300, 4), np.int8), "q")
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    nodes = [helper.make_node("Cast", ["q"], ["qf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["qf", "s"], ["table"]),
             helper.make_node("Unsqueeze", ["ids", "ax"], ["ids2"]),
             helper.make_node("Gather", ["table", "ids2"], ["e"]),
             helper.make_node("Cast", ["other"], ["o"], to=TensorProto.FLOAT)]
    graph = helper.make_graph(
        nodes, "dq", [_vi("ids", ["n"], TensorProto.INT32), _vi("other", ["n"], TensorProto.INT64)],
        [_vi("e", None), _vi("o", None)],
        [q, scale, numpy_helper.from_array(np.array([0], np.int64), "ax")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    roles = input_roles(model)
    assert (roles["ids"].kind, roles["ids"].high) == ("ids", 300)
    assert (roles["other"].kind, roles["other"].high) == ("ids", INT_HIGH)
    assert roles["other"].why == "no embedding table found: small range 0..9"
    ids = make_inputs(model, {"n": 2000})["ids"]
    assert ids.dtype == np.int32 and ids.max() < 300 and ids.max() >= 250


@pytest.mark.parametrize("negate, fill, expected", [
    (False, -1e9, 0),          # Where(mask, -1e9, scores): true hides -> generate all false
    (True, -1e9, 1),           # Where(Not(mask), -1e9, scores): true attends
    (False, float("-inf"), 0),
    (True, 0.0, 1),            # a Where that selects no masking fill: the default, ones
])
def test_padding_mask_polarity(negate, fill, expected):
    """Which value of a bool mask lets every position through, read from its Where."""
    nodes = [helper.make_node("Not", ["m"], ["nm"])] if negate else []
    nodes += [helper.make_node("Where", ["nm" if negate else "m", "fill", "x"], ["y"])]
    graph = helper.make_graph(
        nodes, "pad", [_vi("m", ["batch", "seq"], TensorProto.BOOL), _vi("x", ["batch", "seq"])],
        [_vi("y", None)], [numpy_helper.from_array(np.array(fill, np.float32), "fill")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    role = input_roles(model)["m"]
    assert (role.kind, role.fill) == ("mask", expected)
    feed = make_inputs(model, {"seq": 6})
    assert feed["m"].dtype == bool and (feed["m"] == bool(expected)).all()


def test_multiplicative_padding_mask():
    """Not(mask) cast to float and multiplied into activations: the mask is true on padding."""
    nodes = [helper.make_node("Not", ["m"], ["keep"]),
             helper.make_node("Cast", ["keep"], ["kf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["x", "kf"], ["y"])]
    graph = helper.make_graph(
        nodes, "mul", [_vi("m", ["n"], TensorProto.BOOL), _vi("x", ["n"])], [_vi("y", None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    role = input_roles(model)["m"]
    assert (role.kind, role.fill) == ("mask", 0)
    assert role.describe("m", (1, 4)) == ("m [1x4]: all zeros (nothing marked as padding) (true "
                                          "marks padding: it selects a masking fill or zeroes "
                                          "activations)")


def test_generated_calibration_uses_roles():
    data = generated_calibration(token_model(), n=3, shapes={"seq": 7})
    batch = next(iter(data.batches(3)))
    assert batch["input_ids"].shape == (3, 7) and batch["input_ids"].max() < VOCAB
    assert (batch["mask"] == 1).all()


# -- int64 ids calibration, end to end ---------------------------------------------------------
def test_calibrated_24_on_transformer_with_ids_npz(tmp_path):
    model = onnx.load(str(MODELS / "transformer_mlp.onnx"))
    roles = input_roles(model)
    assert roles["input_ids"].kind == "ids"
    vocab = roles["input_ids"].high
    rng = np.random.default_rng(0)
    ids = rng.integers(0, vocab, size=(12, 16)).astype(np.int64)
    npz = tmp_path / "ids.npz"
    np.savez(npz, input_ids=ids)
    result = prune(str(MODELS / "transformer_mlp.onnx"), pattern="2:4", criterion="sparsegpt",
                   calibration=str(npz), calibration_samples=8, validation_samples=4)
    rows = [r for r in result.report.to_dict()["rows"] if r["pattern"] == "2:4"]
    assert len(rows) >= 4 and all(r["criterion"] == "sparsegpt" for r in rows)
    stored = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    for row in rows:
        w = stored[row["name"]]  # MatMul W[in, out]: groups of 4 along the input axis
        assert row["nonzeros_after"] == w.size // 2
        assert ((w.T.reshape(-1, 4) != 0).sum(axis=1) <= 2).all()
    comparison = result.state.comparison
    assert comparison.accuracy_estimate
    assert comparison.data_note == "4 calibration samples held out from the statistics"

"""The input layer: signatures and shapes, generated inputs, and the one loader that serves
calibration (samples in batches) and validation (one feed) with one check and one set of
messages."""

from __future__ import annotations

import builtins

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.errors import InputDataError, OptionError
from onnxprune.inputs.dataset import (CalibrationSet, generated_calibration, load_calibration,
                                      load_inputs)
from onnxprune.inputs.files import read_npz
from onnxprune.inputs.generate import make_inputs
from onnxprune.inputs.images import ImagePreprocess
from onnxprune.inputs.signature import input_signature, parse_input_shapes, resolve_input_shapes
from onnxprune.runtime.session import run_model

import builders as B

F = TensorProto.FLOAT

OPSET = [helper.make_opsetid("", 17)]


def _vi(name, shape, elem=TensorProto.FLOAT):
    return helper.make_tensor_value_info(name, elem, shape)


def _multi_input():
    """Inputs of every kind make_inputs handles; the graph only needs to be valid."""
    inputs = [_vi("image", ["N", 3, "H", "W"]),
              _vi("nhwc", ["N", "H2", "W2", 3], TensorProto.FLOAT16),
              _vi("input_ids", ["N", "seq"], TensorProto.INT64),
              _vi("attention_mask", ["N", "seq"], TensorProto.INT64),
              _vi("token_type_ids", ["N", "seq"], TensorProto.INT32),
              _vi("flag", [None], TensorProto.BOOL),
              _vi("fixed", [2, 5])]
    nodes = [helper.make_node("Identity", [i.name], [i.name + "_out"]) for i in inputs]
    outputs = [helper.make_tensor_value_info(i.name + "_out", i.type.tensor_type.elem_type, None)
               for i in inputs]
    return helper.make_model(helper.make_graph(nodes, "multi", inputs, outputs),
                             opset_imports=OPSET)


def make_model(nodes, inputs, outputs, initializers=()):
    graph = helper.make_graph(list(nodes), "t", list(inputs), list(outputs), list(initializers))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model  # outputs are left shapeless (onnxruntime infers them); no checker run



def _npz(tmp_path, name="calib.npz", **arrays):
    path = tmp_path / name
    np.savez(path, **arrays)
    return path


def _one_input_model():
    """x [N, 4] -> Relu -> MatMul W [4, 3]."""
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("MatMul", ["a", "W"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, ["N", 4])],
                      [helper.make_tensor_value_info("y", F, None)],
                      [numpy_helper.from_array(np.ones((4, 3), np.float32), "W")])


# -- --input-shape ------------------------------------------------------------------------------
def test_parse_input_shapes_forms():
    assert parse_input_shapes(["x:1x3x224x224", "ids:1,128", "input:0:2x5"]) == {
        "x": (1, 3, 224, 224), "ids": (1, 128), "input:0": (2, 5)}
    assert parse_input_shapes([]) == {}


@pytest.mark.parametrize("bad", ["x", "x:", ":1x3", "x:1xa", "x:0x3", "x:1x-2", "x:1x"])
def test_parse_input_shapes_rejects_bad_text(bad):
    with pytest.raises(OptionError, match="input:1x3x224x224"):
        parse_input_shapes([bad])


def test_parse_input_shapes_rejects_duplicates():
    with pytest.raises(OptionError, match="twice"):
        parse_input_shapes(["x:1x2", "x:1x3"])


# -- signature and shapes -----------------------------------------------------------------------
def test_signature_skips_initializers_listed_as_inputs():
    specs = input_signature(B.mlp_listing_weights())
    assert [s.name for s in specs] == ["x"]
    assert specs[0].dims == ("N", 16) and specs[0].declared == "[N, 16]"


def test_default_shapes():
    shapes = resolve_input_shapes(_multi_input())
    assert shapes == {"image": (1, 3, 224, 224), "nhwc": (1, 224, 224, 3),
                      "input_ids": (1, 16), "attention_mask": (1, 16),
                      "token_type_ids": (1, 16), "flag": (1,), "fixed": (2, 5)}
    assert resolve_input_shapes(_multi_input(), batch=4)["image"] == (4, 3, 224, 224)
    assert resolve_input_shapes(_multi_input(), batch=4)["fixed"] == (2, 5)  # static stays


def test_override_binds_shared_symbols():
    shapes = resolve_input_shapes(_multi_input(), {"input_ids": (2, 128)})
    # 'N' and 'seq' are fixed by the override for every input that uses them.
    assert shapes["attention_mask"] == (2, 128)
    assert shapes["image"] == (2, 3, 224, 224)


def test_override_errors():
    model = _multi_input()
    with pytest.raises(OptionError, match="its inputs are: image, nhwc, input_ids"):
        resolve_input_shapes(model, {"pixels": (1, 3, 8, 8)})
    with pytest.raises(OptionError, match="rank 4"):
        resolve_input_shapes(model, {"image": (1, 3, 8)})
    with pytest.raises(OptionError, match="fixed to 3"):
        resolve_input_shapes(model, {"image": (1, 4, 8, 8)})
    with pytest.raises(OptionError, match="must agree"):
        resolve_input_shapes(model, {"input_ids": (1, 8), "attention_mask": (1, 9)})


def test_input_without_shape_needs_override():
    node = helper.make_node("Relu", ["x"], ["y"])
    model = helper.make_model(helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [_vi("y", None)]), opset_imports=OPSET)
    with pytest.raises(OptionError, match="--input-shape x:"):
        make_inputs(model)
    assert make_inputs(model, {"x": (2, 3)})["x"].shape == (2, 3)
    assert resolve_input_shapes(model, require_all=False) == {}


# -- make_inputs ------------------------------------------------------------------------------
def test_make_inputs_dtypes_and_values():
    inputs = make_inputs(_multi_input())
    assert {k: (v.shape, v.dtype) for k, v in inputs.items()} == {
        "image": ((1, 3, 224, 224), np.float32), "nhwc": ((1, 224, 224, 3), np.float16),
        "input_ids": ((1, 16), np.int64), "attention_mask": ((1, 16), np.int64),
        "token_type_ids": ((1, 16), np.int32), "flag": ((1,), np.bool_),
        "fixed": ((2, 5), np.float32)}
    ids = inputs["input_ids"]
    assert ids.min() >= 0 and ids.max() <= 9
    assert (inputs["attention_mask"] == 1).all()
    assert (inputs["token_type_ids"] == 0).all()
    assert abs(float(inputs["image"].mean())) < 0.01 and 0.95 < inputs["image"].std() < 1.05


def test_make_inputs_scalars_are_arrays():
    nodes = [helper.make_node("Identity", ["t"], ["t_out"]),
             helper.make_node("Identity", ["b"], ["b_out"])]
    model = helper.make_model(helper.make_graph(
        nodes, "g", [_vi("t", []), _vi("b", [], TensorProto.BOOL)],
        [_vi("t_out", []), _vi("b_out", [], TensorProto.BOOL)]), opset_imports=OPSET)
    inputs = make_inputs(model)
    assert all(isinstance(v, np.ndarray) and v.shape == () for v in inputs.values())
    assert run_model(model, inputs)["b_out"] == inputs["b"]


def test_make_inputs_is_seeded():
    model = B.mlp_listing_weights()
    a, b = make_inputs(model, seed=3), make_inputs(model, seed=3)
    c = make_inputs(model, seed=4)
    assert np.array_equal(a["x"], b["x"]) and not np.array_equal(a["x"], c["x"])
    assert make_inputs(model, batch=5)["x"].shape == (5, 16)
    assert make_inputs(model, {"x": (7, 16)})["x"].shape == (7, 16)


def test_make_inputs_runs_through_onnxruntime():
    model = _multi_input()
    inputs = make_inputs(model)
    outputs = run_model(model, inputs)
    for name, arr in inputs.items():
        assert np.array_equal(outputs[name + "_out"], arr)


# -- load_inputs ------------------------------------------------------------------------------
def test_load_inputs_casts_float64(tmp_path):
    path = tmp_path / "in.npz"
    x = np.random.default_rng(0).standard_normal((3, 16))
    np.savez(path, x=x)
    loaded = load_inputs(path, B.mlp_listing_weights())
    assert loaded["x"].dtype == np.float32 and np.allclose(loaded["x"], x)


def test_load_inputs_single_npy(tmp_path):
    path = tmp_path / "x.npy"
    np.save(path, np.ones((2, 16), np.float32))
    assert load_inputs(path, B.mlp_listing_weights())["x"].shape == (2, 16)


@pytest.mark.parametrize("arrays, match", [
    ({}, r"no array for input\(s\) 'x' \[N, 16\] float"),
    ({"x": np.ones((1, 16), np.float32), "y": np.ones(3)}, "'y' that are not model inputs"),
    ({"x": np.ones((16,), np.float32)}, r"rank 1\); the model expects \[N, 16\]"),
    ({"x": np.ones((1, 15), np.float32)}, r"dim 1 must be 16"),
    ({"x": np.ones((1, 16), np.int64)}, "is int64; the model expects float"),
])
def test_load_inputs_errors(tmp_path, arrays, match):
    path = tmp_path / "in.npz"
    np.savez(path, **arrays)
    with pytest.raises(InputDataError, match=match):
        load_inputs(path, B.mlp_listing_weights())


def test_load_inputs_checks_requested_shape_and_symbols(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.ones((2, 16), np.float32))
    with pytest.raises(InputDataError, match="--input-shape asks for 3x16"):
        load_inputs(path, B.mlp_listing_weights(), {"x": (3, 16)})
    model = _multi_input()
    arrays = make_inputs(model)
    arrays["attention_mask"] = np.ones((1, 17), np.int64)
    np.savez(path, **arrays)
    with pytest.raises(InputDataError, match="dim 'seq' is 16 in input 'input_ids' but 17"):
        load_inputs(path, model)


def test_load_inputs_int_casts_only_when_values_fit(tmp_path):
    model = _multi_input()
    arrays = make_inputs(model)
    arrays["token_type_ids"] = arrays["token_type_ids"].astype(np.int64)
    path = tmp_path / "in.npz"
    np.savez(path, **arrays)
    assert load_inputs(path, model)["token_type_ids"].dtype == np.int32
    arrays["token_type_ids"][0, 0] = 2 ** 40
    np.savez(path, **arrays)
    with pytest.raises(InputDataError, match="do not fit int32"):
        load_inputs(path, model)


def test_load_inputs_missing_file(tmp_path):
    with pytest.raises(InputDataError, match="does not exist"):
        load_inputs(tmp_path / "nope.npz", B.mlp_listing_weights())
    bad = tmp_path / "bad.npz"
    bad.write_bytes(b"not numpy")
    with pytest.raises(InputDataError, match="not a readable"):
        load_inputs(bad, B.mlp_listing_weights())


def test_anonymous_dim_names_are_not_shared():
    # paddle2onnx writes "?" for every dynamic dim: they must not be tied together.
    node = helper.make_node("Relu", ["x"], ["y"])
    model = helper.make_model(helper.make_graph(
        [node], "g", [_vi("x", ["?", 3, "?", "?"])], [_vi("y", None)]), opset_imports=OPSET)
    assert input_signature(model)[0].dims == (None, 3, None, None)
    assert resolve_input_shapes(model, {"x": (1, 3, 48, 320)}) == {"x": (1, 3, 48, 320)}
    assert resolve_input_shapes(model) == {"x": (1, 3, 224, 224)}


# -- calibration sets -----------------------------------------------------------------------
def _two_input_model():
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"]),
             helper.make_node("Add", ["h", "bias_in"], ["y"])]
    return make_model(nodes, [helper.make_tensor_value_info("x", F, ["N", 4]),
                              helper.make_tensor_value_info("bias_in", F, ["N", 3])],
                      [helper.make_tensor_value_info("y", F, ["N", 3])],
                      [numpy_helper.from_array(np.ones((4, 3), np.float32), "W")])


def test_npz_by_name_positional_and_samples(tmp_path):
    model = _two_input_model()
    x = np.arange(40, dtype=np.float64).reshape(10, 4)  # float64 is cast to the model's float32
    b = np.ones((10, 3), np.float32)
    data = load_calibration(_npz(tmp_path, x=x, bias_in=b), model)
    assert len(data) == 10
    batches = list(data.batches(4))
    assert [f["x"].shape[0] for f in batches] == [4, 4, 2]
    assert batches[0]["x"].dtype == np.float32 and set(batches[0]) == {"x", "bias_in"}
    np.testing.assert_array_equal(np.concatenate([f["x"] for f in batches]), x)
    positional = tmp_path / "pos.npz"
    np.savez(positional, x, b)
    assert len(load_calibration(positional, model, samples=3)) == 3


@pytest.mark.parametrize("arrays,words", [
    (dict(x=np.ones((2, 4), np.float32)), ["bias_in"]),  # missing input named
    (dict(x=np.ones((2, 4), np.float32), bias_in=np.ones((2, 3), np.float32),
          extra=np.ones(2)), ["extra"]),
    (dict(x=np.ones((2, 5), np.float32), bias_in=np.ones((2, 3), np.float32)),
     ["'x'", "dim 1 must be 4"]),
    (dict(x=np.ones((2, 1, 4), np.float32), bias_in=np.ones((2, 3), np.float32)), ["'x'", "rank"]),
    (dict(x=np.ones((2, 4), np.int64), bias_in=np.ones((2, 3), np.float32)), ["'x'", "int64"]),
    (dict(x=np.ones((2, 4), np.float32), bias_in=np.ones((3, 3), np.float32)), ["sample counts"]),
])
def test_npz_mismatch_errors_name_the_input(tmp_path, arrays, words):
    with pytest.raises(InputDataError) as exc:
        load_calibration(_npz(tmp_path, **arrays), _two_input_model())
    for word in words:
        assert word in str(exc.value)


def test_folder_of_npy_and_npz(tmp_path):
    model = _one_input_model()
    folder = tmp_path / "npy"
    folder.mkdir()
    np.save(folder / "a.npy", np.zeros(4, np.float32))  # one sample (rank - 1)
    np.save(folder / "b.npy", np.ones((3, 4), np.float32))  # a batch of three
    np.save(folder / "c.npy", np.full((1, 4), 2, np.float32))
    data = load_calibration(folder, model)
    assert len(data) == 5
    got = np.concatenate([f["x"] for f in data.batches(2)])
    np.testing.assert_array_equal(got[:, 0], [0, 1, 1, 1, 2])
    two = tmp_path / "npz"
    two.mkdir()
    for i in range(3):
        np.savez(two / f"s{i}.npz", x=np.full((4,), i, np.float32), bias_in=np.zeros(3, np.float32))
    data2 = load_calibration(two, _two_input_model())
    assert len(data2) == 3 and next(data2.batches(8))["x"].shape == (3, 4)
    with pytest.raises(InputDataError, match="model has 2 inputs"):
        load_calibration(folder, _two_input_model())
    bad = tmp_path / "bad"
    bad.mkdir()
    np.save(bad / "a.npy", np.zeros((2, 2, 4), np.float32))
    with pytest.raises(InputDataError, match="'x'"):
        load_calibration(bad, model)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(InputDataError, match="no .npy/.npz"):
        load_calibration(empty, model)


def test_variable_length_samples_are_not_concatenated(tmp_path):
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])],
                       [helper.make_tensor_value_info("x", F, ["N", "T", 4])],
                       [helper.make_tensor_value_info("y", F, ["N", "T", 3])],
                       [numpy_helper.from_array(np.ones((4, 3), np.float32), "W")])
    for i, t in enumerate([5, 5, 7]):
        np.save(tmp_path / f"{i}.npy", np.ones((t, 4), np.float32))
    data = load_calibration(tmp_path, model)
    assert [f["x"].shape for f in data.batches(8)] == [(2, 5, 4), (1, 7, 4)]


def _image_model():
    return make_model([helper.make_node("Conv", ["x", "W"], ["y"])],
                      [helper.make_tensor_value_info("x", F, ["N", 3, 8, 6])],
                      [helper.make_tensor_value_info("y", F, None)],
                      [numpy_helper.from_array(np.ones((2, 3, 1, 1), np.float32), "W")])


def test_images_need_pillow_with_a_clear_message(tmp_path, monkeypatch):
    (tmp_path / "a.png").write_bytes(b"not really a png")
    real_import = builtins.__import__

    def no_pil(name, *args, **kwargs):
        if name == "PIL" or name.startswith("PIL."):
            raise ImportError("no PIL")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_pil)
    with pytest.raises(OptionError, match=r"pip install onnxprune\[images\]"):
        load_calibration(tmp_path, _image_model(), image_preprocess=ImagePreprocess())


def test_image_folder(tmp_path):
    pil = pytest.importorskip("PIL.Image")
    pixels = np.zeros((16, 12, 3), np.uint8)  # twice the model's 8x6: resized on load
    pixels[..., 0] = 255  # pure red
    pil.fromarray(pixels).save(tmp_path / "red.png")
    pil.fromarray(pixels[..., ::-1].copy()).save(tmp_path / "blue.jpg", quality=100)
    pre = ImagePreprocess(mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), channel_order="BGR")
    data = load_calibration(tmp_path, _image_model(), image_preprocess=pre)
    batch = next(data.batches(4))["x"]  # sorted: blue.jpg, red.png
    assert batch.shape == (2, 3, 8, 6) and batch.dtype == np.float32
    np.testing.assert_allclose(batch[0, :, 3, 3], [1, -1, -1], atol=0.05)  # blue, as BGR (JPEG)
    np.testing.assert_allclose(batch[1, :, 3, 3], [-1, -1, 1])
    nhwc = ImagePreprocess(size=(8, 6), layout="NHWC")
    with pytest.raises(InputDataError, match="channels"):
        load_calibration(tmp_path, _image_model(), image_preprocess=nhwc)
    with pytest.raises(OptionError, match="preprocess"):
        load_calibration(tmp_path, _image_model())


def test_bad_sources(tmp_path):
    model = _one_input_model()
    with pytest.raises(InputDataError, match="does not exist"):
        load_calibration(tmp_path / "nope.npz", model)
    (tmp_path / "x.txt").write_text("1 2 3")
    with pytest.raises(InputDataError, match="neither"):
        load_calibration(tmp_path / "x.txt", model)
    with pytest.raises(OptionError):
        ImagePreprocess(layout="CHW")


# -- one loader: calibration and validation agree ---------------------------------------------
def _seq_model():
    """x [N, T, 4] float and m [N, T] int32 (a shared symbolic T), both fed to Identity."""
    inputs = [_vi("x", ["N", "T", 4]), _vi("m", ["N", "T"], TensorProto.INT32)]
    nodes = [helper.make_node("Identity", [i.name], [i.name + "_out"]) for i in inputs]
    outputs = [helper.make_tensor_value_info(i.name + "_out", i.type.tensor_type.elem_type, None)
               for i in inputs]
    return helper.make_model(helper.make_graph(nodes, "seq", inputs, outputs),
                             opset_imports=OPSET)


def _calibration_arrays(source, model):
    batches = list(load_calibration(source, model).batches(1000))
    assert len(batches) == 1
    return batches[0]


@pytest.mark.parametrize("positional", [False, True])
def test_same_file_gives_the_same_arrays_for_calibration_and_validation(tmp_path, positional):
    model = _seq_model()
    r = np.random.default_rng(0)
    x = r.standard_normal((3, 5, 4))  # float64: cast to the model's float32 by both
    m = r.integers(0, 2, (3, 5)).astype(np.int64)  # int64 values that fit int32
    path = tmp_path / "data.npz"
    if positional:
        np.savez(path, x, m)
    else:
        np.savez(path, x=x, m=m)
    fed = load_inputs(path, model)
    served = _calibration_arrays(path, model)
    from_dict = next(CalibrationSet.from_arrays(model, {"x": x, "m": m}).batches(1000))
    fed_dict = load_inputs({"x": x, "m": m}, model)
    for got in (served, from_dict, fed_dict):
        assert list(got) == list(fed) == ["x", "m"]
        for name in fed:
            assert got[name].dtype == fed[name].dtype and got[name].shape == fed[name].shape
            np.testing.assert_array_equal(got[name], fed[name])
    assert fed["x"].dtype == np.float32 and fed["m"].dtype == np.int32
    np.testing.assert_array_equal(fed["x"], x.astype(np.float32))
    np.testing.assert_array_equal(fed["m"], m)


def test_single_npy_gives_the_same_array_for_calibration_and_validation(tmp_path):
    model = _one_input_model()
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    np.save(tmp_path / "x.npy", x)
    fed = load_inputs(tmp_path / "x.npy", model)
    served = _calibration_arrays(tmp_path / "x.npy", model)
    assert fed["x"].dtype == served["x"].dtype == np.float32
    np.testing.assert_array_equal(fed["x"], served["x"])


def test_generated_inputs_are_the_same_for_calibration_and_validation():
    model = _seq_model()
    one = make_inputs(model, seed=0)
    data = generated_calibration(model, n=1, seed=0)
    served = next(data.batches(1))
    assert data.data_free and list(served) == list(one)
    for name in one:
        np.testing.assert_array_equal(served[name], one[name])


class _Boom:
    """Unpickling this would record that code ran: a loader must never unpickle user files."""

    ran = False

    def __reduce__(self):
        return (_Boom._mark, ())

    @staticmethod
    def _mark():
        _Boom.ran = True
        return 0


def _bad_case(tmp_path, case):
    """(file, the input and what to do that its one message must name) for one bad input."""
    path = tmp_path / f"{case}.npz"
    r = np.random.default_rng(1)
    good = {"x": r.standard_normal((2, 5, 4)).astype(np.float32),
            "m": np.ones((2, 5), np.int32)}
    if case == "missing":
        np.savez(path, x=good["x"])
        return path, ["'m' [N, T] int32", "it holds 'x'", "np.savez"]
    if case == "extra":
        np.savez(path, **good, w=np.ones(3))
        return path, ["'w'", "not model inputs", "the inputs are: x, m"]
    if case == "static_dim":
        np.savez(path, x=np.ones((2, 5, 3), np.float32), m=good["m"])
        return path, ["input 'x'", "dim 2 must be 4"]
    if case == "dtype":
        np.savez(path, x=np.ones((2, 5, 4), np.int64), m=good["m"])
        return path, ["input 'x'", "is int64", "expects float [N, T, 4]"]
    if case == "int_range":
        np.savez(path, x=good["x"], m=np.full((2, 5), 2 ** 40, np.int64))
        return path, ["input 'm'", "do not fit int32"]
    if case == "shared_dim":
        np.savez(path, x=good["x"], m=np.ones((2, 6), np.int32))
        return path, ["dim 'T' is 5 in input 'x' but 6 in input 'm'", "must agree"]
    if case == "unnamed_count":
        np.savez(path, good["x"])
        return path, ["1 unnamed arrays", "2 inputs (x, m)", "save them by name"]
    if case == "unreadable":
        path.write_bytes(b"PK\x03\x04 not really a zip")
        return path, ["not a readable .npz/.npy file", "np.savez"]
    if case == "pickled":
        np.savez(path, x=np.array([_Boom()], dtype=object), m=good["m"])
        return path, ["input 'x'", "is object", "expects float"]
    if case == "object_ragged":  # an object array of arrays (ragged samples)
        ragged = np.empty(2, dtype=object)
        ragged[0], ragged[1] = np.ones((5, 4), np.float32), np.ones((3, 4), np.float32)
        np.savez(path, x=ragged, m=good["m"])
        return path, ["input 'x'", "is object (an array of pickled Python objects, which "
                      "onnxprune never loads); the model expects float [N, T, 4]: save a "
                      "numeric array"]
    if case == "object_numbers":  # numbers boxed in an object array: still refused, not cast
        np.savez(path, x=good["x"].astype(object), m=good["m"])
        return path, ["input 'x'", "is object", "expects float"]
    if case == "strings":
        np.savez(path, x=np.full((2, 5, 4), "1.0"), m=good["m"])
        return path, ["input 'x'", "is <U3", "expects float"]
    if case == "empty_axis":  # a zero-size (non-sample) axis
        np.savez(path, x=np.ones((2, 0, 4), np.float32), m=np.ones((2, 0), np.int32))
        return path, ["input 'x'", "shape 2x0x4: axis 1 is empty (size 0)"]
    raise AssertionError(case)


BAD_CASES = ["missing", "extra", "static_dim", "dtype", "int_range", "shared_dim",
             "unnamed_count", "unreadable", "pickled", "object_ragged", "object_numbers",
             "strings", "empty_axis"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_every_bad_input_gives_one_message_for_calibration_and_validation(tmp_path, case):
    path, words = _bad_case(tmp_path, case)
    model = _seq_model()
    with pytest.raises(InputDataError) as fed:
        load_inputs(path, model)
    with pytest.raises(InputDataError) as served:
        # Shapes and dtypes are checked when the set is made; values when a batch is read.
        list(load_calibration(path, model).batches(8))
    assert str(fed.value) == str(served.value)
    message = str(fed.value)
    assert f"'{path}'" in message
    for word in words:
        assert word in message
    assert not _Boom.ran


def test_rank_errors_say_what_each_use_needs(tmp_path):
    path = tmp_path / "in.npz"
    np.savez(path, x=np.ones((5, 4), np.float32), m=np.ones((2, 5), np.int32))
    with pytest.raises(InputDataError) as fed:
        load_inputs(path, _seq_model())
    with pytest.raises(InputDataError) as served:
        load_calibration(path, _seq_model())
    common = (f"input 'x' in '{path}' has shape 5x4 (rank 2); the model expects [N, T, 4] "
              "(rank 3) float")
    assert str(fed.value) == common
    assert str(served.value) == common + ", so the array needs rank 3 with samples on axis 0"


def test_zero_size_inputs_are_clear_errors(tmp_path):
    from onnxprune.errors import ModelLoadError

    # a declared zero-size dim: one clear error wherever concrete shapes are needed
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [0, 4])
    w = numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
    model = make_model([helper.make_node("MatMul", ["x", "W"], ["y"])], [x],
                       [helper.make_tensor_value_info("y", TensorProto.FLOAT, [0, 3])], [w])
    assert input_signature(model)[0].dims == (0, 4)
    for call in (lambda: make_inputs(model), lambda: resolve_input_shapes(model),
                 lambda: generated_calibration(model, 2)):
        with pytest.raises(ModelLoadError, match=r"input 'x' declares a zero-size dim \[0, 4\] "
                                                 r"\(axis 0\)"):
            call()
    # data with an empty axis: the fed axis 0 too (validation feeds arrays as they are)
    with pytest.raises(InputDataError, match="shape 0x4: axis 0 is empty"):
        load_inputs({"x": np.ones((0, 4), np.float32)}, _one_input_model())
    with pytest.raises(InputDataError, match="holds no samples"):
        load_calibration(_npz(tmp_path, x=np.ones((0, 4), np.float32)), _one_input_model())


def test_dicts_are_checked_like_files():
    with pytest.raises(InputDataError, match="'the given inputs' has no array for input"):
        load_inputs({"x": np.ones((2, 5, 4), np.float32)}, _seq_model())
    with pytest.raises(InputDataError, match="input 'x' in 'arrays' is int64"):
        CalibrationSet.from_arrays(_seq_model(), {"x": np.ones((2, 5, 4), np.int64),
                                                  "m": np.ones((2, 5), np.int32)})


def test_other_npz_files_refuse_pickles(tmp_path):
    path = tmp_path / "scores.npz"
    np.savez(path, w=np.array([_Boom()], dtype=object))
    with pytest.raises(InputDataError, match="--scores '.*' is not a readable .npz file"):
        read_npz(path, "--scores")
    assert not _Boom.ran
    np.savez(path, w=np.ones(3))
    assert list(read_npz(path, "--scores")) == ["w"]


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_values_are_refused_alike_for_calibration_and_validation(tmp_path, bad):
    # One NaN pixel used to turn every statistic (and every corrected bias) into NaN.
    model = _one_input_model()
    x = np.random.default_rng(0).standard_normal((6, 4)).astype(np.float32)
    x[4, 2] = bad
    path = _npz(tmp_path, x=x)
    messages = []
    for load in (lambda: load_calibration(path, model).batches(2).__next__(),
                 lambda: load_inputs(path, model),
                 lambda: load_inputs({"x": x}, model)):
        with pytest.raises(InputDataError) as err:
            load()
        messages.append(str(err.value))
    for m in messages:
        assert "input 'x'" in m and "sample 4 (index (4, 2))" in m and str(bad) in m
    assert messages[0] == messages[1]  # one check, one message, whichever use reads the file


def test_finite_data_passes_the_finite_check(tmp_path):
    model = _one_input_model()
    x = np.arange(24, dtype=np.float32).reshape(6, 4)
    got = load_inputs(_npz(tmp_path, x=x), model)
    np.testing.assert_array_equal(got["x"], x)


def _truncated_npy(arr: np.ndarray, rows: int) -> bytes:
    """``arr`` saved as .npy whose data stops after ``rows`` samples (header still says all)."""
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    full = buf.getvalue()
    header = len(full) - arr.nbytes
    return full[: header + rows * arr[0].nbytes]


@pytest.mark.parametrize("kind", ["npy", "npz", "npz-deflated"])
def test_calibration_samples_read_only_what_is_asked(tmp_path, kind):
    # Only 3 of 1000 samples are in the file; reading more than asked would hit the end.
    import zipfile

    model = _one_input_model()
    x = np.random.default_rng(0).standard_normal((1000, 4)).astype(np.float32)
    data = _truncated_npy(x, 3)
    path = tmp_path / f"calib.{kind[:3]}"
    if kind == "npy":
        path.write_bytes(data)
    else:
        comp = zipfile.ZIP_DEFLATED if kind.endswith("deflated") else zipfile.ZIP_STORED
        with zipfile.ZipFile(path, "w", compression=comp) as zf:
            zf.writestr("x.npy", data)
    got = np.concatenate([b["x"] for b in load_calibration(path, model, samples=3).batches(2)])
    np.testing.assert_array_equal(got, x[:3])
    with pytest.raises(InputDataError, match="truncated"):
        list(load_calibration(path, model, samples=4).batches(2))


def test_string_inputs_from_npz_unicode_arrays(tmp_path):
    # np.savez stores strings as a unicode array (no pickle): served to a STRING input as
    # objects; a number array for it stays an error
    nodes = [helper.make_node("LabelEncoder", ["s"], ["code"], domain="ai.onnx.ml",
                              keys_strings=["a", "b"], values_floats=[1.0, 2.0]),
             helper.make_node("Mul", ["x", "code"], ["y"])]
    graph = helper.make_graph(nodes, "g", [_vi("x", [2, 1]), _vi("s", [2, 1], TensorProto.STRING)],
                              [_vi("y", [2, 1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("ai.onnx.ml", 3)])
    model.ir_version = 8
    x = np.ones((2, 1), np.float32)
    feeds = load_inputs(_npz(tmp_path, x=x, s=np.array([["a"], ["b"]])), model)
    assert feeds["s"].dtype == object
    np.testing.assert_array_equal(run_model(model, feeds)["y"], [[1.0], [2.0]])
    with pytest.raises(InputDataError, match="input 's' in '.*' is int64; the model expects "
                                             "string"):
        load_inputs(_npz(tmp_path, "n.npz", x=x, s=np.array([[1], [2]])), model)

"""Validation that measures what matters: real samples (``--inputs``, held-out calibration
samples) or generated ones said to be no accuracy estimate; a measure per output; verdicts and
the gates. The figures are checked against direct onnxruntime runs of both models."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import builders as B
from onnxprune import prune
from onnxprune.cli import main
from onnxprune.errors import OptionError, ValidationFailed
from onnxprune.inputs.dataset import CalibrationSet, load_samples
from onnxprune.passes.validate import class_axes
from onnxprune.model.io import load
from onnxprune.report.compare import Comparer, Thresholds, compare

MODELS = Path(__file__).resolve().parents[2] / "models"
DIGITS = MODELS / "digits_cnn.onnx"
CALIB = MODELS / "digits_calib.npz"
TEST = MODELS / "digits_test.npz"


def _argmax(model, x: np.ndarray) -> np.ndarray:
    source = model if isinstance(model, str) else model.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return np.concatenate([session.run(None, {"input": x[i:i + 64]})[0].argmax(1)
                           for i in range(0, len(x), 64)])


def _direct_agreement(pruned: onnx.ModelProto, x: np.ndarray) -> float:
    return float(np.mean(_argmax(str(DIGITS), x) == _argmax(pruned, x)))


def test_inputs_file_is_a_sample_set_and_agreement_matches_a_direct_evaluation():
    # digits_test.npz holds 'labels' beside 'input': ignored and named, not an error
    res = prune(DIGITS, pattern="4x1", sparsity=0.8, inputs=str(TEST))
    cmp = res.report.comparison
    x = np.load(TEST)["input"]
    assert cmp.data == "inputs" and cmp.samples == len(x) == 797 and cmp.accuracy_estimate
    logits = cmp["logits"]
    assert logits.metric == "class scores" and logits.samples == 797 and logits.positions == 797
    assert logits.top1_agreement == pytest.approx(_direct_agreement(res.model, x), abs=1e-12)
    assert any("'labels'" in n and "not fed" in n for n in res.report.notes)


def test_held_out_calibration_samples_validate_and_stay_out_of_the_statistics():
    res = prune(DIGITS, pattern="channel", sparsity=0.3, refit=True, calibration=str(CALIB))
    cmp = res.report.comparison
    assert cmp.data == "held-out" and cmp.samples == 32
    assert "32 calibration samples held out" in cmp.data_note
    calib = res.state.records[[r.name for r in res.state.records].index("calibrate")]
    assert calib.samples == 128  # the first 128 of 256: the held-out 32 come after them
    x = np.load(CALIB)["input"]
    held = x[128:160]
    assert cmp["logits"].top1_agreement == pytest.approx(_direct_agreement(res.model, held))
    # ... and it says about real data what a direct evaluation on 797 test digits says
    # (32 samples: within a few binomial standard errors)
    direct = _direct_agreement(res.model, np.load(TEST)["input"])
    se = np.sqrt(max(direct * (1 - direct), 0.01) / 32)
    assert abs(cmp["logits"].top1_agreement - direct) <= 3 * se + 1 / 32


def test_held_out_share_is_bounded_by_half_the_data_and_by_the_option():
    x = np.load(CALIB)["input"][:20]
    res = prune(DIGITS, pattern="4x1", sparsity=0.5, calibration={"input": x},
                validation_samples=32)
    assert res.report.comparison.samples == 10 and res.report.comparison.data == "held-out"
    res = prune(DIGITS, pattern="4x1", sparsity=0.5, calibration={"input": x},
                validation_samples=0)
    assert res.report.comparison.data == "generated"


def test_without_data_generated_inputs_are_said_to_be_no_accuracy_estimate(tmp_path):
    res = prune(DIGITS, pattern="4x1", sparsity=0.5)
    cmp = res.report.comparison
    assert cmp.data == "generated" and cmp.samples == 8 and not cmp.accuracy_estimate
    assert "not the accuracy" in cmp.data_note
    out = CliRunner().invoke(main, [str(DIGITS), "-o", str(tmp_path / "o.onnx"),
                                    "--pattern", "4x1", "--sparsity", "0.5"])
    assert out.exit_code == 0 and "not an accuracy estimate" in out.output


def test_a_ruined_model_is_broken_warned_on_stderr_and_still_exit_0(tmp_path):
    runner = CliRunner()
    out = runner.invoke(main, [str(DIGITS), "-o", str(tmp_path / "o.onnx"), "--pattern", "4x1",
                               "--sparsity", "0.8", "--inputs", str(TEST)])
    assert out.exit_code == 0
    assert "warning: output 'logits' is broken: top-1 agreement" in out.stderr
    res = prune(DIGITS, pattern="4x1", sparsity=0.8, inputs=str(TEST))
    assert res.report.comparison.verdict == "broken"
    assert res.report.warnings and "797 samples" in res.report.warnings[0]


def test_min_agreement_gate_states_the_measured_value_and_writes_nothing(tmp_path):
    target = tmp_path / "o.onnx"
    res = prune(DIGITS, pattern="4x1", sparsity=0.8, inputs=str(TEST))
    worst = res.report.comparison.worst_agreement
    with pytest.raises(ValidationFailed) as err:
        prune(DIGITS, pattern="4x1", sparsity=0.8, inputs=str(TEST), min_agreement=0.95,
              output=target)
    assert f"{100 * worst:.1f}%" in str(err.value) and "--min-agreement 0.95" in str(err.value)
    assert not target.exists()
    out = CliRunner().invoke(main, [str(DIGITS), "-o", str(target), "--pattern", "4x1",
                                    "--sparsity", "0.8", "--inputs", str(TEST),
                                    "--min-agreement", "0.95"])
    assert out.exit_code == 1 and not target.exists()
    ok = prune(DIGITS, pattern="4x1", sparsity=0.8, inputs=str(TEST),
               min_agreement=round(worst - 0.01, 3), output=target)
    assert ok.output == target and target.exists()


def test_min_agreement_without_class_scores_cannot_be_measured():
    model = B.make_model(  # a feature map: no class axis
        [helper.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])],
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8, 6, 6])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 16, 6, 6])],
        [B.tensor("w", (16, 8, 3, 3))])
    with pytest.raises(ValidationFailed, match="no output holds class scores"):
        prune(model, sparsity=0.5, min_agreement=0.5)


def test_verdict_thresholds_parse_and_judge():
    t = Thresholds.parse("agreement=0.98/0.8, scalar=0.05/0.5")
    assert t.agreement == (0.98, 0.8) and t.scalar == (0.05, 0.5) and t.cosine == (0.99, 0.9)
    assert [t.judge("agreement", v) for v in (0.99, 0.9, 0.5)] == ["ok", "degraded", "broken"]
    assert [t.judge("scalar", v) for v in (0.01, 0.1, 1.0)] == ["ok", "degraded", "broken"]
    for bad in ("agreement=0.8/0.9", "agreement=1.5/0.9", "bogus=1/1", "cosine=0.9"):
        with pytest.raises(OptionError):
            Thresholds.parse(bad)
    res = prune(DIGITS, pattern="4x1", sparsity=0.8, inputs=str(TEST),
                verdict="agreement=0.05/0.01")
    assert res.report.comparison.verdict == "ok" and not res.report.warnings
    out = CliRunner().invoke(main, [str(DIGITS), "--verdict", "agreement=2/1"])
    assert out.exit_code == 2 and "--verdict" in out.output


def test_each_output_gets_its_measure():
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((4, 10))
    ref = {"logits": logits, "feat": rng.standard_normal((4, 3, 8, 8)),
           "ids": np.array([[1, 2], [3, 4]], np.int64), "loss": np.array(2.5e-4),
           "flag": np.array([True, False])}
    cand = {"logits": logits + 0.01, "feat": ref["feat"] * 1.1, "ids": np.array([[1, 2], [3, 5]]),
            "loss": np.array(2.6e-4), "flag": np.array([True, True])}
    cmp = compare(ref, cand, samples=4)
    assert cmp["logits"].metric == "class scores" and cmp["logits"].top1_agreement == 1.0
    assert cmp["logits"].top5_agreement == 1.0
    assert cmp["feat"].metric == "dense" and cmp["feat"].cosine == pytest.approx(1.0)
    assert cmp["feat"].top1_agreement is None and cmp["feat"].verdict == "ok"
    assert cmp["ids"].metric == "exact" and cmp["ids"].equal == 0.75
    assert cmp["ids"].verdict == "broken" and not cmp["ids"].gated
    loss = cmp["loss"]  # a scalar: relative difference, no cosine
    assert loss.metric == "scalar" and loss.cosine is None
    assert loss.rel_error == pytest.approx(0.1e-4 / 2.5e-4) and loss.verdict == "degraded"
    assert cmp["flag"].metric == "exact" and cmp["flag"].equal == 0.5
    assert cmp.passed(0.2)  # exact outputs are judged by equality, not gated by --max-error


def test_streamed_statistics_equal_one_shot_statistics():
    rng = np.random.default_rng(1)
    ref = rng.standard_normal((20, 2, 7)).astype(np.float32)
    cand = ref + rng.normal(0, 0.3, ref.shape).astype(np.float32)
    whole = compare({"y": ref}, {"y": cand}, axes={"y": 2}, samples=20)["y"]
    streamer = Comparer({"y": 2})
    for i in range(0, 20, 6):
        streamer.add({"y": ref[i:i + 6]}, {"y": cand[i:i + 6]}, len(ref[i:i + 6]))
    part = streamer.result()["y"]
    assert part.samples == whole.samples == 20 and part.positions == whole.positions == 40
    for attr in ("top1_agreement", "top5_agreement", "cosine", "max_abs", "rel_error",
                 "mean_rel"):
        assert getattr(part, attr) == pytest.approx(getattr(whole, attr), rel=1e-12), attr
    top1 = np.mean(ref.argmax(2) == cand.argmax(2))
    assert whole.top1_agreement == pytest.approx(top1)
    best5 = np.argsort(-cand, axis=2)[..., :5]
    assert whole.top5_agreement == pytest.approx(np.mean((best5 == ref.argmax(2)[..., None])
                                                         .any(-1)))


def test_a_large_inputs_file_is_read_one_window_at_a_time(tmp_path, monkeypatch):
    x = np.random.default_rng(0).standard_normal((100, 1, 8, 8)).astype(np.float32)
    path = tmp_path / "val.npz"
    np.savez(path, input=x)
    import onnxprune.inputs.files as files

    rows_read = []
    real = files._read_rows

    def spy(f, rows, where, start=0):
        arr = real(f, rows, where, start)
        rows_read.append(len(arr))
        return arr

    monkeypatch.setattr(files, "_read_rows", spy)
    data = load_samples(path, str(DIGITS))
    got = np.concatenate([b["input"] for b in data.batches(8)])
    assert np.array_equal(got, x) and max(rows_read) == 8


def _two_output_model(last_op: str):
    """x -> MatMul -> (Softmax | Concat with itself) : class scores or not by the producer."""
    w = B.tensor("w", (6, 12))
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"])]
    if last_op == "Softmax":
        nodes += [helper.make_node("Softmax", ["h"], ["s"], axis=-1),
                  helper.make_node("Cast", ["s"], ["y"], to=TensorProto.FLOAT)]
    else:
        nodes.append(helper.make_node("Concat", ["h", "h"], ["y"], axis=1))
    shape = [1, 4, 12] if last_op == "Softmax" else [1, 8, 12]
    return B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                              [1, 4, 6])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, shape)], [w])


def test_class_axis_comes_from_the_producing_op():
    assert class_axes(load(_two_output_model("Softmax")).index, {"y": 3}) == {"y": 2}
    assert class_axes(load(_two_output_model("Concat")).index, {"y": 3}) == {"y": None}
    res = prune(_two_output_model("Concat"), sparsity=0.5)
    assert res.report.comparison["y"].metric == "dense"
    res = prune(_two_output_model("Softmax"), sparsity=0.5)
    assert res.report.comparison["y"].metric == "class scores"
    assert res.report.comparison["y"].positions == 8 * 4  # 8 generated samples x 4 positions


def test_calibration_set_slices_match_the_arrays():
    x = np.load(CALIB)["input"]
    data = CalibrationSet.from_arrays(str(DIGITS), {"input": x})
    part = data.slice(100, 140).slice(5, 30)
    assert len(part) == 25
    assert np.array_equal(np.concatenate([b["input"] for b in part.batches(7)]), x[105:130])


def test_a_model_with_a_rank_1_input_gets_the_inputs_file_as_one_feed(tmp_path):
    # x[n] -> Mul by a constant: axis 0 is no sample axis; cutting it into batches of 8 would
    # feed other tensors than the user gave
    model = B.make_model([helper.make_node("Mul", ["x", "w"], ["y"])],
                         [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n"])],
                         [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n"])],
                         [B.tensor("w", (1,))])
    path = tmp_path / "x.npz"
    x = np.arange(20, dtype=np.float32)
    np.savez(path, x=x, labels=np.zeros(3))
    data = load_samples(path, model)
    feeds = list(data.batches(8))
    assert len(data) == 1 and len(feeds) == 1 and np.array_equal(feeds[0]["x"], x)


def test_close_outputs_on_generated_inputs_are_unverified_never_ok(tmp_path):
    # The same light pruning: on generated inputs "unverified" (it cannot speak for accuracy),
    # on real samples "ok"; a degraded/broken output keeps its verdict on either. On noise the
    # scores are near-ties whose argmax flips (top-1 agreement well below 99 % here), so the
    # verdict reads the cosine instead.
    gen = prune(DIGITS, pattern="unstructured", sparsity=0.1).report.comparison
    real = prune(DIGITS, pattern="unstructured", sparsity=0.1, inputs=str(TEST)).report.comparison
    assert real.data == "inputs" and real.verdict == "ok"
    assert real["logits"].top1_agreement >= 0.99
    assert gen.data == "generated" and gen.verdict == "unverified"
    assert gen["logits"].verdict == "unverified" and gen["logits"].cosine >= 0.99
    assert "cannot show accuracy" in gen["logits"].verdict_reason
    assert gen.to_dict()["verdict"] == "unverified"
    ruined = prune(DIGITS, pattern="4x1", sparsity=0.95).report.comparison
    assert ruined.data == "generated" and ruined.verdict in ("degraded", "broken")
    out = CliRunner().invoke(main, [str(DIGITS), "--sparsity", "0.1", "-o",
                                    str(tmp_path / "p.onnx")])
    assert out.exit_code == 0, out.output
    row = [line for line in out.output.splitlines() if line.strip().startswith("logits")][-1]
    assert row.split()[-1] == "unverified"
    assert "verdict thresholds: cosine" in out.output  # class scores judged by cosine on noise


def test_repeated_calibration_samples_are_used_once_and_never_held_out_against_themselves(
        tmp_path):
    """20 distinct images, each given 4 times: each is used once, and the held-out samples
    that validate are none of those the statistics saw."""
    x = np.load(CALIB)["input"][:20]
    npz = tmp_path / "repeated.npz"
    np.savez(npz, input=np.concatenate([x, x, x, x]))
    result = prune(str(DIGITS), criterion="wanda", sparsity=0.5, calibration=str(npz),
                   calibration_samples=16, validation_samples=8)
    state = result.state
    assert any(n.startswith("60 calibration samples dropped as repeats")
               for n in result.report.notes)
    fit = np.concatenate([b["input"] for b in state.calibration.batches(8)])
    held = np.concatenate([b["input"] for b in state.validation.batches(8)])
    assert (len(fit), len(held)) == (12, 8)  # 20 distinct: 8 held out, the other 12 fit
    flat = {row.tobytes() for row in fit}
    assert len(flat) == 12 and not any(row.tobytes() in flat for row in held)
    np.testing.assert_array_equal(np.concatenate([fit, held]), x)  # in their order

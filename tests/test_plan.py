"""The pruning plan (plan.py): --save-plan, `onnxprune apply`, mismatched graphs, --dry-run."""

import base64
import hashlib
import json

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import builders as B
from onnxprune.api import prune
from onnxprune.cli import main
from onnxprune.plan import PlanMismatch, apply_plan, pack_mask, unpack_mask

def _digits():
    from onnxprune.cli import DEFAULT_MODEL

    return DEFAULT_MODEL


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def _weights(path):
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


def test_mask_packing_round_trips():
    keep = np.random.default_rng(0).random((5, 3, 7)) < 0.3
    packed = pack_mask(keep)
    assert len(packed) == -(-keep.size // 8)
    assert (unpack_mask(packed, keep.shape) == keep).all()


@pytest.mark.parametrize("flags", [
    ["--sparsity", "0.8"],
    ["--pattern", "2:4"],
    ["--pattern", "4x1", "--sparsity", "0.5", "--storage", "sparse"],
    ["--pattern", "channel", "--sparsity", "0.5"],
    ["--sparsity", "0.7", "--scope", "global"],
    ["--pattern", "2:4", "--permute"],
])
def test_save_plan_then_apply_reproduces_the_output_bytes(tmp_path, flags):
    model = _digits()
    first, second, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    res = invoke(model, *flags, "--save-plan", plan, "-o", first, "-q")
    assert res.exit_code == 0, res.output
    res = invoke("apply", plan, model, "-o", second, "-q")
    assert res.exit_code == 0, res.output
    assert first.read_bytes() == second.read_bytes()  # byte for byte, metadata included


def test_plan_keys_masks_and_digests(tmp_path):
    plan_path = tmp_path / "plan.json"
    result = prune(_digits(), sparsity=0.8, save_plan=plan_path, validate=False)
    plan = json.loads(plan_path.read_text())
    assert plan["format"] == "onnxprune-plan" and plan["plan_version"] == 1
    assert plan["tool_version"] and plan["options"]["pattern"] == "unstructured"
    assert set(plan["graph"]) == {"sha256", "op_types", "weights"}
    assert plan["channels"] == []
    layers = {r.name: r for r in result.report.rows}
    assert set(plan["weights"]) == set(layers)
    for name, entry in plan["weights"].items():
        packed = base64.b64decode(entry["mask"])
        assert hashlib.sha256(packed).hexdigest() == entry["mask_sha256"]
        keep = unpack_mask(packed, entry["shape"])
        assert entry["sparsity"] == round(1 - keep.mean(), 6)
        assert keep.sum() == layers[name].nonzeros_after or layers[name].shape_after != \
            layers[name].shape  # dead channels removed after the plan was recorded
    assert any(n == f"plan written to {plan_path}" for n in result.report.notes)


def test_channel_plan_records_kept_channels(tmp_path):
    plan_path = tmp_path / "plan.json"
    prune(_digits(), pattern="channel", sparsity=0.5, save_plan=plan_path, validate=False)
    plan = json.loads(plan_path.read_text())
    assert plan["channels"]
    for g in plan["channels"]:
        assert sorted(g["kept"] + g["removed"]) == list(range(g["size"]))
        assert len(g["removed"]) == g["size"] // 2 and g["producers"]


def _matmul(k=24, n=12, fp16=False):
    """x[2,k] @ W[k,n]; with ``fp16`` the weight is stored fp16 behind a Cast, as fp16 exports
    (the same weight name and shape)."""
    w = B.rng(0).standard_normal((k, n)).astype(np.float16 if fp16 else np.float32)
    nodes = [helper.make_node("MatMul", ["x", "Wf" if fp16 else "W"], ["y"], name="mm")]
    if fp16:
        nodes.insert(0, helper.make_node("Cast", ["W"], ["Wf"], to=TensorProto.FLOAT))
    return B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, k])],
                        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, n])],
                        [numpy_helper.from_array(w, "W")])


def test_plan_applies_to_an_fp16_copy(tmp_path):
    src, src16 = tmp_path / "m.onnx", tmp_path / "m16.onnx"
    onnx.save(_matmul(), str(src))
    onnx.save(_matmul(fp16=True), str(src16))
    plan = tmp_path / "plan.json"
    prune(src, sparsity=0.75, save_plan=plan, output=tmp_path / "p.onnx")
    result = apply_plan(plan, src16, output=tmp_path / "p16.onnx")
    w32 = _weights(tmp_path / "p.onnx")["W"]
    w16 = _weights(tmp_path / "p16.onnx")["W"]
    assert w16.dtype == np.float16
    assert ((w16 != 0) == (w32 != 0)).all() and (w32 == 0).mean() == 0.75
    assert any("applied by weight name" in n for n in result.report.notes)  # the extra Cast


@pytest.mark.parametrize("other, message", [
    (lambda: _matmul(k=16), "weight 'W' has shape [16, 12], the plan [24, 12]"),
    (lambda: B.conv_gemm_model(), "weight 'W' is missing"),
])
def test_apply_refuses_another_graph_naming_the_difference(tmp_path, other, message):
    src, dst = tmp_path / "m.onnx", tmp_path / "other.onnx"
    onnx.save(_matmul(), str(src))
    onnx.save(other(), str(dst))
    plan = tmp_path / "plan.json"
    prune(src, sparsity=0.5, save_plan=plan, validate=False)
    res = invoke("apply", plan, dst, "-o", tmp_path / "out.onnx")
    assert res.exit_code == 2
    assert res.output.startswith("error: the model does not match the plan's graph: ")
    assert message in res.output
    assert not (tmp_path / "out.onnx").exists()
    with pytest.raises(PlanMismatch):
        apply_plan(plan, dst)


def test_apply_refuses_what_is_not_a_plan(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_matmul(), str(model))
    (tmp_path / "bad.json").write_text('{"weights": {}}')
    res = invoke("apply", tmp_path / "bad.json", model)
    assert res.exit_code == 2 and "is not an onnxprune plan" in res.output
    res = invoke("apply", tmp_path / "none.json", model)
    assert res.exit_code == 2 and "does not exist" in res.output


def test_dry_run_writes_no_model(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_matmul(), str(model))
    res = invoke(model, "--sparsity", "0.5", "--dry-run")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]
    assert "dry run: no model written" in res.output
    assert "plan (dry run: no model written)" in res.output
    result = prune(model, sparsity=0.5, dry_run=True, output=tmp_path / "never.onnx")
    assert result.output is None and not (tmp_path / "never.onnx").exists()
    assert result.report.params_after == 24 * 12
    assert result.report.nonzeros_after == 24 * 12 // 2
    assert result.report.macs_after is not None
    rows = result.report.sections["plan (dry run: no model written)"]
    assert [(r["weight"], r["pattern"], r["sparsity"]) for r in rows] == \
        [("W", "unstructured", 0.5)]


def test_dry_run_with_save_plan_writes_only_the_plan(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_matmul(), str(model))
    res = invoke(model, "--sparsity", "0.5", "--dry-run", "--save-plan", tmp_path / "p.json",
                 "-q")
    assert res.exit_code == 0, res.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "p.json"]
    res = invoke("apply", tmp_path / "p.json", model, "-o", tmp_path / "out.onnx", "-q")
    assert res.exit_code == 0
    assert (_weights(tmp_path / "out.onnx")["W"] == 0).mean() == 0.5


def test_save_plan_refuses_an_existing_file_before_work(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_matmul(), str(model))
    (tmp_path / "p.json").write_text("keep")
    res = invoke(model, "--save-plan", tmp_path / "p.json", "-o", tmp_path / "out.onnx")
    assert res.exit_code == 2 and res.output.startswith("error: ")
    assert (tmp_path / "p.json").read_text() == "keep" and not (tmp_path / "out.onnx").exists()


def test_apply_to_a_sparse_stored_model(tmp_path):
    """A sparse-stored file is read as dense: the plan applies to it and changes nothing more."""
    first, second, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    res = invoke(_digits(), "--sparsity", "0.9", "--no-resize", "--storage", "sparse",
                 "--save-plan", plan, "-o", first, "-q")
    assert res.exit_code == 0, res.output
    assert onnx.load(str(first)).graph.sparse_initializer
    res = invoke("apply", plan, first, "-o", second, "-q")
    assert res.exit_code == 0, res.output
    assert first.read_bytes() == second.read_bytes()


def test_search_writes_the_plan_of_the_final_run_only(tmp_path):
    model = tmp_path / "m.onnx"
    onnx.save(_matmul(), str(model))
    plan = tmp_path / "p.json"
    result = prune(model, search=True, max_error=0.5, save_plan=plan,
                   output=tmp_path / "out.onnx")
    written = json.loads(plan.read_text())
    w = _weights(tmp_path / "out.onnx")["W"]
    assert (unpack_mask(base64.b64decode(written["weights"]["W"]["mask"]), w.shape)
            == (w != 0)).all()
    assert written["options"]["sparsity"] == result.report.options["sparsity"]


def test_plan_reapplies_weights_inside_subgraphs(tmp_path):
    src = tmp_path / "if.onnx"
    onnx.save(B.if_subgraph_model(), str(src))
    first, second, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "p.json"
    prune(src, sparsity=0.5, save_plan=plan, output=first, validate=False)
    assert len(json.loads(plan.read_text())["weights"]) == 3
    apply_plan(plan, src, output=second, validate=False)
    assert first.read_bytes() == second.read_bytes()


def test_plan_records_the_channel_orders_permute_applied(tmp_path):
    # The masks of a --permute run are on reordered weights: the plan carries the orders, and
    # applying it without them would give another model (so they are load-bearing).
    model = _digits()
    first, second, plan = tmp_path / "a.onnx", tmp_path / "b.onnx", tmp_path / "plan.json"
    assert invoke(model, "--pattern", "2:4", "--permute", "--save-plan", plan, "-o", first,
                  "-q").exit_code == 0
    data = json.loads(plan.read_text())
    assert data["permutations"], "digits' 2:4 layers gain from reordering"
    for g in data["permutations"]:
        assert sorted(g["order"]) == list(range(g["size"])) and g["order"] != sorted(g["order"])
    stripped = dict(data, permutations=[])
    (tmp_path / "stripped.json").write_text(json.dumps(stripped))
    assert invoke("apply", tmp_path / "stripped.json", model, "-o", second, "-q").exit_code == 0
    assert first.read_bytes() != second.read_bytes()
    bad = json.loads(plan.read_text())
    bad["permutations"][0]["order"][0] = bad["permutations"][0]["order"][1]
    (tmp_path / "bad.json").write_text(json.dumps(bad))
    res = CliRunner().invoke(main, ["apply", str(tmp_path / "bad.json"), str(model), "-o",
                                    str(tmp_path / "c.onnx")])
    assert res.exit_code == 2 and "not a permutation" in res.output


def test_permute_is_on_by_default_only_for_tensorrt_and_nm():
    from onnxprune.options import PruneOptions

    assert PruneOptions(pattern="2:4", target="tensorrt").permute is True
    assert PruneOptions(pattern="2:4").permute is False
    assert PruneOptions(pattern="2:4", target="tensorrt", permute=False).permute is False
    assert PruneOptions(pattern="4x1", target="tensorrt").permute is False
    assert PruneOptions(pattern="channel", target="onnxruntime-cpu").permute is False


def test_dry_run_predicts_the_latency_class(tmp_path):
    from onnxprune.plan import predicted_latency

    model = _digits()
    res = invoke(model, "--pattern", "channel", "--sparsity", "0.3", "--dry-run")
    assert res.exit_code == 0 and "speed-up on onnxruntime CPU" in res.output
    masks = invoke(model, "--pattern", "2:4", "--dry-run")
    assert "no change on onnxruntime CPU" in masks.output and "--target tensorrt" in masks.output
    assert predicted_latency(100, 100, "unstructured").startswith("predicted latency: no change")
    assert "small speed-up" in predicted_latency(105, 100, "channel")
    assert "large speed-up" in predicted_latency(400, 100, "channel")
    assert "×2.40-×3.88" in predicted_latency(400, 100, "channel")
    assert "unknown" in predicted_latency(None, 100, "channel")

"""Registry entries of the fused-attention family (ops/attention.py): heads removed as units
from com.microsoft Attention (packed QKV weight and bias), MultiHeadAttention,
GroupQueryAttention (whole KV groups) and opset-23 Attention, masked == resized in onnxruntime;
the FFN width through FastGelu / BiasGelu; normalizations keeping the residual stream; 2:4 masks
on the packed weight along its reduction axis; MAC formulas."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxprune
from channel_models import G, assert_close, masked_and_resized, run
from onnxprune.channels.graph import build_channel_graph
from onnxprune.model.io import load
from onnxprune.ops.layouts import layout_for, prunable_op_types
from onnxprune.ops.registry import entry
from onnxprune.report.macs import count_macs

B, S, D = 2, 5, 16
MS = "com.microsoft"


def model_of(g, inputs, outputs, opset=17):
    """``g.model`` with the outputs shaped like input ``x`` (what every model here returns)."""
    m = g.model(inputs, outputs, opset=opset)
    x = next(vi for vi in m.graph.input if vi.name == "x")
    for o in m.graph.output:
        o.type.CopyFrom(x.type)
    return m


def feeds(model, seed=0):
    rng = np.random.default_rng(seed)
    return {vi.name: rng.standard_normal([d.dim_value for d in vi.type.tensor_type.shape.dim]
                                         ).astype(np.float32) for vi in model.graph.input}


def attr_of(model, op, name):
    node = next(n for n in model.graph.node if n.op_type == op)
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def init(model, name):
    return next(numpy_helper.to_array(t) for t in model.graph.initializer if t.name == name)


def node_of(model, op):
    return next(n for n in model.graph.node if n.op_type == op)


def head_group(graph, tensor, axis=1):
    """The group holding axis ``axis`` of ``tensor`` (a projection's output columns)."""
    return next(g for g in graph.groups if any((m.tensor, m.axis) == (tensor, axis)
                                               for m in g.members))


def check_exact(model, sparsity=0.5, checker=True, **kw):
    """masked == resized on onnxruntime CPU; returns (resized model, removed, shapes)."""
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=sparsity, **kw)
    if checker:  # ONNX's checker does not know onnxruntime's default-domain contrib ops
        onnx.checker.check_model(resized)
    f = feeds(model)
    assert_close(run(resized, f), run(masked, f))
    return resized, removed, shapes


# -- com.microsoft Attention (packed QKV) --------------------------------------------------------
def packed_attention(heads=4, bias=True, sizes=None, seed=1):
    g = G(seed)
    q, k, v = sizes or (D, D, D)
    w = g.w([D, q + k + v], name="qkv_w")
    ins = ["x", w] + ([g.w([q + k + v], 0.1, name="qkv_b")] if bias else [])
    attrs = {"num_heads": heads}
    if sizes:
        attrs["qkv_hidden_sizes"] = list(sizes)
    a = g.op("Attention", ins, domain=MS, **attrs)
    o = g.op("MatMul", [a, g.w([v, D], name="out_w")])
    y = g.op("Add", [o, "x"])
    return model_of(g, [("x", [B, S, D])], [y])


def test_packed_weight_layout_reduces_over_hidden():
    node = onnx.helper.make_node("Attention", ["x", "W", "b"], ["y"], domain=MS, num_heads=4)
    lay = layout_for(node, 1, (16, 48))
    assert (lay.shape2d, lay.out_axis, lay.in_axis) == ((48, 16), 1, 0)
    assert layout_for(node, 2, (48,)) is None
    # --op-types names another domain's op as domain:OpType (opset-23 Attention has no weight)
    assert f"{MS}:Attention" in prunable_op_types() and "Attention" not in prunable_op_types()
    assert entry(node) is not None and entry(node).layout is not None
    # the default-domain (opset 23) Attention is a different entry: no weight
    onnx23 = onnx.helper.make_node("Attention", ["q", "k", "v"], ["y"])
    assert entry(onnx23).layout is None and entry(onnx23).channels is not None


@pytest.mark.parametrize("bias", [True, False])
def test_packed_attention_heads_removed_exactly(bias):
    model = packed_attention(bias=bias)
    graph = build_channel_graph(load(model))
    group = head_group(graph, "qkv_w")
    assert group.prunable and group.size == 4  # one unit per head
    w_member = next(m for m in group.members if m.tensor == "qkv_w" and m.axis == 1)
    # head 1 = its Q, K and V columns of the packed weight
    assert w_member.index_map[1].tolist() == [4, 5, 6, 7, 20, 21, 22, 23, 36, 37, 38, 39]
    resized, removed, shapes = check_exact(model)
    assert len(removed[group.id]) == 2
    assert shapes["qkv_w"] == ((D, 48), (D, 24))
    assert shapes["out_w"] == ((D, D), (8, D))
    if bias:
        assert shapes["qkv_b"] == ((48,), (24,))
    assert attr_of(resized, "Attention", "num_heads") == 2
    kept = [h for h in range(4) if h not in removed[group.id]]
    w0, w1 = init(model, "qkv_w"), init(resized, node_of(resized, "Attention").input[1])
    cols = [p * 16 + h * 4 + i for p in range(3) for h in kept for i in range(4)]
    assert np.array_equal(w1, w0[:, cols])


def test_packed_attention_qkv_hidden_sizes_rewritten():
    # Q/K heads of 4, V heads of 2: three slices of different widths per head.
    model = packed_attention(sizes=(16, 16, 8))
    resized, removed, shapes = check_exact(model, sparsity=0.25)
    assert attr_of(resized, "Attention", "num_heads") == 3
    assert attr_of(resized, "Attention", "qkv_hidden_sizes") == [12, 12, 6]
    assert shapes["qkv_w"] == ((D, 40), (D, 30))
    assert shapes["out_w"] == ((8, D), (6, D))


def test_hidden_width_of_the_packed_weight_is_the_residual_stream():
    model = packed_attention()
    graph = build_channel_graph(load(model))
    hidden = head_group(graph, "qkv_w", 0)
    assert not hidden.prunable  # x is the graph input here


def test_two_four_masks_on_the_packed_weight_along_hidden():
    model = packed_attention()
    result = onnxprune.prune(model, pattern="2:4")
    w = init(result.model, "qkv_w")
    # 4 consecutive hidden features (rows of the stored [D, 3H] weight) per output column
    groups = w.T.reshape(48, D // 4, 4)
    assert (np.count_nonzero(groups, axis=-1) == 2).all()
    run(result.model, feeds(model))


def test_channel_pattern_through_the_api_prunes_heads():
    model = packed_attention()
    result = onnxprune.prune(model, pattern="channel", sparsity=0.5, validate=True)
    assert attr_of(result.model, "Attention", "num_heads") == 2
    assert init(result.model, node_of(result.model, "Attention").input[1]).shape == (D, 24)
    run(result.model, feeds(model))


def test_attention_macs():
    model = packed_attention()
    macs = count_macs(model)
    label = next(k for k, v in macs.op_types.items() if v == "Attention")
    assert macs.per_node[label] == B * S * D * 48 + B * S * S * (D + D)


# -- MultiHeadAttention --------------------------------------------------------------------------
def mha(heads=4, bias=True, seed=2, split_kv=False):
    g = G(seed)
    q, k, v = (g.op("MatMul", ["x", g.w([D, D], name=n)]) for n in ("wq", "wk", "wv"))
    if split_kv:  # K, V already split into heads: [B, N, L, H] through Reshape + Transpose
        k, v = (g.op("Transpose", [g.op("Reshape", [t, g.c(np.array([B, S, heads, D // heads],
                                                                     np.int64))])],
                     perm=[0, 2, 1, 3]) for t in (k, v))
    ins = [q, k, v] + ([g.w([3 * D], 0.1, name="mha_b")] if bias else [])
    a = g.op("MultiHeadAttention", ins, domain=MS, num_heads=heads)
    o = g.op("MatMul", [a, g.w([D, D], name="out_w")])
    return model_of(g, [("x", [B, S, D])], [g.op("Add", [o, "x"])])


@pytest.mark.parametrize("bias,split_kv", [(True, False), (False, False), (False, True)])
def test_multihead_attention_heads_removed_exactly(bias, split_kv):
    model = mha(bias=bias, split_kv=split_kv)
    graph = build_channel_graph(load(model))
    group = head_group(graph, "wq")
    assert group.prunable and group.size == 4
    assert {"wq", "wk", "wv"} <= set(group.producers)
    resized, removed, shapes = check_exact(model)
    assert attr_of(resized, "MultiHeadAttention", "num_heads") == 2
    for name in ("wq", "wk", "wv"):
        assert shapes[name] == ((D, D), (D, 8))
    assert shapes["out_w"] == ((D, D), (8, D))
    if bias:
        assert shapes["mha_b"] == ((48,), (24,))


# -- GroupQueryAttention ---------------------------------------------------------------------------
HS = 8  # onnxruntime's CPU kernel wants head sizes that are multiples of 8


def gqa(heads=4, kv=2, packed=False, key_input=False, rotary=False, seed=3, hs=HS):
    g = G(seed)
    d, dkv = heads * hs, kv * hs
    sl = g.c(np.full((B,), S - 1, np.int32), name="seqlens")
    tl = g.c(np.array(S, np.int32), name="total")
    extra, attrs = [], {}
    if rotary:  # rotary embedding per head: cos/sin caches [max positions, head size / 2]
        angle = np.arange(S)[:, None] / 10000 ** (np.arange(hs // 2)[None] / (hs // 2))
        extra = [g.c(np.cos(angle).astype(np.float32)), g.c(np.sin(angle).astype(np.float32))]
        attrs = {"do_rotary": 1}
    inputs = [("x", [B, S, d])]
    if packed:
        qkv = g.op("MatMul", ["x", g.w([d, d + 2 * dkv], name="wqkv")])
        ins = [qkv, "", "", "", "", sl, tl]
    else:
        q = g.op("MatMul", ["x", g.w([d, d], name="wq")])
        if key_input:  # K comes from outside: its heads cannot be removed
            k = "k"
            inputs.append(("k", [B, S, dkv]))
        else:
            k = g.op("MatMul", ["x", g.w([d, dkv], name="wk")])
        v = g.op("MatMul", ["x", g.w([d, dkv], name="wv")])
        ins = [q, k, v, "", "", sl, tl]
    a = g.op("GroupQueryAttention", ins + extra, n_out=3, domain=MS, num_heads=heads,
             kv_num_heads=kv, **attrs)[0]
    o = g.op("MatMul", [a, g.w([d, d], name="out_w")])
    return model_of(g, inputs, [g.op("Add", [o, "x"])])


def test_gqa_unit_is_a_whole_kv_group():
    model = gqa()
    graph = build_channel_graph(load(model))
    group = head_group(graph, "wk")
    assert group.prunable and group.size == 2  # kv_num_heads units, not num_heads
    wq = next(m for m in group.members if m.tensor == "wq" and m.axis == 1)
    wk = next(m for m in group.members if m.tensor == "wk" and m.axis == 1)
    # KV group 1 = KV head 1 and Q heads 2, 3
    assert wq.index_map[1].tolist() == list(range(2 * HS, 4 * HS))
    assert wk.index_map[1].tolist() == list(range(HS, 2 * HS))


@pytest.mark.parametrize("packed,rotary", [(False, False), (True, False), (True, True)])
def test_gqa_groups_removed_exactly(packed, rotary):
    hs = 16 if rotary else HS  # the CPU kernel's rotary wants head sizes that are multiples of 16
    model = gqa(packed=packed, rotary=rotary, hs=hs)
    resized, removed, shapes = check_exact(model)
    assert attr_of(resized, "GroupQueryAttention", "num_heads") == 2
    assert attr_of(resized, "GroupQueryAttention", "kv_num_heads") == 1
    assert shapes["out_w"] == ((4 * hs, 4 * hs), (2 * hs, 4 * hs))
    if packed:
        assert shapes["wqkv"] == ((4 * hs, 8 * hs), (4 * hs, 4 * hs))
    else:
        assert shapes["wq"] == ((4 * hs, 4 * hs), (4 * hs, 2 * hs))
        assert shapes["wk"] == ((4 * hs, 2 * hs), (4 * hs, hs))


def test_gqa_a_low_scoring_q_head_takes_its_whole_group():
    # Scores per column of the Q projection: Q head 0 is the least important. Removing it alone
    # would leave KV head 0 read by Q head 1 only, so the unit that goes is the whole group 0.
    from onnxprune.channels.resize import removed_by_dim
    from onnxprune.channels.select import select_channels
    model = gqa()
    handle = load(model)
    graph = build_channel_graph(handle)
    scores = np.ones(4 * HS)
    scores[:HS] = 0.01
    removed = select_channels(handle, graph, 0.5, channel_scores={"wq": scores})
    cut = removed_by_dim(graph, removed)
    assert cut[("wq", 1)].tolist() == list(range(2 * HS))  # Q heads 0 and 1
    assert cut[("wk", 1)].tolist() == list(range(HS))  # KV head 0
    assert cut[("out_w", 0)].tolist() == list(range(2 * HS))


def test_gqa_part_of_a_group_is_refused():
    # K is a graph input: its KV heads cannot go, so neither can any Q head of their groups
    # (a Q head alone is no unit), and the Q projection's columns stay.
    model = gqa(key_input=True)
    graph = build_channel_graph(load(model))
    group = head_group(graph, "wq")
    assert not group.prunable
    assert "graph input 'k'" in group.frozen
    _, _, shapes = check_exact(model)
    assert "wq" not in shapes and "out_w" not in shapes


# -- opset-23 Attention ----------------------------------------------------------------------------
def onnx_attention(heads=4, kv=2, rank=3, seed=4):
    g = G(seed)
    hs, d = 4, heads * 4
    q = g.op("MatMul", ["x", g.w([d, d], name="wq")])
    k = g.op("MatMul", ["x", g.w([d, kv * hs], name="wk")])
    v = g.op("MatMul", ["x", g.w([d, kv * hs], name="wv")])
    if rank == 3:
        a = g.op("Attention", [q, k, v], q_num_heads=heads, kv_num_heads=kv)
    else:
        def split(t, n):
            t = g.op("Reshape", [t, g.c(np.array([B, S, n, hs], np.int64))])
            return g.op("Transpose", [t], perm=[0, 2, 1, 3])
        a = g.op("Attention", [split(q, heads), split(k, kv), split(v, kv)])
        a = g.op("Reshape", [g.op("Transpose", [a], perm=[0, 2, 1, 3]),
                             g.c(np.array([B, S, d], np.int64))])
    o = g.op("MatMul", [a, g.w([d, d], name="out_w")])
    return model_of(g, [("x", [B, S, d])], [g.op("Add", [o, "x"])], opset=23)


def _ort_runs_opset23_attention() -> bool:
    try:
        run(onnx_attention(), feeds(onnx_attention()))
        return True
    except Exception:
        return False


@pytest.mark.skipif(not _ort_runs_opset23_attention(),
                    reason="the installed onnxruntime does not run opset-23 Attention")
@pytest.mark.parametrize("rank", [3, 4])
def test_opset23_attention_gqa_groups_removed_exactly(rank):
    # 3-D [B, S, N*H] inputs with q_num_heads / kv_num_heads, or 4-D [B, N, S, H] ones split
    # by Reshape + Transpose (the head axis then ties through those rules).
    model = onnx_attention(rank=rank)
    graph = build_channel_graph(load(model))
    group = head_group(graph, "wk")
    assert group.prunable and group.size == 2
    assert {"wq", "wk", "wv"} <= set(group.producers)
    resized, removed, shapes = check_exact(model)
    if rank == 3:
        assert attr_of(resized, "Attention", "q_num_heads") == 2
        assert attr_of(resized, "Attention", "kv_num_heads") == 1
    else:
        assert not node_of(resized, "Attention").attribute  # 4-D: the shapes say the heads
    assert shapes["wq"] == ((16, 16), (16, 8))
    assert shapes["wv"] == ((16, 8), (16, 4))


# -- FFN through FastGelu / BiasGelu, normalizations -----------------------------------------------
def ffn(act="FastGelu", norm="SkipLayerNormalization", seed=5):
    g = G(seed)
    inputs = [("x", [B, S, D]), ("r", [B, S, D])]
    params = [g.w([D], positive=True), g.w([D], 0.1)]
    if norm == "SkipSimplifiedLayerNormalization":
        params = params[:1]
    n = g.op(norm, ["x", "r"] + params, domain=MS) if norm else "x"
    h = g.op("MatMul", [n, g.w([D, 32], name="up")])
    h = g.op(act, [h] + ([g.w([32], 0.1, name="act_b")] if act != "Gelu" else []), domain=MS)
    o = g.op("Add", [g.op("MatMul", [h, g.w([32, D], name="down")]), n])
    return model_of(g, inputs, [g.op("MatMul", [o, g.w([D, D])])])


@pytest.mark.parametrize("act", ["FastGelu", "BiasGelu", "Gelu"])
def test_ffn_width_through_gelu_forms(act):
    model = ffn(act)
    graph = build_channel_graph(load(model))
    group = head_group(graph, "up")
    assert group.prunable and group.size == 32
    resized, removed, shapes = check_exact(model)
    assert shapes["up"] == ((D, 32), (D, 16)) and shapes["down"] == ((32, D), (16, D))
    if act != "Gelu":
        assert shapes["act_b"] == ((32,), (16,))


@pytest.mark.parametrize("norm", ["SkipLayerNormalization", "SkipSimplifiedLayerNormalization"])
def test_skip_norm_keeps_the_residual_stream(norm):
    model = ffn(norm=norm)
    graph = build_channel_graph(load(model))
    hidden = head_group(graph, "up", 0)
    assert not hidden.prunable
    if norm == "SkipLayerNormalization":
        assert f"{norm} normalizes over the hidden width" in hidden.frozen
        assert "the mean of the kept channels is another mean" in hidden.frozen
    else:  # RMSNorm follows a stream whose removed channels are 0 (tests/channels/
        # test_residual.py); this one starts at the graph inputs
        assert hidden.frozen.startswith("graph input")


def test_rms_norms_freeze_with_their_reason():
    for op, domain, opset in (("SimplifiedLayerNormalization", "", 17),
                              ("RMSNormalization", "", 23)):
        g = G(6)
        n = g.op(op, ["x", g.w([D], positive=True)], domain=domain or None, axis=-1)
        m = g.op("MatMul", [n, g.w([D, 8], name="fc1")])
        m = g.op("Relu", [m])
        model = g.model([("x", [B, S, D])], [g.op("MatMul", [m, g.w([8, 4])])], opset=opset)
        model.graph.output[0].CopyFrom(onnx.helper.make_tensor_value_info(
            model.graph.output[0].name, onnx.TensorProto.FLOAT, [B, S, 4]))
        graph = build_channel_graph(load(model))
        hidden = head_group(graph, "fc1", 0)
        # the norm follows a stream whose removed channels are 0 (tests/channels/
        # test_residual.py); this one is the graph input
        assert hidden.frozen == "graph input 'x' keeps its shape"
        assert head_group(graph, "fc1").prunable  # the width after it still prunes
        if opset == 23 and not _ort_runs_opset23_attention():
            continue
        check_exact(model, checker=domain or op != "SimplifiedLayerNormalization")


# -- a real fused graph: onnxruntime's transformer optimizer output ------------------------------
FUSED = Path(__file__).resolve().parents[2] / "models" / "bert_fused.onnx"


def fused_feeds():
    rng = np.random.default_rng(0)
    mask = np.ones((1, 16), np.int64)
    mask[0, 12:] = 0  # padded positions: the mask_index path is exercised too
    return {"input_ids": rng.integers(0, 50, (1, 16)).astype(np.int64), "attention_mask": mask}


def test_fused_fixture_groups():
    model = onnx.load(FUSED)
    ops = {(n.domain, n.op_type) for n in model.graph.node}
    assert {(MS, "Attention"), (MS, "SkipLayerNormalization"), (MS, "BiasGelu"),
            (MS, "FastGelu"), (MS, "EmbedLayerNormalization")} <= ops
    graph = build_channel_graph(load(model))
    prunable = sorted((g.size, g.producers[0]) for g in graph.prunable())
    # 2 layers x (4 heads of the packed QKV weight, 128 FFN channels through BiasGelu/FastGelu)
    assert [s for s, _ in prunable] == [4, 4, 128, 128]
    assert {p for s, p in prunable if s == 4} == {"Attention_0_qkv_weight",
                                                   "Attention_1_qkv_weight"}
    stream = [g.frozen for g in graph.groups if g.frozen and "normalizes" in g.frozen]
    assert len(stream) == 5 and all("the residual stream" in f for f in stream)


def test_fused_fixture_heads_and_ffn_removed_exactly():
    model = onnx.load(FUSED)
    masked, resized, removed, shapes = masked_and_resized(model, sparsity=0.5)
    onnx.checker.check_model(resized)
    f = fused_feeds()
    assert_close(run(resized, f), run(masked, f))
    assert shapes["Attention_0_qkv_weight"] == ((64, 192), (64, 96))
    assert shapes["Attention_1_qkv_bias"] == ((192,), (96,))
    assert shapes["layers.0.up.bias"] == ((128,), (64,))  # BiasGelu's bias
    assert shapes["layers.1.up.bias"] == ((128,), (64,))  # FastGelu's bias
    assert [attr_of_node(n, "num_heads") for n in resized.graph.node
            if n.op_type == "Attention"] == [2, 2]


def test_fused_fixture_with_dynamic_batch_and_sequence():
    model = onnx.load(FUSED)
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        dims[0].dim_param, dims[1].dim_param = "batch", "sequence"
    graph = build_channel_graph(load(model))
    assert sorted(g.size for g in graph.prunable()) == [4, 4, 128, 128]
    masked, resized, _, _ = masked_and_resized(model, sparsity=0.5)
    rng = np.random.default_rng(0)
    f = {"input_ids": rng.integers(0, 50, (3, 16)).astype(np.int64),
         "attention_mask": np.ones((3, 16), np.int64)}
    assert_close(run(resized, f), run(masked, f))


def attr_of_node(node, name):
    return next(onnx.helper.get_attribute_value(a) for a in node.attribute if a.name == name)


def test_fused_fixture_channel_pruning_through_the_api():
    model = onnx.load(FUSED)
    result = onnxprune.prune(model, pattern="channel", sparsity=0.5, validate=True)
    rep = result.report
    assert (rep.params_before, rep.params_after) == (65536, 32768)
    assert (rep.macs_before, rep.macs_after) == (1122304, 565248)  # Attention MACs counted
    comparison = rep.to_dict()["comparison"]  # validated in onnxruntime on the resized model
    assert comparison["samples"] == 8 and comparison["verdict"] in ("ok", "degraded")
    out = run(result.model, fused_feeds())
    assert out[0].shape == (1, 16, 8)


# -- what cannot be exact is frozen with a reason ------------------------------------------------
def test_packed_qkv_of_multihead_attention_is_frozen():
    g = G(9)
    qkv = g.op("MatMul", ["x", g.w([D, 3 * D], name="wqkv")])
    qkv = g.op("Reshape", [qkv, g.c(np.array([B, S, 4, 3, 4], np.int64))])
    a = g.op("MultiHeadAttention", [qkv], domain=MS, num_heads=4)
    model = model_of(g, [("x", [B, S, D])], [g.op("MatMul", [a, g.w([D, D], name="out_w")])])
    graph = build_channel_graph(load(model))
    assert not any(g.prunable for g in graph.groups)
    assert "packed QKV/KV layouts of MultiHeadAttention are not mapped" in \
        head_group(graph, "wqkv").frozen


def test_attention_with_a_past_cache_from_outside_keeps_its_heads():
    g = G(7)
    ins = ["x", g.w([D, 48], name="qkv_w"), g.w([48], 0.1), "", "past"]
    a, present = g.op("Attention", ins, n_out=2, domain=MS, num_heads=4)
    o = g.op("MatMul", [a, g.w([D, D], name="out_w")])
    model = model_of(g, [("x", [B, S, D]), ("past", [2, B, 4, 3, 4])], [g.op("Add", [o, "x"])])
    model.graph.output.append(onnx.helper.make_tensor_value_info(present, onnx.TensorProto.FLOAT,
                                                                 None))
    graph = build_channel_graph(load(model))
    group = head_group(graph, "qkv_w")
    assert not group.prunable and group.size == 4
    assert group.frozen == "graph input 'past' keeps its shape"


def test_packed_weight_that_does_not_split_into_heads_is_frozen():
    model = packed_attention(heads=3)  # 16 columns per Q/K/V: not 3 heads
    graph = build_channel_graph(load(model))
    group = head_group(graph, "qkv_w")
    assert not group.prunable
    assert "does not split into Q, K, V of 3 heads" in group.frozen


def test_attention_bias_per_head_is_sliced_with_its_head():
    # MultiHeadAttention with a stored per-head attention bias [1, N, S, S]: sliced, not zeroed.
    g = G(8)
    q, k, v = (g.op("MatMul", ["x", g.w([D, D], name=n)]) for n in ("wq", "wk", "wv"))
    bias = g.w([1, 4, S, S], name="rel_bias")
    a = g.op("MultiHeadAttention", [q, k, v, "", "", bias], domain=MS, num_heads=4)
    o = g.op("MatMul", [a, g.w([D, D], name="out_w")])
    model = model_of(g, [("x", [B, S, D])], [g.op("Add", [o, "x"])])
    resized, removed, shapes = check_exact(model)
    gone = removed[head_group(build_channel_graph(load(model)), "wq").id]
    kept = [h for h in range(4) if h not in gone]
    assert shapes["rel_bias"] == ((1, 4, S, S), (1, 2, S, S))
    assert np.array_equal(init(resized, node_of(resized, "MultiHeadAttention").input[5]),
                          init(model, "rel_bias")[:, kept])


# -- shapes and MACs -------------------------------------------------------------------------------
def test_output_shapes_of_custom_domain_ops_are_inferred():
    from onnxprune.model.shapes import infer_shapes
    from onnxprune.ops.registry import complete_types
    model = packed_attention(sizes=(16, 16, 8))
    shapes = infer_shapes(model, complete=complete_types).shapes
    assert shapes[node_of(model, "Attention").output[0]] == (B, S, 8)
    model = gqa(packed=True)
    shapes = infer_shapes(model, complete=complete_types).shapes
    out, pk, _ = node_of(model, "GroupQueryAttention").output
    assert shapes[out] == (B, S, 4 * HS) and shapes[pk] == (B, 2, None, HS)


def test_attention_op_macs():
    for model, op, want in (
            (mha(), "MultiHeadAttention", B * S * S * (D + D)),
            (gqa(), "GroupQueryAttention", 2 * B * S * S * 4 * HS),
            (onnx_attention(), "Attention", B * S * S * (16 + 16)),
            (onnx_attention(rank=4), "Attention", B * 4 * S * S * (4 + 4))):
        macs = count_macs(model)
        label = next(k for k, v in macs.op_types.items() if v == op)
        assert macs.per_node[label] == want, op


# -- dead heads ----------------------------------------------------------------------------------
def _zeroed(model, name, fn):
    for t in model.graph.initializer:
        if t.name == name:
            t.CopyFrom(numpy_helper.from_array(fn(numpy_helper.to_array(t).copy()), name))
    return model


def test_unread_head_is_removed_exactly():
    # Head 2's output rows of the projection are zero: nobody reads the head, it goes.
    from onnxprune.channels.dead import remove_dead_channels

    def rows(a):
        a[8:12] = 0
        return a
    model = _zeroed(packed_attention(), "out_w", rows)
    handle = load(onnx.load_from_string(model.SerializeToString()))
    dead = remove_dead_channels(handle)
    assert dead.channels_removed == 1
    assert attr_of(handle.model, "Attention", "num_heads") == 3
    assert init(handle.model, node_of(handle.model, "Attention").input[1]).shape == (D, 36)
    f = feeds(model)
    assert_close(run(handle.model, f), run(model, f))


def test_head_with_zero_qkv_columns_is_kept():
    # Zero Q/K/V columns: the head still attends (uniformly) over its V bias, a value that is no
    # per-channel constant to fold, so it stays.
    from onnxprune.channels.dead import remove_dead_channels

    def cols(a):
        a[:, [c + p * 16 for p in range(3) for c in range(4, 8)]] = 0
        return a
    model = _zeroed(packed_attention(), "qkv_w", cols)
    handle = load(onnx.load_from_string(model.SerializeToString()))
    dead = remove_dead_channels(handle)
    assert dead.channels_removed == 0
    assert attr_of(handle.model, "Attention", "num_heads") == 4


def test_fused_fixture_through_the_cli(tmp_path):
    from click.testing import CliRunner

    from onnxprune.cli import main
    out = tmp_path / "bert.pruned.onnx"
    res = CliRunner().invoke(main, [str(FUSED), "--pattern", "channel", "--sparsity", "0.25",
                                    "-o", str(out)], catch_exceptions=False)
    assert res.exit_code == 0, res.output
    assert "SkipLayerNormalization normalizes over the hidden width (the residual stream)" in \
        " ".join(res.output.split())
    pruned = onnx.load(out)
    assert [attr_of_node(n, "num_heads") for n in pruned.graph.node
            if n.op_type == "Attention"] == [3, 3]
    assert run(pruned, fused_feeds())[0].shape == (1, 16, 8)


def test_bias_add_ties_its_operands():
    # BiasAdd (x + bias + skip) runs on CUDA only in onnxruntime: the ties and the resize are
    # checked here, element-wise like Add (whose outputs the other tests compare).
    from onnxprune.channels.resize import resize_channels
    from onnxprune.channels.select import select_channels
    g = G(11)
    h = g.op("MatMul", ["x", g.w([D, 32], name="up")])
    s = g.op("MatMul", ["x", g.w([D, 32], name="side")])
    h = g.op("BiasAdd", [h, g.w([32], 0.1, name="ba_b"), s], domain=MS)
    o = g.op("MatMul", [g.op("Relu", [h]), g.w([32, D], name="down")])
    model = model_of(g, [("x", [B, S, D])], [g.op("Add", [o, "x"])])
    handle = load(model)
    graph = build_channel_graph(handle)
    group = head_group(graph, "up")
    assert group.prunable and {"up", "side"} <= set(group.producers)
    assert any(m.tensor == "ba_b" and "bias" in m.roles for m in group.members)
    shapes = resize_channels(handle, graph, select_channels(handle, graph, 0.5))
    assert shapes["ba_b"] == ((32,), (16,)) and shapes["side"] == ((D, 32), (D, 16))

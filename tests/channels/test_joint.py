"""Models pruned together (``--with``): an encoder/decoder pair joined, its interface widths and
the decoder's fed-back state pruned on both sides, split back; exact over several steps."""

from __future__ import annotations

import copy

import numpy as np
import onnx
import pytest

import joint_models as J
from channel_models import G, assert_close, masked_and_resized_with_graph, run
from onnxprune import prune
from onnxprune.channels.graph import build_channel_graph
from onnxprune.errors import OptionError
from onnxprune.model import compose
from onnxprune.model.io import load
from onnxprune.model.shapes import infer_shapes
from onnxprune.ops.registry import complete_types


def pair():
    e, d = J.encoder(), J.decoder()
    return e, d, compose.join([e, d], ["encoder", "decoder"], compose.find_links([e, d]))


def steps_data(seed=0, steps=3):
    rng = np.random.default_rng(seed)
    src = rng.standard_normal((J.SEQ, J.BATCH, J.FEAT)).astype(np.float32)
    toks = rng.standard_normal((steps, J.BATCH, J.FEAT)).astype(np.float32)
    return src, toks


def split(handle_model, joint):
    shapes = infer_shapes(handle_model, upgrade=False, complete=complete_types).shapes
    return compose.split(handle_model, joint, shapes)


def group_with(graph, weight):
    return next(g for g in graph.groups if weight in g.producers)


def test_links_found_by_name():
    e, d, joint = pair()
    assert joint.links == [compose.Link(0, "memory_out", 1, "memory"),
                           compose.Link(0, "hidden_out", 1, "hidden"),
                           compose.Link(1, "hidden_out", 1, "hidden")]
    g = joint.model.graph
    assert [i.name for i in g.input] == ["src", "token"]
    # the encoder's linked outputs are inner values; the decoder's state stays an output,
    # renamed (the encoder has a 'hidden_out' too) and tied to what 'hidden' reads
    assert [o.name for o in g.output] == ["logits", "decoder/hidden_out"]
    assert compose.state_ties(joint.model) == [("decoder/hidden_out", "hidden_out")]
    assert "fed back as input 'hidden'" in joint.describe()[2]


def test_split_of_the_unpruned_join_is_the_original_pair():
    e, d, joint = pair()
    parts = split(joint.model, joint)
    src, toks = steps_data()
    for got, want in zip(J.greedy(run, *parts, src, toks), J.greedy(run, e, d, src, toks)):
        np.testing.assert_array_equal(got, want)
    for part, orig in zip(parts, (e, d)):
        assert [v.name for v in part.graph.input] == [v.name for v in orig.graph.input]
        assert [v.name for v in part.graph.output] == [v.name for v in orig.graph.output]
        assert sorted(t.name for t in part.graph.initializer) == \
            sorted(t.name for t in orig.graph.initializer)
        assert len(part.graph.node) == len(orig.graph.node)
        assert (part.ir_version, list(part.opset_import), part.producer_name) == \
            (orig.ir_version, list(orig.opset_import), orig.producer_name)


def test_interface_and_state_widths_are_prunable_groups():
    _, _, joint = pair()
    graph = build_channel_graph(load(joint.model))
    state = group_with(graph, "w17")  # the bridge Gemm: the decoder's hidden units
    assert state.prunable and state.size == J.DEC
    # the decoder's gate weights (3 gates x DEC rows, torch's chunk) go with it, 3 rows a unit
    assert {"w7", "w11"} <= set(state.producers)
    w_ih = next(m for m in state.members if m.tensor == "w7" and m.axis == 0)
    assert w_ih.index_map.shape == (J.DEC, 3)
    np.testing.assert_array_equal(w_ih.index_map[2], [2, 2 + J.DEC, 2 + 2 * J.DEC])
    memory = group_with(graph, "w5")  # the encoder GRU's hidden units: the memory width
    assert memory.prunable and memory.size == J.ENC
    frozen = [g for g in graph.groups if g.producers and g.frozen]
    assert [g.producers for g in frozen] == [["w137"]]  # only the class scores


@pytest.mark.parametrize("sparsity", [0.2, 0.5])
def test_masked_equals_resized_over_steps(sparsity):
    """The joined model masked and resized, both split, run with the state fed back for
    several steps: the same logits at every step, with fewer parameters."""
    _, _, joint = pair()
    graph, masked, resized, removed, _ = masked_and_resized_with_graph(
        joint.model, None, sparsity=sparsity)
    assert removed and sum(len(v) for v in removed.values()) > 0
    assert any(graph.groups[k].size == J.DEC for k in removed)  # the state shrank
    src, toks = steps_data(steps=4)
    m_parts, r_parts = split(masked, joint), split(resized, joint)
    for got, want in zip(J.greedy(run, *r_parts, src, toks), J.greedy(run, *m_parts, src, toks)):
        assert_close([got], [want])
    dec = r_parts[1]
    kept = J.DEC - len(removed[next(k for k in removed if graph.groups[k].size == J.DEC)])
    dims = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
            for v in list(dec.graph.input) + list(dec.graph.output)}
    assert dims["hidden"] == [J.BATCH, 1, kept] and dims["hidden_out"] == [J.BATCH, 1, kept]
    enc_out = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
               for v in r_parts[0].graph.output}
    assert enc_out["hidden_out"] == [J.BATCH, 1, kept]
    for part in r_parts:
        onnx.checker.check_model(part, full_check=True)


def test_prune_with_writes_both_files(tmp_path):
    e, d = J.encoder(), J.decoder()
    onnx.save(e, tmp_path / "enc.onnx")
    onnx.save(d, tmp_path / "dec.onnx")
    before = [(tmp_path / n).read_bytes() for n in ("enc.onnx", "dec.onnx")]
    (tmp_path / "out").mkdir()
    result = prune(tmp_path / "enc.onnx", pattern="channel", sparsity=0.3,
                   with_models=[tmp_path / "dec.onnx"], output=f"{tmp_path / 'out'}/")
    assert result.outputs == [(tmp_path / "out" / n).resolve()
                              for n in ("enc.pruned.onnx", "dec.pruned.onnx")]
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["dec.pruned.onnx",
                                                                     "enc.pruned.onnx"]
    assert [(tmp_path / n).read_bytes() for n in ("enc.onnx", "dec.onnx")] == before
    enc, dec = (onnx.load(p) for p in result.outputs)
    params = [sum(int(np.prod(t.dims)) for t in m.graph.initializer if t.data_type == 1)
              for m in (enc, dec, e, d)]
    assert params[0] < params[2] and params[1] < params[3]
    src, toks = steps_data(steps=3)
    logits = J.greedy(run, enc, dec, src, toks)  # the pruned pair runs with its state
    assert all(x.shape == (J.BATCH, J.CLASSES) for x in logits)
    assert any("pruned together" in n for n in result.report.notes)
    report = result.report
    assert report.model == f"{(tmp_path / 'enc.onnx').resolve()} + {(tmp_path / 'dec.onnx').resolve()}"
    assert report.file_size_before == sum((tmp_path / n).stat().st_size
                                          for n in ("enc.onnx", "dec.onnx"))
    assert report.file_size_after == sum(p.stat().st_size for p in result.outputs)


def test_link_errors(tmp_path):
    e, d = J.encoder(), J.decoder()
    onnx.save(e, tmp_path / "enc.onnx")
    onnx.save(d, tmp_path / "dec.onnx")
    with pytest.raises(OptionError, match="--with"):
        prune(tmp_path / "enc.onnx", pattern="channel", links=("memory_out=memory",))
    with pytest.raises(OptionError, match="no model has an output 'nope'"):
        prune(tmp_path / "enc.onnx", pattern="channel", with_models=[tmp_path / "dec.onnx"],
              links=("nope=memory",), output=tmp_path / "o.onnx")
    with pytest.raises(OptionError, match="is given twice"):
        prune(tmp_path / "enc.onnx", pattern="channel", with_models=[tmp_path / "dec.onnx"],
              links=("memory_out=memory", "memory_out=memory"), output=tmp_path / "o.onnx")
    with pytest.raises(OptionError, match="shapes differ"):
        prune(tmp_path / "enc.onnx", pattern="channel", with_models=[tmp_path / "dec.onnx"],
              links=("memory_out=hidden",), output=tmp_path / "o.onnx")
    # a model that reads nothing of the first: no link by name
    onnx.save(J.encoder(seed=3), tmp_path / "other.onnx")
    with pytest.raises(OptionError, match="--link OUTPUT=INPUT"):
        prune(tmp_path / "enc.onnx", pattern="channel", with_models=[tmp_path / "other.onnx"],
              output=tmp_path / "o.onnx")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec.onnx", "enc.onnx", "other.onnx"]


def test_state_without_a_first_value_is_refused():
    e, d = J.encoder(), J.decoder()
    with pytest.raises(OptionError, match="keeps its width"):
        compose.join([e, d], ["e", "d"], [compose.Link(1, "hidden_out", 1, "hidden")])


def _chunked(bias_from_other: bool = False, offset: int = 0):
    """x -> Gemm (3*H rows) -> chunk(3) -> r*a + b, c -> Gemm: torch's chunk as exported;
    ``bias_from_other`` reads the size from another tensor, ``offset`` shifts the bounds (no
    longer equal chunks): both must stay frozen."""
    h = 6
    g = G(4)
    y = g.op("Gemm", ["x", g.w([3 * h, 8]), g.w([3 * h], 0.3)], transB=1)
    other = g.op("Gemm", ["x", g.w([3 * h, 8])], transB=1)
    size = g.op("Gather", [g.op("Shape", [other if bias_from_other else y]),
                           g.c(np.array(1, np.int64))])
    step = g.op("Div", [g.op("Add", [size, g.c(np.array(2, np.int64))]),
                        g.c(np.array(3, np.int64))])
    b = [g.c(np.array([0], np.int64))] + [
        g.op("Unsqueeze", [g.op("Add", [g.op("Mul", [step, g.c(np.array(k + 1, np.int64))]),
                                        g.c(np.array(offset if k < 2 else 0, np.int64))]),
                           g.c(np.array([0], np.int64))]) for k in range(3)]
    axes = g.c(np.array([1], np.int64))
    r, a, c = (g.op("Slice", [y, b[k], b[k + 1], axes]) for k in range(3))
    mixed = g.op("Add", [g.op("Mul", [g.op("Sigmoid", [r]), a]), g.op("Relu", [c])])
    g.op("Add", [g.op("MatMul", [mixed, g.w([h, 4])]), g.w([4], 0.1)])
    return g.model([("x", [2, 8])], [g.nodes[-1].output[0]]), h


def test_chunk_slices_tie_equal_chunks_exactly():
    model, h = _chunked()
    graph, masked, resized, removed, sizes = masked_and_resized_with_graph(model, None,
                                                                           sparsity=0.5)
    grp = next(g for g in graph.groups if g.size == h and g.prunable)
    assert grp.id in removed and len(removed[grp.id]) == h // 2
    feeds = {"x": np.random.default_rng(0).standard_normal((2, 8)).astype(np.float32)}
    assert_close(run(resized, feeds), run(masked, feeds))
    w = next(t for t in resized.graph.initializer if t.dims[0] in (3 * h // 2,))
    assert list(w.dims) == [3 * (h - h // 2), 8]


@pytest.mark.parametrize("kw", [dict(bias_from_other=True), dict(offset=1)])
def test_chunk_like_slices_that_are_not_stay_frozen(kw):
    model, h = _chunked(**kw)
    graph = build_channel_graph(load(copy.deepcopy(model)))
    gemm = model.graph.node[0].input[1]
    grp = next(g for g in graph.groups if gemm in g.producers)
    assert grp.frozen is not None


def test_cli_with_and_link(tmp_path):
    from click.testing import CliRunner

    from onnxprune.cli import main

    onnx.save(J.encoder(), tmp_path / "enc.onnx")
    onnx.save(J.decoder(), tmp_path / "dec.onnx")

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)

    bad = invoke(tmp_path / "enc.onnx", "--with", tmp_path / "dec.onnx", "--pattern", "channel",
                 "--link", "memory_out")
    assert bad.exit_code == 2 and "error: --link 'memory_out': give OUTPUT=INPUT" in bad.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dec.onnx", "enc.onnx"]
    ok = invoke(tmp_path / "enc.onnx", "--with", tmp_path / "dec.onnx", "--pattern", "channel",
                "--link", "memory_out=memory", "--link", "hidden_out=hidden", "--link",
                "hidden_out=hidden")
    assert ok.exit_code == 0, ok.output
    written = [tmp_path / "enc.pruned.onnx", tmp_path / "dec.pruned.onnx"]
    assert all(p.exists() for p in written)
    assert f"wrote {written[0]}, {written[1]}" in ok.output
    dec = onnx.load(written[1])
    hidden = [d.dim_value for d in dec.graph.input[2].type.tensor_type.shape.dim]
    assert hidden[2] < J.DEC  # the state shrank on both sides of the call
    assert [d.dim_value for d in dec.graph.output[1].type.tensor_type.shape.dim] == hidden


def test_a_model_given_again_is_its_next_run_with_shared_weights():
    """encoder + the decoder three times: the runs read one set of weights, the state flows
    run to run; masked == resized over the three runs, and the split gives two models."""
    e, d = J.encoder(), J.decoder()
    runs = [e, d, d, d]
    labels = ["encoder", "decoder", "decoder#2", "decoder#3"]
    joint = compose.join(runs, labels, compose.find_links(runs))
    g = joint.model.graph
    assert len(g.initializer) == len(e.graph.initializer) + len(d.graph.initializer)
    assert [i.name for i in g.input] == ["src", "token", "decoder#2/token", "decoder#3/token"]
    assert compose.Link(1, "hidden_out", 2, "hidden") in joint.links
    assert [o.name for o in g.output] == ["logits", "decoder#2/logits", "decoder#3/logits",
                                          "decoder#3/hidden_out"]
    assert not any("decoder#2: output" in line for line in joint.describe())
    graph, masked, resized, removed, _ = masked_and_resized_with_graph(joint.model, None,
                                                                       sparsity=0.3)
    state = group_with(graph, "w17")
    assert state.id in removed and {"w7", "w11"} <= set(state.producers)
    m_parts, r_parts = split(masked, joint), split(resized, joint)
    assert len(r_parts) == 2
    src, toks = steps_data(steps=5)
    for got, want in zip(J.greedy(run, *r_parts, src, toks), J.greedy(run, *m_parts, src, toks)):
        assert_close([got], [want])
    # the joined model's three runs are the split pair's first three steps
    feeds = {"src": src, "token": toks[0], "decoder#2/token": toks[1], "decoder#3/token": toks[2]}
    joined = run(resized, feeds)
    for got, want in zip(joined[:3], J.greedy(run, *r_parts, src, toks[:3])):
        assert_close([got], [want])


def test_real_romanizer_pair_masked_equals_resized_over_steps(corpus_model):
    """arabic-name-romanizer's BiGRU encoder + unrolled GRU-cell decoder (torch chunk gates,
    expand(-1, 2, -1) state): jointly every weight group but the vocabulary is prunable, and
    the resized pair decodes exactly as the masked one, its state fed back step by step."""
    enc = onnx.load(corpus_model("text/romanizer/encoder"))
    dec = onnx.load(corpus_model("text/romanizer/decoder"))
    joint = compose.join([enc, dec], ["encoder", "decoder"], compose.find_links([enc, dec]))
    shapes = {"src": [1, 9], "src_mask": [1, 9], "prefix": [1, 3]}
    graph, masked, resized, removed, _ = masked_and_resized_with_graph(joint.model, shapes,
                                                                       sparsity=0.25)
    frozen = [g for g in graph.groups if g.producers and g.frozen]
    assert [g.producers for g in frozen] == [["m.out.weight"]]  # logprobs' 160 classes
    assert len(removed) == len([g for g in graph.groups if g.producers]) - 1
    m_parts, r_parts = split(masked, joint), split(resized, joint)
    hidden = next(v for v in r_parts[1].graph.input if v.name == "hidden")
    assert hidden.type.tensor_type.shape.dim[2].dim_value == 192  # 256 units, 25 % removed
    src = np.array([[4, 33, 51, 40, 52, 2, 0, 0, 0]], np.int64)
    feeds = {"src": src, "src_mask": src == 0}
    outs = []
    for enc_m, dec_m in (m_parts, r_parts):
        memory, mask, state = run(enc_m, feeds)
        prefix, steps = np.array([[1]], np.int64), []
        for _ in range(5):
            logprobs, state = run(dec_m, {"prefix": prefix, "memory": memory, "src_mask": mask,
                                          "hidden": state})
            steps.append(logprobs)
            prefix = np.concatenate([prefix, logprobs.argmax(-1)[:, None]], axis=1)
        outs.append(steps)
    for got, want in zip(*outs[::-1]):
        assert_close([got], [want])


def test_inspect_with_and_external_data(tmp_path):
    """A model with its weights in an external .data file joins like any other (read, not
    rewritten); inspect --with reports the joined pair and its links."""
    from onnxprune import inspect

    onnx.save(J.encoder(), tmp_path / "enc.onnx", save_as_external_data=True,
              all_tensors_to_one_file=True, location="enc.onnx.data", size_threshold=0)
    onnx.save(J.decoder(), tmp_path / "dec.onnx")
    data = (tmp_path / "enc.onnx.data").read_bytes()
    report = inspect(tmp_path / "enc.onnx", with_models=[tmp_path / "dec.onnx"])
    assert any("inspected together" in n and "hidden_out' -> decoder input 'hidden'"
               .replace("decoder", "dec") in n for n in report.notes)
    # the joined pair holds each file's weights once, even with the decoder run twice
    alone = inspect(tmp_path / "enc.onnx").params_before + \
        inspect(tmp_path / "dec.onnx").params_before
    assert report.params_before == alone
    twice = inspect(tmp_path / "enc.onnx", with_models=[tmp_path / "dec.onnx"] * 2)
    assert twice.params_before == alone
    result = prune(tmp_path / "enc.onnx", pattern="channel", sparsity=0.3,
                   with_models=[tmp_path / "dec.onnx"])
    assert (tmp_path / "enc.onnx.data").read_bytes() == data
    enc, dec = (onnx.load(p) for p in result.outputs)
    src, toks = steps_data(steps=2)
    assert all(x.shape == (J.BATCH, J.CLASSES) for x in J.greedy(run, enc, dec, src, toks))
    with pytest.raises(OptionError, match="--with"):
        inspect(tmp_path / "enc.onnx", links=("memory_out=memory",))


def test_real_t5_pair_links_by_name_given_and_keeps_inputs_apart(corpus_model):
    """flan-t5-small's encoder and decoder (dynamic int8): the link has two names
    (`last_hidden_state` -> `encoder_hidden_states`), so none is found and one is given; both
    files read an 'input_ids', which stay two inputs (not one data); joined, the encoder's
    stream reaches the decoder's cross-attention and only the vocabulary stays whole."""
    enc = onnx.load(corpus_model("text/flan_t5/encoder"))
    dec = onnx.load(corpus_model("text/flan_t5/decoder"))
    assert not compose.find_links([enc, dec])
    links = compose.parse_links([enc, dec], ["encoder", "decoder"],
                                ["last_hidden_state=encoder_hidden_states"])
    joint = compose.join([enc, dec], ["encoder", "decoder"], links)
    assert [i.name for i in joint.model.graph.input] == [
        "input_ids", "attention_mask", "decoder/input_ids", "encoder_attention_mask"]
    shapes = {"input_ids": [1, 16], "attention_mask": [1, 16], "decoder/input_ids": [1, 4],
              "encoder_attention_mask": [1, 16]}
    graph = build_channel_graph(load(joint.model), shapes)
    frozen = [g for g in graph.groups if g.producers and g.frozen]
    assert len(frozen) == 1 and frozen[0].size == 32128  # logits' vocabulary
    stream = next(g for g in graph.groups if g.stream and any(
        m.tensor == "last_hidden_state" for m in g.members))
    assert stream.size == 512 and not stream.frozen


def test_initializers_listed_as_inputs_join_once_per_weight():
    """Old exporters list every initializer as a graph input too: a decoder run twice lists
    its weights once in the joined model, which onnx.checker accepts and onnxruntime runs."""
    e, d = J.encoder(), J.decoder()
    for m in (e, d):  # listed first, before the real inputs
        listed = [onnx.helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                  for t in m.graph.initializer] + list(m.graph.input)
        del m.graph.input[:]
        m.graph.input.extend(listed)
    runs = [e, d, d]
    joint = compose.join(runs, ["e", "d", "d#2"], compose.find_links(runs))
    names = [i.name for i in joint.model.graph.input]
    assert len(names) == len(set(names))
    onnx.checker.check_model(joint.model, full_check=True)
    src, toks = steps_data(steps=2)
    out = run(joint.model, {"src": src, "token": toks[0], "d#2/token": toks[1]})
    want = J.greedy(run, e, d, src, toks)
    assert_close(out[:2], want)


def test_storage_applies_to_every_file(tmp_path):
    """--storage bitmask with --with writes every model so (the decoding nodes in each file,
    a note per file), and each file runs (onnxruntime) as the pair it was."""
    onnx.save(J.encoder(), tmp_path / "enc.onnx")
    onnx.save(J.decoder(), tmp_path / "dec.onnx")
    nodes = {}
    for storage in ("dense", "bitmask"):
        folder = tmp_path / storage
        folder.mkdir()
        result = prune(tmp_path / "enc.onnx", pattern="unstructured", sparsity=0.8,
                       with_models=[tmp_path / "dec.onnx"], storage=storage,
                       output=f"{folder}/")
        src, toks = steps_data(steps=2)
        enc, dec = (onnx.load(p) for p in result.outputs)
        nodes[storage] = [len(enc.graph.node), len(dec.graph.node)]
        assert all(x.shape == (J.BATCH, J.CLASSES) for x in J.greedy(run, enc, dec, src, toks))
        said = [n for n in result.report.notes if n.startswith(("enc.pruned.onnx: ",
                                                                 "dec.pruned.onnx: "))]
        assert len(said) == (2 if storage == "bitmask" else 0), result.report.notes
    assert all(b > d for b, d in zip(nodes["bitmask"], nodes["dense"])), nodes


def test_a_link_read_inside_a_subgraph_is_renamed_there_and_split_back():
    """The decoder reads its linked input inside an If branch (an outer-scope name): joined,
    the branch reads the encoder's output; split, the decoder reads its own input again; the
    width stays (a subgraph read freezes it), and the pair computes what it did."""
    from onnx import TensorProto, helper

    g = G(3)
    g.nodes.append(helper.make_node("MatMul", ["x", g.w([6, 4])], ["feat_out"]))
    enc = g.typed_model("enc", [("x", TensorProto.FLOAT, [2, 6])],
                        [("feat_out", TensorProto.FLOAT, [2, 4])])
    out = helper.make_tensor_value_info
    then = helper.make_graph([helper.make_node("Relu", ["feat"], ["t"])], "then", [],
                             [out("t", TensorProto.FLOAT, [2, 4])])
    other = helper.make_graph([helper.make_node("Neg", ["feat"], ["e"])], "else", [],
                              [out("e", TensorProto.FLOAT, [2, 4])])
    d = G(4)
    d.nodes.append(helper.make_node("If", ["cond"], ["y"], then_branch=then, else_branch=other))
    dec = d.typed_model("dec", [("feat", TensorProto.FLOAT, [2, 4]), ("cond", TensorProto.BOOL, [])],
                        [("y", TensorProto.FLOAT, [2, 4])])
    joint = compose.join([enc, dec], ["enc", "dec"], compose.find_links([enc, dec]))
    branch = next(n for n in joint.model.graph.node if n.op_type == "If").attribute[0].g
    assert branch.node[0].input[0] == "feat_out"
    onnx.checker.check_model(joint.model, full_check=True)
    graph = build_channel_graph(load(joint.model))
    assert all(gr.frozen for gr in graph.groups if "feat_out" in [m.tensor for m in gr.members])
    parts = split(joint.model, joint)
    assert parts[1].graph.node[0].attribute[0].g.node[0].input[0] == "feat"
    x = np.random.default_rng(0).standard_normal((2, 6)).astype(np.float32)
    for cond in (True, False):
        feat, = run(parts[0], {"x": x})
        want, = run(dec, {"feat": run(enc, {"x": x})[0], "cond": np.array(cond)})
        got, = run(parts[1], {"feat": feat, "cond": np.array(cond)})
        np.testing.assert_array_equal(got, want)
        joined, = run(joint.model, {"x": x, "cond": np.array(cond)})
        np.testing.assert_array_equal(joined, want)


def test_a_huge_constant_of_shape_is_never_evaluated():
    """A Reshape target computed from ConstantOfShape([10**9]) (a hostile file): the channel
    builder does not evaluate it (no 8 GB allocation); the Reshape stays computed."""
    from onnx import TensorProto, helper

    from onnxprune.channels.graph import Builder

    g = G(5)
    big = g.op("ConstantOfShape", [g.c(np.array([10 ** 9], np.int64))],
               value=onnx.numpy_helper.from_array(np.array([1], np.int64)))
    target = g.op("Slice", [big, g.c(np.array([0], np.int64)), g.c(np.array([2], np.int64))])
    h = g.op("MatMul", ["x", g.w([4, 6])])
    g.nodes.append(helper.make_node("Reshape", [h, target], ["y"]))
    model = g.typed_model("m", [("x", TensorProto.FLOAT, [3, 4])],
                          [("y", TensorProto.FLOAT, [3, 8])])
    b = Builder(load(model))
    assert b.const_value(target) is None
    # the whole channel graph and a channel run: the 10**9 axis is left whole, never split
    graph = build_channel_graph(load(model))
    assert all(g.size < 10 ** 6 for g in graph.groups)
    result = prune(model, pattern="channel", validate=False, allow_noop=True)
    assert result.report.params_after == result.report.params_before
    small = G(6)
    ones = small.op("ConstantOfShape", [small.c(np.array([3], np.int64))],
                    value=onnx.numpy_helper.from_array(np.array([1], np.int64)))
    vec = small.op("Mul", [ones, small.c(np.array(-1, np.int64))])
    small.nodes.append(helper.make_node("Identity", [vec], ["v"]))
    m2 = small.typed_model("m2", [], [("v", TensorProto.INT64, [3])])
    np.testing.assert_array_equal(Builder(load(m2)).const_value("v"), [-1, -1, -1])

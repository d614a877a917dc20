"""Models that run together, pruned as one: an encoder and its decoder, a backbone and its head.

The width of a tensor one file hands to another (an encoder's ``memory_out``, read by its
decoder as ``memory``) is an interface: pruned in one file alone it must stay whole. Pruned
*jointly*, both sides of the link shrink together. :func:`join` builds one model from several:
every link ``output -> input`` becomes one tensor (the later model reads the earlier one's
output), names that collide get the later file's stem as a prefix, and a *state* — an output
the caller feeds back as an input of the same model at the next call (a recurrent decoder's
``hidden_out -> hidden``) — is recorded in the joined model's metadata (:data:`TIES_KEY`) so the
channel graph keeps the output's channels those of the tensor the input reads
(:func:`state_ties`), instead of freezing it. The pipeline prunes the joined model like any
other; :func:`split` cuts the result back into one model per file: each part is every node its
own outputs need, back to its own inputs, with its names restored and the resized interface
dims written into its inputs and outputs.

Links are found by name (:func:`find_links`): an input of a later model reads the earlier
model's output of the same name, or of that name plus a state suffix (``memory`` <-
``memory_out``); or given as ``OUTPUT=INPUT`` (:func:`parse_links`). Each link is checked:
the same element type, rank and fixed dims on both sides.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Sequence, Set, Tuple

import onnx
from onnx import numpy_helper

from onnxprune.errors import OptionError
from onnxprune.model.index import constant_tensor, subgraph_reads, subgraphs
from onnxprune.model.io import iter_graphs

#: Suffixes that name a value handed on: ``hidden_out`` is the ``hidden`` of the next step or
#: of the next model.
STATE_SUFFIXES = ("_out", "_output", "_new", "_next")
#: Metadata key of a joined model: JSON ``[[graph output, tensor], ...]``, each output holding
#: the channels of that tensor (a state fed back where the tensor is read).
TIES_KEY = "onnxprune.state_ties"


@dataclass(frozen=True)
class Link:
    """Output ``output`` of model ``source`` is input ``input`` of model ``target``
    (``source == target``: a state the caller feeds back at the next call)."""

    source: int
    output: str
    target: int
    input: str


@dataclass
class Part:
    """One of the joined models: its header (a weightless copy, graph emptied), its label, and
    its names -> names in the joined model."""

    label: str
    header: onnx.ModelProto
    inputs: List[onnx.ValueInfoProto]
    outputs: List[onnx.ValueInfoProto]
    names: Dict[str, str] = field(default_factory=dict)  # own name -> joined name
    #: the part this one is a later run of (itself when it is a model's first run): a model
    #: given several times runs several times, every run reading the first run's weights
    first: int = 0


@dataclass
class Joint:
    """The joined model, its parts (in order) and the links between them."""

    model: onnx.ModelProto
    parts: List[Part]
    links: List[Link]

    def describe(self) -> List[str]:
        """The links in words, one line each."""
        out = []
        onward = {(k.source, k.output) for k in self.links if k.source != k.target}
        for k in self.links:
            a, b = self.parts[k.source].label, self.parts[k.target].label
            if k.source == k.target and (k.source, k.output) in onward:
                continue  # fed to the model's next run, given as a link
            if k.source == k.target:
                out.append(f"{a}: output '{k.output}' is fed back as input '{k.input}' at the "
                           "next call (a state: both keep the same channels)")
            else:
                out.append(f"{a} output '{k.output}' -> {b} input '{k.input}'")
        return out


def _inputs(graph: onnx.GraphProto) -> List[onnx.ValueInfoProto]:
    stored = {t.name for t in graph.initializer} | {t.values.name
                                                     for t in graph.sparse_initializer}
    return [vi for vi in graph.input if vi.name not in stored]


def find_links(models: Sequence[onnx.ModelProto]) -> List[Link]:
    """Links by name: each input of a later model reads the nearest earlier model's output of
    the same name, or of that name plus a state suffix; an input so linked whose model also has
    an output of its name plus a state suffix is a state fed back."""
    links: List[Link] = []
    for t in range(1, len(models)):
        outs_t = {o.name for o in models[t].graph.output}
        for vi in _inputs(models[t].graph):
            for s in range(t - 1, -1, -1):
                outs = [o.name for o in models[s].graph.output]
                hit = vi.name if vi.name in outs else next(
                    (vi.name + x for x in STATE_SUFFIXES if vi.name + x in outs), None)
                if hit is not None:
                    links.append(Link(s, hit, t, vi.name))
                    back = next((vi.name + x for x in STATE_SUFFIXES if vi.name + x in outs_t),
                                None)
                    if back is not None:
                        links.append(Link(t, back, t, vi.name))
                    break
    return links


def parse_links(models: Sequence[onnx.ModelProto], labels: Sequence[str],
                specs: Iterable[str]) -> List[Link]:
    """``OUTPUT=INPUT`` specs as links: OUTPUT of the latest model before a model with input
    INPUT; once that input is linked so, OUTPUT of its own model (a state fed back: a name both
    models output, given twice, is the link and then the state)."""
    links: List[Link] = []
    for spec in specs:
        out, sep, inp = str(spec).partition("=")
        out, inp = out.strip(), inp.strip()
        if not sep or not out or not inp:
            raise OptionError(f"--link '{spec}': give OUTPUT=INPUT (an output of one model and "
                              "the input of a later model, or of the same one, that reads it)")
        targets = [t for t, m in enumerate(models) if inp in {v.name for v in _inputs(m.graph)}]
        found = None
        for t in targets:
            # an earlier model's output first; once the input has one, its own (a state)
            fed = any(k.target == t and k.input == inp and k.source != t for k in links)
            for s in ([t] if fed else list(range(t - 1, -1, -1)) + [t]):
                if out in {o.name for o in models[s].graph.output}:
                    found = Link(s, out, t, inp)
                    break
            if found:
                break
        if found is None and any(k.output == out and k.input == inp for k in links):
            raise OptionError(f"--link '{spec}' is given twice: only one model outputs '{out}' "
                              "(a name two models output, given twice, is the link and then "
                              "the state); give it once")
        if found is None:
            where = ", ".join(f"{lab}: outputs {[o.name for o in m.graph.output]}, inputs "
                              f"{[v.name for v in _inputs(m.graph)]}"
                              for lab, m in zip(labels, models))
            raise OptionError(f"--link '{spec}': no model has an output '{out}' read by input "
                              f"'{inp}' of itself or of a later model ({where})")
        links.append(found)
    return links


def _value(graph: onnx.GraphProto, name: str, outputs: bool) -> onnx.ValueInfoProto:
    return next(v for v in (graph.output if outputs else graph.input) if v.name == name)


def _dims(vi: onnx.ValueInfoProto) -> Optional[List]:
    t = vi.type.tensor_type
    if not vi.type.HasField("tensor_type") or not t.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]


def check_links(models: Sequence[onnx.ModelProto], labels: Sequence[str],
                links: Sequence[Link]) -> None:
    """Each link joins values of one element type, rank and fixed dims; an input is linked
    once; a state is fed back into an input that another model's output feeds."""
    seen: Set[Tuple[int, str]] = set()
    for k in links:
        a = _value(models[k.source].graph, k.output, True)
        b = _value(models[k.target].graph, k.input, False)
        where = (f"{labels[k.source]} output '{k.output}' -> {labels[k.target]} input "
                 f"'{k.input}'")
        if (k.target, k.input) in seen and k.source != k.target:
            raise OptionError(f"{where}: that input is linked twice; give one --link for it")
        seen.add((k.target, k.input))
        ta, tb = a.type.tensor_type.elem_type, b.type.tensor_type.elem_type
        if not a.type.HasField("tensor_type") or not b.type.HasField("tensor_type") or ta != tb:
            raise OptionError(f"{where}: the element types differ ({_type(ta)} vs {_type(tb)}); "
                              "link outputs only to the inputs that read them")
        da, db = _dims(a), _dims(b)
        if da is not None and db is not None and (len(da) != len(db) or any(
                x is not None and y is not None and x != y for x, y in zip(da, db))):
            raise OptionError(f"{where}: the shapes differ ({da} vs {db}); link outputs only to "
                              "the inputs that read them")
    for k in links:
        if k.source == k.target and not any(j.target == k.target and j.input == k.input and
                                            j.source != j.target for j in links):
            raise OptionError(f"{labels[k.source]}: state '{k.output}' -> '{k.input}' needs "
                              f"input '{k.input}' linked to an earlier model's output (the "
                              "first value of the state); a graph input keeps its width")


def _constants_to_initializers(graph: onnx.GraphProto) -> None:
    """Main-graph ``Constant`` nodes holding a tensor become initializers of the same name
    (what every run of a repeated model can share)."""
    keep = []
    for node in graph.node:
        value = constant_tensor(node)
        if value is None:
            keep.append(node)
            continue
        tensor = onnx.TensorProto()
        tensor.CopyFrom(value)
        tensor.name = node.output[0]
        graph.initializer.append(tensor)
    del graph.node[:]
    graph.node.extend(keep)


def _type(elem: int) -> str:
    return onnx.TensorProto.DataType.Name(elem).lower() if elem else "not a tensor"


def _all_names(graph: onnx.GraphProto, out: Set[str]) -> Set[str]:
    for coll in (graph.input, graph.output, graph.value_info):
        out.update(v.name for v in coll)
    out.update(t.name for t in graph.initializer)
    out.update(t.values.name for t in graph.sparse_initializer)
    for node in graph.node:
        out.update(n for n in node.input if n)
        out.update(n for n in node.output if n)
        if node.name:
            out.add(node.name)
        for _, sub in subgraphs(node):
            _all_names(sub, out)
    return out


def _rename(graph: onnx.GraphProto, names: Mapping[str, str]) -> None:
    """Rename every occurrence of each name in ``names`` (values, stored tensors, node names),
    subgraphs included: one name everywhere, so scoping stays as it was."""
    def ren(n: str) -> str:
        return names.get(n, n)
    for coll in (graph.input, graph.output, graph.value_info):
        for v in coll:
            v.name = ren(v.name)
    for t in graph.initializer:
        t.name = ren(t.name)
    for t in graph.sparse_initializer:
        t.values.name = ren(t.values.name)
        t.indices.name = ren(t.indices.name)
    for node in graph.node:
        node.input[:] = [ren(n) if n else n for n in node.input]
        node.output[:] = [ren(n) if n else n for n in node.output]
        if node.name:
            node.name = ren(node.name)
        for _, sub in subgraphs(node):
            _rename(sub, names)


def _inline_graph(model: onnx.ModelProto, read) -> onnx.GraphProto:
    """A copy of ``model``'s graph with every external tensor's values inline (``read(tensor)``
    gives them, from the original tensor)."""
    graph = onnx.GraphProto()
    graph.CopyFrom(model.graph)
    if read is None:
        return graph
    originals = {x.name: x for _, g in iter_graphs(model.graph) for x in g.initializer
                 if x.data_location == onnx.TensorProto.EXTERNAL}
    for _, g in iter_graphs(graph):
        for t in g.initializer:
            if t.name in originals and t.data_location == onnx.TensorProto.EXTERNAL:
                t.CopyFrom(numpy_helper.from_array(read(originals[t.name]), t.name))
    return graph


def _header(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` without its graph (opsets, IR version, producer, metadata, functions)."""
    header = onnx.ModelProto()
    for f, value in model.ListFields():
        if f.name == "graph":
            continue
        if hasattr(value, "extend"):  # a repeated field
            getattr(header, f.name).extend(value)
        elif hasattr(value, "CopyFrom"):  # a message
            getattr(header, f.name).CopyFrom(value)
        else:
            setattr(header, f.name, value)
    return header


def join(models: Sequence[onnx.ModelProto], labels: Sequence[str], links: Sequence[Link],
         read=None) -> Joint:
    """One model from ``models`` (copies; the originals are kept) with ``links`` made: each
    linked input replaced by the output it reads. Raises :class:`OptionError` for models that
    cannot run as one (another opset of one domain). ``read(model index, tensor)``: the values
    of an external tensor (external data is made inline)."""
    check_links(models, labels, links)
    opsets: Dict[str, Tuple[int, str]] = {}
    for lab, m in zip(labels, models):
        for o in m.opset_import:
            d = "" if o.domain == "ai.onnx" else o.domain
            if d in opsets and opsets[d][0] != o.version:
                raise OptionError(
                    f"{opsets[d][1]} imports opset {opsets[d][0]} of domain '{d or 'ai.onnx'}' "
                    f"and {lab} opset {o.version}: models pruned together must use one opset "
                    "per domain; export both with the same opset")
            opsets[d] = (o.version, lab)
    taken: Set[str] = set()
    graphs: List[onnx.GraphProto] = []
    parts: List[Part] = []
    first = [next(s for s in range(t + 1) if models[s] is models[t]) for t in range(len(models))]
    sources: Dict[int, onnx.GraphProto] = {}
    for t, (lab, m) in enumerate(zip(labels, models)):
        s = first[t]
        if s not in sources:
            sources[s] = _inline_graph(m, (lambda x, t=t: read(t, x)) if read is not None
                                       else None)
            if first.count(s) > 1:  # run several times: every copy reads the same tensors
                _constants_to_initializers(sources[s])
        graph = onnx.GraphProto()
        graph.CopyFrom(sources[s])
        own = _all_names(graph, set())
        names = {}
        if s < t:  # a later run of a model: its weights are the first run's
            names.update({x.name: parts[s].names[x.name] for x in graph.initializer})
            del graph.initializer[:]
        for n in sorted(own):
            # a name the models before use, an input's too: two inputs of one name are not
            # taken for the same data (T5's encoder and decoder both read 'input_ids')
            if n in taken and n not in names:
                new, i = f"{lab}/{n}", 2
                while new in taken or new in own:
                    new, i = f"{lab}/{n}~{i}", i + 1
                names[n] = new
        for k in links:
            if k.target == t and k.source != t:
                names[k.input] = parts[k.source].names.get(k.output, k.output)
        _rename(graph, names)
        parts.append(Part(lab, _header(m), list(_inputs(sources[s])),
                          list(sources[s].output), {n: names.get(n, n) for n in own}, s))
        taken |= {names.get(n, n) for n in own}
        graphs.append(graph)
    merged = onnx.GraphProto()
    merged.name = "+".join(g.name or lab for g, lab in zip(graphs, labels))
    linked_in = {(k.target, k.input) for k in links if k.source != k.target}
    fed = {(k.source, k.output) for k in links if k.source != k.target}
    have: Set[str] = set()
    for t, g in enumerate(graphs):
        merged.node.extend(g.node)
        merged.initializer.extend(g.initializer)
        merged.sparse_initializer.extend(g.sparse_initializer)
        # a linked input's shape was the output's: one entry per value
        known = {v.name for v in merged.value_info}
        merged.value_info.extend(v for v in g.value_info if v.name not in known)
        by_name = {v.name: v for v in g.input}
        real = [parts[t].names[v.name] for v in parts[t].inputs]  # joined names, in order
        for own, joined in zip(parts[t].inputs, real):
            if (t, own.name) not in linked_in and joined not in have:
                merged.input.append(by_name[joined])
                have.add(joined)
        # initializers listed as inputs (old exporters): once, a later run's are the first's
        stored = [v for v in g.input if v.name not in set(real) and v.name not in have]
        merged.input.extend(stored)
        have.update(v.name for v in stored)
        for vi, own in zip(g.output, parts[t].outputs):
            if (t, own.name) not in fed:
                merged.output.append(vi)
    model = onnx.helper.make_model(merged, opset_imports=[
        onnx.helper.make_opsetid(d, v) for d, (v, _) in opsets.items()])
    model.ir_version = max(m.ir_version for m in models)
    for lab, m in zip(labels, models):
        have_f = {(f.domain, f.name): f for f in model.functions}
        for f in m.functions:
            same = have_f.get((f.domain, f.name))
            if same is None:
                model.functions.append(f)
            elif same.SerializeToString() != f.SerializeToString():
                raise OptionError(f"{lab} defines function '{f.domain}:{f.name}' unlike the "
                                  "model before it: models pruned together must not define "
                                  "one function name two ways; rename one of them")
    ties = [[parts[k.target].names[k.output], parts[k.target].names[k.input]]
            for k in links if k.source == k.target]
    if ties:
        onnx.helper.set_model_props(model, {TIES_KEY: json.dumps(ties)})
    return Joint(model, parts, list(links))


def state_ties(model: onnx.ModelProto) -> List[Tuple[str, str]]:
    """``(graph output, tensor)`` pairs a joined model records: the output keeps the tensor's
    channels (see :func:`join`)."""
    for p in model.metadata_props:
        if p.key == TIES_KEY:
            return [(str(a), str(b)) for a, b in json.loads(p.value)]
    return []


def split(model: onnx.ModelProto, joint: Joint, shapes: Mapping[str, Sequence]
          ) -> List[onnx.ModelProto]:
    """The joined (pruned) ``model`` cut back into one model per part (one per model given
    several times: its first run): each holds the nodes its outputs need back to its inputs,
    its names restored, and its inputs' and outputs' fixed dims set from ``shapes`` (joined
    name -> inferred dims) where channels were removed."""
    graph = model.graph
    producer = {o: i for i, n in enumerate(graph.node) for o in n.output if o}
    stored = {t.name: t for t in graph.initializer}
    sparse = {t.values.name: t for t in graph.sparse_initializer}
    out: List[onnx.ModelProto] = []
    for k, p in enumerate(joint.parts):
        if p.first != k:
            continue  # a later run of a model: written once, as its first run
        own_in = {p.names[v.name] for v in p.inputs}
        need = [p.names[v.name] for v in p.outputs]
        keep: Set[int] = set()
        reads: Set[str] = set()
        while need:
            name = need.pop()
            if name in reads:
                continue
            reads.add(name)
            if name in own_in or name in stored or name in sparse:
                continue
            i = producer.get(name)
            if i is None:
                raise AssertionError(f"split: {p.label} needs '{name}', which nothing of it "
                                     "produces (a bug)")
            if i not in keep:
                keep.add(i)
                node = graph.node[i]
                need.extend(n for n in list(node.input) + subgraph_reads(node) if n)
        back = {v: k for k, v in p.names.items()}
        g = onnx.GraphProto()
        g.name = p.header.graph.name if p.header.graph.name else p.label
        g.node.extend(graph.node[i] for i in sorted(keep))
        g.initializer.extend(stored[n] for n in stored if n in reads)
        g.sparse_initializer.extend(sparse[n] for n in sparse if n in reads)
        for vi in graph.value_info:
            if vi.name in reads:
                g.value_info.append(vi)
        for coll, originals in ((g.input, p.inputs), (g.output, p.outputs)):
            for vi in originals:
                new = onnx.ValueInfoProto()
                new.CopyFrom(vi)
                new.name = p.names[vi.name]
                _set_dims(new, shapes.get(new.name))
                coll.append(new)
        _rename(g, back)
        m = onnx.ModelProto()
        m.CopyFrom(p.header)
        m.graph.CopyFrom(g)
        used = {n.domain for _, gg in iter_graphs(g) for n in gg.node}
        have = {o.domain for o in m.opset_import}
        for o in model.opset_import:
            if o.domain not in have and o.domain in used:
                m.opset_import.append(o)
        out.append(m)
    return out


def _set_dims(vi: onnx.ValueInfoProto, dims: Optional[Sequence]) -> None:
    """Fixed dims of ``vi`` that ``dims`` (inferred) gives another int: set to it."""
    if dims is None or not vi.type.HasField("tensor_type"):
        return
    shape = vi.type.tensor_type.shape
    if len(shape.dim) != len(dims):
        return
    for d, new in zip(shape.dim, dims):
        if isinstance(new, int) and d.HasField("dim_value") and d.dim_value != new:
            d.dim_value = new

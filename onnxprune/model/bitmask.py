"""Bitmask storage: a weight with enough zeros (an initializer, or the value of a main-graph
``Constant`` node) written as its nonzero values plus one bit per element, expanded back to the dense tensor by standard ONNX ops that onnxruntime folds into a
constant when the session is built.

For a tensor ``W`` of ``n`` elements with ``k`` nonzeros the file holds ``W__values`` (``k``
values) and ``W__bits`` (``ceil(n / 8)`` bytes, the nonzero positions, row-major, most
significant bit first: numpy's ``packbits``), and a chain of nodes computes ``W`` from them::

    bits ─Cast(int32)─Reshape[-1,1]─Div[128..1]─Mod 2─Reshape[-1]─Slice[0:n] = m   (0/1 per element)
    Gather(values, CumSum(m) * m) ─Reshape(shape) = W

``values`` starts with one 0, so every position whose bit is 0 gathers index 0 and the j-th
nonzero gathers index j (no Where, which onnxruntime has no float16 CPU kernel for). So a
float32 weight costs ``4 (k + 1) + n / 8`` bytes instead of ``4 n``: 0.53× of dense at 50 %
zeros, 0.23× at 80 %, 0.13× at 90 % — where ``sparse_initializer`` needs 12 bytes per nonzero
(int64 indices) and pays only past 2/3 zeros. Every op is a standard one (opset 11+: CumSum),
so the model passes ``onnx.checker``'s full check; onnxruntime's constant folding (on by default,
any graph optimization level but ``ORT_DISABLE_ALL``) turns the chain into the dense initializer
once, at session creation: inference runs the same kernels on the same values, outputs are
identical (tests compare byte for byte). With optimizations disabled the chain runs on every
call (a few element-wise passes over the weight).

The nodes are named ``onnxprune.bitmask/<i>/<step>``; the last one (``.../shape``) carries in its
``doc_string`` the JSON ``{"values", "bits", "shape"}`` naming the tensors it reads, and the model
is marked with the metadata entry ``onnxprune.storage = bitmask``. :func:`decode` (called by
:func:`onnxprune.model.io.load`) finds such chains, checks them and restores the dense
initializers, so onnxprune reads a bitmask-stored model like any other. The decision which
tensors go in this form is :func:`onnxprune.model.sparse.decide` (``form="bitmask"``).
"""

from __future__ import annotations

import json
from typing import Callable, Dict, List

import numpy as np
import onnx
from onnx import helper, numpy_helper

from onnxprune.model.external import is_external
from onnxprune.model.sparse import StorageDecision, decide, replace_all, why_dense

#: The metadata entry that marks a model written with bitmask storage.
META_KEY, META_VALUE = "onnxprune.storage", "bitmask"
PREFIX = "onnxprune.bitmask/"
#: The lowest default-domain opset the chain is valid in (CumSum). A NonZero + Scatter chain
#: would run at opset 9, but onnxruntime does not constant-fold NonZero: the expansion would run
#: on every call, so older models keep dense storage.
MIN_OPSET = 11
_SHARED = {  # constants every chain reads, added once per model
    "pow": np.array([128, 64, 32, 16, 8, 4, 2, 1], np.int32),
    "two": np.array(2, np.int32), "axis": np.array(0, np.int32),
    "column": np.array([-1, 1], np.int64), "flat": np.array([-1], np.int64),
    "start": np.array([0], np.int64),
}


def bitmask_bytes(numel: int, nonzeros: int, itemsize: int) -> int:
    """Bytes of the values and the bits (protobuf framing aside)."""
    return (nonzeros + 1) * itemsize + -(-numel // 8)


def _opset(model: onnx.ModelProto) -> int:
    return next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)


def encode(model: onnx.ModelProto, read: Callable[[onnx.TensorProto], np.ndarray]
           ) -> List[StorageDecision]:
    """Write the main-graph initializers and ``Constant`` node values worth it in bitmask form,
    in place (``read(tensor)`` gives an initializer's values). Returns one decision per
    initializer and per ``Constant`` node holding a tensor."""
    graph = model.graph
    inputs = {i.name for i in graph.input}
    opset = _opset(model)
    taken = {t.name for t in graph.initializer} | {i.name for i in graph.input} | {
        o for n in graph.node for o in list(n.input) + list(n.output)}

    def fresh(name: str) -> str:
        out, k = name, 0
        while out in taken:
            k += 1
            out = f"{name}_{k}"
        taken.add(out)
        return out

    decisions, keep, nodes, added, replaced = [], [], [], [], set()
    shared: Dict[str, str] = {}

    def consider(tensor: onnx.TensorProto, name: str, values_of) -> bool:
        """Decide ``tensor`` (stored under ``name``); True when it went to bitmask form."""
        why = why_dense(tensor, inputs)
        if not why and opset < MIN_OPSET:
            why = f"opset {opset}: bitmask storage needs opset {MIN_OPSET} or later (CumSum)"
        values = None if why else values_of()
        d = decide(tensor, values, "bitmask", why)
        d.name = name
        decisions.append(d)
        if d.stored != "bitmask":
            return False
        if not shared:
            shared.update({k: fresh(PREFIX + k) for k in _SHARED})
            added.extend(numpy_helper.from_array(v, shared[k]) for k, v in _SHARED.items())
        nodes.extend(_chain(name, np.asarray(values), len(decisions) - 1, shared, fresh, added))
        return True

    for tensor in graph.initializer:
        if not consider(tensor, tensor.name, lambda t=tensor: read(t)):
            keep.append(tensor)
    for k, node in enumerate(graph.node):  # paddle2onnx & co keep weights in Constant nodes
        value = next((a.t for a in node.attribute if a.name == "value"), None) \
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx") else None
        if value is not None and len(node.output) == 1 and consider(
                value, node.output[0], lambda t=value: numpy_helper.to_array(t)):
            replaced.add(k)
    if nodes:
        replace_all(graph.initializer, keep + added)
        replace_all(graph.node, nodes + [n for k, n in enumerate(graph.node)
                                         if k not in replaced])
        entry = next((p for p in model.metadata_props if p.key == META_KEY), None)
        if entry is None:
            entry = model.metadata_props.add()
            entry.key = META_KEY
        entry.value = META_VALUE
    return decisions


def _chain(name: str, values: np.ndarray, i: int, shared: Dict[str, str], fresh,
           added: List[onnx.TensorProto]) -> List[onnx.NodeProto]:
    """The nodes computing tensor ``name`` from its values and bits (their initializers are
    appended to ``added``)."""
    flat = values.reshape(-1)
    keep = flat != 0
    names = {"values": fresh(f"{name}__values"), "bits": fresh(f"{name}__bits"),
             "shape": fresh(f"{name}__shape"), "numel": fresh(f"{name}__numel")}
    added += [numpy_helper.from_array(np.concatenate([np.zeros(1, flat.dtype), flat[keep]]),
                                      names["values"]),
              numpy_helper.from_array(np.packbits(keep), names["bits"]),
              numpy_helper.from_array(np.array(values.shape, np.int64), names["shape"]),
              numpy_helper.from_array(np.array([flat.size], np.int64), names["numel"])]
    t = {k: fresh(f"{PREFIX}{i}/{k}") for k in ("b32", "col", "div", "bit", "flat", "m",
                                                 "cum", "idx", "dense")}
    s, p = shared, f"{PREFIX}{i}/"
    doc = json.dumps({k: names[k] for k in ("values", "bits", "shape")})
    node = helper.make_node
    return [
        node("Cast", [names["bits"]], [t["b32"]], p + "cast", to=onnx.TensorProto.INT32),
        node("Reshape", [t["b32"], s["column"]], [t["col"]], p + "column"),
        node("Div", [t["col"], s["pow"]], [t["div"]], p + "div"),
        node("Mod", [t["div"], s["two"]], [t["bit"]], p + "mod"),
        node("Reshape", [t["bit"], s["flat"]], [t["flat"]], p + "flat"),
        node("Slice", [t["flat"], s["start"], names["numel"]], [t["m"]], p + "slice"),
        node("CumSum", [t["m"], s["axis"]], [t["cum"]], p + "cumsum"),
        node("Mul", [t["cum"], t["m"]], [t["idx"]], p + "index"),
        node("Gather", [names["values"], t["idx"]], [t["dense"]], p + "gather"),
        node("Reshape", [t["dense"], names["shape"]], [name], p + "shape", doc_string=doc),
    ]


def decode(model: onnx.ModelProto, where: str = "the model") -> int:
    """Restore the dense initializers of a bitmask-stored model, in place (removing the chains
    and their tensors). Returns how many were restored; raises
    :class:`~onnxprune.errors.ModelLoadError` for a chain whose tensors do not fit."""
    from onnxprune.errors import ModelLoadError

    if not any(p.key == META_KEY and p.value == META_VALUE for p in model.metadata_props):
        return 0
    graph = model.graph
    chains: Dict[str, List[onnx.NodeProto]] = {}
    for node in graph.node:
        if node.name.startswith(PREFIX) and node.name.count("/") == 2:
            chains.setdefault(node.name.split("/")[1], []).append(node)
    inits = {t.name: t for t in graph.initializer}
    dense, drop, gone = [], set(), set()
    for key, nodes in chains.items():
        last = [n for n in nodes if n.name.endswith("/shape") and n.op_type == "Reshape"]
        try:
            doc = json.loads(last[0].doc_string) if len(last) == 1 else None
            tensors = {k: inits[doc[k]] for k in ("values", "bits", "shape")}
        except (ValueError, KeyError, TypeError):
            raise ModelLoadError(f"{where}: bitmask-stored tensor chain {key} is incomplete; the "
                                 "file is corrupt, re-export it") from None
        if any(is_external(t) for t in tensors.values()):
            raise ModelLoadError(f"{where}: a bitmask-stored tensor keeps its data in external "
                                 "data, which onnxprune does not read; store it dense")
        values = numpy_helper.to_array(tensors["values"]).reshape(-1)
        bits = numpy_helper.to_array(tensors["bits"]).reshape(-1)
        shape = [int(d) for d in numpy_helper.to_array(tensors["shape"]).reshape(-1)]
        numel = int(np.prod(shape, dtype=np.int64))
        if bits.dtype != np.uint8 or min(shape, default=0) < 0 or len(bits) != -(-numel // 8):
            raise ModelLoadError(f"{where}: bitmask-stored tensor '{last[0].output[0]}' has "
                                 f"{len(bits)} mask bytes for shape {shape}; the file is "
                                 "corrupt, re-export it")
        keep = np.unpackbits(bits, count=numel).astype(bool)
        if int(keep.sum()) + 1 != len(values):
            raise ModelLoadError(f"{where}: bitmask-stored tensor '{last[0].output[0]}' has "
                                 f"{len(values) - 1} values for {int(keep.sum())} mask bits; "
                                 "the file is corrupt, re-export it")
        array = np.zeros(numel, values.dtype)
        array[keep] = values[1:]
        dense.append(numpy_helper.from_array(array.reshape(shape), last[0].output[0]))
        gone.update(n.name for n in nodes)
        drop.update(i for n in nodes for i in n.input)
    if not dense:
        return 0
    rest = [n for n in graph.node if n.name not in gone]
    read = {i for n in rest for i in n.input} | {o.name for o in graph.output}
    replace_all(graph.initializer, [t for t in graph.initializer
                                    if t.name not in drop or t.name in read] + dense)
    replace_all(graph.node, rest)
    replace_all(model.metadata_props, [p for p in model.metadata_props if p.key != META_KEY])
    return len(dense)


__all__ = ["META_KEY", "META_VALUE", "MIN_OPSET", "bitmask_bytes", "decode", "encode"]

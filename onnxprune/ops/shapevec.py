"""Shape vectors computed in the graph, evaluated statically: ``Shape → Gather/Slice →
Unsqueeze → Concat`` chains (what exporters write for ``x.view(b, s, heads, -1)``) read as
vectors of numbers, symbolic :class:`DimRef` entries and :class:`DimProduct` entries (a
run-time size times a constant: torch's ``batch * heads``), reshape outputs from them, and the
graph's shapes refined with them (``refine_shapes``, ``complete_shapes``: the channel graph's
and the resize's shapes, batch and sequence kept symbolic). The Reshape channel rule in
:mod:`onnxprune.ops.shape` reads a computed target through :func:`shape_vector`, the Slice rule
a bound computed from its own input's size (torch's ``chunk``) through :func:`size_function`.

A module of its own so that :mod:`onnxprune.ops.shape` stays the layout ops' channel rules.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import onnx

from onnxprune.model.index import attr
from onnxprune.ops.registry import complete_types

# -- shape vectors computed in the graph (Shape -> Gather/Slice -> Unsqueeze -> Concat) --------
@dataclass(frozen=True)
class DimRef:
    """An entry of a computed shape vector: the size of ``tensor``'s ``axis`` at run time."""

    tensor: str
    axis: int


@dataclass(frozen=True)
class DimProduct:
    """An entry computed at run time as the product of sizes times a constant:
    ``Mul(Shape(mask)[0], 6)`` (torch's ``nn.MultiheadAttention`` viewing q as
    ``[seq, batch * heads, head_dim]``), ``Mul(seq, batch)``, ``Div`` by a constant that divides
    ``factor``. ``origin`` is the value the outermost ``Mul``/``Div`` computes: the node whose
    constant a resize rewrites. Never evaluated with bound sizes (that would bake the batch)."""

    refs: Tuple[DimRef, ...]
    factor: int
    origin: str


Entry = Union[int, DimRef, DimProduct]
VECTOR_OPS = ("Shape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Concat", "Gather", "Slice",
              "Reshape", "Mul", "Div")


def shape_vector(name: str, shape_of: Callable, const_of: Callable, producer: Callable,
                 depth: int = 0) -> Optional[List[Entry]]:
    """The entries of a 1-D int shape vector (a scalar counts as one entry), each a constant or
    a :class:`DimRef`, when it is a stored constant or computed from tensor shapes by Shape,
    Gather/Slice with constant indices, Squeeze/Unsqueeze, Concat, Cast and Reshape (a vector
    kept a vector); ``Mul``/``Div`` of one-entry vectors gives a :class:`DimProduct` (or an int
    when both are constants). None otherwise.

    ``shape_of(name)`` is a value's (possibly symbolic) shape or None, ``const_of(name)`` a
    stored constant's values or None, ``producer(name)`` the node computing it or None."""
    c = const_of(name)
    if c is not None:
        a = np.asarray(c)
        if a.dtype.kind not in "iu" or a.ndim > 1:
            return None
        return [int(v) for v in a.ravel()]
    node = producer(name)
    if node is None or depth > 16 or node.domain not in ("", "ai.onnx") or \
            node.op_type not in VECTOR_OPS:
        return None
    out_shape = shape_of(node.output[0])
    if out_shape is not None and len(out_shape) > 1:
        return None

    def sub(i: int) -> Optional[List[Entry]]:
        if i >= len(node.input) or not node.input[i]:
            return None
        return shape_vector(node.input[i], shape_of, const_of, producer, depth + 1)

    def ints(i: int) -> Optional[List[int]]:
        if i >= len(node.input) or not node.input[i]:
            return None
        v = const_of(node.input[i])
        return None if v is None else [int(x) for x in np.ravel(v)]

    op = node.op_type
    if op == "Shape":
        s = shape_of(node.input[0])
        if s is None:
            return None
        r = len(s)
        start, end = int(attr(node, "start", 0)), attr(node, "end", None)
        end = r if end is None else int(end)
        start = min(max(start + r if start < 0 else start, 0), r)
        end = min(max(end + r if end < 0 else end, 0), r)
        return [DimRef(node.input[0], a) for a in range(start, end)]
    if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
        return sub(0)
    if op == "Concat":
        parts = [sub(i) for i in range(len(node.input))]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]
    if op in ("Mul", "Div"):
        a, b = sub(0), sub(1)
        if a is None or b is None or len(a) != 1 or len(b) != 1:
            return None
        e = product_entry(op, a[0], b[0], node.output[0])
        return None if e is None else [e]
    data = sub(0)
    if op == "Reshape":  # [n] -> [-1] / [n], a scalar -> [1]: the same entries
        t = ints(1)
        ok = t is not None and (t[0] in (-1, len(data)) if len(t) == 1 else
                                (not t and len(data) == 1))
        return data if ok else None
    if data is None:
        return None
    if op == "Gather":
        idx = ints(1)
        if idx is None or int(attr(node, "axis", 0)) != 0:
            return None
        n = len(data)
        if any(not -n <= i < n for i in idx):
            return None
        return [data[i] for i in idx]
    # Slice (opset >= 10: bounds as inputs)
    starts, ends = ints(1), ints(2)
    axes, steps = ints(3), ints(4)
    if starts is None or ends is None or len(starts) != 1 or (axes not in (None, [0], [-1])) \
            or (len(node.input) > 3 and node.input[3] and axes is None) \
            or (len(node.input) > 4 and node.input[4] and steps is None):
        return None
    step = 1 if steps is None else steps[0]
    if step == 0:
        return None
    return data[slice(starts[0], ends[0], step)]


#: The longest vector read as a shape vector (a tensor's rank is far below it).
_VECTOR_LIMIT = 64
#: Ops that pass a one-element value on unchanged (a size made a 1-vector, cast, renamed).
ONE_VALUE_OPS = ("Unsqueeze", "Squeeze", "Reshape", "Cast", "Identity", "Flatten")


def size_function(name: str, x: str, shape_of: Callable, const_of: Callable, producer: Callable,
                  depth: int = 0):
    """A one-element value computed from a size of ``x`` as ``(f, axis)``: ``f(size)`` its
    value for a size of ``x``'s ``axis`` (axis None when it reads no size), through ``Shape(x)
    -> Gather`` and integer ``Add``/``Sub``/``Mul``/``Div`` with constants (a Slice bound of
    torch's ``chunk``); None for anything else."""
    value = const_of(name)
    if value is not None:
        if value.size != 1 or value.dtype.kind not in "iu":
            return None
        c = int(value.ravel()[0])
        return (lambda d, c=c: c), None
    node = producer(name)
    if node is None or depth > 12 or node.domain not in ("", "ai.onnx"):
        return None
    op = node.op_type
    if op == "Gather" and node.input[0]:
        shape = producer(node.input[0])
        idx = const_of(node.input[1])
        r = len(shape_of(x) or ())
        if shape is None or shape.op_type != "Shape" or shape.input[0] != x or idx is None \
                or idx.size != 1 or not r:
            return None
        start = int(attr(shape, "start", 0))
        return (lambda d: d), (start + r if start < 0 else start) + int(idx.ravel()[0])
    if op in ("Add", "Sub", "Mul", "Div"):
        a, c = (size_function(i, x, shape_of, const_of, producer, depth + 1)
                for i in node.input[:2])
        if a is None or c is None or (a[1] is not None and c[1] is not None and a[1] != c[1]):
            return None
        fa, fc = a[0], c[0]
        fn = {"Add": lambda d: fa(d) + fc(d), "Sub": lambda d: fa(d) - fc(d),
              "Mul": lambda d: fa(d) * fc(d),
              "Div": lambda d: int(fa(d) / fc(d)) if fc(d) else None}[op]
        return fn, (a[1] if a[1] is not None else c[1])
    if op in ONE_VALUE_OPS or op == "Concat" and len(node.input) == 1:
        return size_function(node.input[0], x, shape_of, const_of, producer, depth + 1)
    return None



def product_entry(op: str, a: Entry, b: Entry, origin: str) -> Optional[Entry]:
    """``a * b`` or ``a / b`` of two entries: an int when both are constants, else a
    :class:`DimProduct` (a ``Div`` only by a constant that divides the factor exactly); a
    product that is one size times 1 is that :class:`DimRef`."""
    def parts(e):
        if isinstance(e, DimProduct):
            return e.refs, e.factor
        return ((e,), 1) if isinstance(e, DimRef) else ((), e)

    (ra, fa), (rb, fb) = parts(a), parts(b)
    if op == "Div":
        if rb or fb == 0 or fa % fb:
            return None
        refs, factor = ra, fa // fb
    else:
        refs, factor = ra + rb, fa * fb
    if not refs or factor == 0:
        return factor
    if factor == 1 and len(refs) == 1:
        return refs[0]
    return DimProduct(tuple(refs), int(factor), origin)


def entry_size(entry: Entry, shape_of: Callable):
    """An entry's value: the constant, or the referenced axis's size (int, symbol or None), or
    a product's (an int when every size is known, else its symbol: ``"batch*6"``)."""
    if isinstance(entry, DimRef):
        s = shape_of(entry.tensor)
        return None if s is None or entry.axis >= len(s) else s[entry.axis]
    if isinstance(entry, DimProduct):
        sizes = [entry_size(r, shape_of) for r in entry.refs]
        if any(d is None or not _known(d) for d in sizes):
            return None
        return product_symbol(sizes + [entry.factor])
    return entry


def dim_factors(d) -> Tuple[List[str], int]:
    """A dim as (its symbols, its constant factor): ``"batch*6"`` -> (["batch"], 6), ``12`` ->
    ([], 12), ``"seq"`` -> (["seq"], 1). The one spelling of a product of sizes in a shape."""
    if isinstance(d, int):
        return [], d
    syms, n = [], 1
    for part in d.split("*"):
        if part.lstrip("-").isdigit():
            n *= int(part)
        else:
            syms.append(part)
    return syms, n


def product_symbol(dims: Sequence) -> Union[int, str]:
    """The product of dims (ints and symbols) in the spelling :func:`dim_factors` reads: the
    symbols in order, then the constant factor when it is not 1 (``"batch*6"``,
    ``"seq*batch"``); an int when no symbol is left."""
    syms: List[str] = []
    n = 1
    for d in dims:
        s, k = dim_factors(d)
        syms += s
        n *= k
    if not syms or n == 0:
        return n
    return "*".join(syms + ([str(n)] if n != 1 else []))


def _known(d) -> bool:
    return isinstance(d, int) or (isinstance(d, str) and not d.startswith("unk__"))


def reshape_output(in_shape, target: Sequence, allowzero: bool) -> Optional[tuple]:
    """Reshape's output shape from its (possibly symbolic) input shape and target values (ints
    or symbols), with ONNX's 0 and -1 rules; a -1 is solved when the symbols cancel."""
    out = []
    for j, v in enumerate(target):
        if v == 0 and not allowzero and isinstance(v, int):
            if j >= len(in_shape):
                return None
            v = in_shape[j]
        if v is None or not _known(v):
            return None
        out.append(v)
    if out.count(-1) > 1:
        return None
    if -1 in out:
        if not all(_known(d) for d in in_shape):
            return None
        # symbols and constant factors of both sides ("batch*6" is batch and 6)
        fin = [dim_factors(d) for d in in_shape]
        fout = [dim_factors(d) for d in out if d != -1]
        num = Counter(s for syms, _ in fin for s in syms)
        den = Counter(s for syms, _ in fout for s in syms)
        left = num - den
        if den - num or sum(left.values()) > 1:
            return None
        n = int(np.prod([k for _, k in fin], dtype=np.int64))
        m = int(np.prod([k for _, k in fout], dtype=np.int64))
        if m <= 0 or n % m:
            return None
        # one symbol left over: the -1 is that symbol times the rest ("batch*12")
        out[out.index(-1)] = product_symbol(list(left) + [n // m])
    return tuple(out)


def refine_shapes(graph: onnx.GraphProto) -> bool:
    """Fill in the output shapes ONNX's inference leaves unknown for Slice and Reshape whose
    bounds or target are computed by a shape subgraph (Shape -> Gather -> Unsqueeze ->
    Concat, as torch exports write ``x.view(b, s, -1, 32)``): evaluated statically where the
    shapes allow, a symbolic dim (batch, sequence) flowing through as its symbol. Works on an
    inferred main graph (``value_info`` entries are replaced); True when any shape improved."""
    from onnx import numpy_helper

    infos = {vi.name: vi for vi in list(graph.input) + list(graph.value_info) +
             list(graph.output) if vi.type.HasField("tensor_type")}
    shapes: Dict[str, tuple] = {}
    for name, vi in infos.items():
        tt = vi.type.tensor_type
        if tt.HasField("shape"):
            shapes[name] = tuple(d.dim_value if d.HasField("dim_value") else
                                 (d.dim_param or None) for d in tt.shape.dim)
    consts: Dict[str, np.ndarray] = {}
    integral = (onnx.TensorProto.INT64, onnx.TensorProto.INT32, onnx.TensorProto.BOOL)
    for t in graph.initializer:
        shapes[t.name] = tuple(int(d) for d in t.dims)
        if t.data_type in integral and len(t.dims) <= 1 and (
                t.raw_data or t.int64_data or t.int32_data or not int(np.prod(t.dims))):
            # bools as 0/1: the masks of the Where that carries a resized head count
            consts[t.name] = numpy_helper.to_array(t).astype(np.int64)
    producers = {}
    for node in graph.node:
        for o in node.output:
            producers[o] = node
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR and \
                        a.t.data_type in integral:
                    consts[node.output[0]] = numpy_helper.to_array(a.t).astype(np.int64)
                elif a.name in ("value_int", "value_ints"):
                    consts[node.output[0]] = np.asarray(onnx.helper.get_attribute_value(a))

    def vector(name: str, depth: int = 0):
        entries = shape_vector(name, shapes.get, consts.get, producers.get)
        if entries is not None:
            return [entry_size(e, shapes.get) for e in entries]
        # Vector arithmetic exporters write around shapes: -x.size(1) (T5's position_bias[:, :,
        # -seq:, :]) and torch's expand(b, 1, -1, -1) target (Where(Equal(v, -1), 1s, v)).
        node = producers.get(name)
        if node is None or depth > 12 or node.domain not in ("", "ai.onnx") or not node.input:
            return None
        op = node.op_type
        args = [vector(i, depth + 1) if i else None for i in node.input]
        if op in ("Cast", "Identity", "Squeeze", "Unsqueeze"):
            return args[0]
        if op == "Reshape":  # a vector reshaped to a vector
            target = consts.get(node.input[1])
            return args[0] if target is not None and np.asarray(target).size == 1 else None
        if op == "Concat":
            return None if any(a is None for a in args) else [e for a in args for e in a]
        if op == "Neg":
            return None if args[0] is None else [_negate(e) for e in args[0]]
        if op == "ConstantOfShape":
            value = next((onnx.numpy_helper.to_array(a.t) for a in node.attribute
                          if a.name == "value"), np.zeros(1, np.int64))
            n = args[0]
            if n is None or len(n) != 1 or not isinstance(n[0], int) or \
                    not 0 <= n[0] <= _VECTOR_LIMIT or np.asarray(value).dtype.kind not in "iu":
                return None  # a shape vector is short: ConstantOfShape([10**9]) is no vector
            return [int(np.asarray(value).ravel()[0])] * n[0]
        if op in ("Mul", "Add", "Sub", "Div", "Equal") and len(args) == 2:
            return _elementwise(op, args[0], args[1])
        if op == "Where" and len(args) == 3 and all(a is not None for a in args):
            c, a, b = _broadcast(*args)
            if c is None or any(x is None or not isinstance(x, int) for x in c):
                return None
            return [x if k else y for k, x, y in zip(c, a, b)]
        return None

    changed = False
    for node in graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in ("Reshape", "Slice",
                                                                      "Range", "Expand") or \
                len(node.input) < 2:
            continue
        y = node.output[0]
        old = shapes.get(y)
        if old is not None and all(_known(d) for d in old):
            continue
        s = shapes.get(node.input[0])
        new = None
        if node.op_type == "Range":
            new = _range_output(node, vector)
        elif s is None:
            continue
        elif node.op_type == "Expand":
            new = _expand_output(s, vector(node.input[1]))
        elif node.op_type == "Reshape":
            target = vector(node.input[1])
            if target is not None:
                new = reshape_output(s, target, bool(attr(node, "allowzero", 0)))
        else:
            new = _slice_output(node, s, vector)
        if new is None or (old is not None and len(old) != len(new)):
            continue
        if old is not None:  # never replace a known dim, only fill unknown ones
            new = tuple(o if _known(o) else n for o, n in zip(old, new))
            if new == old:
                continue
        shapes[y] = new
        vi = infos.get(y)
        if vi is None:
            vi = graph.value_info.add()
            vi.name = y
            elem = infos[node.input[0]].type.tensor_type.elem_type \
                if node.input[0] in infos else 0
            vi.type.tensor_type.elem_type = elem
            infos[y] = vi
        dims = vi.type.tensor_type.shape
        dims.Clear()
        dims.SetInParent()
        for d in new:
            if isinstance(d, int):
                dims.dim.add().dim_value = d
            else:
                dims.dim.add().dim_param = d
        changed = True
    if changed:  # unknowns inferred from the old shapes: let the next inference redo them
        keep = [vi for vi in graph.value_info if not any(
            d.dim_param.startswith("unk__") for d in vi.type.tensor_type.shape.dim)]
        if len(keep) != len(graph.value_info):
            del graph.value_info[:]
            graph.value_info.extend(keep)
    return changed


def _broadcast(*vectors):
    """Vectors of one length, a one-entry vector repeated; Nones when lengths disagree."""
    n = max(len(v) for v in vectors)
    if any(len(v) not in (1, n) for v in vectors):
        return (None,) * len(vectors)
    return tuple(list(v) * n if len(v) == 1 else list(v) for v in vectors)


def _elementwise(op: str, a, b):
    """``a op b`` entry by entry for int/symbol vectors; an entry it cannot tell is None (a
    symbol is a size, so it never equals a negative number)."""
    if a is None or b is None:
        return None
    a, b = _broadcast(a, b)
    if a is None:
        return None
    out = []
    for x, y in zip(a, b):
        if isinstance(x, int) and isinstance(y, int):
            if op == "Div":  # integer Div truncates toward zero
                out.append(None if y == 0 else int(x / y) if x % y else x // y)
                continue
            out.append(x * y if op == "Mul" else x + y if op == "Add" else x - y if op == "Sub"
                       else int(x == y))
        elif op == "Equal" and x is not None and y is not None and _known(x) and _known(y):
            if x == y:
                out.append(1)
            elif isinstance(x, int) and x < 0 or isinstance(y, int) and y < 0:
                out.append(0)
            else:
                out.append(None)
        elif op == "Mul" and (x == 1 or y == 1):
            out.append(y if x == 1 else x)
        elif op == "Mul" and _known(x) and _known(y) and (isinstance(x, int) and x > 0 or
                                                          isinstance(y, int) and y > 0):
            out.append(product_symbol([x, y]))  # a resize's kept-units scaling: "batch*6" * 3
        elif op == "Div" and isinstance(y, int) and y > 0 and _known(x) and \
                dim_factors(x)[1] % y == 0:
            out.append(product_symbol(dim_factors(x)[0] + [dim_factors(x)[1] // y]))
        elif op == "Add" and (x == 0 or y == 0):
            out.append(y if x == 0 else x)
        else:
            out.append(None)
    return out


def _expand_output(s, target) -> Optional[tuple]:
    """Expand's output shape: numpy broadcasting of the input shape and the target vector."""
    if target is None:
        return None
    n = max(len(s), len(target))
    s = [1] * (n - len(s)) + list(s)
    target = [1] * (n - len(target)) + list(target)
    out = []
    for d, t in zip(s, target):
        if t == 1:
            out.append(d)
        elif d == 1 or d == t:
            out.append(t)
        else:
            return None
        if out[-1] is None or not _known(out[-1]):
            return None
    return tuple(out)


def _negate(d):
    """``-d`` for a vector entry: an int, a symbol (``"-sequence"``) or None."""
    if isinstance(d, int):
        return -d
    if isinstance(d, str) and _known(d):
        return d[1:] if d.startswith("-") else "-" + d
    return None


def _range_output(node, vector) -> Optional[tuple]:
    args = [vector(i) for i in node.input[:3]]
    if len(args) != 3 or any(a is None or len(a) != 1 for a in args):
        return None
    start, limit, delta = (a[0] for a in args)
    if start == 0 and delta == 1 and isinstance(limit, str) and _known(limit):
        return (limit,)
    if all(isinstance(v, int) for v in (start, limit, delta)) and delta != 0:
        return (max(0, -(-(limit - start) // delta)),)
    return None


_INT32_MAX = 2 ** 31 - 1  # an end at least this large means "to the end" (torch writes int64 max)


def _slice_output(node, s, vector) -> Optional[tuple]:
    starts, ends = vector(node.input[1]), vector(node.input[2]) if len(node.input) > 2 else None
    axes = vector(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    steps = vector(node.input[4]) if len(node.input) > 4 and node.input[4] else None
    if starts is None or ends is None or (len(node.input) > 3 and node.input[3] and axes is None) \
            or (len(node.input) > 4 and node.input[4] and steps is None):
        return None
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    if not all(isinstance(v, int) for v in list(axes) + list(steps)):
        return None
    out = list(s)
    for a, b, e, st in zip(axes, starts, ends, steps):
        a = a + len(s) if a < 0 else a
        if not 0 <= a < len(s) or st == 0:
            return None
        n = s[a]
        if b == 0 and e == n and st == 1:
            continue  # the whole axis, symbolic or not
        if b == 0 and st == 1 and isinstance(e, str) and _known(e):
            out[a] = e  # x[:, :sequence]: the symbol (a larger one would fail at run time)
            continue
        if st == 1 and isinstance(n, str) and b == _negate(n) and \
                (e == n or isinstance(e, int) and e >= _INT32_MAX):
            continue  # x[-x.size(a):]: the whole axis
        if not (isinstance(n, int) and isinstance(b, int) and isinstance(e, int)):
            return None
        out[a] = len(range(n)[slice(b, e, st)])
    return tuple(out)


def complete_shapes(graph: onnx.GraphProto) -> bool:
    """The registry's type completion, then :func:`refine_shapes`: what the channel graph
    passes to the shape inference as ``complete``."""
    typed = complete_types(graph)
    return refine_shapes(graph) or typed

"""The op registry: one :class:`OpEntry` per op type, saying everything onnxprune knows about it.

An entry's fields are filled by the op's family file (:mod:`onnxprune.ops.conv`,
:mod:`~onnxprune.ops.linear`, :mod:`~onnxprune.ops.norm`, ...) with :func:`define`. Nothing
outside ``onnxprune/ops`` branches on an op type: the rest of the package asks :func:`entry`
(a node) or :func:`entry_of` (an op type) and reads the field it needs.

=================  ===================================================================  ==========
field              what it answers                                                      used by
=================  ===================================================================  ==========
``layout``         ``(node, input index, shape) -> Layout | None``: the weight's         masking,
                   ``W[out, in]`` view (:class:`onnxprune.ops.layouts.Layout`)           channels
``activation``     ``(node, weight index, weight shape) -> Activation | None``: which    calibration,
                   operand is the activation and how its columns are extracted          dead chans
``bias``           ``(node, weight index) -> BiasSlot | None``: where the bias of the    weights,
                   weight's output rows sits and how alpha/beta scale it                dead chans
``fold``           ``(node, weight index, weight shape | None) -> str | None``: why      dead chans
                   folding a constant input channel into the bias is not exact (None:
                   proven exact for every input; see :func:`fold_refusal`)
``channels``       ``(NodeCtx) -> None``: the channel-tie rule                          channels
``const``          ``(node, per-unit input constants, read) -> [outputs] | None``:      dead chans
                   constant propagation through the op
``zero_filter``    ``(node, bias constant, input constant) -> per-unit constant``: what  dead chans
                   the output of an all-zero filter row carries
``masked_zero``    ``(node, operand values) -> bool``: a unit the mask removes (weight   channels
                   rows and every member zeroed) outputs exactly 0, where the           .zeros
                   zero_filter cannot say (a recurrent unit's state starts at 0 and
                   stays there)
``macs``           ``(node, shapes) -> int | None``: the MAC formula                   report.macs
``weight_step``    ``(node, seen shape, read) -> step | None``: a stored weight passes   weights
                   through the op on its way to its consumer: ``()`` unchanged (Cast,
                   Q/DQ), ``("transpose", perm)``, ``("reshape", shape)``
``axis_source``    ``(node, output axis, shape_of) -> input-0 axis | None``: where a     channels
                   stored tensor's axis comes from when the op only moves it
``output_like``    ``(node) -> (input index per output)``: outputs have those inputs'   shape
                   type and shape (for ops ONNX's shape inference leaves untyped)       inference
``output_shape``   ``(node, shape_of) -> [(input index, dims | None) per output]``: an    shape
                   output has that input's element type and ``dims`` (``None``: unknown  inference
                   shape), for ops ONNX's inference does not know (custom domains)
``copies_values``  ``True``: output 0 holds input 0's values (dtype may change), so a     channels
                   constant read through it is the stored tensor's
``shape_only``     ``True``: the output depends on input 0's shape, never its values     channels
                   (a value computed through it is not a stored constant)
``class_axis``     ``(node, rank, opset) -> axis | None``: the axis along which the     validation
                   op's output holds class scores (Softmax's axis, a linear head's
                   output features), so agreement of argmax is the fitting measure
=================  ===================================================================  ==========

Adding an op = one :func:`define` call in its family file + one test.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Callable, Dict, Iterator, Mapping, Optional, Sequence, Tuple

import onnx

Shapes = Mapping[str, Tuple[int, ...]]


@dataclass(frozen=True)
class ConvGeometry:
    """The im2col parameters of a Conv/ConvTranspose (attribute defaults filled in)."""

    kernel: Tuple[int, ...]
    group: int
    strides: Tuple[int, ...]
    dilations: Tuple[int, ...]
    pads: Tuple[int, ...]
    auto_pad: str
    output_padding: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    transpose: bool  # ConvTranspose: the weight is [Cin, Cout/g, k...]


@dataclass(frozen=True)
class Activation:
    """Which input of a weight's consumer carries the activation, and how ``X[rows, in]`` is
    read from it: a matrix operand (``rows_last``: ``X`` is its last-two-axes transpose) or, with
    ``conv`` set, im2col patches."""

    index: int
    rows_last: bool = False
    conv: Optional[ConvGeometry] = None
    #: the operand holds integers that quantize a float tensor (a DynamicQuantizeLinear /
    #: QuantizeLinear output): statistics read that float tensor, before the quantizer
    quantized: bool = False
    #: with ``quantized``: the node's input holding the operand's zero point; where no
    #: quantizer is in the graph (one integer op reads another's output) and it is a stored
    #: constant, the rows are ``operand - zero point`` (the float tensor up to its scale)
    zero_point: Optional[int] = None


@dataclass(frozen=True)
class BiasSlot:
    """Where a weight's per-output-row bias sits: ``y = alpha * (W x) + beta * b``.

    ``index`` is the input holding ``b`` (created there when absent; ``operand`` is its ONNX
    name, used to name a new one, and ``beta_attr`` the attribute reset to 1 when one is
    created), or None when the op has no bias input and ``b`` is the ``[out]`` constant of a
    single ``Add`` after it. ``mean_shift``: calibration's bias correction may move it.
    """

    index: Optional[int]
    alpha: float = 1.0
    beta: float = 1.0
    operand: str = "B"
    beta_attr: Optional[str] = None
    mean_shift: bool = True

    @property
    def scale(self) -> float:
        """A change ``d`` of ``W x`` is undone by adding ``scale * d`` to ``b``."""
        return self.alpha / self.beta


@dataclass
class OpEntry:
    """Everything onnxprune knows about one op type (see the module table)."""

    op_type: str
    layout: Optional[Callable] = None
    activation: Optional[Callable] = None
    bias: Optional[Callable] = None
    fold: Optional[Callable] = None
    channels: Optional[Callable] = None
    const: Optional[Callable] = None
    zero_filter: Optional[Callable] = None
    masked_zero: Optional[Callable] = None
    macs: Optional[Callable] = None
    output_like: Optional[Callable] = None
    output_shape: Optional[Callable] = None
    weight_step: Optional[Callable] = None
    axis_source: Optional[Callable] = None
    copies_values: Optional[bool] = None
    shape_only: Optional[bool] = None
    class_axis: Optional[Callable] = None


_FIELDS = tuple(f.name for f in fields(OpEntry) if f.name != "op_type")
_ENTRIES: Dict[str, OpEntry] = {}


def define(*op_types: str, **fns: Any) -> None:
    """Set fields of the entries of ``op_types``, creating them: ``"Conv"`` is the default ONNX
    domain's op, ``"com.microsoft:Attention"`` another domain's (``domain:OpType``).

    A field set twice is a programming error (two files claiming one op's meaning).
    """
    for name in fns:
        if name not in _FIELDS:
            raise TypeError(f"unknown op entry field '{name}' (fields: {', '.join(_FIELDS)})")
    for op in op_types:
        e = _ENTRIES.setdefault(op, OpEntry(op))
        for name, fn in fns.items():
            if getattr(e, name) is not None:
                raise ValueError(f"{op}.{name} is defined twice")
            setattr(e, name, fn)


def entry_of(op_type: str) -> Optional[OpEntry]:
    """The entry of a default-domain op type, or None."""
    return _ENTRIES.get(op_type)


def op_key(node: onnx.NodeProto) -> str:
    """The op type an entry is defined under: ``OpType``, or ``domain:OpType`` for a custom
    domain (``"com.microsoft:MatMulNBits"``); what ``--op-types`` names."""
    return node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"


def entry(node: onnx.NodeProto) -> Optional[OpEntry]:
    """The entry of ``node``'s op (see :func:`op_key`), or None (unknown op)."""
    return _ENTRIES.get(op_key(node))


def field_of(node: onnx.NodeProto, name: str) -> Optional[Callable]:
    """``entry(node).<name>``, or None."""
    e = entry(node)
    return None if e is None else getattr(e, name)


def macs_of(node: onnx.NodeProto, shapes: Shapes) -> Optional[int]:
    """``node``'s MACs by its entry's formula on ``shapes``: None when its op has no formula or
    the formula cannot tell (a shape it needs is unknown)."""
    formula = field_of(node, "macs")
    return None if formula is None else formula(node, shapes)


def counted_nodes(graph: onnx.GraphProto, shapes: Shapes
                  ) -> Iterator[Tuple[onnx.NodeProto, int]]:
    """(node, MACs) for each node of ``graph`` (not its subgraphs) whose formula gives a
    positive count."""
    for node in graph.node:
        macs = macs_of(node, shapes)
        if macs:
            yield node, int(macs)


def op_types_with(name: str) -> Tuple[str, ...]:
    """Sorted op types whose entry sets field ``name``, as :func:`op_key` spells them
    (``domain:OpType`` for another domain's op: what ``--op-types`` names)."""
    if name not in _FIELDS:
        raise TypeError(f"unknown op entry field '{name}'")
    return tuple(sorted(op for op, e in _ENTRIES.items() if getattr(e, name) is not None))


def entries_with(name: str) -> Tuple[OpEntry, ...]:
    """The entries (every domain; ``op_type`` is the registry key, ``domain:OpType`` outside the
    default domain) whose field ``name`` is set."""
    if name not in _FIELDS:
        raise TypeError(f"unknown op entry field '{name}'")
    return tuple(e for _, e in sorted(_ENTRIES.items()) if getattr(e, name) is not None)


# -- small helpers the family files share ------------------------------------------------------
def operand(node: onnx.NodeProto, index: int, output: bool = False) -> Optional[str]:
    """The name of input (or output) ``index``, None when absent or empty."""
    names = node.output if output else node.input
    return names[index] if index < len(names) and names[index] else None


def shape_in(shapes: Shapes, node: onnx.NodeProto, index: int, output: bool = False
             ) -> Optional[Tuple[int, ...]]:
    """The fully known shape of input (or output) ``index`` from ``shapes``, or None."""
    name = operand(node, index, output)
    return None if name is None else shapes.get(name)


def numel(shape: Sequence[Any]) -> int:
    n = 1
    for d in shape:
        n *= int(d)  # Python ints: no overflow on large models
    return n


# -- questions the rest of the package asks ---------------------------------------------------
def activation_of(node: onnx.NodeProto, weight_index: int,
                  weight_shape: Sequence[int]) -> Optional[Activation]:
    """Which operand of ``node`` feeds its weight at ``weight_index`` and how its columns are
    read, or None (no rule for that op/input)."""
    rule = field_of(node, "activation")
    return None if rule is None else rule(node, weight_index, tuple(int(d) for d in weight_shape))


def bias_slot(node: onnx.NodeProto, weight_index: int) -> Optional[BiasSlot]:
    """Where the bias of the rows of ``node``'s weight at ``weight_index`` sits, or None."""
    rule = field_of(node, "bias")
    return None if rule is None else rule(node, weight_index)


def copies_values(node: onnx.NodeProto) -> bool:
    """Whether ``node``'s output 0 holds its input 0's values (Cast, Identity)."""
    return bool(field_of(node, "copies_values"))


def shape_only(node: onnx.NodeProto) -> bool:
    """Whether ``node``'s output depends only on its input's shape (Shape, Size)."""
    return bool(field_of(node, "shape_only"))


def fold_refusal(node: onnx.NodeProto, weight_index: int,
                 weight_shape: Optional[Sequence[int]] = None) -> Optional[str]:
    """Why folding a constant input channel of the weight at ``weight_index`` (shape
    ``weight_shape``, None when unknown) into the bias (``sum(W[:, channel]) * constant``) is
    not exact, or None when the op's ``fold`` rule proves it is."""
    rule = field_of(node, "fold")
    if rule is None:
        return f"{node.op_type} has no exact-fold rule (no bias the constant can move into)"
    shape = None if weight_shape is None else tuple(int(d) for d in weight_shape)
    return rule(node, weight_index, shape)


def exact_fold(node: onnx.NodeProto, weight_index: int,
               weight_shape: Optional[Sequence[int]] = None) -> bool:
    """Whether a constant input channel of the weight at ``weight_index`` folds exactly into
    the bias (:func:`fold_refusal` has no reason against it)."""
    return fold_refusal(node, weight_index, weight_shape) is None


def weight_step(node: onnx.NodeProto, seen_shape: Tuple[int, ...],
                read: Callable[[int], Any]) -> Optional[tuple]:
    """How a stored weight seen as ``seen_shape`` at input 0 of ``node`` looks at its output:
    ``()`` unchanged, a ``("transpose", perm)`` / ``("reshape", shape)`` step, or None when the
    op does not carry it. ``read(i)`` is the stored value of input ``i``, or None."""
    rule = field_of(node, "weight_step")
    return None if rule is None else rule(node, seen_shape, read)


def same_axis(node, axis, shape_of) -> int:
    """``axis_source`` of an op that copies its input (the axis stays)."""
    return axis


def unchanged_step(node, seen_shape, read) -> tuple:
    """``weight_step`` of an op that hands its input on with the same values and layout."""
    return ()


def complete_types(graph: onnx.GraphProto) -> bool:
    """Declare the outputs ONNX's shape inference left untyped for ops whose entry says what they
    are (``output_like``, ``output_shape``), from their inputs' inferred types; True when any was
    added (run the inference again to carry them on). Works on an inferred model's main graph."""
    typed = {vi.name: vi for vi in list(graph.input) + list(graph.value_info) +
             list(graph.output) if vi.type.HasField("tensor_type")}
    for t in graph.initializer:  # what a computed type may read (a weight's dims)
        typed.setdefault(t.name, onnx.helper.make_tensor_value_info(t.name, t.data_type,
                                                                    list(t.dims)))
    added = False
    dims_of = {t.name: tuple(int(d) for d in t.dims) for t in graph.initializer}
    elem_of = {t.name: t.data_type for t in graph.initializer}
    elem_of.update({n: vi.type.tensor_type.elem_type for n, vi in typed.items()})

    def shape_of(name: str):
        """``name``'s dims (ints, symbolic names, None unknown), or None."""
        vi = typed.get(name)
        if vi is None or not vi.type.tensor_type.HasField("shape"):
            return dims_of.get(name)
        return tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                     for d in vi.type.tensor_type.shape.dim)

    for node in graph.node:
        shaped = field_of(node, "output_shape")
        if shaped is not None:
            for out, item in zip(node.output, shaped(node, shape_of)):
                name = None if item is None else operand(node, item[0])
                if not out or out in typed or name is None or not elem_of.get(name):
                    continue
                vi = graph.value_info.add()
                vi.name = out
                vi.type.tensor_type.elem_type = elem_of[name]
                if item[1] is not None:
                    vi.type.tensor_type.shape.SetInParent()
                    for d in item[1]:
                        dim = vi.type.tensor_type.shape.dim.add()
                        if isinstance(d, int):
                            dim.dim_value = d
                        elif d:
                            dim.dim_param = d
                typed[out] = vi
                elem_of[out] = elem_of[name]
                added = True
        rule = field_of(node, "output_like")
        if rule is None:
            continue
        for out, src in zip(node.output, rule(node)):
            if not out or out in typed:
                continue
            if callable(src):  # computes the type from the typed values (custom-domain ops)
                tp = src(typed)
            else:
                name = operand(node, src)
                tp = typed[name].type if name is not None and name in typed else None
            if tp is None:
                continue
            vi = graph.value_info.add()
            vi.name = out
            vi.type.CopyFrom(tp)
            typed[out] = vi
            added = True
    return added

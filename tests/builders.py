"""Small seeded models for tests, built with onnx.helper (no files, no torch)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def make_model(nodes, inputs, outputs, initializers=(), opset: int = OPSET, value_info=()):
    graph = helper.make_graph(list(nodes), "test", list(inputs), list(outputs),
                              list(initializers), value_info=list(value_info))
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def tensor(name: str, shape, seed: int = 0, dtype=np.float32) -> onnx.TensorProto:
    return numpy_helper.from_array(rng(seed).standard_normal(shape).astype(dtype), name)


def mlp_listing_weights() -> onnx.ModelProto:
    """y = relu(x @ W1) @ W2, x [N, 16], with W1 also listed as a graph input, the way old
    exporters list every weight (no checker run: the inputs and runtime tests use it as is)."""
    vi = helper.make_tensor_value_info
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "W2"], ["y"])]
    graph = helper.make_graph(nodes, "mlp", [vi("x", TensorProto.FLOAT, ["N", 16]),
                                             vi("W1", TensorProto.FLOAT, [16, 8])],
                              [vi("y", TensorProto.FLOAT, ["N", 4])],
                              [tensor("W1", (16, 8)), tensor("W2", (8, 4), 1)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def relu_mlp3(seed: int = 12) -> onnx.ModelProto:
    """x[n, 6] -> MatMul W1 (mm1) -> Relu (relu1, r1) -> MatMul W2 (mm2) -> Relu (relu2, r2) ->
    MatMul W3 (mm3) -> y: three 6x6 weights, a tensor between each piece."""
    r = rng(seed)
    nodes = [helper.make_node("MatMul", ["x", "W1"], ["h1"], name="mm1"),
             helper.make_node("Relu", ["h1"], ["r1"], name="relu1"),
             helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="mm2"),
             helper.make_node("Relu", ["h2"], ["r2"], name="relu2"),
             helper.make_node("MatMul", ["r2", "W3"], ["y"], name="mm3")]
    inits = [numpy_helper.from_array(r.standard_normal((6, 6)).astype(np.float32), f"W{i}")
             for i in (1, 2, 3)]
    vi = helper.make_tensor_value_info
    return make_model(nodes, [vi("x", TensorProto.FLOAT, ["n", 6])],
                      [vi("y", TensorProto.FLOAT, ["n", 6])], inits)


def conv_gemm_model(dtype=np.float32, seed: int = 0, group: int = 1) -> onnx.ModelProto:
    """x[1,8,10,10] -> Conv(16, 3x3, pad 1, group) -> Relu -> GAP -> Flatten -> Gemm(10, transB=1)."""
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [
        helper.make_node("Conv", ["x", "conv.w", "conv.b"], ["c"], pads=[1, 1, 1, 1],
                         group=group, name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("GlobalAveragePool", ["r"], ["g"], name="gap"),
        helper.make_node("Flatten", ["g"], ["f"], name="flatten"),
        helper.make_node("Gemm", ["f", "fc.w", "fc.b"], ["y"], transB=1, name="fc"),
    ]
    inits = [tensor("conv.w", (16, 8 // group, 3, 3), seed, dtype), tensor("conv.b", (16,), seed + 1, dtype),
             tensor("fc.w", (10, 16), seed + 2, dtype), tensor("fc.b", (10,), seed + 3, dtype)]
    return make_model(nodes, [helper.make_tensor_value_info("x", elem, [1, 8, 10, 10])],
                      [helper.make_tensor_value_info("y", elem, [1, 10])], inits)


def matmul_model(seed: int = 0, k: int = 24, n: int = 12, left: bool = False,
                 constant_node: bool = False) -> onnx.ModelProto:
    """x[2,k] @ W[k,n] (or W[n,k] @ x[k,2] when ``left``); W optionally in a Constant node."""
    w = rng(seed).standard_normal((n, k) if left else (k, n)).astype(np.float32)
    inputs_ = ["W", "x"] if left else ["x", "W"]
    x_shape, y_shape = ([k, 2], [n, 2]) if left else ([2, k], [2, n])
    nodes = [helper.make_node("MatMul", inputs_, ["y"], name="mm")]
    inits = []
    if constant_node:
        nodes.insert(0, helper.make_node("Constant", [], ["W"],
                                         value=numpy_helper.from_array(w, "W")))
    else:
        inits.append(numpy_helper.from_array(w, "W"))
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, x_shape)],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, y_shape)], inits)


def gemm_model(trans_b: int, seed: int = 0, k: int = 16, n: int = 12) -> onnx.ModelProto:
    w = rng(seed).standard_normal((n, k) if trans_b else (k, n)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "W"], ["y"], transB=trans_b, name="gemm")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, k])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [3, n])],
                      [numpy_helper.from_array(w, "W")])


def fp16_cast_model(seed: int = 0) -> onnx.ModelProto:
    """fp16 weight -> Cast(to float) -> MatMul, as fp16 exporters emit."""
    w = rng(seed).standard_normal((16, 8)).astype(np.float16)
    nodes = [helper.make_node("Cast", ["W16"], ["W"], to=TensorProto.FLOAT, name="cast"),
             helper.make_node("MatMul", ["x", "W"], ["y"], name="mm")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                      [numpy_helper.from_array(w, "W16")])


def shared_weight_model(seed: int = 0) -> onnx.ModelProto:
    """One initializer read by two MatMuls (tied weights)."""
    w = rng(seed).standard_normal((8, 8)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "W"], ["h"], name="mm1"),
             helper.make_node("MatMul", ["h", "W"], ["y"], name="mm2")]
    return make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])],
                      [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])],
                      [numpy_helper.from_array(w, "W")])


def if_subgraph_model(seed: int = 0) -> onnx.ModelProto:
    """An If whose branches hold their own MatMul weights (one initializer, one Constant) and
    read an outer-scope weight."""
    r = rng(seed)
    w_then = numpy_helper.from_array(r.standard_normal((8, 4)).astype(np.float32), "W_then")
    w_else = r.standard_normal((8, 4)).astype(np.float32)
    w_outer = numpy_helper.from_array(r.standard_normal((8, 4)).astype(np.float32), "W_outer")
    out = helper.make_tensor_value_info
    then_g = helper.make_graph([helper.make_node("MatMul", ["x", "W_then"], ["t"], name="mm_then")],
                               "then", [], [out("t", TensorProto.FLOAT, [2, 4])], [w_then])
    else_g = helper.make_graph(
        [helper.make_node("Constant", [], ["W_else"], value=numpy_helper.from_array(w_else, "W_else")),
         helper.make_node("MatMul", ["x", "W_else"], ["e0"], name="mm_else"),
         helper.make_node("MatMul", ["x", "W_outer"], ["e1"], name="mm_outer"),
         helper.make_node("Add", ["e0", "e1"], ["e"])],
        "else", [], [out("e", TensorProto.FLOAT, [2, 4])])
    nodes = [helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g,
                              name="if")]
    return make_model(nodes, [out("x", TensorProto.FLOAT, [2, 8]), out("cond", TensorProto.BOOL, [])],
                      [out("y", TensorProto.FLOAT, [2, 4])], [w_outer])


def run(model, feeds) -> list:
    import onnxruntime as ort

    sess = ort.InferenceSession(model.SerializeToString() if isinstance(model, onnx.ModelProto)
                                else str(model), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)

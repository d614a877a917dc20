"""Export the small fixture models in ``models/`` from PyTorch (tools only: the package never imports torch).

Each model is built from a fixed seed, exported with the legacy TorchScript exporter (``dynamo=False``,
opset 17, constant folding on), checked with ``onnx.checker`` (full check) and run once in onnxruntime.

    python tools/make_fixtures.py               # writes all fixtures into models/
    python tools/make_fixtures.py --out /tmp/x  # elsewhere

Fixtures (see models/README.md for what each one exercises):
    mobilenetv3_block.onnx       depthwise convs, SE, HardSwish/HardSigmoid, residual Add, BN kept unfused
    mobilenetv3_block_fp16.onnx  the same with fp16 initializers behind Cast-to-fp32 nodes
    yolo_block.onnx              YOLOv8-style C2f (Split/Concat), SPPF, Resize + Concat, DFL detect head
    transformer_mlp.onnx         2-layer encoder: Gather embedding, heads via Reshape+Transpose, MatMul weights

BatchNorm statistics are set from a few random batches (so activations stay well scaled), then the BN affine
parameters are randomized: a model whose BN is the identity would make channel pruning look trivially exact,
and the legacy exporter silently merges initializers with equal values into ``Identity`` nodes.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import math
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn as nn
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

OPSET = 17
REPO = Path(__file__).resolve().parents[1]

warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
warnings.filterwarnings("ignore", message=".*do_constant_folding.*")


# --------------------------------------------------------------------------------------------------
# MobileNetV3-style blocks
# --------------------------------------------------------------------------------------------------


class ConvBNAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1, groups: int = 1, act: type | None = nn.Hardswish):
        layers: list[nn.Module] = [nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
        if act is not None:
            layers.append(act())
        super().__init__(*layers)


class SqueezeExcite(nn.Module):
    """GAP -> 1x1 conv -> ReLU -> 1x1 conv -> HardSigmoid -> Mul (torchvision's MobileNetV3 layout)."""

    def __init__(self, c: int, squeeze: int):
        super().__init__()
        self.fc1 = nn.Conv2d(c, squeeze, 1)
        self.fc2 = nn.Conv2d(squeeze, c, 1)

    def forward(self, x):
        s = F.adaptive_avg_pool2d(x, 1)
        s = F.hardsigmoid(self.fc2(F.relu(self.fc1(s))))
        return x * s


class InvertedResidual(nn.Module):
    def __init__(self, cin: int, cexp: int, cout: int, k: int, s: int, se: bool, act: type):
        super().__init__()
        layers: list[nn.Module] = []
        if cexp != cin:
            layers.append(ConvBNAct(cin, cexp, 1, act=act))
        layers.append(ConvBNAct(cexp, cexp, k, s, groups=cexp, act=act))  # depthwise
        if se:
            layers.append(SqueezeExcite(cexp, max(8, cexp // 4)))
        layers.append(ConvBNAct(cexp, cout, 1, act=None))  # linear projection
        self.block = nn.Sequential(*layers)
        self.residual = s == 1 and cin == cout

    def forward(self, x):
        y = self.block(x)
        return x + y if self.residual else y


class MobileNetV3Block(nn.Module):
    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.stem = ConvBNAct(3, 16, 3, 2)  # 64 -> 32
        self.blocks = nn.Sequential(
            InvertedResidual(16, 16, 16, 3, 2, True, nn.ReLU),  # SE, no expansion, stride 2 -> 16
            InvertedResidual(16, 72, 24, 3, 2, False, nn.ReLU),  # -> 8
            InvertedResidual(24, 88, 24, 3, 1, False, nn.ReLU),  # residual Add
            InvertedResidual(24, 96, 40, 5, 2, True, nn.Hardswish),  # -> 4, SE, 5x5 depthwise
            InvertedResidual(40, 120, 40, 5, 1, True, nn.Hardswish),  # residual Add + SE
        )
        self.last = ConvBNAct(40, 96, 1)
        self.head = nn.Sequential(nn.Linear(96, 128), nn.Hardswish(), nn.Linear(128, num_classes))

    def forward(self, x):
        x = self.last(self.blocks(self.stem(x)))
        x = torch.flatten(F.adaptive_avg_pool2d(x, 1), 1)
        return self.head(x)


# --------------------------------------------------------------------------------------------------
# YOLOv8-style blocks (same structure as ultralytics' Conv, Bottleneck, C2f, SPPF, DFL, Detect)
# --------------------------------------------------------------------------------------------------


class Conv(nn.Module):
    """Conv + BN + SiLU. nn.SiLU exports as Sigmoid + Mul (a node whose input has two consumers)."""

    def __init__(self, cin: int, cout: int, k: int = 1, s: int = 1):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, k, s, k // 2, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.SiLU()

    def forward(self, x):
        return self.act(self.bn(self.conv(x)))


class Bottleneck(nn.Module):
    def __init__(self, c: int, shortcut: bool):
        super().__init__()
        self.cv1 = Conv(c, c, 3)
        self.cv2 = Conv(c, c, 3)
        self.add = shortcut

    def forward(self, x):
        y = self.cv2(self.cv1(x))
        return x + y if self.add else y


class C2f(nn.Module):
    def __init__(self, cin: int, cout: int, n: int = 1, shortcut: bool = False):
        super().__init__()
        self.c = cout // 2
        self.cv1 = Conv(cin, 2 * self.c, 1)
        self.cv2 = Conv((2 + n) * self.c, cout, 1)
        self.m = nn.ModuleList(Bottleneck(self.c, shortcut) for _ in range(n))

    def forward(self, x):
        # Explicit sizes give an ONNX Split with a constant `split` input; .chunk(2, 1) would export as
        # Shape/Gather/Div/Slice arithmetic instead.
        y = list(self.cv1(x).split([self.c, self.c], 1))
        y.extend(m(y[-1]) for m in self.m)
        return self.cv2(torch.cat(y, 1))


class SPPF(nn.Module):
    def __init__(self, cin: int, cout: int, k: int = 5):
        super().__init__()
        c_ = cin // 2
        self.cv1 = Conv(cin, c_, 1)
        self.cv2 = Conv(c_ * 4, cout, 1)
        self.m = nn.MaxPool2d(k, 1, k // 2)

    def forward(self, x):
        y = [self.cv1(x)]
        y.extend(self.m(y[-1]) for _ in range(3))
        return self.cv2(torch.cat(y, 1))


class DFL(nn.Module):
    """Distribution focal loss decoding: softmax over reg_max bins, then a fixed 1x1 conv with weights 0..15.

    That conv weight is a decoding ramp, not a learned weight: pruning it breaks the boxes at any sparsity.
    """

    def __init__(self, c1: int = 16):
        super().__init__()
        self.conv = nn.Conv2d(c1, 1, 1, bias=False).requires_grad_(False)
        self.conv.weight.data[:] = torch.arange(c1, dtype=torch.float).view(1, c1, 1, 1)
        self.c1 = c1

    def forward(self, x):
        a = x.shape[2]  # static model: batch 1, so every Reshape gets a constant shape
        return self.conv(x.view(1, 4, self.c1, a).transpose(2, 1).softmax(1)).view(1, 4, a)


class DetectHead(nn.Module):
    def __init__(self, nc: int, channels: tuple[int, ...], strides: tuple[int, ...], sizes: tuple[int, ...]):
        super().__init__()
        self.nc, self.reg_max = nc, 16
        self.no = nc + 4 * self.reg_max
        c2 = max(16, channels[0] // 4, self.reg_max * 4)
        c3 = max(channels[0], min(nc, 100))
        self.cv2 = nn.ModuleList(
            nn.Sequential(Conv(c, c2, 3), Conv(c2, c2, 3), nn.Conv2d(c2, 4 * self.reg_max, 1)) for c in channels
        )
        self.cv3 = nn.ModuleList(nn.Sequential(Conv(c, c3, 3), Conv(c3, c3, 3), nn.Conv2d(c3, nc, 1)) for c in channels)
        self.dfl = DFL(self.reg_max)
        anchors, stride_t = [], []
        for s, hw in zip(strides, sizes):
            sy, sx = torch.meshgrid(torch.arange(hw) + 0.5, torch.arange(hw) + 0.5, indexing="ij")
            anchors.append(torch.stack((sx, sy), -1).view(-1, 2))
            stride_t.append(torch.full((hw * hw, 1), float(s)))
        self.register_buffer("anchors", torch.cat(anchors).transpose(0, 1).unsqueeze(0))  # [1, 2, A]
        self.register_buffer("strides", torch.cat(stride_t).transpose(0, 1))  # [1, A]

    def forward(self, feats):
        xs = [torch.cat((self.cv2[i](f), self.cv3[i](f)), 1) for i, f in enumerate(feats)]
        x = torch.cat([xi.view(1, self.no, -1) for xi in xs], 2)
        box, cls = x.split((self.reg_max * 4, self.nc), 1)
        lt, rb = self.dfl(box).split((2, 2), 1)
        x1y1, x2y2 = self.anchors - lt, self.anchors + rb
        dbox = torch.cat(((x1y1 + x2y2) / 2, x2y2 - x1y1), 1) * self.strides
        return torch.cat((dbox, cls.sigmoid()), 1)


class YoloBlock(nn.Module):
    def __init__(self, nc: int = 10):
        super().__init__()
        self.stem = Conv(3, 16, 3, 2)  # 64 -> 32
        self.down1 = Conv(16, 32, 3, 2)  # -> 16
        self.c2f1 = C2f(32, 32, 1, shortcut=True)  # P3, 16x16
        self.down2 = Conv(32, 64, 3, 2)  # -> 8
        self.c2f2 = C2f(64, 64, 1, shortcut=True)
        self.sppf = SPPF(64, 64)  # P4, 8x8
        self.up = nn.Upsample(scale_factor=2, mode="nearest")  # -> Resize
        self.c2f3 = C2f(64 + 32, 32, 1, shortcut=False)  # neck on P3
        self.detect = DetectHead(nc, (32, 64), strides=(4, 8), sizes=(16, 8))

    def forward(self, x):
        p3 = self.c2f1(self.down1(self.stem(x)))
        p4 = self.sppf(self.c2f2(self.down2(p3)))
        n3 = self.c2f3(torch.cat((self.up(p4), p3), 1))
        return self.detect([n3, p4])


# --------------------------------------------------------------------------------------------------
# Transformer encoder, written out so that heads are a Reshape + Transpose and weights are MatMul operands
# --------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    def __init__(self, d: int, heads: int, seq: int):
        super().__init__()
        self.h, self.dh, self.t = heads, d // heads, seq
        self.q, self.k, self.v, self.o = (nn.Linear(d, d) for _ in range(4))

    def _heads(self, x):  # [1, T, D] -> [1, H, T, Dh]
        return x.reshape(1, self.t, self.h, self.dh).transpose(1, 2)

    def forward(self, x):
        q, k, v = self._heads(self.q(x)), self._heads(self.k(x)), self._heads(self.v(x))
        att = torch.softmax(q @ k.transpose(-2, -1) / math.sqrt(self.dh), dim=-1)
        y = (att @ v).transpose(1, 2).reshape(1, self.t, self.h * self.dh)
        return self.o(y)


class EncoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, mlp: int, seq: int):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = SelfAttention(d, heads, seq)
        self.fc1, self.fc2 = nn.Linear(d, mlp), nn.Linear(mlp, d)

    def forward(self, x):
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class TransformerMLP(nn.Module):
    def __init__(self, vocab: int = 100, d: int = 64, heads: int = 4, mlp: int = 256, seq: int = 16, layers: int = 2):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.pos = nn.Parameter(torch.randn(1, seq, d) * 0.02)
        self.layers = nn.ModuleList(EncoderLayer(d, heads, mlp, seq) for _ in range(layers))
        self.ln = nn.LayerNorm(d)
        self.lm_head = nn.Linear(d, vocab)

    def forward(self, ids):
        x = self.embed(ids) + self.pos
        for layer in self.layers:
            x = layer(x)
        return self.lm_head(self.ln(x))


# --------------------------------------------------------------------------------------------------
# Export helpers
# --------------------------------------------------------------------------------------------------


@torch.no_grad()
def settle_norms(model: nn.Module, example: torch.Tensor, seed: int) -> None:
    """Set BN running stats from random batches, then give BN/LN non-trivial affine parameters."""
    gen = torch.Generator().manual_seed(seed)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    if bns:
        for m in bns:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the calibration batches
        model.train()
        for _ in range(16):
            model(torch.randn(example.shape, generator=gen))
        for m in bns:
            m.momentum = 0.1  # exported as the BatchNormalization `momentum` attribute
    model.eval()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.weight.copy_(torch.empty_like(m.weight).uniform_(0.6, 1.4, generator=gen))
            m.bias.copy_(torch.randn(m.bias.shape, generator=gen) * 0.1)


def export(
    model: nn.Module,
    example: torch.Tensor,
    *,
    input_name: str,
    output_name: str,
    dynamic_batch: bool,
    fold_bn: bool,
) -> onnx.ModelProto:
    """Export with the legacy exporter. fold_bn=False keeps BatchNormalization nodes (Paddle-like graphs)."""
    buf = io.BytesIO()
    torch.onnx.export(
        model,
        (example,),
        buf,
        dynamo=False,
        opset_version=OPSET,
        do_constant_folding=True,
        # EVAL folds BN into the preceding Conv (what torch exports normally look like); PRESERVE with the
        # model in eval mode keeps BatchNormalization(training_mode=0).
        training=torch.onnx.TrainingMode.EVAL if fold_bn else torch.onnx.TrainingMode.PRESERVE,
        input_names=[input_name],
        output_names=[output_name],
        dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}} if dynamic_batch else None,
    )
    model_proto = onnx.load_from_string(buf.getvalue())
    model_proto.producer_name = "onnxprune-fixtures"
    model_proto.producer_version = f"torch {torch.__version__.split('+')[0]}"
    return model_proto


def to_fp16_weights(model: onnx.ModelProto) -> onnx.ModelProto:
    """Store every float initializer as fp16 and feed its consumers through a Cast-to-float node.

    This is the "fp16 weights behind Cast" layout: compute stays fp32, storage is halved. The fp16
    initializer keeps the original name; the Cast output is ``<name>_fp32``; one Cast per initializer even
    when several nodes read it.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    casts = []
    renamed: dict[str, str] = {}
    for init in graph.initializer:
        if init.data_type != TensorProto.FLOAT:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(init).astype(np.float16), init.name)
        init.CopyFrom(half)
        renamed[init.name] = f"{init.name}_fp32"
        casts.append(
            helper.make_node("Cast", [init.name], [renamed[init.name]], name=f"{init.name}_Cast", to=TensorProto.FLOAT)
        )
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    nodes = casts + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return out


def verify(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    onnx.checker.check_model(model, full_check=True)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    outs = sess.run(None, feeds)
    for o in outs:
        if not np.all(np.isfinite(o)):
            raise RuntimeError("non-finite output")
    return outs


def save(model: onnx.ModelProto, path: Path) -> None:
    data = model.SerializeToString()
    if len(data) > 2 * 1024 * 1024:
        raise RuntimeError(f"{path.name} is {len(data)} bytes; fixtures must stay under 2 MB")
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(path)


def summarize(path: Path, model: onnx.ModelProto, outs: list[np.ndarray]) -> None:
    ops: dict[str, int] = {}
    for n in model.graph.node:
        ops[n.op_type] = ops.get(n.op_type, 0) + 1
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    shapes = ", ".join(str(list(o.shape)) for o in outs)
    print(f"{path.name:32s} {path.stat().st_size / 1024:8.1f} KiB  sha256 {digest}  out {shapes}")
    print("    ops: " + ", ".join(f"{k} {v}" for k, v in sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))))


def build_all(out_dir: Path) -> None:
    torch.set_num_threads(1)  # reproducible float reductions
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)

    # MobileNetV3 block, BN kept, dynamic batch
    torch.manual_seed(1)
    mnv3 = MobileNetV3Block()
    x = torch.randn(1, 3, 64, 64)
    settle_norms(mnv3, x, seed=1)
    m = export(mnv3, x, input_name="input", output_name="logits", dynamic_batch=True, fold_bn=False)
    feeds = {"input": rng.standard_normal((2, 3, 64, 64), dtype=np.float32)}
    outs = verify(m, feeds)
    with torch.no_grad():
        ref = mnv3(torch.from_numpy(feeds["input"])).numpy()
    assert np.allclose(outs[0], ref, atol=1e-4), np.abs(outs[0] - ref).max()
    path = out_dir / "mobilenetv3_block.onnx"
    save(m, path)
    summarize(path, m, outs)

    m16 = to_fp16_weights(m)
    outs16 = verify(m16, feeds)
    path16 = out_dir / "mobilenetv3_block_fp16.onnx"
    save(m16, path16)
    summarize(path16, m16, outs16)
    print(f"    fp16 vs fp32 max abs diff {np.abs(outs16[0] - outs[0]).max():.2e}")

    # YOLOv8-style block, BN folded (ultralytics fuses before export), static batch 1
    torch.manual_seed(2)
    yolo = YoloBlock()
    x = torch.randn(1, 3, 64, 64)
    settle_norms(yolo, x, seed=2)
    m = export(yolo, x, input_name="images", output_name="output0", dynamic_batch=False, fold_bn=True)
    feeds = {"images": rng.standard_normal((1, 3, 64, 64), dtype=np.float32)}
    outs = verify(m, feeds)
    with torch.no_grad():
        ref = yolo(torch.from_numpy(feeds["images"])).numpy()
    assert np.allclose(outs[0], ref, atol=1e-3), np.abs(outs[0] - ref).max()
    path = out_dir / "yolo_block.onnx"
    save(m, path)
    summarize(path, m, outs)

    # Transformer encoder, static [1, 16] int64 ids
    torch.manual_seed(3)
    tr = TransformerMLP().eval()
    settle_norms(tr, torch.zeros(1, 16), seed=3)
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(3))
    m = export(tr, ids, input_name="input_ids", output_name="logits", dynamic_batch=False, fold_bn=True)
    feeds = {"input_ids": rng.integers(0, 100, (1, 16), dtype=np.int64)}
    outs = verify(m, feeds)
    with torch.no_grad():
        ref = tr(torch.from_numpy(feeds["input_ids"])).numpy()
    assert np.allclose(outs[0], ref, atol=1e-4), np.abs(outs[0] - ref).max()
    path = out_dir / "transformer_mlp.onnx"
    save(m, path)
    summarize(path, m, outs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "models", help="output folder (default: models/)")
    args = parser.parse_args()
    build_all(args.out)


if __name__ == "__main__":
    main()

"""Make models/bert_fused.onnx: a small BERT-like encoder (random weights) exported by PyTorch and
fused by onnxruntime's transformer optimizer into com.microsoft Attention (packed QKV weight),
SkipLayerNormalization, BiasGelu and FastGelu, as a user's optimized transformer file looks.

Torch lives in its own venv (the package never imports it); the optimizer needs sympy:

    python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch==2.13.0 onnx \
        onnxruntime numpy sympy
    /tmp/torchvenv/bin/python tools/make_fused_fixture.py        # ~5 s
    # a larger one for tools/bench_fused.py (not committed):
    /tmp/torchvenv/bin/python tools/make_fused_fixture.py --hidden 256 --heads 8 --ffn 1024 \
        --layers 4 --seq 128 -o /tmp/bert_fused_big.onnx

Seeded and byte-for-byte reproducible for one torch/onnxruntime version (the script prints the
fused op counts and the SHA-256; it checks the fused model against the exported one in
onnxruntime and fails when the fusion did not happen).
"""

from __future__ import annotations

import argparse
import hashlib
import math
import sys
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

HIDDEN, HEADS, FFN, LAYERS, SEQ, VOCAB = 64, 4, 128, 2, 16, 50
OUT = Path(__file__).resolve().parent.parent / "models" / "bert_fused.onnx"


def _configure(argv) -> Path:
    """Sizes from the command line (defaults: the committed fixture); returns the output path."""
    global HIDDEN, HEADS, FFN, LAYERS, SEQ
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=HIDDEN)
    ap.add_argument("--heads", type=int, default=HEADS)
    ap.add_argument("--ffn", type=int, default=FFN)
    ap.add_argument("--layers", type=int, default=LAYERS)
    ap.add_argument("--seq", type=int, default=SEQ)
    ap.add_argument("-o", "--output", type=Path, default=OUT)
    a = ap.parse_args(argv)
    HIDDEN, HEADS, FFN, LAYERS, SEQ = a.hidden, a.heads, a.ffn, a.layers, a.seq
    return a.output


class Layer(nn.Module):
    """A post-LN BERT layer written like Hugging Face's BertLayer (what the optimizer matches)."""

    def __init__(self, approximate: str) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(HIDDEN, HIDDEN) for _ in range(3))
        self.o = nn.Linear(HIDDEN, HIDDEN)
        self.ln1 = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.up = nn.Linear(HIDDEN, FFN)
        self.down = nn.Linear(FFN, HIDDEN)
        self.ln2 = nn.LayerNorm(HIDDEN, eps=1e-12)
        self.approximate = approximate

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        dh = HIDDEN // HEADS

        def heads(t):
            return t.view(b, s, HEADS, dh).permute(0, 2, 1, 3)
        q, k, v = heads(self.q(x)), heads(self.k(x)), heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(dh) + mask
        ctx = torch.matmul(scores.softmax(-1), v).permute(0, 2, 1, 3).contiguous()
        x = self.ln1(self.o(ctx.view(b, s, HIDDEN)) + x)
        return self.ln2(self.down(F.gelu(self.up(x), approximate=self.approximate)) + x)


class Encoder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.word = nn.Embedding(VOCAB, HIDDEN)
        self.pos = nn.Embedding(SEQ, HIDDEN)
        self.ln = nn.LayerNorm(HIDDEN, eps=1e-12)
        # erf GELU (fused to BiasGelu) in layer 0, tanh GELU (FastGelu) in layer 1
        self.layers = nn.ModuleList([Layer(("none", "tanh")[i % 2]) for i in range(LAYERS)])
        self.head = nn.Linear(HIDDEN, 8)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(input_ids.shape[1]).unsqueeze(0)
        x = self.ln(self.word(input_ids) + self.pos(pos))
        ext = (1.0 - attention_mask[:, None, None, :].to(torch.float32)) * -10000.0
        for layer in self.layers:
            x = layer(x, ext)
        return self.head(x)


def main(argv=None) -> int:
    out_path = _configure(argv)
    torch.manual_seed(0)
    model = Encoder().eval()
    with torch.no_grad():  # unit-scale LayerNorm affine parameters that are not the identity
        for m in model.modules():
            if isinstance(m, nn.LayerNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.1, 0.1)
    ids = torch.randint(0, VOCAB, (1, SEQ))
    mask = torch.ones(1, SEQ, dtype=torch.int64)
    from onnxruntime.transformers import optimizer
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.onnx"
        torch.onnx.export(model, (ids, mask), str(raw), input_names=["input_ids", "attention_mask"],
                          output_names=["logits"], opset_version=17, do_constant_folding=True,
                          dynamo=False)
        fused = optimizer.optimize_model(str(raw), model_type="bert", num_heads=HEADS,
                                         hidden_size=HIDDEN, opt_level=0)
        counts = Counter(n.op_type for n in fused.model.graph.node)
        print(dict(counts))
        for op in ("Attention", "SkipLayerNormalization", "BiasGelu", "FastGelu"):
            if not counts.get(op):
                print(f"error: the optimizer emitted no {op}", file=sys.stderr)
                return 1
        out = fused.model
        out.producer_name, out.producer_version = "onnxprune-fixtures", "1"
        if not any(o.domain == "com.microsoft" for o in out.opset_import):
            out.opset_import.append(onnx.helper.make_opsetid("com.microsoft", 1))
        onnx.checker.check_model(out)
        feeds = {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
        want = ort.InferenceSession(str(raw), providers=["CPUExecutionProvider"]).run(None, feeds)
        got = ort.InferenceSession(out.SerializeToString(),
                                   providers=["CPUExecutionProvider"]).run(None, feeds)
        err = float(np.abs(got[0] - want[0]).max())
        print(f"fused vs exported: max |diff| {err:.2e}")
        if err > 1e-3:
            print("error: the fused model does not match the exported one", file=sys.stderr)
            return 1
        data = out.SerializeToString()
    out_path.write_bytes(data)
    print(f"{out_path.name}: {len(data) / 1024:.0f} KiB sha256 "
          f"{hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

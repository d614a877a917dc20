"""What pruning flan-t5-small's residual width (d_model, through its RMSNorms) does to its
decoder: top-1 agreement of the decoder's next-token logits with the dense decoder's, teacher
forced on generated sentences (``tools/eval_text.py``'s, encoded by the dense encoder).

    python tools/bench_t5_residual.py                      # this checkout: stream kept and cut
    python tools/bench_t5_residual.py --onnxprune-root <checkout>   # another checkout

Each row is one ``onnxprune`` CLI run on ``text/flan_t5/decoder.onnx`` (``--input-shape`` from
``tools/corpus.py``'s ``TEXT_INPUT_SHAPES``); calibrated rows get 64 samples made the same way
from other sentences (seed 1; evaluation: seed 0, 32 sentences). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import eval_text as et  # noqa: E402
from corpus import TEXT_INPUT_SHAPES  # noqa: E402

DECODER = "flan_t5/decoder.onnx"
RUNS = {
    "channel 25% (stream kept: the default)": [],
    "channel 25% + wanda + refit (stream kept)": ["--criterion", "wanda", "--refit"],
    "channel 25% --prune-stream": ["--prune-stream"],
    "channel 25% + wanda + refit --prune-stream": ["--criterion", "wanda", "--refit",
                                                   "--prune-stream"],
}
DEC_LEN = 8


def decoder_feed(n: int, seed: int) -> dict:
    """Decoder inputs for ``n`` sentences: the dense encoder's hidden states, and the sentence's
    first tokens shifted right behind T5's start token (0)."""
    enc = et.tokenize(et.T5_TOK, [a for a, _ in et.sentence_pairs(n, seed)])
    hidden = et.t5_hidden(et.text_file(et.T5_ENCODER), enc)
    ids = np.concatenate([np.zeros((n, 1), np.int64), enc["input_ids"][:, :DEC_LEN - 1]], 1)
    return {"input_ids": ids, "encoder_hidden_states": hidden.astype(np.float32),
            "encoder_attention_mask": enc["attention_mask"]}, enc["attention_mask"][:, :DEC_LEN]


def logits(path, feed) -> np.ndarray:
    sess = et.session(path)
    return np.concatenate([sess.run(None, {k: v[i:i + 1] for k, v in feed.items()})[0]
                           for i in range(len(feed["input_ids"]))])


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--onnxprune-root", default=str(HERE.parent),
                        help="the checkout whose onnxprune runs [default: this one]")
    args = parser.parse_args(argv)
    shapes = ",".join(f"{k}={v}" for k, v in TEXT_INPUT_SHAPES["text/flan_t5/decoder"].items())
    decoder = et.text_file(DECODER)
    feed, mask = decoder_feed(32, 0)
    dense = logits(decoder, feed)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        cal = Path(tmp) / "cal.npz"
        np.savez(cal, **decoder_feed(64, 1)[0])
        env = dict(os.environ, PYTHONPATH=args.onnxprune_root)
        for label, extra in RUNS.items():
            out = Path(tmp) / "pruned.onnx"
            cmd = [sys.executable, "-m", "onnxprune", str(decoder), "--pattern", "channel",
                   "--sparsity", "0.25", "--input-shape", shapes, "-o", str(out), "--force"]
            if "--refit" in extra:
                cmd += ["--calibration", str(cal)]
            cmd += extra
            res = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=tmp)
            if res.returncode != 0 or not out.is_file():
                rows.append((label, "—", "—", res.stdout.strip().splitlines()[-1:] or
                             res.stderr.strip().splitlines()[-1:]))
                continue
            params = re.search(r"^params\s+(.*)$", res.stdout, re.M)
            pruned = logits(out, feed)
            agree = (pruned.argmax(-1) == dense.argmax(-1))[mask.astype(bool)].mean()
            cos = float((pruned * dense).sum() / np.linalg.norm(pruned) / np.linalg.norm(dense))
            rows.append((label, f"{agree:.3f}", f"{cos:.3f}", params.group(1) if params else ""))
    print(f"onnxprune from {args.onnxprune_root}\n")
    print("| run | top-1 agreement | logits cosine | params |\n|---|---:|---:|---|")
    for r in rows:
        print("| " + " | ".join(str(c) for c in r) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())

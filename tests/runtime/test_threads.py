"""Results do not depend on thread counts: onnxruntime's intra-op threads (``--threads``) and
the BLAS threads numpy uses; a channel refit and a calibrated run give the same bytes."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from onnxprune import prune

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"


@pytest.mark.parametrize("model, kw", [
    ("yolo_block.onnx", dict(pattern="channel", sparsity=0.5, refit=True)),
    ("digits_cnn.onnx", dict(pattern="channel", sparsity=0.4, refit=True,
                             calibration=str(MODELS / "digits_calib.npz"))),
    ("digits_cnn.onnx", dict(criterion="sparsegpt", sparsity=0.6,
                             calibration=str(MODELS / "digits_calib.npz"))),
])
def test_onnxruntime_thread_count_does_not_change_the_output(model, kw):
    one = prune(MODELS / model, threads=1, **kw).model.SerializeToString()
    two = prune(MODELS / model, threads=2, **kw).model.SerializeToString()
    assert one == two


def test_blas_thread_count_does_not_change_a_channel_refit(tmp_path):
    digests = []
    for n in ("1", "2"):
        out = tmp_path / f"refit{n}.onnx"
        env = dict(os.environ, OPENBLAS_NUM_THREADS=n, OMP_NUM_THREADS=n, MKL_NUM_THREADS=n,
                   PYTHONHASHSEED=n)
        subprocess.run([sys.executable, "-m", "onnxprune", str(MODELS / "yolo_block.onnx"),
                        "--pattern", "channel", "--sparsity", "0.5", "--refit", "--threads", n,
                        "-o", str(out), "--quiet"], check=True, env=env, cwd=ROOT)
        digests.append(hashlib.sha256(out.read_bytes()).hexdigest())
    assert digests[0] == digests[1]

"""A temp file is recorded for cleanup in the same step it is created: an interrupt at any later
point of creating it (here: while its permissions are set) leaves no temp file behind, and a data
file whose model never landed is taken back."""

from __future__ import annotations

import os

import onnx
import pytest

import builders as B
from onnxprune.model import io as mio
from onnxprune.model import output


def _interrupt_chmod(monkeypatch):
    def chmod(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(output.os, "chmod", chmod)


def test_write_atomic_leaves_no_temp_when_interrupted_while_creating_it(tmp_path, monkeypatch):
    _interrupt_chmod(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        output.write_atomic(tmp_path / "report.json", lambda p: None, force=False)
    assert os.listdir(tmp_path) == []


def test_save_leaves_no_temp_when_interrupted_while_creating_it(tmp_path, monkeypatch):
    handle = mio.load(B.conv_gemm_model())
    _interrupt_chmod(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        mio.save(handle, tmp_path / "out.onnx")
    assert os.listdir(tmp_path) == []


def test_a_data_file_without_its_model_is_taken_back(tmp_path, monkeypatch):
    src = tmp_path / "src"
    src.mkdir()
    onnx.save(B.conv_gemm_model(), str(src / "m.onnx"), save_as_external_data=True,
              all_tensors_to_one_file=True, location="m.onnx.data", size_threshold=0)
    handle = mio.load(src / "m.onnx")
    out = tmp_path / "out"
    out.mkdir()
    real = mio.commit

    def commit(tmp, final, force, what="output"):
        if what == "output":  # the model's own commit: interrupted after the data file landed
            raise KeyboardInterrupt
        return real(tmp, final, force, what)

    monkeypatch.setattr(mio, "commit", commit)
    with pytest.raises(KeyboardInterrupt):
        mio.save(handle, out / "out.onnx")
    assert os.listdir(out) == []

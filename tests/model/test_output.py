"""Every path the tool writes is checked like -o before any work, and written atomically and
(without --force) exclusively: model output, its .data file, the JSON report."""

from __future__ import annotations

import json
import os
import stat

import numpy as np
import onnx
import pytest
from click.testing import CliRunner

import builders as B
from onnxprune import cli
from onnxprune.errors import OutputError
from onnxprune.model.output import check_output, commit, temp_beside


@pytest.fixture
def src(tmp_path):
    path = tmp_path / "m.onnx"
    onnx.save(B.conv_gemm_model(), str(path))
    return path


def _ext_src(tmp_path, data_name):
    """A model whose weights sit in the external file ``data_name`` beside it."""
    path = tmp_path / "ext.onnx"
    onnx.save(B.conv_gemm_model(), str(path), save_as_external_data=True,
              all_tensors_to_one_file=True, location=data_name, size_threshold=0)
    return path


def invoke(*args):
    return CliRunner().invoke(cli.main, [str(a) for a in args])


def _no_temp_files(folder):
    return not [p for p in folder.iterdir() if p.name.endswith(".tmp")]


def _bytes(path):
    return path.read_bytes()


@pytest.mark.parametrize("force", [False, True])
def test_report_may_not_be_the_input_model(src, tmp_path, force):
    before = _bytes(src)
    res = invoke(src, "-o", tmp_path / "o.onnx", "--report", src, "-q",
                 *(["--force"] if force else []))
    assert res.exit_code == 2 and "input model reads" in res.output
    assert _bytes(src) == before and not (tmp_path / "o.onnx").exists()


def test_report_may_not_be_the_output(src, tmp_path):
    out = tmp_path / "o.onnx"
    res = invoke(src, "-o", out, "--report", out, "-q")
    assert res.exit_code == 2 and "another file this run writes" in res.output
    assert not out.exists()


def test_report_may_not_be_the_file_an_output_folder_gets(src, tmp_path):
    folder = tmp_path / "outdir"
    folder.mkdir()
    res = invoke(src, "-o", str(folder) + "/", "--report", folder / "m.pruned.onnx", "-q")
    assert res.exit_code == 2 and "another file this run writes" in res.output
    assert list(folder.iterdir()) == []


def test_existing_report_needs_force_and_is_checked_before_work(src, tmp_path):
    report = tmp_path / "r.json"
    report.write_text("keep me")
    out = tmp_path / "o.onnx"
    res = invoke(src, "-o", out, "--report", report, "-q")
    assert res.exit_code == 2 and "already exists" in res.output
    assert report.read_text() == "keep me" and not out.exists()  # refused before any work
    res = invoke(src, "-o", out, "--report", report, "-q", "--force")
    assert res.exit_code == 0 and json.loads(report.read_text())["rows"]


def test_report_in_a_missing_folder_is_refused_before_the_model_is_written(src, tmp_path):
    out = tmp_path / "o.onnx"
    res = invoke(src, "-o", out, "--report", tmp_path / "nope" / "r.json", "-q")
    assert res.exit_code == 2 and "does not exist" in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_report_dash_writes_json_to_stdout(src, tmp_path):
    res = CliRunner().invoke(cli.main, [str(src), "-o", str(tmp_path / "o.onnx"), "--report",
                                        "-", "-q"])
    assert res.exit_code == 0
    data = json.loads(res.stdout)
    assert data["rows"] and (tmp_path / "o.onnx").exists()


@pytest.mark.parametrize("link", ["hard", "sym"])
def test_output_resolving_to_the_input_is_refused_even_with_force(src, tmp_path, link):
    alias = tmp_path / "alias.onnx"
    (os.link if link == "hard" else os.symlink)(src, alias)
    before = _bytes(src)
    res = invoke(src, "-o", alias, "-q", "--force")
    assert res.exit_code == 2 and "input model reads" in res.output
    assert _bytes(src) == before


def test_output_data_file_may_not_be_the_inputs_external_data(tmp_path):
    src = _ext_src(tmp_path, "o.onnx.data")
    before = (tmp_path / "o.onnx.data").read_bytes()
    res = invoke(src, "-o", tmp_path / "o.onnx", "-q", "--force")
    assert res.exit_code == 2 and "input model reads" in res.output
    assert (tmp_path / "o.onnx.data").read_bytes() == before


def test_only_regular_files_are_replaced(src, tmp_path):
    fifo = tmp_path / "pipe.onnx"
    os.mkfifo(fifo)
    res = invoke(src, "-o", fifo, "-q", "--force")
    assert res.exit_code == 2 and "not a regular file" in res.output
    assert stat.S_ISFIFO(os.stat(fifo).st_mode)
    with pytest.raises(OutputError, match="not a regular file"):
        check_output("/dev/null", True, what="report")


def test_output_folder_means_a_file_inside_it(src, tmp_path):
    folder = tmp_path / "outdir"
    folder.mkdir()
    res = invoke(src, "-o", str(folder) + "/", "-q")
    assert res.exit_code == 0 and (folder / "m.pruned.onnx").exists()
    res = invoke(src, "-o", str(tmp_path / "missing") + "/", "-q")
    assert res.exit_code == 2 and "folder" in res.output
    assert not (tmp_path / "missing").exists()


def test_a_file_that_appears_during_the_run_is_never_overwritten(tmp_path):
    final = tmp_path / "o.onnx"
    tmp = temp_beside(final)
    with open(tmp, "w") as f:
        f.write("new")
    final.write_text("someone else's")  # appeared after the up-front check
    with pytest.raises(OutputError, match="appeared while onnxprune was working"):
        commit(tmp, final, force=False)
    assert final.read_text() == "someone else's" and _no_temp_files(tmp_path)


def test_outputs_get_a_new_files_permissions(src, tmp_path):
    umask = os.umask(0o022)
    try:
        out, report = tmp_path / "o.onnx", tmp_path / "r.json"
        assert invoke(src, "-o", out, "--report", report, "-q").exit_code == 0
    finally:
        os.umask(umask)
    for path in (out, report):
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o644
    assert _no_temp_files(tmp_path)


def test_output_through_a_symlink_into_another_folder_writes_the_target(src, tmp_path):
    # The temp file is made beside the target, so the rename never crosses a filesystem
    # (a symlink into tmpfs); /dev/shm when there is one, else another folder.
    shm = "/dev/shm"
    target_dir = tmp_path / "elsewhere"
    if os.path.isdir(shm) and os.access(shm, os.W_OK):
        import tempfile

        target_dir = __import__("pathlib").Path(tempfile.mkdtemp(dir=shm))
    target_dir.mkdir(exist_ok=True)
    target = target_dir / "real.onnx"
    target.write_bytes(b"old")
    link = tmp_path / "link.onnx"
    os.symlink(target, link)
    res = invoke(src, "-o", link, "-q", "--force")
    assert res.exit_code == 0, res.output
    assert os.path.islink(link)
    onnx.checker.check_model(onnx.load(str(target)))
    assert _no_temp_files(target_dir) and _no_temp_files(tmp_path)
    np.testing.assert_equal(os.path.realpath(link), str(target))

"""``--report report.html``: one self-contained page rendered from ``Report.to_dict()``.

Without a browser: the page parses, names every layer (escaped), fetches nothing (no http(s)
reference anywhere), shows a hostile name only escaped, draws charts with matplotlib and says how
to get them without it, shows verdict badges when the comparison has verdicts. With a headless
Chromium (skipped with the reason when none is installed): the page is screenshotted (a real,
non-blank image) and logs nothing to the console.
"""

from __future__ import annotations

import html
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper

import builders as B
import onnxprune
from onnxprune.cli import main
from onnxprune.report.html import INSTALL_HINT, render_html
from onnxprune.report.report import LayerRow, Report

HOSTILE = "<script>alert(1)</script>"


class _Page(HTMLParser):
    """Collects the text, the tags and every attribute value of a page; fails on a tag closed
    that was never opened (html.parser itself is lenient)."""

    VOID = {"meta", "br", "img", "input", "link", "hr"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.text, self.tags, self.attrs, self.stack = [], [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [v or "" for _, v in attrs]
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += [v or "" for _, v in attrs]

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, (tag, self.stack[-5:])
        self.stack.pop()

    def handle_data(self, data):
        self.text.append(data)


def parse(page: str) -> _Page:
    parser = _Page()
    parser.feed(page)
    parser.close()
    assert parser.stack == [], parser.stack
    return parser


def _hostile_model():
    """A MatMul chain whose weight, nodes and output carry markup in their names."""
    w = "W" + HOSTILE
    nodes = [helper.make_node("MatMul", ["x", w], ["h"], name='<img src=x onerror="alert(2)">'),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "V&amp;"], ["y\"'><b>"], name="m2")]
    return B.make_model(nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 16])],
                        [helper.make_tensor_value_info("y\"'><b>", TensorProto.FLOAT, [2, 4])],
                        [B.tensor(w, (16, 8)), B.tensor("V&amp;", (8, 4), 1)])


@pytest.fixture(scope="module")
def digits(models_dir):
    return models_dir / "digits_cnn.onnx"


def _no_remote(page: str) -> None:
    lowered = page.lower()
    assert "http://" not in lowered and "https://" not in lowered
    assert "<script" not in lowered and "<link" not in lowered and "@import" not in lowered
    # the only references are to the page's own SVG parts (clip paths, glyphs)
    assert all(ref.strip("'\" ").startswith("#") for ref in re.findall(r"url\(([^)]*)\)", page))
    assert all(ref.startswith("#") for ref in re.findall(r"(?:href|src)=\"([^\"]*)\"", page))


def test_page_parses_and_lists_every_layer_escaped(digits):
    report = onnxprune.prune(digits, pattern="channel", sparsity=0.5).report
    page = report.html_text()
    assert page.startswith("<!DOCTYPE html>")
    parsed = parse(page)
    text = "".join(parsed.text)
    for row in report.rows:
        assert html.escape(row.name) in page and row.name in text
    for name, reason in report.frozen:
        assert html.escape(reason) in page
    assert "Channel groups left whole (1)" in text
    _no_remote(page)
    assert {"style", "table", "section"} <= set(parsed.tags)


def test_hostile_names_appear_only_escaped():
    result = onnxprune.prune(_hostile_model(), sparsity=0.5)
    report = result.report
    report.model = f"models/{HOSTILE}.onnx"
    report.notes.append(f"note {HOSTILE}")
    page = report.html_text()
    _no_remote(page)
    assert page.count("&lt;script&gt;alert(1)&lt;/script&gt;") >= 3  # title, header, row, note
    assert "<img" not in page and "<b>" not in page and 'onerror="' not in page
    parsed = parse(page)
    # what a browser shows is the name itself, as text
    text = "".join(parsed.text)
    assert "W" + HOSTILE in text and "V&amp;" in text and "y\"'><b>" in text
    assert "script" not in parsed.tags and "img" not in parsed.tags


def test_page_headline_and_sections_follow_the_data(digits, tmp_path):
    report = onnxprune.prune(digits, pattern="4x1", sparsity=0.8, resize=False,
                             output=tmp_path / "m.onnx").report
    text = "".join(parse(report.html_text()).text)
    d = report.to_dict()
    for label in ("params", "nonzeros", "sparsity", "MACs", "file size"):
        assert label in text
    assert "27.9K → 5.58K" in text and "0.0% → 80.0%" in text  # nonzeros, sparsity
    assert "Validation: reference vs pruned outputs" in text and "logits" in text
    assert "zeros are stored densely" in text
    assert "Options used" in text and "4x1" in text
    assert f"report schema {d['schema_version']}" in text and d["tool"]["version"] in text
    assert "no output written" not in text
    assert "input; no output written" in "".join(parse(onnxprune.prune(
        digits, validate=False).report.html_text()).text)


def _with_verdicts(report: Report) -> dict:
    d = report.to_dict()
    d["comparison"]["verdict"] = "degraded"
    d["comparison"]["samples"] = 32
    d["comparison"]["thresholds"] = {"cosine": [0.99, 0.9]}
    out = d["comparison"]["outputs"][0]
    d["comparison"]["outputs"] = [dict(out, verdict="ok", samples=32),
                                  dict(out, name="boxes", verdict="broken",
                                       verdict_reason="cosine 0.2 < 0.9")]
    return d


def test_verdict_badges_and_unknown_comparison_keys_are_rendered(digits):
    d = _with_verdicts(onnxprune.prune(digits).report)
    page = render_html(d)
    assert '<span class="badge ok">ok</span>' in page
    assert '<span class="badge broken">broken</span>' in page
    assert '<span class="badge degraded">degraded</span>' in page
    text = "".join(parse(page).text)
    assert "verdict_reason" in text and "cosine 0.2 < 0.9" in text
    assert "samples" in text and "cosine: 0.99, 0.9" in text


def test_page_without_matplotlib_has_tables_and_says_how_to_get_charts(digits, monkeypatch):
    report = onnxprune.prune(digits).report
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    page = report.html_text()
    assert "<svg" not in page
    assert INSTALL_HINT == "pip install onnxprune[report]" and INSTALL_HINT in page
    text = "".join(parse(page).text)
    assert all(r.name in text for r in report.rows)


def test_charts_are_inline_svg(digits, models_dir):
    pytest.importorskip("matplotlib", reason="charts need the report extra (matplotlib)")
    report = onnxprune.prune(digits, calibration=models_dir / "digits_calib.npz",
                             allocate="sensitivity").report
    page = report.html_text()
    assert INSTALL_HINT not in page
    assert page.count("<svg") == 2  # the layer chart and the sensitivity curves
    assert "<metadata" not in page and "<!--" not in page and "<?xml" not in page
    _no_remote(page)
    parse(page)
    search = onnxprune.prune(digits, max_error=0.3, search=True).report.html_text()
    assert search.count("<svg") == 2  # layers and the search probes
    assert "within --max-error" in search


def test_chart_keeps_a_dollar_name_as_text():
    pytest.importorskip("matplotlib", reason="charts need the report extra (matplotlib)")
    row = LayerRow("w$x^2$", "MatMul", (4, 4), (4, 4), 16, 16, 16, 8)
    page = Report(model="m", rows=[row], params_before=16, params_after=16,
                  nonzeros_before=16, nonzeros_after=8).html_text()
    assert "w$x^2$" in page and page.count("<svg") == 1


@pytest.mark.parametrize("suffix, is_html", [(".html", True), (".HTM", True), (".json", False),
                                             (".txt", False)])
def test_write_chooses_the_format_by_suffix(tmp_path, suffix, is_html):
    path = tmp_path / f"report{suffix}"
    Report(model="m.onnx").write(path)
    text = path.read_text("utf-8")
    if is_html:
        assert text.startswith("<!DOCTYPE html>")
    else:
        assert json.loads(text)["model"] == "m.onnx"


def test_cli_writes_an_html_report(tmp_path, digits):
    path = tmp_path / "r.html"
    res = CliRunner().invoke(main, ["prune", str(digits), "-o", str(tmp_path / "p.onnx"),
                                    "--report", str(path), "-q"])
    assert res.exit_code == 0, res.output
    page = path.read_text("utf-8")
    assert page.startswith("<!DOCTYPE html>") and "onnx::Conv_39" in page
    res = CliRunner().invoke(main, ["prune", str(digits), "-o", str(tmp_path / "p.onnx"),
                                    "--report", str(path), "-q"])
    assert res.exit_code == 2 and "--force" in res.output  # checked like any report path


# -- a real browser ---------------------------------------------------------------------------------
BROWSERS = ("chromium-headless-shell", "chromium", "chromium-browser", "google-chrome",
            "google-chrome-stable", "headless_shell", "chrome")


def _browser():
    for name in BROWSERS:
        path = shutil.which(name)
        if path:
            return path
    return None


def _shoot(browser: str, page: Path, png: Path, tmp: Path) -> str:
    """Screenshot ``page``; the browser's log (console messages are its ``:CONSOLE`` lines)."""
    args = [browser, "--headless", "--disable-gpu", "--no-first-run", "--hide-scrollbars",
            f"--user-data-dir={tmp / 'profile'}", "--enable-logging=stderr", "--v=0",
            f"--screenshot={png}", "--window-size=1280,1600", page.resolve().as_uri()]
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        args.insert(1, "--no-sandbox")  # Chromium refuses its sandbox as root
    done = subprocess.run(args, capture_output=True, text=True, timeout=120)
    assert png.is_file(), done.stderr[-2000:]
    return done.stdout + done.stderr


def _console(log: str):
    return [line for line in log.splitlines() if ":CONSOLE" in line]


def _png_colors(path: Path, limit: int = 3) -> int:
    """How many distinct pixel values an 8-bit RGB/RGBA PNG holds (up to ``limit``)."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, header = 8, b"", None
    while pos < len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        chunk = data[pos + 8:pos + 8 + length]
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", chunk)
        elif kind == b"IDAT":
            idat += chunk
        pos += 12 + length
    width, height, depth, color = header[:4]
    assert depth == 8 and color in (2, 6), header
    bpp = 3 if color == 2 else 4
    raw = zlib.decompress(idat)
    stride = width * bpp
    prev = bytearray(stride)
    colors = set()
    for y in range(height):
        f = raw[y * (stride + 1)]
        line = bytearray(raw[y * (stride + 1) + 1:(y + 1) * (stride + 1)])
        for i in range(stride):
            a = line[i - bpp] if i >= bpp else 0
            b, c = prev[i], prev[i - bpp] if i >= bpp else 0
            if f == 1:
                line[i] = (line[i] + a) & 255
            elif f == 2:
                line[i] = (line[i] + b) & 255
            elif f == 3:
                line[i] = (line[i] + (a + b) // 2) & 255
            elif f == 4:
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        prev = line
        if y % 16 == 0:
            colors.update(bytes(line[i:i + bpp]) for i in range(0, stride, bpp * 7))
            if len(colors) >= limit:
                return len(colors)
    return len(colors)


@pytest.mark.skipif(_browser() is None, reason="no headless browser installed (tried "
                    + ", ".join(BROWSERS) + "); e.g. apt-get install chromium-headless-shell")
def test_page_in_a_headless_browser(tmp_path, digits, models_dir):
    browser = _browser()
    # the console capture works: a page that logs an error is caught
    probe = tmp_path / "probe.html"
    probe.write_text("<!DOCTYPE html><p>probe</p><script>console.error('probe-error')</script>")
    assert any("probe-error" in line for line in _console(
        _shoot(browser, probe, tmp_path / "probe.png", tmp_path)))

    report = onnxprune.prune(digits, calibration=models_dir / "digits_calib.npz",
                             allocate="sensitivity").report
    d = _with_verdicts(report)
    d["rows"][0]["name"] = HOSTILE  # a hostile name must not run either
    page = tmp_path / "report.html"
    page.write_text(render_html(d), encoding="utf-8")
    png = tmp_path / "report.png"
    log = _shoot(browser, page, png, tmp_path)
    assert _console(log) == []
    assert png.stat().st_size > 20_000
    assert _png_colors(png) >= 3  # not a blank page of one colour

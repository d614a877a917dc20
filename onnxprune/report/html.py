"""The report as one self-contained HTML page (``--report report.html``).

:func:`render_html` turns :meth:`Report.to_dict <onnxprune.report.report.Report.to_dict>` — the
same data as the JSON report — into a page with inline CSS and inline SVG charts, nothing fetched
from anywhere: a headline (params, nonzeros, MACs, file size before → after), the validation
verdict per output, per-layer sparsity and params (chart and table), sensitivity curves and the
sparsity search when measured, notes, what was left alone and why, the options used and timings.
It renders whatever keys the data holds (a comparison output's keys become its columns), so the
page follows the data.

Charts are drawn with matplotlib (the optional extra ``pip install onnxprune[report]``) on the
Agg/SVG backends; without it the page has the tables only and says how to get the charts. Every
string from the model (names can hold ``<script>``) is HTML-escaped; the SVG text is escaped by
matplotlib, and its comments, metadata and namespace URLs are stripped.
"""

from __future__ import annotations

import html
import io
import json
import math
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from onnxprune.report.report import ARROW, format_bytes, format_count
from onnxprune.text import printable

#: Most layers drawn in the per-layer chart (the largest by params); the table lists all.
CHART_LAYERS = 60
#: Most weights drawn in the sensitivity chart (the largest by params).
CHART_CURVES = 12
INSTALL_HINT = "pip install onnxprune[report]"

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,"DejaVu Sans",sans-serif;
 margin:0;color:#1d2433;background:#f4f6f9}
main{max-width:1200px;margin:0 auto;padding:24px}
h1{font-size:22px;margin:0 0 4px}h2{font-size:17px;margin:28px 0 10px}
.sub{color:#5b6475;word-break:break-all}
.cards{display:flex;flex-wrap:wrap;gap:12px;margin-top:16px}
.card{background:#fff;border-radius:8px;padding:12px 16px;min-width:170px;
 box-shadow:0 1px 2px rgba(0,0,0,.08)}
.card .k{color:#5b6475;font-size:12px;text-transform:uppercase;letter-spacing:.04em}
.card .v{font-size:18px;font-weight:600;margin-top:2px}
.card .r{color:#5b6475;font-size:12px}
section{background:#fff;border-radius:8px;padding:4px 16px 14px;margin-top:16px;
 box-shadow:0 1px 2px rgba(0,0,0,.08);overflow-x:auto}
table{border-collapse:collapse;width:100%;font-size:13px}
table.kv{width:auto;min-width:40%}
th,td{padding:4px 8px;border-bottom:1px solid #e6e9ef;text-align:left;vertical-align:top}
th{background:#f0f2f6;font-weight:600;white-space:nowrap}
td.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}
td.name{word-break:break-all;max-width:420px}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;font-weight:600;font-size:12px;
 color:#fff;background:#6b7280}
.ok{background:#15803d}.unverified{background:#0e7490}.degraded{background:#b45309}.broken,.fail{background:#b91c1c}
.chart svg{max-width:100%;height:auto}
ul.notes li{margin:4px 0}
.muted{color:#5b6475}
"""


def render_html(data: Dict[str, Any]) -> str:
    """The page for ``data`` (a report's :meth:`to_dict`) as an HTML document string."""
    charts = _chart_backend()
    parts: List[str] = []
    model, output = data.get("model"), data.get("output")
    title = "onnxprune report: " + str(model)
    parts.append(f"<h1>onnxprune report</h1><div class=\"sub\">{_e(model)}"
                 + (f" {ARROW} {_e(output)}" if output else "") + "</div>")
    tool = data.get("tool") or {}
    parts.append(f"<div class=\"sub\">{_e(tool.get('name', 'onnxprune'))} "
                 f"{_e(tool.get('version', ''))}, report schema "
                 f"{_e(data.get('schema_version', ''))}</div>")
    parts.append(_headline(data))
    if charts is None:
        parts.append(f"<p class=\"muted\">Charts need matplotlib: <code>{INSTALL_HINT}</code> "
                     "gives charts.</p>")
    comparison = data.get("comparison")
    if comparison:
        parts.append(_section("Validation: reference vs pruned outputs",
                              _comparison(comparison)))
    rows = data.get("rows") or []
    if rows:
        body = ""
        if charts is not None:
            body += _chart_div(charts, lambda: _layer_chart(rows))
        body += _layer_table(rows)
        parts.append(_section(f"Layers ({len(rows)})", body))
    else:
        parts.append(_section("Layers", "<p>no prunable weights</p>"))
    for name, rows_ in (data.get("sections") or {}).items():
        if rows_:
            parts.append(_section(str(name), _extra_section(name, rows_, charts)))
    notes = data.get("notes") or []
    if notes:
        parts.append(_section("Notes", "<ul class=\"notes\">"
                              + "".join(f"<li>{_e(n)}</li>" for n in notes) + "</ul>"))
    for key, label in (("skipped", "Weights left unpruned"),
                       ("frozen", "Channel groups left whole")):
        items = data.get(key) or []
        if items:
            parts.append(_section(f"{label} ({len(items)})",
                                  _table(["name", "why, and what it means"],
                                         [[_td(i.get("name"), "name"), _td(i.get("reason"))]
                                          for i in items])))
    options = data.get("options") or {}
    if options:
        parts.append(_section("Options used", _table(
            ["option", "value"], [[_td(k), _td(_value(v))] for k, v in options.items()],
            cls="kv")))
    timings = data.get("timings") or {}
    if timings:
        parts.append(_section("Time", _table(
            ["step", "seconds"], [[_td(k), _td(_num(v, ".2f"), "n")] for k, v in
                                  timings.items()], cls="kv")))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">"
            f"<title>{_e(title)}</title><style>{_CSS}</style></head>"
            f"<body><main>{''.join(parts)}</main></body></html>\n")


# -- pieces -------------------------------------------------------------------------------------
def _headline(d: Dict[str, Any]) -> str:
    cards = [("params", d.get("params_before"), d.get("params_after"), format_count),
             ("nonzeros", d.get("nonzeros_before"), d.get("nonzeros_after"), format_count),
             ("sparsity", d.get("sparsity_before"), d.get("sparsity_after"), _pct),
             ("MACs", d.get("macs_before"), d.get("macs_after"), format_count)]
    if d.get("sparse_macs_after") is not None and d.get("sparse_macs_after") != d.get("macs_after"):
        cards.append(("MACs with sparse kernels", d.get("macs_before"), d.get("sparse_macs_after"),
                      format_count))
    cards.append(("file size", d.get("file_size_before"), d.get("file_size_after"),
                  format_bytes))
    out = []
    for label, before, after, fmt in cards:
        if before is None and after is None:
            continue
        value = fmt(before) if after is None or after == before else \
            f"{fmt(before)} {ARROW} {fmt(after)}"
        ratio = ""
        if label != "sparsity" and before and after is not None and after != before:
            ratio = f"<div class=\"r\">×{after / before:.2f}</div>"
        elif label == "file size" and after is None:
            ratio = "<div class=\"r\">input; no output written</div>"
        out.append(f"<div class=\"card\"><div class=\"k\">{_e(label)}</div>"
                   f"<div class=\"v\">{_e(value)}</div>{ratio}</div>")
    return f"<div class=\"cards\">{''.join(out)}</div>"


def _comparison(cmp: Dict[str, Any]) -> str:
    """The comparison's own keys as a list (a ``verdict`` as a badge), then one row per output
    with every key any output has (its ``verdict`` as a badge, first)."""
    pairs = []
    for k, v in cmp.items():
        if k == "outputs" or (isinstance(v, (list, dict)) and not v):
            continue
        cell = f"<td>{_badge(v)}</td>" if k == "verdict" else _td(_value(v))
        pairs.append([_td(k), cell])
    html_ = _table(["", ""], pairs, show_head=False, cls="kv") if pairs else ""
    outputs = cmp.get("outputs") or []
    if outputs:
        columns: List[str] = []
        for o in outputs:
            for k in o:
                if k not in columns and k not in ("name", "verdict"):
                    columns.append(k)
        has_verdict = any("verdict" in o for o in outputs)
        head = ["output"] + (["verdict"] if has_verdict else []) + columns
        body = []
        for o in outputs:
            row = [_td(o.get("name"), "name")]
            if has_verdict:
                row.append(f"<td>{_badge(o.get('verdict'))}</td>")
            for k in columns:
                v = o.get(k)
                row.append(_td(_value(v), "n" if _finite(v) else ""))
            body.append(row)
        html_ += _table(head, body)
    return html_


def _layer_table(rows: Sequence[Dict[str, Any]]) -> str:
    head = ["layer", "op", "shape", "sparsity", "params", "nonzeros", "MACs", "pattern", "note"]
    body = []
    for r in rows:
        shape, shape_after = r.get("shape") or [], r.get("shape_after") or []
        shape_text = _shape(shape) if shape == shape_after else \
            f"{_shape(shape)} {ARROW} {_shape(shape_after)}"
        pattern = "/".join(p for p in (r.get("pattern"), r.get("criterion")) if p)
        body.append([
            _td(r.get("name"), "name"), _td(r.get("op_type")), _td(shape_text),
            _td(_change(r.get("sparsity_before"), r.get("sparsity_after"), _pct), "n"),
            _td(_change(r.get("params"), r.get("params_after"), format_count), "n"),
            _td(_change(r.get("nonzeros_before"), r.get("nonzeros_after"), format_count), "n"),
            _td("" if r.get("macs_before") is None else
                _change(r.get("macs_before"), r.get("macs_after"), format_count), "n"),
            _td(pattern), _td(r.get("note") or "")])
    return _table(head, body)


def _extra_section(name: str, rows: Sequence[Dict[str, Any]], charts) -> str:
    body = ""
    if charts is not None:
        if _sensitivity_columns(rows):
            body += _chart_div(charts, lambda: _sensitivity_chart(rows))
        elif all("sparsity" in r and "rel_error" in r for r in rows):
            body += _chart_div(charts, lambda: _search_chart(rows))
    columns: List[str] = []
    for r in rows:
        for k in r:
            if k not in columns:
                columns.append(str(k))
    body += _table(columns, [[_td(_value(r.get(c)), "n" if isinstance(r.get(c), (int, float))
                                  else "") for c in columns] for r in rows])
    return body


# -- charts -------------------------------------------------------------------------------------
def _chart_backend():
    """matplotlib's pyplot on the Agg backend, or None when matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _chart_div(plt, draw: Callable[[], Any]) -> str:
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "onnxprune", "font.size": 9}):
        fig = draw()
        try:
            buf = io.StringIO()
            fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None})
        finally:
            plt.close(fig)
    return f"<div class=\"chart\">{_clean_svg(buf.getvalue())}</div>"


def _clean_svg(svg: str) -> str:
    """matplotlib's SVG file as inline markup: no XML prolog, DOCTYPE, comments or metadata, and
    no namespace URLs (HTML parses inline SVG without them)."""
    svg = svg[svg.index("<svg"):]
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    svg = re.sub(r"<metadata>.*?</metadata>", "", svg, flags=re.S)
    svg = re.sub(r'\s+xmlns(:\w+)?="[^"]*"', "", svg)
    return svg.strip()


def _layer_chart(rows: Sequence[Dict[str, Any]]):
    import matplotlib.pyplot as plt

    shown = list(rows)
    if len(shown) > CHART_LAYERS:
        shown = sorted(shown, key=lambda r: -(r.get("params") or 0))[:CHART_LAYERS]
        order = {id(r): i for i, r in enumerate(rows)}
        shown.sort(key=lambda r: order[id(r)])
    names = [_short(r.get("name")) for r in shown]
    y = list(range(len(shown)))
    height = max(2.2, 0.26 * len(shown) + 1.0)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, height), sharey=True)
    before = [100 * (r.get("sparsity_before") or 0) for r in shown]
    after = [100 * (r.get("sparsity_after") or 0) for r in shown]
    ax1.barh([v + 0.2 for v in y], before, height=0.4, color="#9ca3af", label="before")
    ax1.barh([v - 0.2 for v in y], after, height=0.4, color="#2563eb", label="after")
    ax1.set_xlim(0, 100)
    ax1.set_xlabel("sparsity (% zeros)")
    ax1.set_yticks(y)
    ax1.set_yticklabels(names)
    ax1.set_ylim(len(shown) - 0.5, -0.5)  # first layer on top, no blank margins
    ax1.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=2, fontsize=8, frameon=False)
    p_before = [r.get("params") or 0 for r in shown]
    nz_after = [r.get("nonzeros_after") or 0 for r in shown]
    p_after = [r.get("params_after") or 0 for r in shown]
    ax2.barh([v + 0.27 for v in y], p_before, height=0.27, color="#9ca3af", label="params before")
    ax2.barh(y, p_after, height=0.27, color="#93c5fd", label="params after")
    ax2.barh([v - 0.27 for v in y], nz_after, height=0.27, color="#2563eb",
             label="nonzeros after")
    ax2.set_xlabel("elements")
    if max(p_before + [1]) / max(1, min([p for p in p_before if p] or [1])) > 100:
        ax2.set_xscale("log")
    ax2.legend(loc="lower center", bbox_to_anchor=(0.5, 1.0), ncol=3, fontsize=8, frameon=False)
    if len(shown) < len(rows):
        ax1.set_title(f"the {len(shown)} largest of {len(rows)} layers", fontsize=9, pad=18)
    for ax in (ax1, ax2):
        ax.grid(axis="x", color="#e5e7eb")
        ax.set_axisbelow(True)
    fig.tight_layout()
    return fig


_ERR_KEY = re.compile(r"^err@(.+)$")


def _sensitivity_columns(rows: Sequence[Dict[str, Any]]) -> List[Tuple[str, float]]:
    """``[(column, sparsity)]`` of a sensitivity table's ``err@S`` columns, by sparsity."""
    cols = {}
    for r in rows:
        for k in r:
            m = _ERR_KEY.match(str(k))
            if m:
                try:
                    cols[k] = float(m.group(1))
                except ValueError:
                    pass
    return sorted(cols.items(), key=lambda kv: kv[1])


def _sensitivity_chart(rows: Sequence[Dict[str, Any]]):
    import matplotlib.pyplot as plt

    cols = _sensitivity_columns(rows)
    shown = sorted(rows, key=lambda r: -(r.get("params") or 0))[:CHART_CURVES]
    fig, ax = plt.subplots(figsize=(8, 4))
    log = True
    for r in shown:
        xs = [100 * s for c, s in cols if _finite(r.get(c))]
        ys = [float(r[c]) for c, _ in cols if _finite(r.get(c))]
        if not xs:
            continue
        log = log and all(v > 0 for v in ys)
        ax.plot(xs, ys, marker="o", markersize=3, label=_short(r.get("weight", r.get("name")),
                                                                   32))
    if log:
        ax.set_yscale("log")
    ax.set_xlabel("sparsity of the layer alone (%)")
    ax.set_ylabel("output error")
    title = "error when each layer alone is pruned"
    if len(shown) < len(rows):
        title += f" (the {len(shown)} largest of {len(rows)} layers)"
    ax.set_title(title, fontsize=9)
    ax.grid(color="#e5e7eb")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    return fig


def _search_chart(rows: Sequence[Dict[str, Any]]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3))
    pts = [(100 * float(r["sparsity"]), float(r["rel_error"]), bool(r.get("passed")))
           for r in rows if _finite(r.get("sparsity")) and _finite(r.get("rel_error"))]
    for ok, color, label in ((True, "#15803d", "within --max-error"),
                             (False, "#b91c1c", "over --max-error")):
        sel = [(x, y) for x, y, p in pts if p == ok]
        if sel:
            ax.scatter([x for x, _ in sel], [y for _, y in sel], color=color, label=label, s=24)
    ax.set_xlabel("sparsity probed (%)")
    ax.set_ylabel("relative max error")
    ax.grid(color="#e5e7eb")
    if pts:
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# -- formatting ---------------------------------------------------------------------------------
def _e(x: Any) -> str:
    """``x`` as HTML text: markup characters escaped, control characters shown as escapes."""
    return html.escape(printable("" if x is None else x, keep_newlines=True), quote=True)


def _td(x: Any, cls: str = "") -> str:
    return f"<td class=\"{cls}\">{_e(x)}</td>" if cls else f"<td>{_e(x)}</td>"


def _table(columns: Sequence[str], body: Sequence[Sequence[str]], show_head: bool = True,
           cls: str = "") -> str:
    """A table of ``body`` rows of ready ``<td>`` cells under the escaped ``columns``."""
    head = ("<thead><tr>" + "".join(f"<th>{_e(c)}</th>" for c in columns) + "</tr></thead>"
            if show_head else "")
    rows = "".join("<tr>" + "".join(cells) + "</tr>" for cells in body)
    attr = f" class=\"{cls}\"" if cls else ""
    return f"<table{attr}>{head}<tbody>{rows}</tbody></table>"


def _section(title: str, body: str) -> str:
    return f"<section><h2>{_e(title)}</h2>{body}</section>"


def _badge(verdict: Any) -> str:
    if verdict is None:
        return ""
    cls = re.sub(r"[^a-z]", "", str(verdict).lower())
    return f"<span class=\"badge {cls}\">{_e(verdict)}</span>"


def _value(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return _num(v)
    if isinstance(v, list) and all(isinstance(x, int) and not isinstance(x, bool) for x in v):
        return _shape(v)
    if isinstance(v, dict):
        return "; ".join(f"{k}: {_value(x)}" for k, x in v.items())
    if isinstance(v, list):
        return ", ".join(_value(x) for x in v) if all(
            not isinstance(x, (dict, list)) for x in v) else json.dumps(v, ensure_ascii=False)
    return str(v)


def _num(x: Any, fmt: str = ".4g") -> str:
    if not _finite(x):
        return "—"
    return format(float(x), fmt)


def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape) if len(shape) else "scalar"


def _change(before: Any, after: Any, fmt: Callable[[Any], str]) -> str:
    if after is None or after == before:
        return fmt(before)
    return f"{fmt(before)} {ARROW} {fmt(after)}"


def _short(name: Any, width: int = 40) -> str:
    """A chart label: ``name`` printable, its end kept when too long, ``$`` escaped (a name is
    text, not matplotlib math)."""
    text = printable("" if name is None else name)
    text = text if len(text) <= width else "…" + text[-(width - 1):]
    return text.replace("$", r"\$")


__all__ = ["CHART_CURVES", "CHART_LAYERS", "INSTALL_HINT", "render_html"]

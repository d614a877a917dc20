"""The per-layer report: what a run (or ``onnxprune inspect``) found and did, as data.

:class:`Report` and :class:`LayerRow` are plain dataclasses the passes fill in; this module owns
how they are shown — a rich table on the terminal (:meth:`Report.render`), JSON
(:meth:`Report.to_dict`, :meth:`Report.write_json`; layout in ``report.schema.json``, versioned
by :data:`SCHEMA_VERSION`) or an HTML page (:meth:`Report.write`, :mod:`onnxprune.report.html`) — so the CLI, the Python
API and ``inspect`` share one format. Sizes are shown in human units (params and MACs in K/M/G, files in KiB/MiB).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
from rich import box
from rich.console import Console
from rich.segment import Segment
from rich.table import Table
from rich.text import Text

from onnxprune.report.compare import Comparison, tolerance_for
from onnxprune.text import printable

ARROW = "→"
#: The note (and the CLI's warning) of a run that pruned nothing (:meth:`Report.flag_noop`).
NOOP_NOTE = ("nothing was pruned: no weight gained a zero and no channel was removed (the "
             "selected weights may already be at the target sparsity, or the selection left "
             "every weight alone); raise --sparsity or widen the selection")

#: Version of the report's JSON layout (:meth:`Report.to_dict`, described by
#: ``report.schema.json`` beside this module): raised whenever a key is renamed, removed or
#: changes meaning; new optional keys inside ``comparison``/``options``/``sections`` do not raise it.
SCHEMA_VERSION = 1


@dataclass
class LayerRow:
    """One prunable weight before and after pruning.

    ``params`` counts elements of the stored tensor (``shape``) and ``params_after`` those of the
    resized one (``shape_after``; fewer only when channels were removed). ``channels`` is
    (output channels before, after) for channel pruning. ``macs_before``/``macs_after`` are the
    MACs of the node(s) reading the weight, when counted.
    """

    name: str
    op_type: str
    shape: Tuple[int, ...]
    shape_after: Tuple[int, ...]
    params: int
    params_after: int
    nonzeros_before: int
    nonzeros_after: int
    pattern: str = ""
    criterion: str = ""
    channels: Optional[Tuple[int, int]] = None
    note: str = ""
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None

    @property
    def sparsity_before(self) -> float:
        return _sparsity(self.nonzeros_before, self.params)

    @property
    def sparsity_after(self) -> float:
        return _sparsity(self.nonzeros_after, self.params_after)

    def to_dict(self) -> dict:
        d = _jsonable(dataclasses.asdict(self))
        d["sparsity_before"] = self.sparsity_before
        d["sparsity_after"] = self.sparsity_after
        return d


def _sparsity(nonzeros: int, params: int) -> float:
    return 1.0 - nonzeros / params if params else 0.0


@dataclass
class Report:
    """Everything a run reports: per-layer rows, totals, validation, and what was left alone.

    ``skipped`` lists weights not pruned and ``frozen`` channel groups left whole, each as
    ``(name, reason)``. ``sections`` holds extra tables (``title -> list of row dicts``, e.g. a
    sensitivity scan); ``timings`` seconds per step.
    """

    model: str
    output: Optional[str] = None
    rows: List[LayerRow] = field(default_factory=list)
    skipped: List[Tuple[str, str]] = field(default_factory=list)
    frozen: List[Tuple[str, str]] = field(default_factory=list)
    macs_before: Optional[int] = None
    macs_after: Optional[int] = None
    sparse_macs_after: Optional[int] = None
    params_before: int = 0
    params_after: int = 0
    nonzeros_before: int = 0
    nonzeros_after: int = 0
    file_size_before: Optional[int] = None
    file_size_after: Optional[int] = None
    comparison: Optional[Comparison] = None
    warnings: List[str] = field(default_factory=list)  # said on stderr too (broken verdicts)
    options: Dict[str, Any] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    timings: Dict[str, float] = field(default_factory=dict)
    sections: Dict[str, List[Dict[str, Any]]] = field(default_factory=dict)
    metric: Optional[Dict[str, Any]] = None  # the user's: {"source", "dense", "pruned", "drop"}
    noop: bool = False

    @property
    def sparsity_before(self) -> float:
        return _sparsity(self.nonzeros_before, self.params_before)

    @property
    def sparsity_after(self) -> float:
        return _sparsity(self.nonzeros_after, self.params_after)

    def flag_noop(self) -> bool:
        """Set :attr:`noop` (and add :data:`NOOP_NOTE` to the notes) when the run changed no
        weight: no new zero and no channel removed. Returns :attr:`noop`."""
        self.noop = (self.nonzeros_after >= self.nonzeros_before
                     and self.params_after == self.params_before)
        if self.noop and NOOP_NOTE not in self.notes:
            self.notes.append(NOOP_NOTE)
        return self.noop

    # -- JSON ---------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        """A JSON-safe dict: the dataclass fields (tuples as lists, numpy as Python, inf/nan as
        null) plus ``sparsity_before``/``sparsity_after`` totals; ``skipped``/``frozen`` entries
        become ``{"name", "reason"}`` objects."""
        from onnxprune import __version__

        return {
            "tool": {"name": "onnxprune", "version": __version__},
            "schema_version": SCHEMA_VERSION,
            "model": self.model,
            "output": self.output,
            "params_before": int(self.params_before),
            "params_after": int(self.params_after),
            "nonzeros_before": int(self.nonzeros_before),
            "nonzeros_after": int(self.nonzeros_after),
            "sparsity_before": self.sparsity_before,
            "sparsity_after": self.sparsity_after,
            "macs_before": _opt_int(self.macs_before),
            "macs_after": _opt_int(self.macs_after),
            "sparse_macs_after": _opt_int(self.sparse_macs_after),
            "file_size_before": _opt_int(self.file_size_before),
            "file_size_after": _opt_int(self.file_size_after),
            "rows": [r.to_dict() for r in self.rows],
            "skipped": [{"name": n, "reason": r} for n, r in self.skipped],
            "frozen": [{"name": n, "reason": r} for n, r in self.frozen],
            "comparison": None if self.comparison is None else self.comparison.to_dict(),
            "warnings": [str(w) for w in self.warnings],
            "options": _jsonable(self.options),
            "notes": [str(n) for n in self.notes],
            "timings": _jsonable(self.timings),
            "sections": _jsonable(self.sections),
            "metric": _jsonable(self.metric),
            "noop": bool(self.noop),
        }

    def write(self, path: Union[str, os.PathLike], force: bool = True) -> Path:
        """Write the report in the format its suffix names: ``.html``/``.htm`` a self-contained
        page (:meth:`html_text`), anything else JSON (:meth:`json_text`)."""
        if Path(path).suffix.lower() in (".html", ".htm"):
            return self._write_text(path, self.html_text(), force)
        return self.write_json(path, force)

    def write_json(self, path: Union[str, os.PathLike], force: bool = True) -> Path:
        """Write :meth:`to_dict` as indented JSON, atomically (temp file beside it, then an
        exclusive create, or a replace with ``force``; see :mod:`onnxprune.model.output`)."""
        return self._write_text(path, self.json_text() + "\n", force)

    def write_html(self, path: Union[str, os.PathLike], force: bool = True) -> Path:
        """Write :meth:`html_text`, atomically as :meth:`write_json`."""
        return self._write_text(path, self.html_text(), force)

    @staticmethod
    def _write_text(path: Union[str, os.PathLike], text: str, force: bool) -> Path:
        from onnxprune.model.output import write_atomic

        def write(tmp: str) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                f.write(text)

        return write_atomic(Path(os.path.realpath(path)), write, force, "report")

    def html_text(self) -> str:
        """The report as one self-contained HTML page (:mod:`onnxprune.report.html`)."""
        from onnxprune.report.html import render_html

        return render_html(self.to_dict())

    def json_text(self) -> str:
        """:meth:`to_dict` as indented JSON text (``--report -``)."""
        return json.dumps(self.to_dict(), indent=2, allow_nan=False)

    # -- terminal -----------------------------------------------------------------------------
    def render(self, console: Console, max_rows: int = 60) -> None:
        """Print the report: per-layer table (first and last rows of long ones), totals, MACs,
        params, file size, validation per output, skipped/frozen weights, notes, extra
        sections and timings.

        Names come from the model (untrusted): every cell is escaped with
        :func:`~onnxprune.text.printable` before layout, and whatever reaches the console is
        escaped again (:class:`_Escaped`), so no control character a name carries is printed
        raw."""
        print_ = console.print

        def show(renderable) -> None:
            print_(_Escaped(renderable))

        title = f"onnxprune: {self.model}" + (f" {ARROW} {self.output}" if self.output else "")
        # A line of its own: a table title would wrap at the table's width.
        show(_text(title, style="bold"))
        if self.rows:
            show(self._layer_table(max_rows))
        else:
            show("no prunable weights")
        show(self._summary())
        if self.comparison is not None:
            show(self._comparison_table())
            for line in self._verdict_lines():
                show(_text(line, style="dim"))
        for label, items in (("skipped", self.skipped), ("frozen", self.frozen)):
            if items:
                show(_name_reason_table(label, items, max_rows))
        for title_, rows in self.sections.items():
            if rows:
                show(_dict_table(title_, rows, max_rows))
        if self.notes:
            show(_text("notes", style="bold"))
            for note in self.notes:
                show(_text(f"  • {note}"))
        if self.timings:
            parts = ", ".join(f"{k} {v:.2f}s" for k, v in self.timings.items())
            show(_text(f"time: {parts}", style="dim"))

    def _layer_table(self, max_rows: int) -> Table:
        rows = self.rows
        changed = any(r.shape_after != r.shape or r.nonzeros_after != r.nonzeros_before
                      or r.params_after != r.params for r in rows)
        show_channels = any(r.channels is not None for r in rows)
        show_macs = any(r.macs_before is not None for r in rows)
        # One pattern/criterion for every row (the usual run) goes in the summary instead.
        show_pattern = len({(r.pattern, r.criterion) for r in rows}) > 1
        show_note = any(r.note for r in rows)

        table = _table(None)
        longest = max(len(r.name) for r in rows)
        table.add_column("layer", overflow="fold", min_width=min(longest, 40))
        table.add_column("op", no_wrap=True)
        table.add_column("shape", overflow="fold")
        table.add_column("sparsity", justify="right", no_wrap=True)
        table.add_column("params", justify="right", no_wrap=True)
        if show_channels:
            table.add_column("channels", justify="right", no_wrap=True)
        if show_macs:
            table.add_column("MACs", justify="right", no_wrap=True)
        if show_pattern:
            table.add_column("pattern", overflow="fold")
        if show_note:
            table.add_column("note", overflow="fold")

        def cells(r: LayerRow) -> List[str]:
            shape = _shape_change(r.shape, r.shape_after)
            sparsity = _pct(r.sparsity_before)
            if changed:
                sparsity += f" {ARROW} {_pct(r.sparsity_after)}"
            params = _before_after(r.params, r.params_after, format_count)
            out: List[Union[str, Text]] = [_text(r.name), _text(r.op_type), shape, sparsity, params]
            if show_channels:
                out.append("" if r.channels is None
                           else f"{r.channels[0]} {ARROW} {r.channels[1]}")
            if show_macs:
                out.append("" if r.macs_before is None
                           else _before_after(r.macs_before, r.macs_after, format_count))
            if show_pattern:
                out.append(_text("/".join(p for p in (r.pattern, r.criterion) if p)))
            if show_note:
                out.append(_text(r.note))
            return out

        head, tail = _head_tail(len(rows), max_rows)
        for r in rows[:head]:
            table.add_row(*cells(r))
        hidden = len(rows) - head - tail
        if hidden > 0:
            table.add_row(f"… {hidden} more", *[""] * (len(table.columns) - 1), style="dim")
        for r in rows[len(rows) - tail:] if tail else []:
            table.add_row(*cells(r))
        return table

    def _summary(self) -> Table:
        grid = Table.grid(padding=(0, 2))
        grid.add_column(style="bold")
        grid.add_column()
        grid.add_row("weights", f"{len(self.rows)} prunable, sparsity "
                     f"{_before_after(self.sparsity_before, self.sparsity_after, _pct)}")
        methods = {(r.pattern, r.criterion) for r in self.rows}
        if len(methods) == 1:
            method = "/".join(p for p in next(iter(methods)) if p)
            if method:
                grid.add_row("pattern", method)
        grid.add_row("params", _before_after(self.params_before, self.params_after,
                                             format_count, ratio=True))
        grid.add_row("nonzeros", _before_after(self.nonzeros_before, self.nonzeros_after,
                                               format_count, ratio=True))
        if self.macs_before is not None:
            text = _before_after(self.macs_before, self.macs_after, format_count, ratio=True)
            if self.sparse_macs_after is not None and self.sparse_macs_after != self.macs_after:
                text += f" (with sparse kernels: {format_count(self.sparse_macs_after)}"
                if self.macs_before:
                    text += f", ×{self.sparse_macs_after / self.macs_before:.2f}"
                text += ")"
            grid.add_row("MACs", text)
        if self.metric is not None:
            m = self.metric
            line = _text(f"{_num(m['dense'], '.6g')} {ARROW} {_num(m['pruned'], '.6g')} "
                         f"(drop {_num(m['drop'], '.3g')}; {m['source']})")
            line.overflow = "fold"  # the script's path in full, never cut
            grid.add_row("metric", line)
        if self.file_size_before is not None or self.file_size_after is not None:
            grid.add_row("file size", _before_after(self.file_size_before, self.file_size_after,
                                                    format_bytes, ratio=True))
        return grid

    def _comparison_table(self) -> Table:
        cmp = self.comparison
        gate = self.options.get("max_error")  # a float, or {output name: tolerance}
        table = _table(f"validation on {cmp.data_note}" if cmp.data_note
                       else "validation: reference vs pruned outputs")
        table.add_column("output", overflow="fold")
        table.add_column("shape", overflow="fold")
        table.add_column("measure", overflow="fold")
        for name in ("samples", "top-1", "top-5", "cosine", "rel err", "max abs"):
            table.add_column(name, justify="right", no_wrap=True)
        table.add_column("verdict", overflow="fold")
        styles = {"ok": "green", "unverified": "cyan", "degraded": "yellow", "broken": "red"}
        for s in cmp.outputs:
            row: List[Union[str, Text]] = [
                _text(s.name), _shape(s.shape),
                _text(s.metric if s.numeric else f"{s.metric} ({s.kind})"), str(s.samples),
                "" if s.top1_agreement is None else _pct(s.top1_agreement),
                "" if s.top5_agreement is None else _pct(s.top5_agreement),
                "" if s.cosine is None else _num(s.cosine, ".6f"),
                "" if not s.gated else _num(s.rel_error),
                "" if not s.gated else _num(s.max_abs)]
            if s.reason is None and s.metric == "exact":
                row[4] = _text(f"{_pct(s.equal)} equal")
            verdict = s.verdict if s.reason is None else f"{s.verdict}: {s.reason}"
            tol = None if gate is None else tolerance_for(gate, s.name)
            if s.reason is None and tol is not None and s.gated and not s.passed(tol):
                verdict += f" (rel err > --max-error {tol:g})"
            table.add_row(*row, _text(verdict, style=styles.get(s.verdict, "")))
        return table

    def _verdict_lines(self) -> List[str]:
        """What the verdicts mean: the thresholds of the measures the outputs used."""
        cmp = self.comparison
        lines = cmp.threshold_lines()
        out = [f"verdict thresholds: {'; '.join(lines)}"] if lines else []
        for o in cmp.outputs:
            if o.background is not None:
                c, share, _, overall = o.background
                out.append(f"top-1 of '{o.name}': counted where either model's top class is "
                           f"not class {c}, the reference's at {100 * share:.0f}% of the "
                           f"positions (a blank or background class); over every position "
                           f"{100 * overall:.1f}%")
        if not cmp.accuracy_estimate:
            out.append("generated inputs: these figures are not an accuracy estimate")
        return out


# -- formatting ---------------------------------------------------------------------------------
def _text(text: Any, style: str = "") -> Text:
    """A table cell or line of the report: ``text`` escaped (:func:`printable`), never parsed
    as markup."""
    return Text(printable(text, keep_newlines=True), style=style)


class _Escaped:
    """``renderable`` with every control character in its text segments escaped: the last
    guard between a model's names and the terminal (rich's own control segments, such as
    colours, pass unchanged)."""

    def __init__(self, renderable):
        self.renderable = renderable

    def __rich_console__(self, console, options):
        renderable = self.renderable
        if isinstance(renderable, str):
            renderable = console.render_str(renderable)
        for segment in console.render(renderable, options):
            if segment.control or segment.text == "\n":
                yield segment
            else:
                yield Segment(printable(segment.text, keep_newlines=True), segment.style)



def format_count(n: Optional[float]) -> str:
    """``1234567`` -> ``'1.23M'`` (SI prefixes K, M, G, T; exact below 1000)."""
    if n is None:
        return "—"
    n = float(n)
    for div, unit in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return f"{n:.0f}"


def format_bytes(n: Optional[float]) -> str:
    """``1536`` -> ``'1.5 KiB'`` (binary units, as ``ls -lh``)."""
    if n is None:
        return "—"
    n = float(n)
    for div, unit in ((1 << 40, "TiB"), (1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{n:.0f} B"


def _pct(x: Optional[float]) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _num(x: Optional[float], fmt: str = ".3g") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "—"
    return format(x, fmt)


def _shape(shape: Sequence[int]) -> str:
    return "×".join(str(d) for d in shape) if len(shape) else "scalar"


def _shape_change(before: Sequence[int], after: Sequence[int]) -> str:
    """``(128, 64, 3, 3), (96, 64, 3, 3)`` -> ``'128→96×64×3×3'``: arrows on changed dims."""
    if tuple(before) == tuple(after):
        return _shape(before)
    if len(before) != len(after):
        return f"{_shape(before)} {ARROW} {_shape(after)}"
    return "×".join(str(b) if b == a else f"{b}{ARROW}{a}" for b, a in zip(before, after))


def _before_after(before, after, fmt, ratio: bool = False) -> str:
    if after is None or after == before:
        return fmt(before)
    text = f"{fmt(before)} {ARROW} {fmt(after)}"
    if ratio and before:
        text += f" (×{after / before:.2f})"
    return text


def _table(title: Optional[str]) -> Table:
    # No vertical rules: layer names and shapes get the width.
    return Table(title=title, title_justify="left", title_style="bold", box=box.SIMPLE_HEAD,
                 pad_edge=False, collapse_padding=True)


def _head_tail(n: int, max_rows: int) -> Tuple[int, int]:
    """How many rows to show from the start and the end of a table of ``n`` rows."""
    if n <= max_rows or max_rows <= 0:
        return n, 0
    head = (max_rows + 1) // 2
    return head, max_rows - head


def _name_reason_table(title: str, items: Sequence[Tuple[str, str]], max_rows: int) -> Table:
    table = _table(f"{title} ({len(items)})")
    table.add_column("name", overflow="fold")
    table.add_column("reason", overflow="fold")
    head, tail = _head_tail(len(items), max_rows)
    for name, reason in items[:head]:
        table.add_row(_text(str(name)), _text(str(reason)))
    if len(items) - head - tail > 0:
        table.add_row(f"… {len(items) - head - tail} more", "", style="dim")
    for name, reason in items[len(items) - tail:] if tail else []:
        table.add_row(_text(str(name)), _text(str(reason)))
    return table


def _dict_table(title: str, rows: Sequence[Dict[str, Any]], max_rows: int) -> Table:
    columns: List[str] = []
    for row in rows:
        for key in row:
            if key not in columns:
                columns.append(str(key))
    table = _table(title)
    for col in columns:
        table.add_column(printable(col), overflow="fold")

    def cell(v: Any) -> Text:
        if isinstance(v, float):
            return _text(_num(v))
        if isinstance(v, (list, tuple)) and all(isinstance(x, (int, np.integer)) for x in v):
            return _text(_shape(v))
        return _text("" if v is None else str(v))

    head, tail = _head_tail(len(rows), max_rows)
    for row in rows[:head]:
        table.add_row(*[cell(row.get(c)) for c in columns])
    if len(rows) - head - tail > 0:
        table.add_row(f"… {len(rows) - head - tail} more", *[""] * (len(columns) - 1),
                      style="dim")
    for row in rows[len(rows) - tail:] if tail else []:
        table.add_row(*[cell(row.get(c)) for c in columns])
    return table


# -- JSON conversion ----------------------------------------------------------------------------
def _opt_int(x) -> Optional[int]:
    return None if x is None else int(x)


def _jsonable(x: Any) -> Any:
    """Tuples -> lists, numpy -> Python, Paths -> str, inf/nan -> None, objects with
    ``to_dict`` -> their dict, recursively."""
    if x is None or isinstance(x, (bool, str, int)):
        return x
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, np.bool_):
        return bool(x)
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return _jsonable(float(x))
    if isinstance(x, np.ndarray):
        return _jsonable(x.tolist())
    if isinstance(x, os.PathLike):
        return os.fspath(x)
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in x]
    if hasattr(x, "to_dict"):
        return _jsonable(x.to_dict())
    if dataclasses.is_dataclass(x) and not isinstance(x, type):
        return _jsonable(dataclasses.asdict(x))
    return str(x)

"""The one way a benchmark tool writes its section of a ``benchmarks/*.md`` page: the text
between its ``<!-- ...: begin -->`` and ``<!-- ...: end -->`` markers is replaced (what is around
it, other tools' sections and hand-written prose, stays); a page without them gets it appended."""

from __future__ import annotations

from pathlib import Path


def write_marked(path: Path, text: str, begin: str, end: str) -> None:
    """Put ``text`` (starting with ``begin``, ending with ``end``) in place of ``path``'s
    ``begin``..``end`` span, or at its end when the page has no such span yet."""
    path = Path(path)
    old = path.read_text(encoding="utf-8") if path.exists() else ""
    text = text.rstrip("\n")
    if begin in old and end in old:
        new = old[:old.index(begin)] + text + old[old.index(end) + len(end):]
    else:
        new = (old.rstrip("\n") + "\n\n" if old.strip() else "") + text + "\n"
    path.write_text(new, encoding="utf-8")

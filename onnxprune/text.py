"""Showing untrusted text (tensor, node, input and file names from a model; messages that
quote them) on a terminal: :func:`printable`, the one escaping every place that shows a name
goes through (the ``error:`` line, the text report, notes, progress).

A model is untrusted input: a name like ``"\\x1b[2J"`` or ``"\\x1b]0;title\\x07"`` printed raw
would clear the screen, retitle the window or hide text. Control characters (C0, DEL, C1) and
the Unicode bidirectional overrides are shown as Python-style escapes (``\\x1b``, ``\\u202e``);
everything else is unchanged. JSON output needs none of this: ``json`` escapes them itself.
"""

from __future__ import annotations

import re

#: C0 controls, DEL, C1 controls, and bidi embeddings/overrides/isolates (they reorder text).
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


_SHORT = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escape(match: "re.Match[str]") -> str:
    char = match.group()
    if char in _SHORT:
        return _SHORT[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object, keep_newlines: bool = False) -> str:
    """``text`` (``str()`` of it) with every control character escaped; with
    ``keep_newlines`` a ``\\n`` stays a line break (for text laid out in lines)."""
    text = str(text)
    if keep_newlines:
        return "\n".join(_CONTROL.sub(_escape, line) for line in text.split("\n"))
    return _CONTROL.sub(_escape, text)

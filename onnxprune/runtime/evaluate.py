"""The user's own metric: ``function(session) -> float``, higher is better.

This module owns loading that function (``--eval-script file.py:function``, or a callable given
to the API as ``evaluate=``), calling it on an onnxruntime session of a model (the dense one or a
candidate), and checking what it returns. The function loads its own data and runs the session
it is given; onnxprune never sees the data.

Every mistake in the script is an :class:`~onnxprune.errors.OptionError` (exit 2) naming the
script and what is wrong: a missing file, no ``:function``, a missing or non-callable function,
an exception while importing it (caught when the options are built, before any work), and an
exception, a non-number or a non-finite number returned for the dense model (measured first, so
the user learns at once). On a pruned candidate a non-finite value is no error but a
measurement that fails every bound (a broken model can make a loss-like metric NaN); an
exception or a non-number is still an error there.
"""

from __future__ import annotations

import importlib.util
import itertools
import math
import numbers
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from onnxprune.errors import OptionError
from onnxprune.text import printable

#: One documented signature for every user metric.
SIGNATURE = "function(session) -> float (an onnxruntime.InferenceSession; higher is better)"

_COUNTER = itertools.count()


@dataclass(eq=False)
class Metric:
    """A user's metric: the function, how to name it in messages and the report (``source``:
    ``file.py:function`` or the callable's name), and the dense model's value once measured
    (:func:`onnxprune.api.prune` measures it first, once per run, so searches do not repeat it).
    """

    function: Callable[[Any], Any]
    source: str
    dense: Optional[float] = None

    def measure(self, model, role: str, finite: bool = True) -> float:
        """The metric of ``model`` (a path, proto or :class:`~onnxprune.model.io.ModelHandle`),
        run on a CPU ``InferenceSession`` of it. ``role`` names the model in messages (``"dense"``,
        ``"pruned"``). ``finite``: a NaN or infinity is an error (else it is returned as is)."""
        from onnxprune.runtime.session import InvalidOutputModel, open_session

        try:
            session = open_session(model)
        except InvalidOutputModel as exc:
            if role != "dense":  # a model onnxprune made that onnxruntime refuses: our bug
                raise
            raise OptionError(f"--eval-script {self.source} needs onnxruntime to run the model, "
                              f"but it cannot load the input model "
                              f"({exc.detail.splitlines()[0][:200]})") from None
        try:
            value = self.function(session)
        except Exception as exc:
            raise OptionError(f"--eval-script {self.source} raised on the {role} model: "
                              f"{_exception_text(exc)}; it must return a number, {SIGNATURE}"
                              ) from exc
        number = as_number(value)
        if number is None:
            raise OptionError(f"--eval-script {self.source} returned {_shown(value)} for the "
                              f"{role} model, not a number; it must be {SIGNATURE}")
        if finite and not math.isfinite(number):
            raise OptionError(f"--eval-script {self.source} returned {number} for the {role} "
                              f"model; it must return a finite number, {SIGNATURE}")
        return number


def as_number(value: Any) -> Optional[float]:
    """``value`` as a float when it is a real number (Python or numpy, a 0-d array included;
    never a bool), else None."""
    if isinstance(value, (bool, np.bool_)):
        return None
    if isinstance(value, np.ndarray):
        if value.ndim != 0 or value.dtype.kind not in "iuf":
            return None
        value = value.item()
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def load_metric(spec: Any) -> Metric:
    """``spec`` -> a :class:`Metric`: ``"path/to/file.py:function"`` (the file imported as a
    module of its own), a callable, or a :class:`Metric` (returned as it is)."""
    if isinstance(spec, Metric):
        return spec
    if isinstance(spec, (str, Path)):
        return _load_script(str(spec))
    if callable(spec):
        return Metric(spec, _callable_name(spec))
    raise OptionError(f"eval_script must be 'file.py:function' or a callable {SIGNATURE}, got "
                      f"{_shown(spec)}")


def _load_script(text: str) -> Metric:
    """Import ``file.py`` of ``"file.py:function"`` under a unique module name (its folder is
    on ``sys.path`` only while it is imported, so it can import files beside it) and return
    its ``function``."""
    path_text, sep, name = text.rpartition(":")
    shown = printable(text)
    if not sep or not path_text or not name:
        raise OptionError(f"--eval-script '{shown}': expected FILE.py:FUNCTION, e.g. "
                          f"metric.py:accuracy, naming {SIGNATURE}")
    if not name.isidentifier():
        raise OptionError(f"--eval-script '{shown}': '{printable(name)}' is not a function "
                          "name; expected FILE.py:FUNCTION")
    path = Path(path_text).expanduser()
    if not path.is_file():
        what = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise OptionError(f"--eval-script: {printable(path_text)} {what}; give the Python file "
                          "that defines the metric function")
    path = path.resolve()
    stem = re.sub(r"\W", "_", path.stem) or "script"
    module_name = f"onnxprune_eval_script_{next(_COUNTER)}_{stem}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise OptionError(f"--eval-script: {printable(path_text)} cannot be imported as a "
                          "Python module; give a .py file")
    module = importlib.util.module_from_spec(spec)
    folder = str(path.parent)
    sys.modules[module_name] = module  # dataclasses and pickling look modules up by name
    sys.path.insert(0, folder)
    try:
        spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:
        sys.modules.pop(module_name, None)
        raise OptionError(f"--eval-script: importing {printable(path_text)} raised "
                          f"{_exception_text(exc)}; fix the script") from exc
    finally:
        try:
            sys.path.remove(folder)  # the first occurrence: the one inserted above
        except ValueError:  # the script removed it itself
            pass
    source = f"{path_text}:{name}"
    if not hasattr(module, name):
        found = sorted(k for k, v in vars(module).items()
                       if callable(v) and not k.startswith("_")
                       and getattr(v, "__module__", None) == module_name)
        defined = f" (it defines {', '.join(found)})" if found else ""
        raise OptionError(f"--eval-script: {printable(path_text)} has no function "
                          f"'{printable(name)}'{defined}")
    function = getattr(module, name)
    if not callable(function):
        raise OptionError(f"--eval-script {printable(source)} is a {type(function).__name__}, "
                          f"not a function; it must be {SIGNATURE}")
    return Metric(function, printable(source))


def _callable_name(fn: Callable) -> str:
    name = getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None)
    if name is None:
        return printable(type(fn).__name__)
    module = getattr(fn, "__module__", None)
    return printable(f"{module}.{name}" if module and module != "__main__" else name)


def _exception_text(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return printable(f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__)


def _shown(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return printable(f"{text} (a {type(value).__name__})")

"""Pruning models that run together (``--with``): an encoder and its decoder as one.

:func:`prune_joint` loads every model, links them (:mod:`onnxprune.model.compose`: by name, or
``--link OUTPUT=INPUT``), prunes the joined model with the usual pipeline (calibration,
validation and the report work on it as on any model: its inputs are the first model's and
every input no link feeds), cuts the result back into one model per file, checks that the
pieces, run one after the other, give the joined model's outputs, and writes each atomically
as ``<stem>.pruned.onnx`` (the first at ``output``, the others beside it). Every output path is
checked before any work; nothing is written when a check fails.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np
import onnx

from onnxprune.errors import OptionError
from onnxprune.model import compose
from onnxprune.model import io as mio
from onnxprune.model.output import default_output
from onnxprune.model.sparse import summary as storage_summary
from onnxprune.options import PruneOptions


def _label(handle: mio.ModelHandle, k: int) -> str:
    if handle.path is None:
        return f"model{k + 1}"
    name = handle.path.name
    return name[:-len(".onnx")] if name.endswith(".onnx") else name


def _outputs(handles: List[mio.ModelHandle], output, force: bool) -> List[Path]:
    """Where each model goes: the first at ``output`` (default beside it), the others as
    ``<stem>.pruned.onnx`` in the same folder; all checked now, none the same file."""
    reads = [f for h in handles for f in mio.input_files(h)]
    first = mio.resolve_output(handles[0].path, output, force,
                               external=mio.needs_external(handles[0]), reads=reads)
    outs = [first]
    for h in handles[1:]:
        if h.path is None:
            raise OptionError("--with: the models pruned together must be files")
        target = first.parent / default_output(h.path).name
        if target in outs:
            raise OptionError(f"--with: two models would both be written to '{target}'; give "
                              "them different file names")
        outs.append(mio.resolve_output(h.path, target, force, external=mio.needs_external(h),
                                       reads=reads))
    return outs


def load_runs(model, with_models) -> Tuple[List[mio.ModelHandle], List[int]]:
    """One handle per file (a file given again is the same model run again: a decoder's next
    step) and, per run, its handle's index."""
    handles: List[mio.ModelHandle] = []
    runs: List[int] = []
    for source in [model, *with_models]:
        path = Path(source).resolve() if isinstance(source, (str, os.PathLike)) else None
        k = next((i for i, h in enumerate(handles) if path is not None and h.path == path),
                 None)
        if k is None:
            handles.append(mio.load(source))
            k = len(handles) - 1
        runs.append(k)
    return handles, runs


def join_files(runs: List[int], handles: List[mio.ModelHandle], link_specs=()
               ) -> compose.Joint:
    """The models run in order ``runs`` (indices into ``handles``) joined: links by name, or
    ``link_specs`` (``OUTPUT=INPUT``); :class:`OptionError` when nothing links them."""
    files = [_label(h, k) for k, h in enumerate(handles)]
    if len(set(files)) != len(files):
        files = [f"{lab}{k + 1}" for k, lab in enumerate(files)]
    labels = [files[k] + (f"#{runs[:t + 1].count(k)}" if runs[:t].count(k) else "")
              for t, k in enumerate(runs)]
    protos = [handles[k].model for k in runs]
    links = (compose.parse_links(protos, labels, link_specs) if link_specs
             else compose.find_links(protos))
    if not any(k.source != k.target for k in links):
        raise OptionError(
            f"--with: no output of {labels[0]} is an input of "
            f"{', '.join(labels[1:])} by name (outputs {[o.name for o in protos[0].graph.output]}"
            f"); name the links with --link OUTPUT=INPUT")
    return compose.join(protos, labels, links, read=lambda t, x: handles[runs[t]].read(x))


def prune_joint(model, opts: PruneOptions, output, force: bool, track, run: Callable):
    """Prune ``model`` and ``opts.with_models`` as one (see the module doc); ``run(model,
    opts, output, force, track)`` prunes the joined model (``api._prune``)."""
    from onnxprune.model.shapes import infer_shapes
    from onnxprune.ops.registry import complete_types

    if opts.save_plan is not None:
        raise OptionError("--save-plan records one model's graph; it is not available with "
                          "--with")
    handles, runs = load_runs(model, opts.with_models)
    outs = None if opts.dry_run else _outputs(handles, output, force)
    joint = join_files(runs, handles, opts.links)
    sub = replace(opts, with_models=(), links=())
    result = run(joint.model, sub, None, force, track)
    state = result.state
    shapes = infer_shapes(state.handle, opts.input_shapes, upgrade=False,
                          complete=complete_types).shapes
    parts = compose.split(state.handle.model, joint, shapes)
    note = _check_parts(joint, parts, state.handle, opts, state.full_check)
    result.report.notes.append("pruned together: " + "; ".join(joint.describe()))
    if note is not None:
        result.report.notes.append(note)
    result.parts = parts
    result.report.model = " + ".join(str(h.path) if h.path is not None else f"<model {k + 1}>"
                                     for k, h in enumerate(handles))
    before = [h.file_size() for h in handles]
    if None not in before:
        result.report.file_size_before = sum(before)
    if outs is not None:
        written = 0
        for part, out, h in zip(parts, outs, handles):
            stored: list = []
            with mio.load(part) as ph:
                mio.save(ph, out, force=force, **({} if opts.storage == "dense" else dict(
                    storage=opts.storage, decisions=stored)))
            size = mio.size_on_disk(out, part)
            written += size
            result.report.notes.append(f"wrote {out.name}: {_mib(h.file_size())} -> "
                                       f"{_mib(size)}")
            if stored:
                result.report.notes.append(f"{out.name}: " + storage_summary(
                    stored, opts.storage, size))
        result.report.file_size_after = written
        result.outputs = outs
        result.output = outs[0]
        result.report.output = ", ".join(str(o) for o in outs)
    result.model = parts[0]
    return result


def _mib(n: Optional[int]) -> str:
    if n is None:
        return "?"
    return f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


def _check_parts(joint: compose.Joint, parts: List[onnx.ModelProto], merged: mio.ModelHandle,
                 opts: PruneOptions, full_check: bool) -> Optional[str]:
    """The pieces, each checked and run one after the other on one generated input, give the
    joined model's outputs (a state's too); else an internal error (nothing is written). Where
    onnxruntime cannot run the joined model (custom ops), the pieces are held to onnx.checker
    and the returned note says so."""
    from onnxprune.inputs.generate import make_inputs
    from onnxprune.runtime.session import InvalidOutputModel, open_session, run_model
    from onnxprune.runtime.validate import check_valid

    try:
        session = open_session(merged)
    except InvalidOutputModel as exc:
        for part in parts:
            with mio.load(part) as handle:
                mio.check_graph(handle, full_check=full_check)
        return (f"onnxruntime cannot load the joined models ({exc.detail.splitlines()[0]}): "
                "the written pieces were checked with onnx.checker only, not run")
    for part in parts:
        check_valid(part, full_check=full_check)
    feed = make_inputs(merged, opts.input_shapes, seed=opts.seed)
    want = run_model(session, feed)
    values: Dict[str, np.ndarray] = dict(feed)  # joined names
    firsts = [k for k, p in enumerate(joint.parts) if p.first == k]
    for p in joint.parts:
        part = parts[firsts.index(p.first)]
        own = {p.names[v.name]: v.name for v in p.inputs}
        got = run_model(part, {own[k]: values[k] for k in own})
        values.update({p.names[k]: v for k, v in got.items()})
    for name, ref in want.items():
        if not _same(values[name], ref):
            raise AssertionError(f"joint pruning: output '{name}' of the pieces run one after "
                                 "the other differs from the joined model's (a bug; nothing "
                                 "was written)")
    return None


def _same(got, ref) -> bool:
    """Float outputs equal up to rounding scaled by their magnitude (the joined graph and its
    pieces may fuse differently); anything else (integers, strings, sequences, maps) equal."""
    if isinstance(ref, np.ndarray) and ref.dtype.kind == "f":
        finite = np.abs(ref[np.isfinite(ref)])
        scale = max(1.0, float(finite.max())) if finite.size else 1.0
        return bool(np.shape(got) == ref.shape and np.allclose(
            got, ref, rtol=1e-4, atol=1e-5 * scale, equal_nan=True))
    try:
        return bool(np.array_equal(np.asarray(got), np.asarray(ref)))
    except (TypeError, ValueError):
        return got == ref

"""The ``onnxprune`` command: a thin layer that maps options onto :func:`onnxprune.prune`.

``onnxprune MODEL [options]`` prunes; ``onnxprune inspect MODEL`` reports without changing.
User mistakes (:class:`~onnxprune.errors.OnnxPruneError`) print one line and exit 2 (1 for a
failed ``--max-error`` gate); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Optional

import click

from onnxprune import __version__
from onnxprune.masking.criteria import criterion_names
from onnxprune.errors import OnnxPruneError, OptionError
from onnxprune.model.io import default_output
from onnxprune.masking.patterns import pattern_help

#: Pruned when no MODEL is given, so a first run needs no file of one's own (models/digits_cnn.onnx).
DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "digits_cnn.onnx"


class DefaultToPrune(click.Group):
    """``onnxprune MODEL ...`` means ``onnxprune prune MODEL ...``; subcommands stay reachable."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h",
                                                                          "--version")):
            args = ["prune", *args]
        return super().parse_args(ctx, args)


@click.group(cls=DefaultToPrune, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="onnxprune")
def main() -> None:
    """Post-training pruning for ONNX models.

    \b
    onnxprune model.onnx --pattern 4x1 --sparsity 0.8   # writes model.pruned.onnx + report
    onnxprune inspect model.onnx                         # sparsity, params, MACs; no changes
    """


def _console(quiet: bool):
    from rich.console import Console

    return Console(stderr=False, quiet=quiet, highlight=False)


def _track(quiet: bool):
    if quiet:
        return None
    from rich.progress import track

    def tracker(items, description, total):
        if total < 8:
            return items
        return track(items, description=description, total=total, transient=True,
                     console=_err_console())

    return tracker


def _err_console():
    from rich.console import Console

    return Console(stderr=True)


def _npz_dict(path: Optional[str], what: str):
    if path is None:
        return None
    from onnxprune.inputs.files import read_npz

    return read_npz(path, what)


def _run(fn):
    """Run a command body, turning user errors into one line and exit code 2."""
    def on_term(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, on_term)
    try:
        return fn()
    except OnnxPruneError as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)


@main.command("prune")
@click.argument("model", required=False, type=click.Path(dir_okay=True, path_type=Path))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output path [default: <stem>.pruned.onnx beside the input].")
@click.option("--pattern", default="unstructured", show_default=True, help=pattern_help())
@click.option("--sparsity", type=float, default=None,
              help="Fraction of zeros in the selected weights, counting existing zeros "
                   "[default: 0.5; implied by N:M].")
@click.option("--criterion", default="magnitude", show_default=True,
              help=f"Importance criterion: {', '.join(criterion_names())}.")
@click.option("--scope", type=click.Choice(["local", "global"]), default="local",
              show_default=True, help="local: each weight reaches the target; global: one "
                                      "threshold across weights.")
@click.option("--op-types", default=None, help="Comma-separated op types to prune "
                                               "[default: all prunable].")
@click.option("--include", default=None, help="Regex: prune only weights/nodes whose name matches.")
@click.option("--exclude", default=None, help="Regex: skip weights/nodes whose name matches.")
@click.option("--config", type=click.Path(path_type=Path), default=None,
              help="JSON/YAML per-op rules (see README).")
@click.option("--min-sparsity", type=float, default=0.0, show_default=True,
              help="Global scope: lower bound per weight.")
@click.option("--max-sparsity", type=float, default=0.98, show_default=True,
              help="Global scope: upper bound per weight.")
@click.option("--scores", "scores_path", default=None,
              help=".npz of importance scores keyed by weight name (criterion 'scores').")
@click.option("--masks", "masks_path", default=None,
              help=".npz of keep-masks (1 = keep) keyed by weight name.")
@click.option("--round-to", type=int, default=1, show_default=True,
              help="Channel pattern: keep channel counts at multiples of this (8 or 16 pays "
                   "off on CPUs).")
@click.option("--min-channels", type=int, default=1, show_default=True,
              help="Channel pattern: channels kept at least, per group.")
@click.option("--resize/--no-resize", default=None,
              help="Remove channels physically [default: yes for unstructured and channel, "
                   "no for blocks and N:M, whose layout it would shift]. --no-resize keeps "
                   "every shape (channel pattern: masks only).")
@click.option("--prune-fixed", is_flag=True,
              help="Also prune tensors that look like fixed operands (ramps, DFT bases, "
                   "identity), which are left alone by default.")
@click.option("--input-shape", "input_shapes", multiple=True,
              help="Fix an input's dims for generated inputs and MACs: NAME:1x3x224x224.")
@click.option("--calibration", default=None,
              help="Calibration inputs: .npz (one array per input, axis 0 = samples), a folder "
                   "of .npy/.npz, or a folder of images (see --image-*).")
@click.option("--calibration-samples", type=int, default=128, show_default=True)
@click.option("--refit", is_flag=True,
              help="Channel pattern: refit consumers of removed channels by least squares on "
                   "the calibration data.")
@click.option("--bias-correction/--no-bias-correction", default=True, show_default=True,
              help="With calibration data: move each pruned layer's bias so its mean output "
                   "stays the dense model's.")
@click.option("--allocate", type=click.Choice(["auto", "uniform", "sensitivity"]),
              default="auto", show_default=True,
              help="sensitivity: measure each layer's output error on the calibration data and "
                   "spread the target where it hurts least; auto: sensitivity when "
                   "--calibration is given for a free-sparsity pattern (local scope, no "
                   "search), else uniform.")
@click.option("--image-size", default=None, help="Images: resize to HxW (e.g. 48x320).")
@click.option("--image-scale", type=float, default=1 / 255, show_default="1/255",
              help="Images: pixel multiplier before mean/std.")
@click.option("--image-mean", default=None, help="Images: per-channel mean, e.g. 0.5,0.5,0.5.")
@click.option("--image-std", default=None, help="Images: per-channel std, e.g. 0.5,0.5,0.5.")
@click.option("--image-layout", type=click.Choice(["NCHW", "NHWC"]), default="NCHW",
              show_default=True)
@click.option("--image-order", type=click.Choice(["RGB", "BGR"]), default="RGB",
              show_default=True)
@click.option("--inputs", "inputs_path", default=None,
              help=".npz of model inputs keyed by input name, for the comparison.")
@click.option("--no-validate", is_flag=True, help="Skip checker, onnxruntime and comparison.")
@click.option("--max-error", type=float, default=None,
              help="Fail (exit 1, nothing written) if the relative max error of any output "
                   "exceeds this.")
@click.option("--search", is_flag=True,
              help="With --max-error: find the highest sparsity (up to --sparsity, default "
                   "0.95) whose outputs stay within it.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write the report as JSON here.")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--memory-budget", type=int, default=256, show_default=True,
              help="MiB of scores held across weights; past it, scoring streams (models of any "
                   "size in bounded memory).")
@click.option("--force", is_flag=True, help="Overwrite an existing output file.")
@click.option("-q", "--quiet", is_flag=True, help="No report or progress on stdout.")
def prune_command(model, output, report_path, force, quiet, **flags):
    """Prune MODEL and write <stem>.pruned.onnx (MODEL defaults to the bundled digits CNN)."""

    def body():
        from onnxprune.api import prune

        path = model if model is not None else DEFAULT_MODEL
        out = output
        if out is None:  # the bundled model's output goes to the working folder, not the package
            out = default_output(path if model is not None else Path.cwd() / DEFAULT_MODEL.name)
        stamp = _stamp(out)
        try:
            result = prune(path, output=out, force=force,
                           track=_track(quiet) or (lambda items, d, t: items),
                           **_options(flags))
        except KeyboardInterrupt:
            if _stamp(out) != stamp:  # the signal came after the output was renamed into place
                click.echo(f"interrupted after {out} was completely written", err=True)
                sys.exit(130)
            raise
        except OnnxPruneError as exc:
            report = getattr(exc, "report", None)
            if report is not None:  # a failed --max-error gate: show why before the error
                _emit(report, report_path, quiet)
            raise
        _emit(result.report, report_path, quiet)
        if not quiet:
            click.echo(f"wrote {result.output}")

    _run(body)


def _stamp(path: Path):
    """What identifies the file at ``path`` now (None when there is none)."""
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return None


def _options(flags: dict) -> dict:
    """CLI flags -> :class:`onnxprune.api.PruneOptions` fields (the CLI adds no logic of its
    own: files become arrays, text becomes numbers, negated flags flip)."""
    from onnxprune.inputs.images import ImagePreprocess
    from onnxprune.inputs.signature import parse_input_shapes

    f = dict(flags)
    f["scores"] = _npz_dict(f.pop("scores_path"), "--scores")
    f["masks"] = _npz_dict(f.pop("masks_path"), "--masks")
    f["inputs"] = f.pop("inputs_path")
    f["validate"] = not f.pop("no_validate")
    f["guard_fixed"] = not f.pop("prune_fixed")
    f["input_shapes"] = parse_input_shapes(f["input_shapes"])
    f["memory_budget"] = f["memory_budget"] << 20
    image = {k: f.pop(f"image_{k}") for k in ("size", "scale", "mean", "std", "layout", "order")}
    if image["size"] or image["mean"] or image["std"]:
        f["image_preprocess"] = ImagePreprocess(
            size=_floats(image["size"], "--image-size", "x", int) if image["size"] else None,
            scale=image["scale"],
            mean=_floats(image["mean"], "--image-mean") if image["mean"] else (0.0, 0.0, 0.0),
            std=_floats(image["std"], "--image-std") if image["std"] else (1.0, 1.0, 1.0),
            layout=image["layout"], channel_order=image["order"])
    return f


def _floats(text: str, flag: str, sep: str = ",", kind=float) -> tuple:
    try:
        return tuple(kind(v) for v in text.replace(" ", "").split(sep))
    except ValueError:
        raise OptionError(f"{flag} '{text}': expected numbers separated by '{sep}'") from None


def _emit(report, report_path, quiet):
    if report_path is not None:
        report.write_json(report_path)
    report.render(_console(quiet))


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--input-shape", "input_shapes", multiple=True,
              help="Fix an input's dims for MACs: NAME:1x3x224x224.")
@click.option("--report", "report_path", type=click.Path(path_type=Path), default=None,
              help="Write the report as JSON here.")
@click.option("-q", "--quiet", is_flag=True)
def inspect_command(model, input_shapes, report_path, quiet):
    """Report sparsity, params and MACs of MODEL without changing it."""

    def body():
        from onnxprune.api import inspect
        from onnxprune.inputs.signature import parse_input_shapes

        report = inspect(model, parse_input_shapes(input_shapes))
        _emit(report, report_path, quiet)

    _run(body)


if __name__ == "__main__":  # pragma: no cover
    main()

"""The ``onnxprune`` command: a thin layer that maps options onto :func:`onnxprune.prune`.

``onnxprune MODEL [options]`` prunes; ``onnxprune inspect MODEL`` reports without changing.
The options are generated from :class:`~onnxprune.options.PruneOptions`' field metadata (help,
flag names, choices read from the registries, parsers) with the dataclass defaults, so this
module types none of them; it adds only what is no option of a run (output, report, force,
quiet). User mistakes (:class:`~onnxprune.errors.OnnxPruneError`) print one line and exit 2
(1 for a failed ``--max-error`` gate); anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import signal
import sys
from dataclasses import Field
from pathlib import Path
from typing import List, Optional, Union

import click

from onnxprune import __version__
from onnxprune.errors import OnnxPruneError
from onnxprune.model.io import default_output
from onnxprune.options import Flag, FlagGroup, cli_fields, from_cli, param_name
from onnxprune.text import printable

#: Pruned when no MODEL is given, so a first run needs no file of one's own (models/digits_cnn.onnx).
DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "digits_cnn.onnx"


class DefaultToPrune(click.Group):
    """``onnxprune MODEL ...`` means ``onnxprune prune MODEL ...``; subcommands stay reachable."""

    def parse_args(self, ctx, args):
        if not args or (args[0] not in self.commands and args[0] not in ("--help", "-h",
                                                                          "--version")):
            args = ["prune", *args]
        return super().parse_args(ctx, args)

    def main(self, *args, **kwargs):
        # click's own usage errors quote what the user typed (a path, a value): escape control
        # characters there too, like every other line the tool prints.
        try:
            kwargs.setdefault("standalone_mode", False)
            return super().main(*args, **kwargs)
        except click.exceptions.Exit as exc:
            sys.exit(exc.exit_code)
        except click.Abort:
            click.echo("interrupted: nothing was written", err=True)
            sys.exit(130)
        except click.ClickException as exc:
            import io

            shown = io.StringIO()
            exc.show(file=shown)
            click.echo(printable(shown.getvalue().rstrip("\n"), keep_newlines=True), err=True)
            sys.exit(exc.exit_code)


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
        return track(items, description=printable(description), total=total, transient=True,
                     console=_err_console())

    return tracker


def _err_console():
    from rich.console import Console

    return Console(stderr=True)


def _run(fn):
    """Run a command body, turning user errors into one line and exit code 2."""
    def on_term(signum, frame):
        raise KeyboardInterrupt
    # Every signal that ends the process unwinds like Ctrl-C, so temp files are removed.
    for name in ("SIGTERM", "SIGHUP", "SIGQUIT"):
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), on_term)
    try:
        return fn()
    except OnnxPruneError as exc:
        # one line, names escaped: a model's names reach messages, and the terminal
        click.echo(f"error: {printable(exc)}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted: nothing was written", err=True)
        sys.exit(130)


# -- options generated from PruneOptions -------------------------------------------------------

_CLICK_TYPES = {str: None, int: int, float: float, bool: bool,
                Path: click.Path(path_type=Path)}


def _click_option(name: str, key: str, flag: Flag, default) -> click.Option:
    """The click option ``name`` for ``flag`` (of field or group key ``key``), holding
    ``default`` when not given."""
    kwargs = dict(help=flag.help_text(), default=default, multiple=flag.multiple,
                  metavar=flag.metavar)
    if flag.switch:
        kwargs["is_flag"] = True
    elif flag.choices is not None:
        kwargs["type"] = click.Choice(list(flag.choices()))
    elif _CLICK_TYPES[flag.type] is not None:
        kwargs["type"] = _CLICK_TYPES[flag.type]
    if flag.default_text is not None:
        kwargs["show_default"] = flag.default_text
    elif not flag.switch and default is not None and not flag.multiple:
        kwargs["show_default"] = True
    return click.Option([flag.decl(key), name], **kwargs)


def _field_options(f: Field, spec: Union[Flag, FlagGroup]) -> List[click.Option]:
    if isinstance(spec, FlagGroup):
        return [_click_option(param_name(f, key), key, flag, None)
                for key, flag in spec.flags.items()]
    return [_click_option(param_name(f), f.name, spec, spec.cli_default(f.default))]


def option_params(command: str) -> List[click.Option]:
    """The click options of every :class:`PruneOptions` field ``command`` exposes."""
    return [opt for f, spec in cli_fields(command) for opt in _field_options(f, spec)]


def _report_option() -> click.Option:
    return click.Option(["--report", "report_path"], type=str, default=None, metavar="PATH",
                        help="Write the report as JSON here ('-': to stdout, and the text "
                             "report to stderr). Checked like -o before any work.")


def _force_option() -> click.Option:
    return click.Option(["--force"], is_flag=True,
                        help="Overwrite existing output/report files (never the input's).")


def _quiet_option() -> click.Option:
    return click.Option(["-q", "--quiet"], is_flag=True,
                        help="No report or progress on stdout.")


def build_main() -> click.Group:
    """The ``onnxprune`` command group, its options built from the fields and registries as
    they are now (a criterion registered before the call is a ``--criterion`` choice)."""

    @click.group(cls=DefaultToPrune, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(__version__, prog_name="onnxprune")
    def main() -> None:
        """Post-training pruning for ONNX models.

        \b
        onnxprune model.onnx --pattern 4x1 --sparsity 0.8   # writes model.pruned.onnx + report
        onnxprune inspect model.onnx                         # sparsity, params, MACs; no changes
        """

    prune_params = [
        click.Argument(["model"], required=False, type=click.Path(dir_okay=True, path_type=Path)),
        click.Option(["-o", "--output"], type=str, metavar="PATH",
                     help="Output path [default: <stem>.pruned.onnx beside the input]; a "
                          "folder (or a path ending in /) gets <stem>.pruned.onnx inside it."),
        *option_params("prune"),
        _report_option(),
        _force_option(),
        _quiet_option(),
    ]
    inspect_params = [
        click.Argument(["model"], type=click.Path(path_type=Path)),
        *option_params("inspect"),
        _report_option(),
        _force_option(),
        _quiet_option(),
    ]
    main.add_command(click.Command("prune", callback=prune_command, params=prune_params,
                                   help=prune_command.__doc__))
    main.add_command(click.Command("inspect", callback=inspect_command, params=inspect_params,
                                   help=inspect_command.__doc__))
    return main


def prune_command(model, output, report_path, force, quiet, **flags):
    """Prune MODEL and write <stem>.pruned.onnx (MODEL defaults to the bundled digits CNN)."""

    def body():
        from onnxprune.api import prune

        path = model if model is not None else DEFAULT_MODEL
        out = output
        if out is None:  # the bundled model's output goes to the working folder, not the package
            out = default_output(path if model is not None else Path.cwd() / DEFAULT_MODEL.name)
        report_path_ok = _check_report(report_path, path, force, output=out)
        stamp = _stamp(Path(out))
        try:
            result = prune(path, output=out, force=force,
                           track=_track(quiet) or (lambda items, d, t: items),
                           **from_cli(flags, "prune"))
        except KeyboardInterrupt:
            if _stamp(Path(out)) != stamp:  # the signal came after the output was renamed into place
                click.echo(f"interrupted after {printable(out)} was completely written",
                           err=True)
                sys.exit(130)
            raise
        except OnnxPruneError as exc:
            report = getattr(exc, "report", None)
            if report is not None:  # a failed --max-error gate: show why before the error
                _emit(report, report_path_ok, quiet, force)
            raise
        _emit(result.report, report_path_ok, quiet, force)
        if not quiet:
            click.echo(f"wrote {printable(result.output)}", err=report_path_ok == "-")

    _run(body)


def _stamp(path: Path):
    """What identifies the file at ``path`` now (None when there is none)."""
    try:
        st = path.stat()
        return st.st_ino, st.st_mtime_ns, st.st_size
    except OSError:
        return None


def _check_report(report_path: Optional[str], model, force: bool, output=None):
    """The ``--report`` path checked like ``-o`` before any work: never a file the input reads
    or the model ``output`` (as it will be written: a folder means the file inside it), only a
    regular file, an existing one only with ``--force``."""
    if report_path is None or report_path == "-":
        return report_path
    from onnxprune.model.io import input_files, load, resolve_output
    from onnxprune.model.output import check_output

    avoid = [] if output is None else [resolve_output(Path(model), output, force=True)]
    return check_output(report_path, force, input_files(load(model)), "report", avoid=avoid)


def _emit(report, report_path, quiet, force=False):
    if report_path == "-":  # JSON owns stdout; the text report goes to stderr
        click.echo(report.json_text())
        if not quiet:
            report.render(_err_console())
        return
    if report_path is not None:
        report.write(report_path, force=force)
    report.render(_console(quiet))


def inspect_command(model, report_path, force, quiet, **flags):
    """Report sparsity, params and MACs of MODEL without changing it."""

    def body():
        from onnxprune.api import inspect

        checked = _check_report(report_path, model, force)
        report = inspect(model, **from_cli(flags, "inspect"))
        _emit(report, checked, quiet, force)

    _run(body)


main = build_main()


if __name__ == "__main__":  # pragma: no cover
    main()

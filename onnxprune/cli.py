"""The ``onnxprune`` command: a thin layer that maps options onto :func:`onnxprune.prune`.

``onnxprune MODEL [options]`` prunes; ``onnxprune inspect MODEL`` reports without changing.
The options are generated from :class:`~onnxprune.options.PruneOptions`' field metadata (help,
flag names, choices read from the registries, parsers) with the dataclass defaults, so this
module types none of them; it adds only what is no option of a run (output, report, force,
quiet, logging). User mistakes (:class:`~onnxprune.errors.OnnxPruneError`) print one line and
exit 2 (1 for a failed gate: ``--max-error``, ``--min-agreement``, ``--min-metric``,
``--max-metric-drop``); a run that pruned nothing warns and exits 3 unless ``--allow-noop``; anything else is a bug and keeps its traceback.

Output: the report on stdout, laid out for a terminal when stdout is one, and as plain
full-width lines (never wrapped or cut at 80 columns) when it is piped or redirected. Log lines
(``-v``/``--log-level``; the ``onnxprune`` logger, configured here only) go to stderr.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from dataclasses import Field
from pathlib import Path
from typing import List, Optional, Union

import click

from onnxprune import __version__
from onnxprune.errors import OnnxPruneError
from onnxprune.model.io import default_output
from onnxprune.model.sparse import STORAGES
from onnxprune.options import Flag, FlagGroup, cli_fields, from_cli, param_name
from onnxprune.text import printable

#: Pruned when no MODEL is given, so a first run needs no file of one's own (models/digits_cnn.onnx).
DEFAULT_MODEL = Path(__file__).resolve().parent / "data" / "digits_cnn.onnx"
#: Exit code of a run that pruned nothing (no new zero, no channel removed) without --allow-noop.
EXIT_NOOP = 3
#: The console width when output is not a terminal: wide enough that no line is ever wrapped.
PLAIN_WIDTH = 1 << 16
#: ``--log-level`` choices (the ``onnxprune`` logger's level; default warning).
LOG_LEVELS = ("debug", "info", "warning", "error")

log = logging.getLogger("onnxprune.cli")  # not __name__: `python -m onnxprune.cli` is __main__


def version() -> str:
    """The installed distribution's version (``onnxprune.__version__`` when not installed)."""
    try:
        from importlib.metadata import version as dist_version

        return dist_version("onnxprune")
    except Exception:  # not installed (run from a source tree)
        return __version__


#: Options every command takes, which may also come before the command's name
#: (``onnxprune -v inspect model.onnx``); the value each takes (0 or 1 argument).
_LEADING_OPTIONS = {"-q": 0, "--quiet": 0, "-v": 0, "-vv": 0, "-vvv": 0, "--verbose": 0,
                    "--force": 0, "--log-level": 1}


def _command_first(args: List[str], commands) -> List[str]:
    """``[-v, inspect, m.onnx]`` -> ``[inspect, -v, m.onnx]``: the common options given before
    a command name move after it; anything else is left as it is."""
    i = 0
    while i < len(args):
        flag = args[i].split("=", 1)[0]
        if flag not in _LEADING_OPTIONS:
            break
        i += 1 + (_LEADING_OPTIONS[flag] if "=" not in args[i] else 0)
    if 0 < i < len(args) and args[i] in commands:
        return [args[i], *args[:i], *args[i + 1:]]
    return args


def _help_records(command: click.Command, ctx: click.Context, skip_help: bool = False):
    """The help lines of ``command``'s options (its -h/--help left out with ``skip_help``)."""
    return [rec for p in command.get_params(ctx)
            if isinstance(p, click.Option) and not (skip_help and "--help" in p.opts)
            and (rec := p.get_help_record(ctx))]


class DefaultToPrune(click.Group):
    """``onnxprune MODEL ...`` means ``onnxprune prune MODEL ...``; subcommands stay reachable."""

    def format_help(self, ctx, formatter):
        """The group's help with the prune options in full: ``onnxprune MODEL [OPTIONS]`` is
        the main use, so ``onnxprune --help`` shows what ``onnxprune prune --help`` shows, then
        the subcommands."""
        formatter.write_usage(ctx.command_path, "[MODEL] [OPTIONS]")
        formatter.write_usage(ctx.command_path, "COMMAND [ARGS]...", prefix="       ")
        self.format_help_text(ctx, formatter)
        prune = self.commands["prune"]
        prune_ctx = click.Context(prune, info_name="prune", parent=ctx)
        with formatter.section("Prune options (onnxprune [MODEL] or onnxprune prune [MODEL])"):
            formatter.write_dl(_help_records(prune, prune_ctx, skip_help=True))
        records = _help_records(self, ctx)
        with formatter.section("Other options"):
            formatter.write_dl(records)
        self.format_commands(ctx, formatter)
        self.format_epilog(ctx, formatter)

    def parse_args(self, ctx, args):
        args = _command_first(list(args), self.commands)
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


def _console(quiet: bool = False, stderr: bool = False):
    """The console the report is printed on: laid out for the terminal when the stream is one;
    otherwise plain full-width lines (no wrapping, no cut columns; see :func:`_print`)."""
    from rich.console import Console

    console = Console(stderr=stderr, quiet=quiet, highlight=False)
    if console.is_terminal:
        return console
    return Console(stderr=stderr, quiet=quiet, highlight=False, width=PLAIN_WIDTH,
                   soft_wrap=True)


def _print(report, console) -> None:
    """Render ``report`` on ``console``; off a terminal, every table row (a log is searched,
    not scrolled), each as one plain line, its table padding trimmed."""
    if console.is_terminal or console.quiet:
        report.render(console)
        return
    with console.capture() as captured:
        report.render(console, max_rows=0)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    click.echo(text, err=console.stderr)


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
    return _console(stderr=True)


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
                        help="Write the report here: a self-contained page for .html/.htm, "
                             "else JSON ('-': JSON to stdout, and the text report to stderr). "
                             "Checked like -o before any work.")


def _force_option() -> click.Option:
    return click.Option(["--force"], is_flag=True,
                        help="Overwrite existing output/report files (never the input's).")


def _quiet_option() -> click.Option:
    return click.Option(["-q", "--quiet"], is_flag=True,
                        help="No report or progress on stdout.")


def _logging_options() -> List[click.Option]:
    return [
        click.Option(["-v", "--verbose"], count=True,
                     help="Log what the run does on stderr: -v each step and its time (info), "
                          "-vv details (debug)."),
        click.Option(["--log-level"], type=click.Choice(LOG_LEVELS), default=None,
                     help="Level of the log lines on stderr (overrides -v) [default: warning]."),
    ]


class _EchoHandler(logging.Handler):
    """Log records as escaped lines on the current stderr (click's, so tests capture them)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            click.echo(printable(self.format(record), keep_newlines=True), err=True)
        except Exception:  # pragma: no cover - logging must never end the run
            self.handleError(record)


@contextlib.contextmanager
def _logging(verbose: int, log_level: Optional[str]):
    """The ``onnxprune`` logger at the level asked for (``--log-level``, else ``-v`` info,
    ``-vv`` debug, else warning) with a stderr handler, for the command's duration."""
    level = (log_level.upper() if log_level else
             "DEBUG" if verbose >= 2 else "INFO" if verbose == 1 else "WARNING")
    root = logging.getLogger("onnxprune")
    handler = _EchoHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(level)
    try:
        yield
    finally:
        root.removeHandler(handler)
        root.setLevel(old_level)


def _demo_output(folder: Path, force: bool) -> Path:
    """Where the no-MODEL demo writes: ``digits_cnn.pruned.onnx`` in ``folder``, or with
    ``--force`` over it; when it exists, the first free ``digits_cnn.pruned-N.onnx`` (N = 2,
    3, ...), so the demo runs again and again and never overwrites a file."""
    first = default_output(folder / DEFAULT_MODEL.name)
    if force or not os.path.lexists(first):
        return first
    n = 2
    while os.path.lexists(folder / f"{DEFAULT_MODEL.stem}.pruned-{n}.onnx"):
        n += 1
    return folder / f"{DEFAULT_MODEL.stem}.pruned-{n}.onnx"


def build_main() -> click.Group:
    """The ``onnxprune`` command group, its options built from the fields and registries as
    they are now (a criterion registered before the call is a ``--criterion`` choice)."""

    @click.group(cls=DefaultToPrune, context_settings={"help_option_names": ["-h", "--help"]})
    @click.version_option(version(), "--version", prog_name="onnxprune",
                          message="%(prog)s %(version)s",
                          help="Print 'onnxprune <version>' and exit.")
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
        *_logging_options(),
    ]
    inspect_params = [
        click.Argument(["model"], type=click.Path(path_type=Path)),
        *option_params("inspect"),
        _report_option(),
        _force_option(),
        _quiet_option(),
        *_logging_options(),
    ]
    main.add_command(click.Command("prune", callback=prune_command, params=prune_params,
                                   help=prune_command.__doc__))
    main.add_command(click.Command("inspect", callback=inspect_command, params=inspect_params,
                                   help=inspect_command.__doc__))
    apply_params = [
        click.Argument(["plan"], type=click.Path(path_type=Path)),
        click.Argument(["model"], type=click.Path(path_type=Path)),
        click.Option(["-o", "--output"], type=str, metavar="PATH",
                     help="Output path [default: <stem>.pruned.onnx beside the input]."),
        click.Option(["--storage"], type=click.Choice(list(STORAGES)),
                     default=None, help="Override the plan's --storage."),
        click.Option(["--no-validate", "no_validate"], is_flag=True,
                     help="Skip checker, onnxruntime and comparison."),
        _report_option(),
        _force_option(),
        _quiet_option(),
        *_logging_options(),
    ]
    main.add_command(click.Command("apply", callback=apply_command, params=apply_params,
                                   help=apply_command.__doc__))
    return main


def prune_command(model, output, report_path, force, quiet, verbose, log_level, **flags):
    """Prune MODEL into <stem>.pruned.onnx (the default command).

    Without MODEL the bundled digits CNN is pruned into ./digits_cnn.pruned.onnx, or
    ./digits_cnn.pruned-2.onnx, -3, ... when that exists (never over a file without --force).

    Exit codes: 0 done; 1 a gate (--max-error, --min-agreement, --min-metric,
    --max-metric-drop) failed (nothing written); 2 a problem with the input or options
    (nothing written); 3 nothing was pruned (written; --allow-noop makes it 0).
    """

    def body():
        from onnxprune.api import prune

        path = model if model is not None else DEFAULT_MODEL
        out = output
        if out is None:  # the bundled model's output goes to the working folder, not the package
            out = (default_output(path) if model is not None
                   else _demo_output(Path.cwd(), force))
        report_path_ok = _check_report(report_path, path, force, output=out)
        stamp = _stamp(Path(out))
        options = from_cli(flags, "prune")
        log.info("pruning %s into %s", path, out)
        log.debug("options: %s", options)
        try:
            result = prune(path, output=out, force=force,
                           track=_track(quiet) or (lambda items, d, t: items), **options)
        except KeyboardInterrupt:
            if _stamp(Path(out)) != stamp:  # the signal came after the output was renamed into place
                click.echo(f"interrupted after {printable(out)} was completely written",
                           err=True)
                sys.exit(130)
            raise
        except OnnxPruneError as exc:
            report = getattr(exc, "report", None)
            if report is not None:  # a failed gate: show why before the error
                _emit(report, report_path_ok, quiet, force)
            raise
        _emit(result.report, report_path_ok, quiet, force)
        if not quiet:
            written = result.outputs or ([result.output] if result.output is not None else [])
            click.echo(f"wrote {', '.join(printable(o) for o in written)}" if written
                       else "dry run: no model written", err=report_path_ok == "-")
        if result.report.noop:
            from onnxprune.report.report import NOOP_NOTE

            if options["allow_noop"]:
                click.echo(f"warning: {NOOP_NOTE} (accepted: --allow-noop)", err=True)
            else:
                click.echo(f"warning: {NOOP_NOTE}; exit {EXIT_NOOP} (--allow-noop accepts "
                           "such a run)", err=True)
                sys.exit(EXIT_NOOP)

    with _logging(verbose, log_level):
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
    for warning in report.warnings:  # on stderr whatever else is shown (even with --quiet)
        click.echo(f"warning: {printable(warning)}", err=True)
    if report_path == "-":  # JSON owns stdout; the text report goes to stderr
        click.echo(report.json_text())
        if not quiet:
            _print(report, _err_console())
        return
    if report_path is not None:
        report.write(report_path, force=force)
    _print(report, _console(quiet))


def inspect_command(model, report_path, force, quiet, verbose, log_level, **flags):
    """Report sparsity, params and MACs of MODEL without changing it."""

    def body():
        from onnxprune.api import inspect

        checked = _check_report(report_path, model, force)
        log.info("inspecting %s", model)
        report = inspect(model, **from_cli(flags, "inspect"))
        _emit(report, checked, quiet, force)

    with _logging(verbose, log_level):
        _run(body)


def apply_command(plan, model, output, storage, no_validate, report_path, force, quiet, verbose,
                  log_level):
    """Re-apply PLAN (written by --save-plan) to MODEL of the same architecture.

    Exit 2 (nothing written) when MODEL's weights are not the plan's (a missing weight, another
    shape), naming what differs.
    """

    def body():
        from onnxprune.plan import apply_plan

        out = output if output is not None else default_output(model)
        checked = _check_report(report_path, model, force, output=out)
        log.info("applying %s to %s", plan, model)
        result = apply_plan(plan, model, output=out, force=force, validate=not no_validate,
                            storage=storage)
        _emit(result.report, checked, quiet, force)
        if not quiet:
            click.echo(f"wrote {printable(result.output)}", err=checked == "-")

    with _logging(verbose, log_level):
        _run(body)


main = build_main()


if __name__ == "__main__":  # pragma: no cover
    main()

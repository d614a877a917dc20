"""Where onnxprune writes, and how: every output path checked before any work, every file
written atomically and, without ``force``, exclusively.

One set of rules for every file the tool writes (the pruned model, its ``.data`` file, the JSON
report), so none of them can:

* be, or resolve to (through symlinks or hard links), a file the input model reads — the model
  or its external data — even with ``force``;
* replace anything but a regular file: a directory, FIFO or device at the path is refused;
* replace an existing file without ``force``, including one that appears while the run works
  (the final name is created with link-then-unlink, which fails if the name exists);
* land in a folder that does not exist, or is not writable, after minutes of work;
* leave a temp file behind, or get permissions other than a new file's (mkstemp's 0600).

A path written through a symlink replaces the symlink's target; temp files are made beside the
target, so the final rename never crosses a filesystem.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import signal
import stat
import tempfile
from pathlib import Path
from typing import Callable, Iterable, Iterator, List, Optional, Tuple, Union

from onnxprune.errors import OutputError

PathLike = Union[str, os.PathLike]


def default_output(input_path: PathLike, suffix: str = ".pruned.onnx") -> Path:
    """``dir/model.onnx`` -> ``dir/model.pruned.onnx`` (any other name gets the suffix added)."""
    path = Path(input_path)
    stem = path.name[: -len(".onnx")] if path.name.endswith(".onnx") else path.name
    return path.with_name(stem + suffix)


def _same_file(target: Path, identity: Optional[Tuple[int, int]], other: PathLike) -> bool:
    """Whether ``target`` (an existing file's ``(st_dev, st_ino)`` is ``identity``) is
    ``other``: the same real path, or the same file through a hard link."""
    if target == Path(os.path.realpath(other)):
        return True
    try:
        st = os.stat(other)
    except OSError:
        return False
    return identity == (st.st_dev, st.st_ino)


def check_output(path: PathLike, force: bool, reads: Iterable[PathLike] = (),
                 what: str = "output", avoid: Iterable[PathLike] = (),
                 default_name: Optional[str] = None) -> Path:
    """Check ``path`` as a place to write ``what``, before any work; return the real path to
    write (symlinks resolved). ``reads``: files the input reads (never written, even with
    ``force``); ``avoid``: other files this run writes. ``default_name``: with it, a path naming
    an existing folder, or ending in a path separator, means that file inside the folder."""
    text = os.fspath(path)
    out = Path(text)
    flag = "--report" if what == "report" else "-o/--output"
    if text.endswith((os.sep, "/")) or out.is_dir():
        if default_name is None or not out.is_dir():
            raise OutputError(f"{what} '{text}' is a folder{'' if out.is_dir() else ' that does not exist'}; "
                              f"give a file path with {flag}")
        out = out / default_name
    target = Path(os.path.realpath(out))
    try:
        st = os.stat(target)
    except FileNotFoundError:
        st = None
    except OSError as exc:
        raise OutputError(f"{what} '{out}' cannot be used ({exc.strerror}); choose another "
                          f"{flag}") from None
    if st is not None and not stat.S_ISREG(st.st_mode):
        kind = "a folder" if stat.S_ISDIR(st.st_mode) else "not a regular file (a FIFO, device or socket)"
        raise OutputError(f"{what} '{out}' is {kind}; onnxprune only writes regular files, "
                          f"choose another {flag}")
    me = None if st is None else (st.st_dev, st.st_ino)
    for other in reads:
        if _same_file(target, me, other):
            raise OutputError(f"{what} '{out}' is a file the input model reads ('{other}'); "
                              f"onnxprune never overwrites its input, choose another {flag}")
    for other in avoid:
        if other is not None and _same_file(target, me, other):
            raise OutputError(f"{what} '{out}' is also the path of another file this run "
                              f"writes ('{other}'); choose another {flag}")
    if st is not None and not force:
        raise OutputError(f"{what} '{out}' already exists; pass --force (force=True) to "
                          f"overwrite it or choose another {flag}")
    parent = target.parent
    if not parent.is_dir():
        raise OutputError(f"folder '{parent}' for {what} '{out}' does not exist; create it first")
    if not os.access(parent, os.W_OK):
        raise OutputError(f"folder '{parent}' is not writable; choose another {flag}")
    return target


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """Hold the signals that end a run (INT, TERM, HUP, QUIT) until the block is done, so a
    temp file is never created without being recorded for cleanup (POSIX; elsewhere a no-op)."""
    if not hasattr(signal, "pthread_sigmask"):
        yield
        return
    wanted = {getattr(signal, n) for n in ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
              if hasattr(signal, n)}
    old = signal.pthread_sigmask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def temp_beside(path: Path, made: Optional[List[str]] = None) -> str:
    """A new empty temp file in ``path``'s folder, with a new file's usual permissions. Its name
    is appended to ``made`` in the same step as it is created (no signal lands in between), so
    the caller's cleanup always knows it."""
    with _signals_deferred():
        fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        if made is not None:
            made.append(name)
    try:
        os.close(fd)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(name, 0o666 & ~umask)
    except BaseException:
        if made is None and os.path.exists(name):
            os.unlink(name)
        raise
    return name


def commit(tmp: str, final: Path, force: bool, what: str = "output") -> None:
    """Move the finished temp file ``tmp`` to ``final``: replacing it with ``force``, else
    creating the name exclusively (a file that appeared there meanwhile is never replaced)."""
    if force:
        os.replace(tmp, final)
        return
    try:
        os.link(tmp, final)
    except FileExistsError:
        os.unlink(tmp)
        raise _appeared(final, what) from None
    except OSError as exc:  # a filesystem without hard links: exclusive create, then copy
        if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK,
                             errno.EXDEV):
            raise
        _copy_exclusive(tmp, final, what)
    os.unlink(tmp)


def _copy_exclusive(tmp: str, final: Path, what: str) -> None:
    try:
        fd = os.open(final, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    except FileExistsError:
        os.unlink(tmp)
        raise _appeared(final, what) from None
    with os.fdopen(fd, "wb") as dst, open(tmp, "rb") as src:
        shutil.copyfileobj(src, dst, 1 << 24)
        dst.flush()
        os.fsync(dst.fileno())


def _appeared(final: Path, what: str) -> OutputError:
    return OutputError(f"{what} '{final}' appeared while onnxprune was working; nothing was "
                       "overwritten (pass --force to replace it)")


def write_atomic(final: Path, write: Callable[[str], None], force: bool,
                 what: str = "output") -> Path:
    """Write ``final`` through a temp file beside it (``write(tmp_path)`` fills it), then
    :func:`commit`; the temp file never outlives a failure or an interrupt."""
    made: List[str] = []
    try:
        tmp = temp_beside(final, made)
        write(tmp)
        commit(tmp, final, force, what)
    finally:
        for tmp in made:
            if os.path.exists(tmp):
                os.unlink(tmp)
    return final


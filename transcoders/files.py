"""Writing files without losing anything: atomic writes, the user's umask, run locks, refusals.

Every file the project writes goes through :func:`atomic_write`: the content goes to a
temporary file in the destination folder, is flushed and fsynced, gets the permissions a
plain ``open(path, "w")`` would give (``0o666`` less the umask; ``mkstemp`` alone gives
``0o600``), and is renamed over the destination. Readers see the old file or the new one,
never half of one.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch


class OutputExistsError(ValueError):
    """A file or folder we were asked to write already holds something we must not replace."""


class FolderLockedError(ValueError):
    """Another process holds the lock of a folder we want to write into."""


def current_umask() -> int:
    """The process umask (read by setting and restoring it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def fsync_dir(folder: Path) -> None:
    """fsync a folder, so a rename inside it survives a power cut (best effort)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def atomic_write(path: str | os.PathLike, write: Callable[[Path], Any], *, mode: int = 0o666) -> Path:
    """Create or replace ``path`` atomically: ``write(tmp)`` fills a temporary file beside it,
    which is fsynced, given ``mode & ~umask`` and renamed over ``path``.

    Raises:
        OSError: the folder cannot be written (nothing is left behind).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, mode & ~current_umask())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def temp_dir_beside(path: str | os.PathLike) -> Path:
    """A new empty folder next to ``path`` (same file system, so it can be renamed into place
    once complete) with the permissions ``mkdir`` would give (``mkdtemp`` alone gives 0o700)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    os.chmod(tmp, 0o777 & ~current_umask())
    return tmp


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Atomically write ``data`` to ``path`` (see :func:`atomic_write`)."""
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Atomically write UTF-8 ``text`` to ``path``."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> Path:
    """Atomically write ``obj`` as JSON."""
    return atomic_write_text(path, json.dumps(obj, indent=indent) + "\n")


def atomic_save_tensors(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                        metadata: dict[str, str] | None = None) -> Path:
    """Atomically write ``tensors`` as a safetensors file (contiguous CPU copies)."""
    from safetensors.torch import save_file

    data = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(data, str(tmp), metadata=metadata))


def atomic_savefig(fig, path: str | os.PathLike, **kwargs: Any) -> Path:
    """Atomically save a matplotlib figure; the format comes from ``path``'s suffix."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))


def refuse_to_replace(path: str | os.PathLike, force: bool, *, hint: str = "") -> Path:
    """Return ``path`` if it does not exist or ``force`` is set.

    Raises:
        OutputExistsError: ``path`` exists and ``force`` is not set; names the file and the fix.
    """
    path = Path(path)
    if path.exists() and not force:
        raise OutputExistsError(f"{path} already exists; pass --force to replace it{hint or ''}, or choose another --out.")
    return path


def check_writable(folder: str | os.PathLike) -> Path:
    """Make sure ``folder`` exists (created if needed) and a file can be created in it, before
    spending time on work whose result goes there.

    Raises:
        OSError: the folder is read-only or cannot be created; the message names it.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=folder, prefix=".write-test.")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise OSError(exc.errno or errno.EACCES,
                      f"cannot write into {folder} ({exc.strerror or exc}); make it writable or choose another folder") from None
    return folder


LOCK = ".lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, what: str = "run") -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (a ``.lock`` file with ``flock``) for the block.

    The lock dies with the process, so a crash never leaves a stale lock behind.

    Raises:
        FolderLockedError: another process holds it (the message gives its pid).
    """
    import fcntl

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise FolderLockedError(f"another {what} (pid {holder}) is writing into {folder}; wait for it to finish, "
                                    "or use another folder") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)


@contextlib.contextmanager
def signals_deferred(signums: tuple[int, ...] = (signal.SIGINT, signal.SIGTERM)) -> Iterator[None]:
    """Hold back ``signums`` for the block, then deliver them, so that a group of writes that
    belong together (a coder's weights and its config) finishes as a whole.

    Python-level handlers are swapped in (not a thread signal mask: the kernel hands a
    process-wide signal to any thread that does not block it, and torch starts many). Outside
    the main thread, where handlers cannot be set, the block runs unprotected.
    """
    pending: list[int] = []
    try:
        old = {s: signal.signal(s, lambda signum, _frame: pending.append(signum)) for s in signums}
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(pending):
            signal.raise_signal(s)


def slugify(text: str, max_len: int = 60) -> str:
    """A file-name-safe slug of ``text``: lowercase letters, digits and single dashes."""
    out, dash = [], False
    for ch in text.lower():
        if ch.isascii() and ch.isalnum():
            out.append(ch)
            dash = False
        elif not dash and out:
            out.append("-")
            dash = True
    return "".join(out).strip("-")[:max_len].strip("-") or "untitled"

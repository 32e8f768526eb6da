"""Writing files so that a reader never sees a partial one, and checksumming them.

Every output fusionkern writes (checkpoints, reports, rasters, ONNX files, engines, resume records) goes through
:func:`atomic_output`: the content is written to a temporary file beside the target and renamed onto it only when
complete, so a killed run never leaves a complete-looking file. :func:`check_writable` refuses an output path that
cannot be written before any work starts, with one line naming it instead of a traceback half-way through.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import tempfile
import uuid
from pathlib import Path
from typing import Iterator

from fusionkern.errors import InputError

_HASH_CHUNK = 1 << 22
WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM})
"""OS errors that mean the output cannot take what is written (full, over quota, too large, read-only, denied)."""


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` (same suffix, so format-sniffing writers still work); renamed to ``path``
    when the block succeeds, removed when it fails."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.stem}.{uuid.uuid4().hex[:12]}.tmp{path.suffix}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically (flushed to disk before the rename); returns the path."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    return Path(path)


def write_text_atomic(path: str | os.PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` atomically; returns the path."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a local file, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def default_dir_mode() -> int:
    """The mode ``mkdir`` gives a new folder under the current umask (``tempfile.mkdtemp`` always gives 0700)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _read_only(path: Path) -> bool:
    """Whether ``path`` may not be written: no write permission, or no write bit at all (which even root honours
    here: a folder someone marked read-only is never written into or replaced)."""
    return not os.access(path, os.W_OK) or not path.stat().st_mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH)


def check_writable(path: str | os.PathLike, what: str = "--out", inside: bool = False) -> None:
    """Refuses an output path that cannot be written, before any work is done.

    The deepest existing folder on the way to the output must accept a new file (a probe file is created and
    removed there), and an output that exists already must not be read-only.

    Args:
        path: The output: a folder the command writes into (``inside``) or a file or folder it creates beside
            its final place and renames onto it.
        what: The option that named it, for the message.
        inside: Files are written inside ``path`` (when it exists) rather than beside it.

    Raises:
        InputError: The output or the folder it goes into is read-only, missing permissions, not a folder, or
            on a read-only file system; the message names it.
    """
    path = Path(path).absolute()
    if path.exists() and _read_only(path):
        raise InputError(f"{what} {path} is read-only" + ("" if inside else "; refusing to replace it"))
    folder = path if inside and path.is_dir() else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise InputError(f"{what} {path}: {folder} is not a folder")
    if _read_only(folder):
        raise InputError(f"{what} {path}: the folder {folder} is read-only")
    try:
        handle, probe = tempfile.mkstemp(prefix=".fusionkern-probe-", dir=folder)
        os.close(handle)
        os.unlink(probe)
    except OSError as exc:
        raise InputError(f"{what} {path}: cannot write in {folder} ({exc.strerror or exc})") from None


@contextlib.contextmanager
def output_errors(path: str | os.PathLike, what: str = "--out") -> Iterator[None]:
    """Turns a write that the output cannot take (disk full, quota, file size limit, read-only, denied) into one
    :class:`~fusionkern.errors.InputError` naming the output; other errors pass unchanged.

    Args:
        path: The output being written.
        what: The option that named it.
    """
    try:
        yield
    except OSError as exc:
        if exc.errno not in WRITE_ERRNOS:
            raise
        where = f" ({exc.filename})" if exc.filename else ""
        raise InputError(f"cannot write {what} {path}: {exc.strerror or exc}{where}") from exc


@contextlib.contextmanager
def folder_built_aside(out: str | os.PathLike) -> Iterator[Path]:
    """A hidden folder beside ``out`` to build a whole output folder in; it replaces ``out`` only when the block
    finishes, and is removed if it fails, so a failed run never leaves a complete-looking folder (nor loses the
    previous one).

    Yields:
        The folder to write into (with the mode ``mkdir`` would give, not ``mkdtemp``'s 0700).
    """
    import shutil

    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        os.chmod(partial, default_dir_mode())
        yield partial
        if out.exists():
            old = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(out, old)
            os.replace(partial, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(partial, out)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise

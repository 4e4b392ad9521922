"""Filesystem moves that survive crashes and power cuts, and never overwrite.

Every durable step writes to a temporary name in the destination directory, fsyncs the
file, gives it its final name with a rename that refuses to replace anything, then fsyncs
the directory: until the directory entry is on disk a power cut can undo the rename.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

from folderd.errors import DurabilityError

# Errors that mean "the disk cannot keep what we write": the daemon must stop, not go on.
DURABILITY_ERRNOS = {errno.ENOSPC, errno.EIO, errno.EDQUOT, errno.EROFS}

TEMP_PREFIX = ".folderd-"

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100
try:
    _renameat2 = _libc.renameat2
    _renameat2.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
except AttributeError:  # pragma: no cover - glibc before 2.28
    _renameat2 = None


def check_durable(error: OSError, what: str) -> None:
    """Raise DurabilityError if `error` means the disk cannot keep our data."""
    if error.errno in DURABILITY_ERRNOS:
        raise DurabilityError(f"{what}: {os.strerror(error.errno or 0)}") from error


def remove_if_exists(path: str | os.PathLike[str]) -> None:
    """Unlink a file that may already be gone (cleaning up after a failed step)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def fsync_dir(path: str | os.PathLike[str]) -> None:
    """Make the directory's entries (a rename, a new file) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def temp_path(directory: Path, tag: str) -> Path:
    """A hidden temporary name in `directory`; folderd's scanners and most tools skip dot-files."""
    return directory / f"{TEMP_PREFIX}{tag}-{secrets.token_hex(4)}.tmp"


def write_file(path: Path, data: bytes) -> None:
    """Write bytes to a new file and fsync it."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace `path` with `data` atomically and durably (temp, fsync, rename, fsync dir)."""
    temp = temp_path(path.parent, "w")
    try:
        write_file(temp, data)
        os.replace(temp, path)
    except BaseException:
        remove_if_exists(temp)
        raise
    fsync_dir(path.parent)


def rename_noreplace(source: Path, destination: Path) -> None:
    """Rename `source` to `destination`; raise FileExistsError if `destination` exists.

    renameat2(RENAME_NOREPLACE) does it atomically. Filesystems without it (some FUSE and
    network ones) get link + unlink, which is just as safe; a filesystem without hard links
    gets a check and a rename (the outbox is folderd's own, so nobody races us there).
    """
    if _renameat2 is not None:
        result = _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(destination), _RENAME_NOREPLACE)
        if result == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination))
        if code not in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise OSError(code, os.strerror(code), str(source))
    try:
        os.link(source, destination, follow_symlinks=False)
    except FileExistsError:
        raise
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK):
            raise
        if os.path.lexists(destination):
            raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), str(destination)) from None
        os.rename(source, destination)
        return
    os.unlink(source)


NAME_MAX = 255


def _fit(stem: str, tail: str) -> str:
    """`stem` shortened (at a character boundary) so that stem + tail fits NAME_MAX bytes."""
    room = NAME_MAX - len(os.fsencode(tail))
    encoded = os.fsencode(stem)
    if len(encoded) <= room:
        return stem
    return encoded[: max(1, room)].decode("utf-8", "ignore") or "file"


def candidate_names(directory: Path, stem: str, suffix: str, reserve: str = "") -> Iterator[Path]:
    """`stem.suffix`, then `stem-1.suffix`, `stem-2.suffix`, ...: never overwrite a file.

    The stem is shortened where a name (plus `reserve`, e.g. a sidecar's suffix) would pass
    the filesystem's 255-byte limit, so a long name can always be placed.
    """
    yield directory / f"{_fit(stem, suffix + reserve)}{suffix}"
    number = 1
    while True:
        tail = f"-{number}{suffix}"
        yield directory / f"{_fit(stem, tail + reserve)}{tail}"
        number += 1


def place_noclobber(source: Path, directory: Path, name: str) -> Path:
    """Give `source` (already in `directory`'s filesystem) a free name; fsync; return it.

    `source` must be on the same filesystem as `directory`.
    """
    stem, suffix = os.path.splitext(name)
    for candidate in candidate_names(directory, stem, suffix):
        try:
            rename_noreplace(source, candidate)
        except FileExistsError:
            continue
        fsync_dir(directory)
        if source.parent != directory:
            fsync_dir(source.parent)
        return candidate
    raise AssertionError("unreachable")  # pragma: no cover


def move_noclobber(source: Path, directory: Path, name: str) -> Path:
    """Move `source` into `directory` under `name` (or a suffixed free name); return the path.

    Across filesystems: copy to a temp name, fsync, rename, fsync the directory, and only
    then unlink the source, so a crash leaves a duplicate, never a loss.
    """
    directory.mkdir(parents=True, exist_ok=True)
    try:
        return place_noclobber(source, directory, name)
    except OSError as error:
        if error.errno != errno.EXDEV:
            raise
    temp = temp_path(directory, "x")
    try:
        with open(source, "rb") as reader, open(temp, "xb") as writer:
            shutil.copyfileobj(reader, writer, 1024 * 1024)
            writer.flush()
            os.fsync(writer.fileno())
        shutil.copystat(source, temp)
        final = place_noclobber(temp, directory, name)
    except BaseException:
        remove_if_exists(temp)
        raise
    os.unlink(source)
    fsync_dir(source.parent)
    return final


def same_file(first: os.stat_result, second: os.stat_result) -> bool:
    return (first.st_dev, first.st_ino) == (second.st_dev, second.st_ino)


def ensure_subdir(base: Path, parts: list[str]) -> Path:
    """base/parts..., creating what is missing, where no component below `base` may be a
    symbolic link: one planted in an outbox, done or failed folder (its sub-folders mirror
    the inbox's) would send results and originals somewhere else. Raise OSError(ELOOP)."""
    base.mkdir(parents=True, exist_ok=True)
    path = base
    for part in parts:
        path = path / part
        try:
            os.mkdir(path)
        except FileExistsError:
            pass
        if not os.path.isdir(path) or os.path.islink(path):
            raise OSError(errno.ELOOP, "a symbolic link or not a folder; folderd does not write through it", str(path))
    return path

"""Claiming: taking a settled file out of the user's view of the inbox, safely.

Drop folders are often writable by others. A planted symlink or hard link must never make
folderd upload or move a file from elsewhere, so a claim opens the file with O_NOFOLLOW
relative to its directory (itself opened component by component with O_NOFOLLOW), checks
it is a regular file with one link and the size and times the watcher saw, renames it into
the work area (a hidden folder of the inbox, so the rename is atomic and two daemons on one
inbox cannot both win it), and checks that what was renamed is what was opened.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import stat
import time
from pathlib import Path
from typing import Any

from folderd.errors import FolderdError
from folderd.fsutil import same_file
from folderd.watch import WORK_DIR, Signature

SEPARATOR = "~"


class ClaimRefused(FolderdError):
    """The file changed, vanished or is not safe to take; the watcher will look again."""


def new_job_id() -> str:
    return f"{int(time.time()):x}{secrets.token_hex(4)}"


def work_root(inbox: Path, daemon_id: str) -> Path:
    """Each daemon has its own work area, so one never recovers another's files as orphans."""
    return inbox / WORK_DIR / daemon_id


def ensure_work_root(inbox: Path, daemon_id: str) -> Path:
    """Create the work area (0700); refuse it if something planted a link there."""
    root = work_root(inbox, daemon_id)
    for path in (inbox / WORK_DIR, root):
        try:
            os.mkdir(path, 0o700)
        except FileExistsError:
            pass
        info = os.lstat(path)
        if not stat.S_ISDIR(info.st_mode):
            raise ClaimRefused(f"{path} is not a directory (a link planted in the inbox?); remove it")
    return root


def open_directory(root: Path, parts: list[str]) -> int:
    """Open root/parts... one component at a time without following links; return the fd."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY)
    for part in parts:
        try:
            child = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
        finally:
            os.close(fd)
        fd = child
    return fd


def sha256_of_fd(fd: int) -> str:
    digest = hashlib.sha256()
    offset = 0
    while True:
        chunk = os.pread(fd, 1024 * 1024, offset)
        if not chunk:
            return digest.hexdigest()
        digest.update(chunk)
        offset += len(chunk)


def sha256_of(path: Path) -> str:
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    try:
        return sha256_of_fd(fd)
    finally:
        os.close(fd)


def claim(inbox: Path, relpath: str, signature: Signature | None, daemon_id: str, folder: str) -> dict[str, Any]:
    """Move inbox/relpath into the work area; return the new job record (state claimed).

    Raise ClaimRefused when the file is gone, changed since `signature`, or unsafe.
    """
    parts = relpath.split("/")
    name = parts[-1]
    job_id = new_job_id()
    root = ensure_work_root(inbox, daemon_id)
    try:
        source_dir = open_directory(inbox, parts[:-1])
    except OSError as error:
        raise ClaimRefused(f"cannot open the folder of {relpath}: {error.strerror}") from None
    try:
        try:
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY, dir_fd=source_dir)
        except FileNotFoundError:
            raise ClaimRefused(f"{relpath} is gone") from None
        except OSError as error:
            raise ClaimRefused(f"cannot open {relpath}: {error.strerror} (a symbolic link?)") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise ClaimRefused(f"{relpath} is not a regular file")
            if info.st_nlink != 1:
                raise ClaimRefused(f"{relpath} has {info.st_nlink} hard links")
            now_signature = (info.st_size, info.st_mtime_ns, info.st_ctime_ns, info.st_ino)
            if signature is not None and now_signature != signature:
                raise ClaimRefused(f"{relpath} changed since it settled")
            work_dir = root.joinpath(*parts[:-1]) if len(parts) > 1 else root
            work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            work_name = f"{job_id}{SEPARATOR}{name}"
            if len(os.fsencode(work_name)) > 255:  # NAME_MAX: a long name in the inbox must still be claimable
                work_name = os.fsencode(work_name)[:255].decode("utf-8", "ignore")
            work_fd = os.open(work_dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                try:
                    os.rename(name, work_name, src_dir_fd=source_dir, dst_dir_fd=work_fd)
                except FileNotFoundError:
                    raise ClaimRefused(f"{relpath} is gone (taken by another process?)") from None
                moved = os.stat(work_name, dir_fd=work_fd, follow_symlinks=False)
                if not same_file(moved, info):
                    # Swapped between open and rename: put back whatever we took and leave it.
                    os.rename(work_name, name, src_dir_fd=work_fd, dst_dir_fd=source_dir)
                    raise ClaimRefused(f"{relpath} was replaced while being claimed")
                # The rename must be durable in both directories before the ledger says "claimed".
                os.fsync(work_fd)
                os.fsync(source_dir)
            finally:
                os.close(work_fd)
            digest = sha256_of_fd(fd)
        finally:
            os.close(fd)
    finally:
        os.close(source_dir)
    now = time.time()
    return {
        "id": job_id,
        "folder": folder,
        "source": relpath,
        "work": str(work_dir / work_name),
        "size": info.st_size,
        "mtime": info.st_mtime,
        "sha256": digest,
        "state": "claimed",
        "created": now,
        "updated": now,
        "tries": 0,
        "attempts": 0,
    }


def find_orphans(inbox: Path, daemon_id: str, known_work_paths: set[str]) -> list[tuple[Path, str]]:
    """Files in this daemon's work area that no job records: a crash between the rename and
    the ledger write leaves them. Return (work path, original relpath) pairs."""
    root = work_root(inbox, daemon_id)
    found: list[tuple[Path, str]] = []
    if not root.is_dir():
        return found
    for directory, _subdirs, files in os.walk(root):
        for file in files:
            path = Path(directory) / file
            if str(path) in known_work_paths or SEPARATOR not in file:
                continue
            relative_dir = os.path.relpath(directory, root)
            original = file.split(SEPARATOR, 1)[1]
            relpath = original if relative_dir == "." else f"{relative_dir.replace(os.sep, '/')}/{original}"
            found.append((path, relpath))
    return found


def adopt_orphan(path: Path, relpath: str, folder: str) -> dict[str, Any]:
    """A job record for an orphan found in the work area."""
    info = os.lstat(path)
    job_id = path.name.split(SEPARATOR, 1)[0]
    now = time.time()
    return {
        "id": job_id,
        "folder": folder,
        "source": relpath,
        "work": str(path),
        "size": info.st_size,
        "mtime": info.st_mtime,
        "sha256": sha256_of(path),
        "state": "claimed",
        "created": now,
        "updated": now,
        "tries": 0,
        "attempts": 0,
        "recovered": True,
    }


"""Watch one file with inotify to prove that nobody opened, read, changed or moved it.

Used by the end-to-end tests for planted symlinks and hard links: the file they point at
must never be touched by folderd. inotify watches the inode, so an open through a symlink
or another hard link is seen too.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import struct
from pathlib import Path

IN_ACCESS = 0x001
IN_MODIFY = 0x002
IN_ATTRIB = 0x004
IN_CLOSE_WRITE = 0x008
IN_CLOSE_NOWRITE = 0x010
IN_OPEN = 0x020
IN_MOVE_SELF = 0x800
IN_DELETE_SELF = 0x400
IN_NONBLOCK = os.O_NONBLOCK

NAMES = {
    IN_ACCESS: "access",
    IN_MODIFY: "modify",
    IN_ATTRIB: "attrib",
    IN_CLOSE_WRITE: "close_write",
    IN_CLOSE_NOWRITE: "close_nowrite",
    IN_OPEN: "open",
    IN_MOVE_SELF: "move_self",
    IN_DELETE_SELF: "delete_self",
}

_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


class TouchWatch:
    """Records every open/read/write/attribute change/move/delete of one file's inode."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.fd = _libc.inotify_init1(IN_NONBLOCK)
        if self.fd < 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
        mask = IN_ACCESS | IN_MODIFY | IN_ATTRIB | IN_CLOSE_WRITE | IN_CLOSE_NOWRITE | IN_OPEN | IN_MOVE_SELF | IN_DELETE_SELF
        if _libc.inotify_add_watch(self.fd, os.fsencode(path), mask) < 0:
            code = ctypes.get_errno()
            os.close(self.fd)
            raise OSError(code, os.strerror(code), str(path))
        self.seen: list[str] = []

    def events(self) -> list[str]:
        """Every event so far, by name (e.g. ['open', 'access', 'close_nowrite'])."""
        while True:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as error:  # pragma: no cover
                if error.errno == errno.EINTR:
                    continue
                raise
            offset = 0
            while offset < len(data):
                _wd, mask, _cookie, length = struct.unpack_from("iIII", data, offset)
                offset += 16 + length
                self.seen.extend(name for bit, name in NAMES.items() if mask & bit)
        return list(self.seen)

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> TouchWatch:  # noqa: PYI034
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

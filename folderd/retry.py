"""`folderd retry`: move failed originals back into their inbox so they are taken again."""

from __future__ import annotations

import os
from pathlib import Path

from folderd.config import Config
from folderd.deliver import ERROR_SUFFIX
from folderd.fsutil import TEMP_PREFIX, move_noclobber


def failed_files(directory: Path) -> list[str]:
    """Relative paths of the originals in a failed folder (not their sidecars)."""
    found: list[str] = []
    if not directory.is_dir():
        return found
    for root, _dirs, names in os.walk(directory):
        for name in names:
            if name.endswith(ERROR_SUFFIX) or name.startswith(TEMP_PREFIX):
                continue
            relative = os.path.relpath(os.path.join(root, name), directory)
            found.append(relative.replace(os.sep, "/"))
    return sorted(found)


def retry(config: Config, folder: str | None = None, names: list[str] | None = None) -> tuple[list[str], list[str]]:
    """Move matching failed files back to their inboxes; remove their sidecars.

    `names` match a failed file's relative path or base name. Return (moved, problems).
    """
    moved: list[str] = []
    problems: list[str] = []
    wanted = set(names or [])
    matched: set[str] = set()
    for rule in config.folders:
        if folder is not None and rule.name != folder:
            continue
        for relpath in failed_files(rule.failed):
            base = relpath.rsplit("/", 1)[-1]
            if wanted and relpath not in wanted and base not in wanted:
                continue
            matched.update({relpath, base})
            source = rule.failed / relpath
            parts = relpath.split("/")
            destination = rule.inbox.joinpath(*parts[:-1]) if rule.recursive else rule.inbox
            try:
                final = move_noclobber(source, destination, parts[-1])
            except OSError as error:
                problems.append(f"{rule.name}: {relpath}: {error.strerror or error}")
                continue
            sidecar = source.with_name(source.name + ERROR_SUFFIX)
            try:
                sidecar.unlink()
            except FileNotFoundError:
                pass
            moved.append(f"{rule.name}: {relpath} -> {final}")
    if folder is not None and config.folder(folder) is None:
        problems.append(f"no folder named {folder!r} in the configuration")
    for name in sorted(wanted - matched):
        problems.append(f"no failed file matches {name!r}")
    return moved, problems

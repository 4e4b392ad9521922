"""Delivering results and putting originals away: outbox, done, failed.

Each step is idempotent, because a crash can interrupt it anywhere and recovery runs it
again: a result already given its final name is found again by inode (before the temp
name is removed) or by content hash (after); an original already moved is not moved twice.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import time
from pathlib import Path
from typing import Any

from PIL import Image

from folderd.config import FolderRule
from folderd.fsutil import (
    TEMP_PREFIX,
    atomic_write,
    candidate_names,
    ensure_subdir,
    fsync_dir,
    move_noclobber,
    place_noclobber,
    rename_noreplace,
    same_file,
    temp_path,
    write_file,
)
from folderd.imaging import EXTENSION, JPEG_EXIF_LIMIT, exif_for_output, format_of_bytes

FORMAT_NAMES = {"jpeg": "JPEG", "png": "PNG", "webp": "WEBP"}
ERROR_SUFFIX = ".error.json"


def split_relpath(relpath: str) -> tuple[list[str], str]:
    parts = relpath.split("/")
    return parts[:-1], parts[-1]


def output_temp(rule: FolderRule, job: dict[str, Any]) -> Path:
    """Where a result is written before it has its final name (hidden, in the outbox)."""
    subdirs, _ = split_relpath(job["source"])
    directory = ensure_subdir(rule.outbox, subdirs)
    return directory / f"{TEMP_PREFIX}{job['id']}.part"


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1024 * 1024), b""):
            digest.update(chunk)
    return digest.hexdigest()


def convert_output(path: Path, wanted: str, jpeg_quality: int) -> str:
    """Re-encode the result at `path` in place (durably) as `wanted` (jpeg|png|webp); return the format."""
    target = FORMAT_NAMES[wanted]
    with Image.open(path) as image:
        if image.format == target:
            return target
        image.load()
        info = dict(image.info)
        if target == "JPEG" and image.mode not in ("RGB", "L"):
            image = image.convert("RGB")
        buffer = io.BytesIO()
        options: dict[str, Any] = {}
        if info.get("icc_profile"):
            options["icc_profile"] = info["icc_profile"]
        exif = exif_for_output(info.get("exif"), image.width, image.height, limit=JPEG_EXIF_LIMIT if target == "JPEG" else None)
        if exif:
            options["exif"] = exif
        if target == "JPEG":
            options.update(quality=jpeg_quality, subsampling=0 if jpeg_quality >= 90 else 2)
        elif target == "WEBP":
            options.update(quality=95, method=4)
        image.save(buffer, target, **options)
    temp = temp_path(path.parent, "c")
    write_file(temp, buffer.getvalue())
    os.replace(temp, path)
    return target


def deliver(rule: FolderRule, job: dict[str, Any]) -> dict[str, Any]:
    """Give the fetched result its final outbox name; return the job's updates (state delivered)."""
    temp = Path(job["output_tmp"])
    subdirs, name = split_relpath(job["source"])
    directory = rule.outbox.joinpath(*subdirs)
    stem = os.path.splitext(name)[0]
    if not temp.exists():
        found = _find_delivered(directory, stem, job.get("output_sha256"))
        if found is None:
            raise FileNotFoundError(f"the result of job {job['id']} is neither at {temp.name} nor in the outbox")
        return {"state": "delivered", "output": str(found)}
    if rule.output_format != "auto":
        kind = convert_output(temp, rule.output_format, rule.jpeg_quality)
        updates_hash = sha256_file(temp)
    else:
        with open(temp, "rb") as handle:
            kind = format_of_bytes(handle.read(64)) or job.get("result_format") or "PNG"
        updates_hash = job.get("output_sha256") or sha256_file(temp)
    suffix = EXTENSION.get(kind, ".img")
    # A crash after link() and before unlink() (the fallback of rename_noreplace) leaves the
    # result under both names: find it by inode rather than deliver it twice.
    temp_info = os.stat(temp)
    if temp_info.st_nlink > 1:
        for candidate in candidate_names(directory, stem, suffix):
            try:
                if same_file(os.stat(candidate), temp_info):
                    os.unlink(temp)
                    fsync_dir(directory)
                    return {"state": "delivered", "output": str(candidate), "output_sha256": updates_hash}
            except FileNotFoundError:
                break
    final = place_noclobber(temp, directory, stem + suffix)
    return {"state": "delivered", "output": str(final), "output_sha256": updates_hash}


def _find_delivered(directory: Path, stem: str, digest: str | None) -> Path | None:
    """A result given its final name before a crash: same stem, same content."""
    if not digest or not directory.is_dir():
        return None
    for entry in os.scandir(directory):
        if entry.name.startswith(stem) and entry.is_file(follow_symlinks=False):
            if sha256_file(Path(entry.path)) == digest:
                return Path(entry.path)
    return None


def archive(rule: FolderRule, job: dict[str, Any]) -> dict[str, Any]:
    """The result is safe in the outbox: move the original to done/ (or delete it)."""
    work = Path(job["work"])
    subdirs, name = split_relpath(job["source"])
    updates: dict[str, Any] = {"state": "archived"}
    if work.exists():
        if rule.on_success == "delete":
            os.unlink(work)
            fsync_dir(work.parent)
        else:
            updates["archived_to"] = str(move_noclobber(work, ensure_subdir(rule.done, subdirs), name))
    return updates


def fail(rule: FolderRule, job: dict[str, Any]) -> dict[str, Any]:
    """Move the original to failed/ with NAME.error.json saying why; return the updates (state failed)."""
    work = Path(job["work"])
    subdirs, name = split_relpath(job["source"])
    directory = ensure_subdir(rule.failed, subdirs)
    if not work.exists():
        previous = _find_sidecar(directory, job["id"])
        return {"state": "failed", "failed_to": str(previous) if previous else None}
    error = job.get("error") or {}
    stem, suffix = os.path.splitext(name)
    # Choose a name free for both the file and its sidecar; write the sidecar first so that a
    # crash between the two steps leaves a sidecar naming this job, which recovery finds.
    for candidate in candidate_names(directory, stem, suffix, reserve=ERROR_SUFFIX):
        sidecar = candidate.with_name(candidate.name + ERROR_SUFFIX)
        if os.path.lexists(candidate) or os.path.lexists(sidecar):
            if not os.path.lexists(candidate) and _sidecar_job(sidecar) == job["id"]:
                # A crash came between writing this job's sidecar and moving the file: finish the move.
                moved = move_noclobber(work, directory, candidate.name)
                if moved != candidate:
                    os.replace(sidecar, moved.with_name(moved.name + ERROR_SUFFIX))
                fsync_dir(directory)
                return {"state": "failed", "failed_to": str(moved)}
            continue
        report = {
            "file": job["source"],
            "folder": job["folder"],
            "job_id": job["id"],
            "reason": error.get("reason", "unknown"),
            "status": error.get("status"),
            "message": error.get("message"),
            "stage": error.get("stage"),
            "attempts": job.get("attempts", 0),
            "task_id": job.get("task_id"),
            "sha256": job.get("sha256"),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
        temp = temp_path(directory, "e")
        write_file(temp, (json.dumps(report, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        try:
            rename_noreplace(temp, sidecar)
        except FileExistsError:
            os.unlink(temp)
            continue
        moved = move_noclobber(work, directory, candidate.name)
        if moved != candidate:  # someone took the name in between: keep the pair together
            os.replace(sidecar, moved.with_name(moved.name + ERROR_SUFFIX))
        fsync_dir(directory)
        return {"state": "failed", "failed_to": str(moved)}
    raise AssertionError("unreachable")  # pragma: no cover


def _sidecar_job(sidecar: Path) -> str | None:
    """The job id a NAME.error.json names, or None if it cannot be read."""
    try:
        return json.loads(sidecar.read_text(encoding="utf-8")).get("job_id")
    except (OSError, ValueError, AttributeError):
        return None


def _find_sidecar(directory: Path, job_id: str) -> Path | None:
    for entry in os.scandir(directory):
        if entry.name.endswith(ERROR_SUFFIX):
            try:
                if json.loads(Path(entry.path).read_text(encoding="utf-8")).get("job_id") == job_id:
                    return Path(entry.path[: -len(ERROR_SUFFIX)])
            except (OSError, ValueError):
                continue
    return None


def write_status_file(path: Path, data: dict[str, Any]) -> None:
    atomic_write(path, (json.dumps(data, indent=1, default=str) + "\n").encode("utf-8"))

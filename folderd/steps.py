"""The blocking work of each job state, run in worker threads.

Each step takes a copy of a job record and returns the updates to apply to it (at least
the new state), or raises: ImageError (the input will never pass), ApiError (its kind
says what to do), OSError. Only the supervisor applies updates and writes the ledger.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from folderd import local
from folderd.clipdrop import Client, Credits
from folderd.config import FolderRule
from folderd.deliver import output_temp, sha256_file
from folderd.errors import ApiError, ImageError
from folderd.fsutil import remove_if_exists
from folderd.imaging import MIME, encode_for_upload, format_of_bytes, probe, reattach_metadata
from folderd.routing import ASYNC_FORMATS, MAX_UPLOAD_BYTES, SYNC_FORMATS, route


@dataclass
class Context:
    """What the steps need besides the job: its folder's rule, the API client, a scratch dir."""

    rule: FolderRule
    client: Client | None
    scratch: Path


def _credits(credits: Credits) -> dict[str, Any]:
    updates: dict[str, Any] = {}
    if credits.consumed is not None:
        updates["credits"] = str(credits.consumed)
    if credits.remaining is not None:
        updates["_remaining"] = str(credits.remaining)
    return updates


def prepare(context: Context, job: dict[str, Any]) -> dict[str, Any]:
    """Probe the input, route it, and convert it when its endpoint needs another format."""
    if job.get("incomplete"):
        raise ImageError(job["incomplete"])
    work = Path(job["work"])
    info = probe(work)
    decision = route(context.rule, info)
    updates: dict[str, Any] = {
        "state": "prepared",
        "backend": context.rule.backend,
        "mode": decision.mode,
        "strategy": decision.strategy,
        "target": [decision.width, decision.height],
        "input": {"format": info.format, "width": info.width, "height": info.height, "alpha": info.has_alpha, "orientation": info.orientation},
        "credits_estimate": decision.credits_estimate,
        "upload": None,
    }
    if decision.clamped:
        updates["clamped"] = True
    if decision.mode == "local":
        return updates
    accepted = SYNC_FORMATS if decision.mode == "sync" else ASYNC_FORMATS
    if decision.convert:
        context.scratch.mkdir(parents=True, exist_ok=True)
        destination = context.scratch / f"{job['id']}.upload"
        if destination.exists():
            destination.unlink()
        kind, mime = encode_for_upload(work, destination, accepted=accepted, max_bytes=MAX_UPLOAD_BYTES)
        updates["upload"] = str(destination)
        updates["upload_mime"] = mime
        updates["upload_name"] = Path(job["source"]).stem + (".png" if kind == "PNG" else ".jpg")
    else:
        updates["upload_mime"] = MIME[info.format]
        updates["upload_name"] = Path(job["source"]).name
    return updates


def _upload_source(job: dict[str, Any]) -> Path:
    return Path(job["upload"] or job["work"])


def _fresh_temp(context: Context, job: dict[str, Any]) -> Path:
    temp = output_temp(context.rule, job)
    remove_if_exists(temp)
    return temp


def run_local(context: Context, job: dict[str, Any]) -> dict[str, Any]:
    temp = _fresh_temp(context, job)
    width, height = job["target"]
    try:
        kind = local.upscale(
            Path(job["work"]), temp, width, height, job["strategy"], jpeg_quality=context.rule.jpeg_quality, output=context.rule.output_format
        )
    except BaseException:
        remove_if_exists(temp)
        raise
    return {"state": "fetched", "output_tmp": str(temp), "result_format": kind, "output_sha256": sha256_file(temp)}


def submit_sync(context: Context, job: dict[str, Any]) -> dict[str, Any]:
    assert context.client is not None
    temp = _fresh_temp(context, job)
    width, height = job["target"]
    kind, credits = context.client.upscale_sync(_upload_source(job), job["upload_name"], job["upload_mime"], width, height, temp)
    # The API's result carries no colour profile or EXIF: put the original's back.
    reattach_metadata(Path(job["work"]), temp)
    updates = {"state": "fetched", "output_tmp": str(temp), "result_format": kind, "output_sha256": sha256_file(temp)}
    updates.update(_credits(credits))
    return updates


def submit_async(context: Context, job: dict[str, Any]) -> dict[str, Any]:
    assert context.client is not None
    width, height = job["target"]
    task_id, credits = context.client.submit(_upload_source(job), job["upload_name"], job["upload_mime"], width, height, job["strategy"])
    updates: dict[str, Any] = {"state": "submitted", "task_id": task_id}
    updates.update(_credits(credits))
    return updates


def poll(context: Context, job: dict[str, Any]) -> dict[str, Any]:
    assert context.client is not None
    status = context.client.status(job["task_id"])
    return {"_status": status}


def fetch(context: Context, job: dict[str, Any]) -> dict[str, Any]:
    """Ask /result for a fresh signed URL (they expire) and download it without the key."""
    assert context.client is not None
    url = context.client.result_url(job["task_id"])
    temp = _fresh_temp(context, job)
    kind = context.client.download(url, temp)
    reattach_metadata(Path(job["work"]), temp)
    return {"state": "fetched", "output_tmp": str(temp), "result_format": kind, "output_sha256": sha256_file(temp)}


def copy_result(context: Context, job: dict[str, Any], earlier_output: str | None, earlier_sha256: str | None) -> dict[str, Any]:
    """Identical content under the same rule was upscaled before: copy that result (0 credits).

    Return updates without `output_tmp` when the earlier result is gone or changed, so the
    supervisor makes it afresh.
    """
    if not earlier_output or not earlier_sha256:
        return {"state": "prepared"}
    temp = _fresh_temp(context, job)
    try:
        with open(earlier_output, "rb") as reader, open(temp, "xb") as writer:
            shutil.copyfileobj(reader, writer, 1024 * 1024)
            writer.flush()
            os.fsync(writer.fileno())
    except FileNotFoundError:
        remove_if_exists(temp)
        return {"state": "prepared"}
    digest = sha256_file(temp)
    if digest != earlier_sha256:
        remove_if_exists(temp)
        return {"state": "prepared"}
    with open(temp, "rb") as handle:
        kind = format_of_bytes(handle.read(64)) or "PNG"
    return {"state": "fetched", "output_tmp": str(temp), "result_format": kind, "output_sha256": digest, "credits_estimate": "0"}


def remove_upload(job: dict[str, Any]) -> None:
    upload = job.get("upload")
    if upload:
        remove_if_exists(upload)


__all__ = ["Context", "prepare", "run_local", "submit_sync", "submit_async", "poll", "fetch", "remove_upload", "ApiError"]

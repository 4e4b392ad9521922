"""The Clipdrop image-upscaling API: one call per method, errors sorted into what to do next.

Two HTTP sessions: `api` talks to the base URL and is the only one that ever sends the
key; `storage` fetches signed download URLs and never has it. requests forwards custom
headers such as x-api-key across redirects to other hosts, so API calls do not follow
redirects by themselves: a redirect off the base URL is followed by the keyless session.

What the contract leaves out and public clients have seen is handled here: fractional
credit headers (Decimal, optional), `taskId` as a string or {"value": ...}, status values
in any case, a missing eta, Retry-After in seconds or as an HTTP date, non-JSON error
bodies (a proxy's HTML 413).
"""

from __future__ import annotations

import email.utils
import os
import time
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any
from urllib.parse import urljoin, urlsplit

import requests

from folderd.errors import ApiError
from folderd.fsutil import remove_if_exists
from folderd.imaging import MIME, format_of_bytes

SYNC_PATH = "/image-upscaling/v1/upscale"
ASYNC_PATH = "/image-upscaling/v1/async-upscale"
STATUS_PATH = "/async-tasks/v1/task-status/"
RESULT_PATH = "/async-tasks/v1/result/"
CHUNK = 256 * 1024
USER_AGENT = "folderd"


@dataclass(frozen=True)
class Credits:
    consumed: Decimal | None
    remaining: Decimal | None


@dataclass(frozen=True)
class TaskStatus:
    state: str               # queued | completed | failed | (anything else the API says, lower case)
    eta: float | None        # epoch seconds, when the API gave one
    position: int | None


def parse_decimal(value: str | None) -> Decimal | None:
    if value is None:
        return None
    try:
        number = Decimal(value.strip())
    except (InvalidOperation, AttributeError):
        return None
    return number if number.is_finite() else None


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds from now: a number of seconds or an HTTP date; None if absent or bad."""
    if not value:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


def _error_message(response: requests.Response) -> str:
    """The API's error text, or a short excerpt of a body that is not JSON (an HTML proxy page)."""
    try:
        body = response.json()
        if isinstance(body, dict) and body.get("error"):
            return str(body["error"])
    except ValueError:
        pass
    text = " ".join(response.text.split())[:200] if response.content else ""
    return f"HTTP {response.status_code} {response.reason or ''}".strip() + (f": {text}" if text else "")


def classify(response: requests.Response, what: str) -> ApiError:
    """Turn an unsuccessful response into an ApiError whose kind says what to do."""
    status = response.status_code
    message = f"{what}: {_error_message(response)}"
    if status in (401, 403):
        return ApiError("auth", message, status=status)
    if status == 402:
        return ApiError("credits", message, status=status)
    if status == 429:
        return ApiError("rate", message, status=status, retry_after=parse_retry_after(response.headers.get("Retry-After")))
    if status >= 500 or status == 408:
        # The API answered with an error: it charges successful calls only.
        return ApiError("transient", message, status=status)
    return ApiError("rejected", message, status=status)


def credits_of(response: requests.Response) -> Credits:
    return Credits(parse_decimal(response.headers.get("x-credits-consumed")), parse_decimal(response.headers.get("x-remaining-credits")))


def task_id_of(body: Any) -> str:
    """`taskId` has been seen both as a string and as {"value": "..."}."""
    value = body.get("taskId") if isinstance(body, dict) else None
    if isinstance(value, dict):
        value = value.get("value")
    if isinstance(value, (str, int)) and str(value):
        return str(value)
    raise ApiError("transient", f"submit: the API answered without a task id ({str(body)[:100]})", maybe_processed=True)


class Client:
    """Calls the API with the key; downloads signed URLs without it."""

    def __init__(self, base_url: str, api_key: str, timeout: float, pool_size: int = 8) -> None:
        self.base_url = base_url.rstrip("/")
        self._key = api_key
        self.timeout = timeout
        self.api = requests.Session()
        self.storage = requests.Session()
        for session in (self.api, self.storage):
            session.headers["User-Agent"] = USER_AGENT
            adapter = requests.adapters.HTTPAdapter(pool_connections=4, pool_maxsize=pool_size)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
        origin = urlsplit(self.base_url)
        self._origin = (origin.scheme, origin.netloc)

    def close(self) -> None:
        self.api.close()
        self.storage.close()

    # ------------------------------------------------------------------ transport

    def _request(self, method: str, path: str, what: str, **kwargs: Any) -> requests.Response:
        """One API call with the key; a redirect is followed only without the key off the base URL."""
        url = self.base_url + path
        try:
            response = self.api.request(
                method, url, headers={"x-api-key": self._key}, timeout=self.timeout, allow_redirects=False, **kwargs
            )
            if response.is_redirect and method == "GET":
                location = urljoin(url, response.headers.get("Location", ""))
                target = urlsplit(location)
                if (target.scheme, target.netloc) == self._origin:
                    response = self.api.get(location, headers={"x-api-key": self._key}, timeout=self.timeout, allow_redirects=False)
                else:
                    response = self.storage.get(location, timeout=self.timeout, allow_redirects=True)
        except requests.ConnectTimeout as error:
            raise ApiError("transient", f"{what}: cannot connect to the API ({_short(error)})") from None
        except requests.ConnectionError as error:
            # A reset after the request left us: the API may have done (and charged) the work.
            sent = not _is_connect_error(error)
            raise ApiError("transient", f"{what}: connection failed ({_short(error)})", maybe_processed=sent) from None
        except requests.Timeout as error:
            raise ApiError("transient", f"{what}: no answer within {self.timeout:g}s ({_short(error)})", maybe_processed=True) from None
        except requests.RequestException as error:
            raise ApiError("transient", f"{what}: {_short(error)}", maybe_processed=True) from None
        if response.is_redirect:
            raise ApiError("rejected", f"{what}: the API answered with a redirect folderd does not follow (HTTP {response.status_code})", status=response.status_code)
        return response

    def _upload(self, path: str, what: str, image: Path, filename: str, mime: str, fields: dict[str, str]) -> requests.Response:
        with open(image, "rb") as handle:
            return self._request("POST", path, what, files={"image_file": (filename, handle, mime)}, data=fields, stream=True)

    # ------------------------------------------------------------------ endpoints

    def upscale_sync(self, image: Path, filename: str, mime: str, width: int, height: int, destination: Path) -> tuple[str, Credits]:
        """POST the image to the sync endpoint and write the result to `destination` (fsynced).

        Return (format of the result, credits). Raise ApiError.
        """
        response = self._upload(SYNC_PATH, "upscale", image, filename, mime, {"target_width": str(width), "target_height": str(height)})
        with response:
            if response.status_code != 200:
                response.content  # noqa: B018 - read the error body before the connection goes back
                raise classify(response, "upscale")
            kind = self._save_image(response, destination, "upscale", maybe_processed=True)
            return kind, credits_of(response)

    def submit(self, image: Path, filename: str, mime: str, width: int, height: int, strategy: str) -> tuple[str, Credits]:
        """Register an async upscale. Return (task id, credits). Raise ApiError."""
        response = self._upload(
            ASYNC_PATH, "submit", image, filename, mime,
            {"target_width": str(width), "target_height": str(height), "strategy": strategy},
        )
        with response:
            if response.status_code != 200:
                response.content  # noqa: B018
                raise classify(response, "submit")
            try:
                body = response.json()
            except (ValueError, requests.RequestException) as error:
                raise ApiError("transient", f"submit: the answer is not JSON ({_short(error)})", maybe_processed=True) from None
            return task_id_of(body), credits_of(response)

    def status(self, task_id: str) -> TaskStatus:
        """Ask how a task is doing. Raise ApiError."""
        response = self._request("GET", STATUS_PATH + task_id, "status")
        if response.status_code != 200:
            if response.status_code == 404:
                return TaskStatus("unknown", None, None)
            raise classify(response, "status")
        try:
            body = response.json()
        except ValueError:
            raise ApiError("transient", "status: the answer is not JSON") from None
        state = str(body.get("status", "")).strip().lower() if isinstance(body, dict) else ""
        eta = body.get("eta") if isinstance(body, dict) else None
        position = body.get("position") if isinstance(body, dict) else None
        eta_seconds = float(eta) / 1000.0 if isinstance(eta, (int, float)) and not isinstance(eta, bool) and eta > 0 else None
        return TaskStatus(state or "unknown", eta_seconds, position if isinstance(position, int) else None)

    def result_url(self, task_id: str) -> str:
        """Ask for a fresh signed URL of a completed task's image. Raise ApiError."""
        response = self._request("GET", RESULT_PATH + task_id, "result")
        if response.status_code != 200:
            if response.status_code in (400, 404, 409):
                # The task is not ready (or gone): the poller decides what it means.
                raise ApiError("transient", f"result: {_error_message(response)}", status=response.status_code)
            raise classify(response, "result")
        try:
            url = response.json().get("downloadUrl")
        except (ValueError, AttributeError):
            url = None
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            raise ApiError("transient", "result: the answer has no download URL")
        return url

    def download(self, url: str, destination: Path) -> str:
        """Fetch a signed URL (without the key) into `destination`; return the image format."""
        try:
            response = self.storage.get(url, timeout=self.timeout, stream=True)
        except requests.RequestException as error:
            raise ApiError("transient", f"download: {_short(error)}") from None
        with response:
            if response.status_code in (400, 401, 403, 404, 410):
                response.content  # noqa: B018
                raise ApiError("expired", f"download: the signed URL was refused (HTTP {response.status_code}); it may have expired", status=response.status_code)
            if response.status_code != 200:
                response.content  # noqa: B018
                raise ApiError("transient", f"download: HTTP {response.status_code}", status=response.status_code)
            return self._save_image(response, destination, "download", maybe_processed=False)

    # ------------------------------------------------------------------ bodies

    def _save_image(self, response: requests.Response, destination: Path, what: str, *, maybe_processed: bool) -> str:
        """Stream an image body to `destination`, fsync it, and check it is the image it claims."""
        expected = response.headers.get("Content-Length")
        received = 0
        head = b""
        try:
            with open(destination, "xb") as handle:
                for chunk in response.iter_content(CHUNK):
                    if len(head) < 64:
                        head += chunk[:64]
                    handle.write(chunk)
                    received += len(chunk)
                handle.flush()
                os.fsync(handle.fileno())
        except requests.RequestException as error:
            remove_if_exists(destination)
            raise ApiError("transient", f"{what}: the image was cut off ({_short(error)})", maybe_processed=maybe_processed) from None
        except OSError:
            remove_if_exists(destination)
            raise
        if (expected is not None and expected.isdigit() and int(expected) != received) or received == 0:
            remove_if_exists(destination)
            raise ApiError("transient", f"{what}: the image was cut off ({received} of {expected or '?'} bytes)", maybe_processed=maybe_processed)
        kind = format_of_bytes(head)
        declared = response.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if kind is None or kind not in MIME:
            remove_if_exists(destination)
            raise ApiError("transient", f"{what}: the body is not an image (Content-Type {declared or 'missing'})", maybe_processed=maybe_processed)
        return kind


def _is_connect_error(error: requests.ConnectionError) -> bool:
    text = repr(error)
    return "NewConnectionError" in text or "Failed to establish a new connection" in text or "Connection refused" in text


def _short(error: BaseException) -> str:
    """An exception's text without URLs' query strings (signed URLs carry their signature there)."""
    from folderd.logs import scrub_text

    return scrub_text(str(error))[:300]

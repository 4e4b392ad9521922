"""Helpers for the reliability and security tests: batches of unique inputs tracked by
SHA-256, a background sampler that watches the final folders for partial files, crash
runs, and the end-of-trial invariants (every input in exactly one final place).

Figures: when FOLDERD_RELIABILITY_REPORT names a file, every trial, injected fault and
bad input is appended to it as a JSON line, so docs/reliability.md can quote what the
tests really did (see `scripts` in docs/reliability.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import threading
import time
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from PIL import Image

from tests.fake_clipdrop import FakeClipdrop
from tests.harness import CANARY_KEY, ROOT, DaemonProcess, Setup, files

ERROR_SUFFIX = ".error.json"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()  # an empty input may sit in failed/ as it was
TERMINAL = {"archived", "failed"}


# --------------------------------------------------------------------------- figures


def report(kind: str, **fields: Any) -> None:
    """Append one fact (a trial, a fault, a bad input) to $FOLDERD_RELIABILITY_REPORT."""
    target = os.environ.get("FOLDERD_RELIABILITY_REPORT")
    if not target:
        return
    line = json.dumps({"kind": kind, "test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], **fields}, default=str)
    with open(target, "a", encoding="utf-8") as handle:
        handle.write(line + "\n")


# --------------------------------------------------------------------------- inputs


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_path(path: Path) -> str:
    return sha256_bytes(path.read_bytes())


def unique_image(path: Path, size: tuple[int, int], seed: int, fmt: str | None = None, **save: Any) -> str:
    """Write a small image no other test input shares (a gradient with seeded noise); return its sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    width, height = size
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    noise = Image.frombytes("RGB", (width // 4 or 1, height // 4 or 1), rng.randbytes((width // 4 or 1) * (height // 4 or 1) * 3))
    image.paste(noise, (width // 8, height // 8))
    fmt = fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG")
    image.save(path, fmt, **save)
    return sha256_path(path)


@dataclass
class Original:
    folder: int
    name: str
    sha256: str
    expect: str = "done"  # done | failed | either


def batch_files(
    setup: Setup, count: int, *, seed: int = 0, start: int = 0, bad: int = 0
) -> tuple[dict[str, Original], list[tuple[Path, bytes]]]:
    """`count` unique images split over the folders (JPEG and PNG), plus `bad` text files
    named .jpg; return (originals by sha256, [(path, bytes)] still to be written)."""
    import io

    originals: dict[str, Original] = {}
    writes: list[tuple[Path, bytes]] = []
    folders = len(setup.names)
    for index in range(start, start + count):
        folder = index % folders
        suffix = ".jpg" if (index // folders) % 2 == 0 else ".png"
        name = f"{'sd'[folder % 2]}{index:03d}{suffix}"
        rng = random.Random(seed * 100_003 + index)
        width, height = 40 + index % 23, 30 + index % 17
        image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
        noise = Image.frombytes("RGB", (width // 4, height // 4), rng.randbytes((width // 4) * (height // 4) * 3))
        image.paste(noise, (width // 8, height // 8))
        buffer = io.BytesIO()
        image.save(buffer, "PNG" if suffix == ".png" else "JPEG")
        data = buffer.getvalue()
        originals[sha256_bytes(data)] = Original(folder, name, sha256_bytes(data))
        writes.append((setup.path("inbox", folder) / name, data))
    for index in range(bad):
        name = f"bad{start + index:03d}.jpg"
        data = f"not an image, just text number {seed}-{start + index}\n".encode() * 4
        originals[sha256_bytes(data)] = Original(0, name, sha256_bytes(data), expect="failed")
        writes.append((setup.path("inbox", 0) / name, data))
    return originals, writes


def write_all(writes: list[tuple[Path, bytes]], *, pause: float = 0.0) -> None:
    """Write files in two halves (`pause` seconds apart: a producer still writing)."""
    for path, data in writes:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as handle:
            handle.write(data[: len(data) // 2])
            if pause:
                handle.flush()
                time.sleep(pause)
            handle.write(data[len(data) // 2 :])


def write_batch(setup: Setup, count: int, *, seed: int = 0, start: int = 0, bad: int = 0) -> dict[str, Original]:
    originals, writes = batch_files(setup, count, seed=seed, start=start, bad=bad)
    write_all(writes)
    return originals


# --------------------------------------------------------------------------- sampler


class Sampler(threading.Thread):
    """Look at outbox, done and failed every few milliseconds while daemons run.

    A file under a final (non-dot) name must never be empty, never change size, and must
    be whole when first seen: an original in done/failed has the SHA-256 of an input, a
    result in the outbox decodes completely, a sidecar is valid JSON.
    """

    def __init__(self, setup: Setup, originals: set[str] | None = None, interval: float = 0.005) -> None:
        super().__init__(name="sampler", daemon=True)
        self.dirs: list[tuple[str, Path]] = []
        for index in range(len(setup.names)):
            for kind in ("outbox", "done", "failed"):
                self.dirs.append((kind, setup.path(kind, index)))
        self.originals = originals if originals is not None else set()
        self.interval = interval
        self.violations: list[str] = []
        self.samples = 0
        self.checked = 0
        self._seen: dict[str, tuple[int, int]] = {}
        self._halt = threading.Event()

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=10)

    def run(self) -> None:
        while not self._halt.is_set():
            for kind, directory in self.dirs:
                try:
                    entries = list(os.scandir(directory))
                except FileNotFoundError:
                    continue
                for entry in entries:
                    if entry.name.startswith("."):
                        continue
                    try:
                        info = entry.stat(follow_symlinks=False)
                    except FileNotFoundError:
                        continue
                    if not entry.is_file(follow_symlinks=False):
                        continue
                    self._look(kind, Path(entry.path), info)
            self.samples += 1
            time.sleep(self.interval)

    def _look(self, kind: str, path: Path, info: os.stat_result) -> None:
        key = str(path)
        if info.st_size == 0 and not (kind in ("done", "failed") and EMPTY_SHA256 in self.originals):
            self.violations.append(f"zero-length file visible: {path}")
        previous = self._seen.get(key)
        if previous is not None:
            if previous[0] == info.st_ino and previous[1] != info.st_size:
                self.violations.append(f"{path} changed size under its final name: {previous[1]} -> {info.st_size}")
            if previous == (info.st_ino, info.st_size):
                return
        self._seen[key] = (info.st_ino, info.st_size)
        problem = self._whole(kind, path)
        self.checked += 1
        if problem:
            self.violations.append(problem)

    def _whole(self, kind: str, path: Path) -> str | None:
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        if path.name.endswith(ERROR_SUFFIX):
            try:
                json.loads(data)
            except ValueError:
                return f"partial sidecar visible: {path}"
            return None
        if kind in ("done", "failed"):
            if self.originals and sha256_bytes(data) not in self.originals:
                return f"{path} in {kind}/ is not the whole original ({len(data)} bytes, unknown sha256)"
            return None
        try:
            import io

            with Image.open(io.BytesIO(data)) as image:
                image.load()
        except Exception as error:  # noqa: BLE001 - any decode failure is a partial result
            return f"partial result visible in the outbox: {path} ({type(error).__name__}: {error})"
        return None


# --------------------------------------------------------------------------- runs


@dataclass
class Trial:
    """One batch through one or more daemon lives; collects logs and kill snapshots."""

    setup: Setup
    fake: FakeClipdrop | None
    originals: dict[str, Original]
    logs: list[Path] = field(default_factory=list)
    kills: list[dict[str, Any]] = field(default_factory=list)
    sampler: Sampler | None = None
    runs: int = 0

    def start_sampler(self) -> Sampler:
        self.sampler = Sampler(self.setup, set(self.originals))
        self.sampler.start()
        return self.sampler

    def _save_log(self, text: str, tag: str) -> Path:
        self.runs += 1
        path = self.setup.root / f"{tag}-{self.runs:02d}.log"
        path.write_text(text)
        self.logs.append(path)
        return path

    def once(self, *, env: dict[str, str] | None = None, timeout: float = 90, tag: str = "once") -> subprocess.CompletedProcess[str]:
        environment = dict(self.setup.env)
        environment.pop("FOLDERD_CRASH_AFTER", None)
        environment.update(env or {})
        result = subprocess.run(
            self.setup.command("once", "-c", str(self.setup.config)),
            check=False,
            env=environment,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=ROOT,
        )
        self._save_log(result.stdout + result.stderr, tag)
        return result

    def crash_after(self, state: str, count: int, *, timeout: float = 60, must: bool = True) -> bool:
        """`folderd once` with FOLDERD_CRASH_AFTER=state:count; return whether it died by SIGKILL
        (it must, unless `must` is false: the batch may end before the count is reached)."""
        result = self.once(env={"FOLDERD_CRASH_AFTER": f"{state}:{count}"}, timeout=timeout, tag=f"crash-{state}")
        if not must and result.returncode in (0, 1):
            return False
        assert result.returncode == -signal.SIGKILL, (
            f"expected the daemon to kill itself after {state}:{count}, it exited {result.returncode}\n{result.stderr[-3000:]}"
        )
        self.after_kill(f"after {state}:{count}")
        report("fault", fault=f"crash_after:{state}")
        return True

    def start(self) -> DaemonProcess:
        daemon = DaemonProcess(self.setup)
        self.logs.append(daemon.log_path)
        return daemon

    def kill_at(self, daemon: DaemonProcess, delay: float) -> None:
        """SIGKILL a running `folderd run` after `delay` seconds."""
        deadline = time.monotonic() + delay
        while time.monotonic() < deadline and daemon.process.poll() is None:
            time.sleep(0.01)
        alive = daemon.process.poll() is None
        daemon.kill()
        if alive:
            self.after_kill(f"random kill at {delay:.2f}s")
            report("fault", fault="sigkill:random")

    def after_kill(self, what: str) -> None:
        from folderd.ledger import read_only

        jobs = read_only(self.setup.state).jobs
        self.kills.append(
            {
                "what": what,
                "time": time.time(),
                "jobs": {job_id: dict(job) for job_id, job in jobs.items()},
            }
        )

    def finish(self, expected: int | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        """`folderd once` without the hook; exit 0 (or 1 when inputs meant to fail failed in this run)."""
        allowed = {expected} if expected is not None else {0}
        if expected is None and any(original.expect != "done" for original in self.originals.values()):
            allowed.add(1)
        result = self.once(timeout=timeout, tag="finish")
        assert result.returncode in allowed, (
            f"finishing run exited {result.returncode}, expected {sorted(allowed)}\n{result.stderr[-4000:]}"
        )
        return result

    # ------------------------------------------------------------------ checks

    def check(self, *, allow_done_duplicates: bool = False) -> dict[str, Any]:
        """Every invariant of a finished trial; return counts for the figures."""
        if self.sampler is not None:
            self.sampler.stop()
            assert self.sampler.violations == [], self.sampler.violations[:10]
        outcome = check_final(self.setup, self.originals, allow_done_duplicates=allow_done_duplicates)
        jobs = self.setup.ledger_jobs()
        checked = {"task_ids": 0, "caught_submitting": 0}
        if self.fake is not None:
            checked = check_no_resubmit(self.fake, jobs, self.kills, set(self.originals))
            assert self.fake.leaks() == 0, "the API key reached the storage host"
        texts = [path.read_text(errors="replace") for path in self.logs if path.exists()]
        check_no_secrets(texts, self.fake)
        report(
            "trial",
            files=len(self.originals),
            kills=len(self.kills),
            delivered=outcome["done"],
            failed=outcome["failed"],
            lost=0,
            resubmitted_after_task_id=0,
            logs=len(texts),
            task_ids_checked=checked["task_ids"],
            caught_submitting=checked["caught_submitting"],
            key_leaks=0,
            samples=self.sampler.samples if self.sampler else 0,
        )
        return outcome


def check_final(setup: Setup, originals: dict[str, Original], *, allow_done_duplicates: bool = False) -> dict[str, int]:
    """Each input's content is in exactly one of done/ (with exactly one result in the
    outbox) or failed/ (with a sidecar giving a reason); nothing is left behind."""
    from folderd.ledger import read_only

    ledger = read_only(setup.state)  # loads
    unfinished = [(job["source"], job["state"]) for job in ledger.jobs.values() if job["state"] not in TERMINAL]
    assert unfinished == [], f"jobs not finished: {unfinished}"
    counts = {"done": 0, "failed": 0}
    for index in range(len(setup.names)):
        inbox = setup.path("inbox", index)
        left = files(inbox)
        assert left == [], f"left in inbox {index}: {left}"
        work = inbox / ".folderd"
        leftovers = [str(path) for path in work.rglob("*") if path.is_file()] if work.exists() else []
        assert leftovers == [], f"left in the work area: {leftovers}"
        outbox = setup.path("outbox", index)
        done = _by_sha(setup.path("done", index))
        failed = _by_sha(setup.path("failed", index), skip_sidecars=True)
        results = [name for name in files(outbox)]
        mine = {sha: original for sha, original in originals.items() if original.folder == index}
        foreign = set(done) | set(failed)
        unknown = foreign - set(mine)
        assert not unknown, f"files nobody dropped in folder {index}: {[done.get(sha) or failed.get(sha) for sha in unknown]}"
        stems: dict[str, list[str]] = {}
        for name in results:
            stems.setdefault(Path(name).stem, []).append(name)
        for sha, original in mine.items():
            in_done, in_failed = done.get(sha, []), failed.get(sha, [])
            where = f"{original.name} (folder {index}): done={in_done} failed={in_failed}"
            assert in_done or in_failed, f"LOST: {where}"
            assert not (in_done and in_failed), f"in both done and failed: {where}"
            if in_done:
                if not allow_done_duplicates:
                    assert len(in_done) == 1, f"original twice in done: {where}"
                assert original.expect in ("done", "either"), f"expected to fail but delivered: {where}"
                produced = stems.pop(Path(original.name).stem, [])
                assert len(produced) == 1, f"results of {original.name}: {produced} (outbox: {results})"
                counts["done"] += 1
            else:
                assert len(in_failed) == 1, f"original twice in failed: {where}"
                assert original.expect in ("failed", "either"), f"failed unexpectedly: {where}: {_sidecar_text(setup, index, in_failed[0])}"
                sidecar = setup.path("failed", index) / (in_failed[0] + ERROR_SUFFIX)
                assert sidecar.exists(), f"no sidecar for {in_failed[0]}"
                assert json.loads(sidecar.read_text())["reason"], f"empty reason in {sidecar}"
                assert Path(original.name).stem not in stems, f"a failed input has a result: {where}"
                counts["failed"] += 1
        extra = [name for names in stems.values() for name in names]
        assert extra == [], f"results in outbox {index} matching no delivered input (a duplicate delivery?): {extra}"
    for job in ledger.jobs.values():
        if job["state"] == "archived" and job.get("output"):
            output = Path(job["output"])
            assert output.exists(), f"job {job['id']} names an output that does not exist: {output}"
            assert sha256_path(output) == job["output_sha256"], f"output of {job['source']} differs from the ledger's hash"
    return counts


def _sidecar_text(setup: Setup, index: int, name: str) -> str:
    path = setup.path("failed", index) / (name + ERROR_SUFFIX)
    return path.read_text() if path.exists() else "(no sidecar)"


def _by_sha(directory: Path, *, skip_sidecars: bool = False) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for name in files(directory):
        if skip_sidecars and name.endswith(ERROR_SUFFIX):
            continue
        found.setdefault(sha256_path(directory / name), []).append(name)
    return found


def check_no_resubmit(fake: FakeClipdrop, jobs: dict[str, dict[str, Any]], kills: list[dict[str, Any]], inputs: set[str]) -> dict[str, int]:
    """A task id stored in the ledger is never submitted again; only jobs caught in
    'submitting' may be sent twice, and those are marked maybe_paid_twice. Return how many
    stored task ids and jobs caught in 'submitting' were checked."""
    counts = {"task_ids": 0, "caught_submitting": 0}
    submits = [record for record in fake.records if record.endpoint in ("submit", "sync") and record.charged > 0]
    for kill in kills:
        for job_id, before in kill["jobs"].items():
            after = jobs.get(job_id)
            assert after is not None, f"job {job_id} vanished from the ledger"
            if before.get("task_id") and before["state"] in ("submitted", "ready", "fetched", "delivered", "archived"):
                again = [record for record in submits if record.image_sha256 == before["sha256"] and record.time > kill["time"]]
                assert again == [], f"{before['source']}: task {before['task_id']} stored, yet submitted again after the {kill['what']}"
                assert after.get("task_id") == before["task_id"], f"{before['source']}: task id changed after a restart"
                counts["task_ids"] += 1
            if before["state"] == "submitting":
                assert after.get("maybe_paid_twice") is True, (
                    f"{before['source']} was resubmitted after a crash in 'submitting' but is not marked maybe_paid_twice"
                )
                counts["caught_submitting"] += 1
    paid = fake.submissions()
    by_sha: dict[str, list[dict[str, Any]]] = {}
    for job in jobs.values():
        by_sha.setdefault(job.get("sha256", ""), []).append(job)
    for sha, count in paid.items():
        if count > 1 and sha in inputs:
            owners = by_sha.get(sha, [])
            assert any(job.get("maybe_paid_twice") for job in owners), (
                f"an input was charged {count} times without maybe_paid_twice: {[job['source'] for job in owners]}"
            )
    return counts


def signatures(fake: FakeClipdrop | None) -> set[str]:
    found: set[str] = set()
    for record in fake.records if fake is not None else []:
        for value in parse_qs(urlsplit(record.path).query).get("signature", []):
            found.add(value)
    return found


def check_no_secrets(texts: list[str], fake: FakeClipdrop | None, key: str = CANARY_KEY) -> None:
    secret_list = [key, *signatures(fake)]
    for text in texts:
        for secret in secret_list:
            assert secret not in text, f"a secret ({secret[:6]}...) appears in a daemon log"
    report("logs", scanned=len(texts), secrets=len(secret_list))


def ledger_credits(jobs: dict[str, dict[str, Any]]) -> Decimal:
    return sum((Decimal(job.get("credits") or "0") for job in jobs.values()), Decimal(0))


def two_folder_setup(root: Path, fake: FakeClipdrop, **overrides: Any) -> Setup:
    """Folder 0: smooth, small outputs (sync). Folder 1: detailed (async)."""
    fake.rpm = 1_000_000  # the fake's own rate limiter is not under test here
    root.mkdir(parents=True, exist_ok=True)
    setup = Setup(root, backend="clipdrop", folders=2, base_url=fake.base_url, **overrides).with_key()
    setup.state = Path(setup.data["state_dir"])
    setup.folder(1)["strategy"] = "detailed"
    setup.write()
    return setup


# --------------------------------------------------------------------------- summary


def summarize(path: str) -> dict[str, Any]:
    """The figures of docs/reliability.md from a $FOLDERD_RELIABILITY_REPORT file."""
    from collections import Counter

    trials = files_ = kills = lost = resubmitted = logs = delivered = failed = task_ids = caught = leaks = 0
    faults: Counter[str] = Counter()
    inputs: Counter[str] = Counter()
    with open(path, encoding="utf-8") as handle:
        lines = handle.readlines()
    for line in lines:
        fact = json.loads(line)
        if fact["kind"] == "trial":
            trials += 1
            files_ += fact["files"]
            kills += fact["kills"]
            lost += fact["lost"]
            resubmitted += fact["resubmitted_after_task_id"]
            delivered += fact["delivered"]
            failed += fact["failed"]
            task_ids += fact.get("task_ids_checked", 0)
            caught += fact.get("caught_submitting", 0)
            leaks += fact.get("key_leaks", 0)
        elif fact["kind"] == "fault":
            faults[fact["fault"] if fact["fault"].startswith("api:") else fact["fault"].split(":")[0]] += 1
        elif fact["kind"] == "bad-input":
            inputs[fact["outcome"]] += 1
        elif fact["kind"] == "logs":
            logs += fact["scanned"]
    return {
        "trials": trials,
        "inputs_tracked": files_,
        "sigkills": kills,
        "delivered": delivered,
        "failed_with_reason": failed,
        "faults": dict(faults),
        "faults_total": sum(faults.values()),
        "bad_inputs": dict(inputs),
        "bad_inputs_total": sum(inputs.values()),
        "logs_scanned": logs,
        "files_lost": lost,
        "resubmitted_after_task_id": resubmitted,
        "stored_task_ids_checked": task_ids,
        "caught_in_submitting": caught,
        "key_leaks": leaks,
    }


if __name__ == "__main__":  # python -m tests.reliability_kit REPORT...
    import sys

    for report_path in sys.argv[1:]:
        print(report_path, json.dumps(summarize(report_path), indent=1))

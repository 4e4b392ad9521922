"""Unattended operation: the systemd notify protocol, watchdog, inboxes that vanish or live on a
NAS-like FUSE mount, SIGHUP reloads, `status`, `once` progress, `retry`, journald and redaction.

Real `folderd` processes on real folders, the fake Clipdrop API over loopback.
"""

from __future__ import annotations

import io
import json
import logging
import os
import pty
import re
import select
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import structlog
from PIL import Image

from folderd import logs
from tests.fake_clipdrop import FakeClipdrop
from tests.harness import CANARY_KEY, ROOT, DaemonProcess, Setup, files, make_image, wait_until
from tests.unattended_helpers import (
    BindMount,
    NotifyListener,
    cpu_seconds,
    fuse_problem,
    hide_systemd_python,
    journal_stub,
    journald_running,
    json_lines,
)

STATUS_LINE = re.compile(r"^\d+ queued, \d+ in flight, [\d,]+ delivered, [\d,]+ failed(, .+)?$")


def _has_systemd_python() -> bool:
    try:
        from systemd import daemon  # type: ignore[import-not-found]  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path (AF_UNIX socket paths are limited to 107 bytes)."""
    path = Path(tempfile.mkdtemp(prefix="fdn-", dir="/tmp"))
    try:
        yield path
    finally:
        for child in path.iterdir():
            child.unlink()
        path.rmdir()


@pytest.fixture
def slow_fake(start_fake: Callable[..., FakeClipdrop]) -> FakeClipdrop:
    """A fake API whose async tasks take long enough to sit in 'submitted' until released."""
    return start_fake(async_duration=60.0)


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    """Daemons started by a test are killed at teardown if the test did not stop them."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        if daemon.process.poll() is None:
            daemon.kill()


def start(setup: Setup, daemons: list[DaemonProcess]) -> DaemonProcess:
    daemon = setup.start()
    daemons.append(daemon)
    return daemon


def events(daemon: DaemonProcess, name: str) -> list[dict[str, Any]]:
    return [event for event in daemon.events() if event.get("event") == name]


def wait_event(daemon: DaemonProcess, name: str, timeout: float = 15.0, **match: Any) -> dict[str, Any]:
    def found() -> dict[str, Any] | None:
        for event in events(daemon, name):
            if all(event.get(key) == value for key, value in match.items()):
                return event
        return None

    return daemon.wait_for(found, timeout, what=f"log event {name!r} {match or ''}")


def job_states(setup: Setup) -> list[str]:
    return sorted(job["state"] for job in setup.ledger_jobs().values())


def status_json(setup: Setup) -> dict[str, Any]:
    result = setup.cli("status", "--json")
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)


def rewrite(setup: Setup, daemon: DaemonProcess) -> None:
    """Write the changed config and SIGHUP the daemon."""
    setup.write()
    daemon.process.send_signal(signal.SIGHUP)


# ====================================================================== notify protocol


def use_implementation(setup: Setup, implementation: str, directory: Path) -> None:
    """Make folderd's Notifier use the raw socket ("socket") or systemd-python's sd_notify."""
    if implementation == "socket":
        setup.env["PYTHONPATH"] = hide_systemd_python(directory)
        probe = subprocess.run(
            [sys.executable, "-c", "from folderd.notify import Notifier; print(Notifier({'NOTIFY_SOCKET': '@x'})._systemd_notify)"],
            env=setup.env, cwd=ROOT, capture_output=True, text=True,
        )
        assert probe.stdout.strip() == "None", probe.stdout + probe.stderr
    elif not _has_systemd_python():
        pytest.skip("systemd-python is not installed in this environment (pip install 'folderd[systemd]')")


@pytest.mark.parametrize("implementation", ["socket", "systemd-python"])
def test_notify_ready_after_recovery_status_watchdog_reload_and_stop(
    tmp_path: Path, short_dir: Path, slow_fake: FakeClipdrop, daemons: list[DaemonProcess], implementation: str
) -> None:
    """Over a real NOTIFY_SOCKET: READY=1 only after recovery and watchers, current STATUS=, WATCHDOG=1 every interval/2, RELOADING→READY on SIGHUP, STOPPING=1 on SIGTERM."""
    setup = Setup(tmp_path, backend="clipdrop", base_url=slow_fake.base_url, folder={"strategy": "detailed"}).with_key()
    # A pending job in the ledger: submitted to the API, its task still running, then a stop.
    make_image(setup.inbox / "pending.png", (60, 40))
    first = start(setup, daemons)
    first.wait_for(lambda: job_states(setup) == ["submitted"], what="the job to be submitted")
    assert first.stop() == 0
    assert job_states(setup) == ["submitted"]
    slow_fake.complete_now()  # done while folderd was down: the restarted daemon's first poll finds it

    use_implementation(setup, implementation, tmp_path / "nosystemd")
    daemon_log: dict[str, str] = {}

    def on_message(text: str) -> None:
        if "READY=1" in text and "first_ready" not in daemon_log:
            wait_until(lambda: len(daemons) == 2, 5, "the daemon object")
            daemon_log["first_ready"] = daemons[1].log_text()  # what the daemon had logged when READY arrived

    listener = NotifyListener(str(short_dir / "notify"), on_message)
    try:
        setup.env.update(NOTIFY_SOCKET=listener.address, WATCHDOG_USEC="400000")
        second = start(setup, daemons)
        listener.wait_for(lambda fields: fields.get("READY") == "1", what="READY=1")
        first_fields = listener.fields()[0]
        assert first_fields.get("READY") == "1", f"READY=1 must be the first message: {listener.texts()}"
        assert STATUS_LINE.match(first_fields["STATUS"]), first_fields
        assert "0 queued, 1 in flight, 0 delivered, 0 failed" in first_fields["STATUS"]
        assert "credits left" in first_fields["STATUS"]  # the submit reported x-remaining-credits
        before_ready = [json.loads(line) for line in daemon_log["first_ready"].splitlines() if line.startswith("{")]
        names = [event["event"] for event in before_ready]
        assert "folderd started" in names and "watching" in names, names
        started = next(event for event in before_ready if event["event"] == "folderd started")
        assert started["jobs_resumed"] == 1

        # The job resumes from its task id and is delivered; STATUS follows it.
        listener.wait_for(lambda fields: "1 delivered" in fields.get("STATUS", ""), what="STATUS with 1 delivered")
        slow_fake.async_duration = 0.2
        make_image(setup.inbox / "new.png", (62, 40))  # another image (dedupe is off in the fast settings)
        listener.wait_for(lambda fields: "2 delivered" in fields.get("STATUS", ""), what="STATUS with 2 delivered")
        assert sorted(slow_fake.submissions().values()) == [1, 1], slow_fake.submissions()  # the resumed job was not resubmitted
        statuses = [fields["STATUS"] for fields in listener.fields() if "STATUS" in fields]
        assert all(STATUS_LINE.match(status) and "\n" not in status for status in statuses), statuses
        assert all("credits left" in status for status in statuses), statuses
        after_first = statuses[next(index for index, status in enumerate(statuses) if "1 delivered" in status):]
        assert any("1 queued" in status or "1 in flight" in status for status in after_first), statuses  # new.png on its way
        assert all(a != b for a, b in zip(statuses, statuses[1:])), f"STATUS= resent unchanged: {statuses}"
        # The daemon's own status line and the last STATUS= agree.
        wait_until(lambda: json.loads((setup.state / "status.json").read_text())["line"] == statuses[-1] or None, 5, "status.json line")

        # Watchdog pings: WATCHDOG_USEC=0.4 s, so one about every 0.2 s.
        time.sleep(1.5)
        pings = listener.times_of(lambda fields: fields.get("WATCHDOG") == "1")
        assert len(pings) >= 6, f"{len(pings)} watchdog pings"
        gaps = [b - a for a, b in zip(pings, pings[1:])]
        assert 0.12 <= statistics.median(gaps) <= 0.3, gaps
        assert max(gaps) < 0.4, f"a gap reached the watchdog deadline: {max(gaps):.3f}s"

        # SIGHUP: RELOADING=1 with MONOTONIC_USEC, then READY=1 again.
        mark = len(listener.texts())
        second.process.send_signal(signal.SIGHUP)
        reloading = listener.wait_for(lambda fields: fields.get("RELOADING") == "1", start=mark, what="RELOADING=1")
        monotonic_usec = int(listener.fields()[reloading]["MONOTONIC_USEC"])
        assert abs(monotonic_usec / 1e6 - time.clock_gettime(time.CLOCK_MONOTONIC)) < 5
        listener.wait_for(lambda fields: fields.get("READY") == "1", start=reloading + 1, what="READY=1 after the reload")

        # SIGTERM: STOPPING=1, exit 0, nothing after STOPPING.
        mark = len(listener.texts())
        assert second.stop() == 0
        stopping = listener.wait_for(lambda fields: fields.get("STOPPING") == "1", start=mark, timeout=3, what="STOPPING=1")
        time.sleep(0.1)
        kinds = [next(key for key in ("READY", "RELOADING", "STOPPING", "WATCHDOG", "STATUS") if key in fields) for fields in listener.fields()]
        assert kinds[0] == "READY" and kinds[stopping] == "STOPPING" and stopping == len(kinds) - 1, kinds
        order = [kind for kind in kinds if kind in ("READY", "RELOADING", "STOPPING")]
        assert order == ["READY", "RELOADING", "READY", "STOPPING"], order
    finally:
        listener.close()


@pytest.mark.parametrize("implementation", ["socket", "systemd-python"])
def test_notify_abstract_socket_name(tmp_path: Path, daemons: list[DaemonProcess], implementation: str) -> None:
    """NOTIFY_SOCKET='@name' (an abstract socket) gets READY, STATUS and STOPPING, with and without systemd-python."""
    setup = Setup(tmp_path, backend="local")
    use_implementation(setup, implementation, tmp_path / "nosystemd")
    listener = NotifyListener(f"@folderd-test-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    try:
        setup.env["NOTIFY_SOCKET"] = listener.address
        daemon = start(setup, daemons)
        listener.wait_for(lambda fields: fields.get("READY") == "1", what="READY=1")
        make_image(setup.inbox / "a.jpg")
        listener.wait_for(lambda fields: "1 delivered" in fields.get("STATUS", ""), what="STATUS with 1 delivered")
        assert daemon.stop() == 0
        listener.wait_for(lambda fields: fields.get("STOPPING") == "1", timeout=3, what="STOPPING=1")
        assert "WATCHDOG=1" not in listener.texts(), "no WATCHDOG_USEC, so no pings"
    finally:
        listener.close()


def test_watchdog_withheld_while_a_watcher_is_stuck_on_a_hung_mount(tmp_path: Path) -> None:
    """A watcher blocked in a scan of a hung FUSE mount (bindfs SIGSTOPped) stops the WATCHDOG=1 pings; they resume when it turns again."""
    if problem := fuse_problem():
        pytest.skip(problem)
    from folderd.config import load
    from folderd.daemon import Daemon
    from folderd.notify import Notifier

    class Recorder(Notifier):
        def __init__(self) -> None:
            super().__init__({"WATCHDOG_USEC": "400000"})
            self.sent: list[str] = []

        def send(self, *lines: str) -> None:
            self.sent.append("\n".join(lines))

    try:
        mount = BindMount(tmp_path / "nas", tmp_path / "share" / "inbox")
    except OSError as error:
        pytest.skip(f"FUSE mount failed here: {error}")
    offset = [0.0]

    def clock() -> float:
        return time.monotonic() + offset[0]

    daemon = None
    try:
        setup = Setup(tmp_path, backend="local", folder={"inbox": str(mount.point), "watch": "poll"})
        config = load(setup.config)
        recorder = Recorder()
        daemon = Daemon(config, notifier=recorder, environ={"WATCHDOG_USEC": "400000"}, clock=clock)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        daemon._start_watcher(config.folders[0])
        watcher = daemon.watchers["f0"]
        wait_until(lambda: watcher.last_scan, 5, "a first scan of the mount")

        daemon._housekeeping()
        assert recorder.sent.count("WATCHDOG=1") == 1, recorder.sent

        mount.freeze()
        deadline = time.monotonic() + 15
        while True:  # blocked: no turn of its loop (at least one a second when free) for 1.3 s
            beat = watcher.heartbeat
            time.sleep(1.3)
            if watcher.heartbeat == beat:
                break
            assert time.monotonic() < deadline, "the watcher never blocked on the frozen mount"
        offset[0] += 31.0  # what would otherwise be 31 s of waiting for the stale-heartbeat limit
        daemon.next_watchdog = 0.0
        with structlog.testing.capture_logs() as captured:
            daemon._housekeeping()
        assert recorder.sent.count("WATCHDOG=1") == 1, "a ping was sent while the watcher was stuck"
        assert any("watcher is stuck" in entry["event"] and entry.get("folder") == "f0" for entry in captured), captured

        mount.thaw()
        wait_until(lambda: watcher.heartbeat > beat + 30, 10, "the watcher to turn again")
        daemon.next_watchdog = 0.0
        daemon._housekeeping()
        assert recorder.sent.count("WATCHDOG=1") == 2, recorder.sent
    finally:
        mount.thaw()
        if daemon is not None:
            for watcher in daemon.watchers.values():
                watcher.stop()
                watcher.join(timeout=5)
        mount.unmount()


# ====================================================================== inboxes that vanish


def test_inbox_that_disappears_is_reported_once_without_spinning_and_taken_up_again(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """An inbox renamed away (a NAS unmount), then a plain file in its place: reported once, the watcher survives, CPU stays low; once back, files are taken again."""
    setup = Setup(tmp_path, backend="local")
    daemon = start(setup, daemons)
    wait_event(daemon, "watching", folder="f0")
    make_image(setup.inbox / "before.jpg")
    daemon.wait_for(lambda: files(setup.done) == ["before.jpg"], what="before.jpg delivered and archived")

    away = tmp_path / "f0" / "inbox.away"
    setup.inbox.rename(away)
    wait_event(daemon, "inbox unavailable; retrying with backoff", folder="f0")
    wait_until(lambda: status_json(setup)["folders"]["f0"]["unavailable"], 5, "status to show the inbox unavailable")
    assert "INBOX UNAVAILABLE: FileNotFoundError" in setup.cli("status").stdout

    cpu_before = cpu_seconds(daemon.process.pid)
    setup.inbox.write_bytes(b"a file where the inbox was")  # scans now fail with ENOTDIR
    time.sleep(3.0)
    cpu_used = cpu_seconds(daemon.process.pid) - cpu_before
    assert cpu_used < 0.5, f"the daemon used {cpu_used:.2f}s of CPU in 3 s with its inbox gone"
    assert daemon.process.poll() is None

    setup.inbox.unlink()
    make_image(away / "after.jpg")
    away.rename(setup.inbox)
    wait_event(daemon, "inbox available again", timeout=20, folder="f0")
    daemon.wait_for(lambda: files(setup.outbox) == ["after.jpg", "before.jpg"], what="after.jpg delivered")
    assert len(events(daemon, "inbox unavailable; retrying with backoff")) == 1
    assert not events(daemon, "a folder watcher thread died; starting a new one")
    wait_until(lambda: status_json(setup)["folders"]["f0"]["unavailable"] is None, 5, "status to show the inbox available")
    assert daemon.stop() == 0


def test_nas_like_fuse_inbox_is_polled_and_writes_behind_the_mount_are_taken(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """An inbox on a bindfs (FUSE) mount gets watch: auto → poll with the fuse reason; a file written to the backing dir (no inotify event) is delivered."""
    if problem := fuse_problem():
        pytest.skip(problem)
    try:
        mount = BindMount(tmp_path / "nas-backing", tmp_path / "share" / "inbox")
    except OSError as error:
        pytest.skip(f"FUSE mount failed here: {error}")
    try:
        setup = Setup(tmp_path, backend="local", folder={"inbox": str(mount.point), "watch": "auto"})
        check = setup.cli("check")
        assert "watch poll (fuse" in check.stdout, check.stdout + check.stderr
        daemon = start(setup, daemons)
        wait_event(daemon, "watching", folder="f0", method="poll")
        wait_until(lambda: status_json(setup)["folders"]["f0"]["last_scan"], 5, "a scan")
        folder = status_json(setup)["folders"]["f0"]
        assert folder["watch"] == "poll"
        assert folder["watch_reason"].startswith("fuse") and str(mount.point) in folder["watch_reason"], folder
        assert "watch: poll (fuse" in setup.cli("status").stdout

        make_image(mount.backing / "scan-001.jpg", (40, 30))  # written behind the mount, as another host would
        daemon.wait_for(lambda: files(setup.outbox) == ["scan-001.jpg"], what="the file written behind the mount")
        with Image.open(setup.outbox / "scan-001.jpg") as image:
            assert image.size == (80, 60)
        done = mount.point.parent / "done"  # the default <inbox>/../done, off the FUSE mount
        daemon.wait_for(lambda: files(done) == ["scan-001.jpg"], what="the original archived off the FUSE mount")
        assert files(mount.backing) == []
        assert daemon.stop() == 0
    finally:
        mount.unmount()


# ====================================================================== SIGHUP reload


def test_reload_adds_a_folder_and_changes_a_target_without_restart(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """SIGHUP with a new folder and a changed target: the new folder's files are taken, new files use the new target, same process."""
    setup = Setup(tmp_path, backend="local", folders=2)
    added = setup.data["folders"].pop(1)
    setup.write()
    daemon = start(setup, daemons)
    make_image(setup.inbox / "old.jpg", (40, 30))
    daemon.wait_for(lambda: files(setup.outbox) == ["old.jpg"], what="old.jpg")

    setup.data["folders"].append(added)
    setup.folder(0)["target"] = {"scale": 3}
    rewrite(setup, daemon)
    event = wait_event(daemon, "configuration reloaded")
    assert event["added"] == ["f1"] and event["changed"] == ["f0"] and event["removed"] == []
    make_image(setup.path("inbox", 1) / "other.jpg", (40, 30))
    make_image(setup.inbox / "new.jpg", (40, 30))
    daemon.wait_for(lambda: files(setup.path("outbox", 1)) == ["other.jpg"], what="the added folder's file")
    daemon.wait_for(lambda: files(setup.outbox) == ["new.jpg", "old.jpg"], what="new.jpg")
    sizes = {}
    for name in ("old.jpg", "new.jpg"):
        with Image.open(setup.outbox / name) as image:
            sizes[name] = image.size
    assert sizes == {"old.jpg": (80, 60), "new.jpg": (120, 90)}
    with Image.open(setup.path("outbox", 1) / "other.jpg") as image:
        assert image.size == (80, 60)
    assert len(events(daemon, "folderd started")) == 1
    assert daemon.stop() == 0


def test_reload_removing_a_folder_with_a_job_in_flight_finishes_it_once(tmp_path: Path, slow_fake: FakeClipdrop, daemons: list[DaemonProcess]) -> None:
    """A folder removed by SIGHUP while its job sits in 'submitted': the job completes, nothing is submitted twice, the folder is no longer watched."""
    setup = Setup(tmp_path, backend="clipdrop", base_url=slow_fake.base_url, folders=2, folder={"strategy": "detailed"}).with_key()
    slow_fake.eta = False  # polled with backoff from 200 ms, so complete_now() is seen soon
    daemon = start(setup, daemons)
    make_image(setup.path("inbox", 1) / "x.png", (60, 40))
    daemon.wait_for(lambda: job_states(setup) == ["submitted"], what="x.png submitted")

    removed = setup.data["folders"].pop(1)
    rewrite(setup, daemon)
    event = wait_event(daemon, "configuration reloaded")
    assert event["removed"] == ["f1"]
    make_image(Path(removed["inbox"]) / "late.png", (60, 40))  # the folder is no longer watched
    slow_fake.complete_now()
    daemon.wait_for(lambda: files(Path(removed["outbox"])) == ["x.jpg"], what="the removed folder's job delivered")
    daemon.wait_for(lambda: job_states(setup) == ["archived"], what="the job archived")
    time.sleep(0.5)
    assert files(Path(removed["inbox"])) == ["late.png"]
    assert len(slow_fake.calls("submit")) == 1 and list(slow_fake.submissions().values()) == [1]
    assert daemon.stop() == 0


def test_reload_with_an_invalid_config_names_the_key_and_keeps_the_old_one(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """A SIGHUP with an unknown key logs errors naming it; the old configuration keeps working."""
    setup = Setup(tmp_path, backend="local")
    daemon = start(setup, daemons)
    wait_event(daemon, "folderd started")
    setup.folder(0)["frobnicate"] = True
    setup.folder(0)["target"] = {"scale": 3}
    rewrite(setup, daemon)
    event = wait_event(daemon, "reload rejected: the configuration has errors; the old one stays in force")
    assert any("folders[0].frobnicate" in problem and "unknown key" in problem for problem in event["errors"]), event
    make_image(setup.inbox / "still.jpg", (40, 30))
    daemon.wait_for(lambda: files(setup.outbox) == ["still.jpg"], what="a file in the old folder")
    with Image.open(setup.outbox / "still.jpg") as image:
        assert image.size == (80, 60)  # the old target
    assert not events(daemon, "configuration reloaded")
    assert daemon.stop() == 0


def test_sighup_during_startup_does_not_kill_the_daemon_and_is_applied(tmp_path: Path, daemons: list[DaemonProcess]) -> None:
    """A SIGHUP while folderd is still starting (held up on a hung FUSE inbox) neither kills it nor is lost: the reload is applied once it runs."""
    if problem := fuse_problem():
        pytest.skip(problem)
    try:
        mount = BindMount(tmp_path / "nas", tmp_path / "share" / "inbox")
    except OSError as error:
        pytest.skip(f"FUSE mount failed here: {error}")
    try:
        setup = Setup(tmp_path, backend="local", folders=2, folder={"watch": "poll"})
        added = setup.data["folders"].pop(1)
        setup.folder(0)["inbox"] = str(mount.point)
        setup.write()
        mount.freeze()
        daemon = start(setup, daemons)
        lock = setup.state / "lock"
        wait_until(lambda: lock.exists() and lock.read_text().strip() == str(daemon.process.pid), 10, "the daemon to take its lock")
        time.sleep(0.5)
        assert not events(daemon, "folderd started"), "start-up was expected to be held up by the hung mount"
        setup.data["folders"].append(added)
        rewrite(setup, daemon)
        time.sleep(0.5)
        assert daemon.process.poll() is None, f"SIGHUP during start-up killed folderd (exit {daemon.process.returncode})"
        mount.thaw()
        wait_event(daemon, "folderd started")
        event = wait_event(daemon, "configuration reloaded")
        assert event["added"] == ["f1"]
        make_image(setup.path("inbox", 1) / "late.jpg")
        daemon.wait_for(lambda: files(setup.path("outbox", 1)) == ["late.jpg"], what="a file in the folder the reload added")
        assert daemon.stop() == 0
    finally:
        mount.thaw()
        for daemon in daemons:
            if daemon.process.poll() is None:
                daemon.kill()
        mount.unmount()


# ====================================================================== status


def _documented_status_keys() -> dict[str, set[str]]:
    """The key sets of the README's `status --json` example."""
    readme = (ROOT / "README.md").read_text()
    block = readme.split("`folderd status --json` prints a stable document:", 1)[1]
    example = json.loads(block.split("```json", 1)[1].split("```", 1)[0])
    folder = next(iter(example["folders"].values()))
    return {"top": set(example), "daemon": set(example["daemon"]), "credits": set(example["credits"]), "folder": set(folder) - {"jobs"}, "job": set(folder["jobs"][0])}


def test_status_shows_watch_method_last_scan_pause_and_oldest_pending(tmp_path: Path, fake: FakeClipdrop, daemons: list[DaemonProcess]) -> None:
    """`status` (text and --json) shows per folder the watch method and why, the last scan, a 401 pause and why, the oldest pending job; --json keys match the documented schema."""
    from folderd import status as status_module

    setup = Setup(tmp_path, backend="clipdrop", base_url=fake.base_url, folders=2, clipdrop={"pause_retry": "4s"}).with_key()
    setup.folder(0)["watch"] = "auto"
    setup.folder(1)["watch"] = "poll"
    setup.write()
    fake.inject("any", "401", times=1000)
    daemon = start(setup, daemons)
    make_image(setup.inbox / "first.jpg")
    wait_event(daemon, "API backend paused: files wait in their folders, nothing is moved to failed")
    make_image(setup.inbox / "second.jpg")  # arrives while paused: stays in the inbox
    document = daemon.wait_for(lambda: (doc := status_json(setup))["folders"]["f0"]["waiting_in_inbox"] == 1 and doc, what="second.jpg waiting in the inbox")
    now = time.time()
    documented = _documented_status_keys()
    assert set(document) == documented["top"]
    assert set(document["daemon"]) == documented["daemon"]
    assert set(document["credits"]) == documented["credits"]
    for name, folder in document["folders"].items():
        assert set(folder) - {"jobs"} == documented["folder"], name
        assert all(set(job) == documented["job"] for job in folder["jobs"])
    for key in documented["daemon"] | documented["credits"] | documented["folder"] | documented["job"]:
        assert f'"{key}"' in (status_module.__doc__ or ""), f"{key} is not documented in folderd/status.py"

    daemon_part = document["daemon"]
    assert daemon_part["running"] and daemon_part["pid"] == daemon.process.pid
    assert "HTTP 401" in daemon_part["paused"] and "PAUSED" in daemon_part["line"]
    f0, f1 = document["folders"]["f0"], document["folders"]["f1"]
    assert f0["watch"] == "native" and " mount at " in f0["watch_reason"]
    assert f1["watch"] == "poll" and f1["watch_reason"] == "watch: poll in the config"
    assert now - 60 < f0["last_scan"] <= now + 1 and now - 60 < f1["last_scan"] <= now + 1  # kept to 30 s granularity
    assert [job["file"] for job in f0["jobs"]] == ["first.jpg"] and f0["queued"] + f0["in_flight"] == 1
    assert now - 30 < f0["oldest_pending"] < now and f1["oldest_pending"] is None
    assert files(setup.failed) == []

    text = setup.cli("status").stdout
    assert f"daemon: running (pid {daemon.process.pid})" in text
    assert re.search(r"API PAUSED: .*HTTP 401", text), text
    assert re.search(r"f0: .*\n  watch: native \(\S+ mount at [^)]*\); last scan \d+s ago\n", text), text
    assert "  watch: poll (watch: poll in the config); last scan" in text
    assert re.search(r"  oldest pending: \d+s\n", text) and "first.jpg" in text

    fake.clear_faults()
    daemon.wait_for(lambda: files(setup.outbox) == ["first.jpg", "second.jpg"], timeout=20, what="delivery once the key works")
    document = daemon.wait_for(lambda: (doc := status_json(setup))["daemon"]["paused"] is None and doc, what="the pause to clear")
    assert document["folders"]["f0"]["delivered"] == 2 and document["folders"]["f0"]["oldest_pending"] is None
    assert document["credits"]["remaining"] == "998"
    assert daemon.stop() == 0
    after = status_json(setup)
    assert after["daemon"]["running"] is False and after["folders"]["f0"]["watch"] is None
    assert "daemon: not running" in setup.cli("status").stdout


# ====================================================================== once progress


def test_once_progress_is_json_lines_without_a_terminal(tmp_path: Path, fake: FakeClipdrop) -> None:
    """`folderd once` with stderr not a TTY logs a JSON 'progress' event per finished file with done/total/credits."""
    setup = Setup(tmp_path, backend="clipdrop", base_url=fake.base_url).with_key()
    for index in range(3):
        make_image(setup.inbox / f"p{index}.jpg")
    result = setup.once()
    assert result.returncode == 0, result.stderr
    progress = [event for event in json_lines(result.stderr) if event.get("event") == "progress"]
    assert [(event["done"], event["total"], event["credits"]) for event in progress] == [(1, 3, "1"), (2, 3, "2"), (3, 3, "3")], progress
    assert "ETA" not in result.stderr and "\r" not in result.stderr


def test_once_progress_bar_on_a_terminal(tmp_path: Path, fake: FakeClipdrop) -> None:
    """`folderd once` on a TTY (a pty) draws a progress bar with files, credits and an ETA."""
    setup = Setup(tmp_path, backend="clipdrop", base_url=fake.base_url).with_key()
    for index in range(3):
        make_image(setup.inbox / f"p{index}.jpg")
    master, slave = pty.openpty()
    command = setup.command("once", "-c", str(setup.config), "--log-level", "warning")  # the bar alone
    process = subprocess.Popen(command, env=setup.env, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave)
    os.close(slave)
    output = b""
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        ready, _, _ = select.select([master], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            output += chunk
        elif process.poll() is not None:
            break
    os.close(master)
    code = process.wait(timeout=10)
    text = output.decode(errors="replace")
    assert code == 0, text
    bars = re.findall(r"\[[#.]{30}\] (\d+)/(\d+) files, \S+ credits, ETA (?:\d+:\d\d|--:--)", text)
    assert bars, text
    assert ("3", "3") in bars, bars
    assert "3/3 files, 3 credits" in text
    assert text.endswith("3/3 files, 3 credits, ETA --:--\r\n"), f"the final bar must end its line: {text[-200:]!r}"


# ====================================================================== retry


def test_retry_moves_failed_files_back_and_they_are_delivered_when_fixed(tmp_path: Path, fake: FakeClipdrop) -> None:
    """`folderd retry [--folder NAME] [FILE…]` moves matching failed originals back, removes sidecars, reports unknown names with exit 1; the files are then delivered."""
    setup = Setup(tmp_path, backend="clipdrop", base_url=fake.base_url, folders=2).with_key()
    make_image(setup.inbox / "a.jpg")
    make_image(setup.inbox / "b.jpg")
    make_image(setup.path("inbox", 1) / "c.jpg")
    fake.inject("sync", "413-html", times=3)  # the API rejects all three: they fail
    result = setup.once()
    assert result.returncode == 1, result.stderr
    assert files(setup.failed) == ["a.jpg", "a.jpg.error.json", "b.jpg", "b.jpg.error.json"]
    assert files(setup.path("failed", 1)) == ["c.jpg", "c.jpg.error.json"]
    assert json.loads((setup.failed / "a.jpg.error.json").read_text())  # a reason is there

    nothing = setup.cli("retry", "--folder", "nosuch")
    assert nothing.returncode == 1 and "no folder named 'nosuch'" in nothing.stderr

    partly = setup.cli("retry", "--folder", "f0", "a.jpg", "zzz.jpg")
    assert partly.returncode == 1
    assert "no failed file matches 'zzz.jpg'" in partly.stderr and "moved back: f0: a.jpg" in partly.stdout
    assert files(setup.inbox) == ["a.jpg"]
    assert files(setup.failed) == ["b.jpg", "b.jpg.error.json"]
    assert files(setup.path("failed", 1)) == ["c.jpg", "c.jpg.error.json"]

    result = setup.once()  # the fault is gone: delivered the second time
    assert result.returncode == 0, result.stderr
    assert files(setup.outbox) == ["a.jpg"]

    rest = setup.cli("retry")
    assert rest.returncode == 0, rest.stderr
    assert files(setup.failed) == [] and files(setup.path("failed", 1)) == []
    assert files(setup.inbox) == ["b.jpg"] and files(setup.path("inbox", 1)) == ["c.jpg"]
    result = setup.once()
    assert result.returncode == 0, result.stderr
    assert files(setup.outbox) == ["a.jpg", "b.jpg"] and files(setup.path("outbox", 1)) == ["c.jpg"]
    empty = setup.cli("retry")
    assert empty.returncode == 0 and "no failed files" in empty.stdout


# ====================================================================== journald


def test_journal_stream_that_does_not_match_stderr_keeps_json_lines(tmp_path: Path) -> None:
    """JOURNAL_STREAM naming another device:inode than stderr: output stays JSON lines (log.format auto)."""
    setup = Setup(tmp_path, backend="local", log={"level": "info", "format": "auto"})
    setup.env["JOURNAL_STREAM"] = "8:12345"
    make_image(setup.inbox / "a.jpg")
    result = setup.once()
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines and all(json.loads(line)["event"] for line in lines), result.stderr
    assert any(json.loads(line)["event"] == "folderd started" for line in lines)


def test_journal_stream_matching_stderr_sends_events_with_fields(tmp_path: Path) -> None:
    """JOURNAL_STREAM matching stderr's device:inode: events go through systemd.journal.send (a recording stand-in) with FOLDER/JOB_ID fields, not to stderr."""
    setup = Setup(tmp_path, backend="local", log={"level": "info", "format": "auto"})
    setup.env["PYTHONPATH"] = journal_stub(tmp_path / "journalstub")
    journal = tmp_path / "journal.jsonl"
    setup.env["FOLDERD_TEST_JOURNAL"] = str(journal)
    make_image(setup.inbox / "a.jpg")
    stderr_path = tmp_path / "stderr.txt"
    with open(stderr_path, "w") as stderr:
        info = os.fstat(stderr.fileno())
        setup.env["JOURNAL_STREAM"] = f"{info.st_dev}:{info.st_ino}"
        code = subprocess.run(setup.command("once", "-c", str(setup.config)), env=setup.env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=stderr, timeout=60).returncode
    assert code == 0, stderr_path.read_text()
    assert json_lines(stderr_path.read_text()) == [], "events went to stderr instead of the journal"
    entries = [json.loads(line) for line in journal.read_text().splitlines()]
    assert any(entry["MESSAGE"].startswith("folderd started") for entry in entries), entries
    archived = [entry for entry in entries if entry.get("STATE") == "archived"]
    assert archived, entries
    entry = archived[0]
    assert entry["SYSLOG_IDENTIFIER"] == "folderd" and entry["PRIORITY"] == "6"
    assert entry["FOLDER"] == "f0" and entry["FILE"] == "a.jpg" and entry["JOB_ID"]
    assert all(re.fullmatch(r"[A-Z0-9_]+", key) for entry in entries for key in entry), "journal field names must be upper-case"


def test_journal_real_journald(tmp_path: Path) -> None:
    """With journald running and systemd-python installed, an event sent by folderd's journal renderer can be read back with journalctl."""
    if not journald_running():
        pytest.skip("journald is not running here (no /run/systemd/journal/socket): the real journal cannot be read back")
    if not _has_systemd_python():
        pytest.skip("systemd-python is not installed")
    from systemd import journal  # type: ignore[import-not-found]

    marker = f"folderd-test-{uuid.uuid4().hex}"
    renderer = logs._JournalRenderer(journal.send)
    with pytest.raises(structlog.DropEvent):
        renderer(None, "info", {"event": marker, "level": "info", "folder": "f0", "job_id": "j1"})
    found = ""
    for _ in range(50):
        found = subprocess.run(["journalctl", "-o", "json", "--no-pager", "-n", "200", "SYSLOG_IDENTIFIER=folderd"], capture_output=True, text=True).stdout
        if marker in found:
            break
        time.sleep(0.1)
    entry = next(json.loads(line) for line in found.splitlines() if marker in line)
    assert entry["FOLDER"] == "f0" and entry["JOB_ID"] == "j1"


# ====================================================================== redaction


@pytest.fixture
def restore_stdlib_logging() -> Iterator[None]:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def test_api_key_and_url_signatures_never_reach_log_output(restore_stdlib_logging: None) -> None:
    """The canary API key in a message, a nested field or an exception text, and ?signature= query strings, are scrubbed from JSON, console, stdlib and journal output."""
    signed = "https://storage.example/results/x.jpg?X-Amz-Signature=deadbeef99&X-Amz-Expires=600"
    for fmt in ("json", "console"):
        stream = io.StringIO()
        logs.configure("debug", fmt, stream)
        logs.register_secret(CANARY_KEY)
        log = logs.get("folderd.test")
        log.info(f"called with {CANARY_KEY}", headers={"x-api-key": CANARY_KEY}, urls=[signed], attempt=(1, CANARY_KEY))
        log.warning("download failed", error=RuntimeError(f"401 for key {CANARY_KEY} at {signed}"))
        try:
            raise ConnectionError(f"HTTPSConnectionPool: Max retries exceeded with url: {signed} (key {CANARY_KEY})")
        except ConnectionError:
            log.exception("fetch crashed", url=signed)
        logging.getLogger("urllib3.connectionpool").warning("Retrying %s with key %s", signed, CANARY_KEY)
        output = stream.getvalue()
        assert CANARY_KEY not in output, output
        assert "deadbeef99" not in output and "X-Amz-Signature" not in output, output
        assert output.count(logs.REDACTED) >= 8, output
        assert "https://storage.example/results/x.jpg?" in output and "ConnectionError" in output  # the rest is kept
        if fmt == "json":
            assert all(json.loads(line) for line in output.splitlines() if line.startswith("{"))

    sent: list[dict[str, Any]] = []
    renderer = logs._JournalRenderer(lambda message, **fields: sent.append({"MESSAGE": message, **fields}))
    structlog.configure(processors=[structlog.processors.add_log_level, structlog.processors.format_exc_info, logs.redact, renderer], logger_factory=structlog.PrintLoggerFactory(io.StringIO()))
    logs.get("folderd.test").error("job", folder="f0", reason=f"refused {CANARY_KEY} {signed}")
    assert sent and CANARY_KEY not in json.dumps(sent) and "deadbeef99" not in json.dumps(sent), sent

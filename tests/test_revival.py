"""A watcher thread or the inotify observer that dies is started again (in-process: the
daemon's loop runs in a thread, so the test can reach in and break its threads)."""

from __future__ import annotations

import io
import threading
from collections.abc import Iterator

import pytest

from folderd import logs
from folderd.config import load
from folderd.daemon import Daemon
from tests.harness import Setup, files, make_image, wait_until


@pytest.fixture
def running(local_setup: Setup) -> Iterator[tuple[Daemon, io.StringIO, Setup]]:
    """A daemon on a natively watched folder whose full rescans are rare, so only events bring files in quickly."""
    local_setup.folder().update(watch="native", rescan="600s")
    local_setup.write()
    stream = io.StringIO()
    logs.configure("info", "json", stream)
    daemon = Daemon(load(local_setup.config), environ={})
    thread = threading.Thread(target=daemon.run, daemon=True)
    thread.start()
    wait_until(lambda: "folderd started" in stream.getvalue(), what="the daemon to start")
    try:
        yield daemon, stream, local_setup
    finally:
        daemon.request_stop()
        thread.join(15)
    assert not thread.is_alive()


def test_dead_inotify_observer_is_replaced_and_events_work_again(running: tuple[Daemon, io.StringIO, Setup]) -> None:
    """If the inotify observer thread dies, the daemon logs it, starts a new one, and new files are taken on events again."""
    daemon, stream, setup = running
    old = daemon.observer
    old.stop()
    old.join(5)
    assert not old.is_alive()
    wait_until(lambda: "the inotify observer thread died" in stream.getvalue(), timeout=15, what="the revival")
    assert daemon.observer is not None and daemon.observer is not old and daemon.observer.is_alive()
    make_image(setup.inbox / "after.jpg")
    wait_until(lambda: files(setup.outbox) == ["after.jpg"], timeout=10, what="a file taken after the revival")


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_watcher_thread_is_started_again(running: tuple[Daemon, io.StringIO, Setup]) -> None:
    """If a folder's watcher thread dies (here: an error its loop does not catch), a new watcher takes over the folder."""
    daemon, stream, setup = running
    watcher = daemon.watchers["f0"]

    def die() -> None:
        raise SystemExit("the watcher thread ends")

    watcher._scan = die  # type: ignore[method-assign]
    watcher.hint(None)  # ask for a full scan, which now ends the thread
    watcher.join(5)
    assert not watcher.is_alive()
    wait_until(lambda: "a folder watcher thread died" in stream.getvalue(), timeout=15, what="the revival")
    assert daemon.watchers["f0"] is not watcher and daemon.watchers["f0"].is_alive()
    make_image(setup.inbox / "later.jpg")
    wait_until(lambda: files(setup.outbox) == ["later.jpg"], timeout=10, what="a file taken by the new watcher")

"""`folderd check` and the watcher against the environment: permissions and inotify limits."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import ROOT, Setup, files, make_image

INOTIFY_INSTANCES = Path("/proc/sys/fs/inotify/max_user_instances")


@pytest.fixture
def world_readable_dir() -> Iterator[Path]:
    """A directory another user can read (pytest's own tmp dirs are private to root)."""
    path = Path(tempfile.mkdtemp(prefix="folderd-check-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root and setpriv to run check as another user")
def test_check_reports_folders_this_user_cannot_write(world_readable_dir: Path) -> None:
    """Run as an unprivileged user, `folderd check` names every folder it could not write or create, and exits non-zero."""
    tmp_path = world_readable_dir
    setup = Setup(tmp_path, backend="local")
    for kind in ("inbox", "outbox"):
        setup.path(kind).mkdir(parents=True)  # owned by root, mode 755: not writable by nobody
    setup.data["state_dir"] = str(tmp_path / "state")
    setup.write()
    command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m", "folderd", "check", "-c", str(setup.config)]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, env={"PATH": os.environ["PATH"], "PYTHONPATH": str(ROOT)})
    assert result.returncode == 1, result.stdout + result.stderr
    for what in ("state_dir:", "folder f0: inbox:", "folder f0: outbox:", "folder f0: done:", "folder f0: failed:"):
        assert what in result.stderr
    assert "is not writable by this user" in result.stderr


@pytest.fixture
def no_inotify_instances() -> Iterator[None]:
    """fs.inotify.max_user_instances at 0 for the test (restored after), so no inotify instance can be made."""
    try:
        old = INOTIFY_INSTANCES.read_text()
        INOTIFY_INSTANCES.write_text("0\n")
    except OSError as error:
        pytest.skip(f"cannot change fs.inotify.max_user_instances here: {error}")
    try:
        yield
    finally:
        INOTIFY_INSTANCES.write_text(old)


def test_inotify_limit_falls_back_to_polling_with_the_sysctl_to_raise(local_setup: Setup, no_inotify_instances: None) -> None:
    """When inotify cannot be had (instance limit), the folder is polled instead, the log names the sysctl to raise, and files are still taken."""
    local_setup.folder()["watch"] = "native"
    local_setup.write()
    daemon = local_setup.start()
    try:
        daemon.wait_for(lambda: "max_user_instances" in daemon.log_text(), what="the inotify advice")
        make_image(local_setup.inbox / "late.jpg")
        daemon.wait_for(lambda: files(local_setup.outbox) == ["late.jpg"], what="the file to be taken by polling")
        status = local_setup.cli("status", "--json").stdout
        assert '"watch": "poll"' in status and "max_user_instances" in status
    finally:
        assert daemon.stop() == 0

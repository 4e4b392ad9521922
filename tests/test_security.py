"""Security (issue 3): planted links never expose or receive files, the API key goes only to
base_url and into no log, a key file others can read is refused, and two daemons sharing an
inbox each take a file at most once.

Covered elsewhere and not repeated here: planted symlinks and hard links never *opened*
(inotify proof, local backend) and a second daemon on one state dir in
tests/test_e2e_files.py; the key and signed-URL signatures in no log/state file and
redirects of status/result calls in tests/test_e2e_api.py; overlapping or nested folder
paths (outbox/done/failed inside the inbox, inbox == outbox, shared inboxes) in
tests/test_config.py (test_inbox_equal_to_outbox, test_folder_inside_the_inbox,
test_overlapping_folders_between_rules, test_state_dir_inside_an_inbox).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from folderd.claim import ClaimRefused, claim
from tests.fake_clipdrop import FakeClipdrop
from tests.harness import CANARY_KEY, ROOT, Setup, files
from tests.reliability_kit import (
    Original,
    Trial,
    batch_files,
    check_final,
    report,
    sha256_path,
    signatures,
    two_folder_setup,
    unique_image,
    write_all,
    write_batch,
)


def _snapshot(path: Path) -> tuple[bytes, int, int]:
    info = os.lstat(path)
    return path.read_bytes(), info.st_mtime_ns, info.st_ino


def site(root: Path, **options: Any) -> Setup:
    root.mkdir(parents=True, exist_ok=True)
    return Setup(root, **options)


def _uploaded(fake: FakeClipdrop) -> set[str]:
    return {record.image_sha256 for record in fake.records if record.image_sha256}


# =========================================================================== planted links


def test_planted_links_in_the_inbox_never_upload_or_move_a_file_from_elsewhere(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If symlinks (to an image and to a key file), a hard link, and a symlinked folder are
    planted in a recursive inbox, none of their targets is uploaded (checked by the hashes
    the API received), moved, or changed; the links stay where they are."""
    fake.rpm = 1_000_000
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret_image = elsewhere / "private.jpg"
    unique_image(secret_image, (64, 48), seed=901)
    key_file = elsewhere / "clipdrop.key"
    key_file.write_text(CANARY_KEY + "\n")
    hard_target = elsewhere / "hard.jpg"
    unique_image(hard_target, (64, 48), seed=902)
    (elsewhere / "folder").mkdir()
    inner = elsewhere / "folder" / "inner.jpg"
    unique_image(inner, (64, 48), seed=903)
    targets = [secret_image, key_file, hard_target, inner]
    before = {path: _snapshot(path) for path in targets}

    setup = site(tmp_path / "site", backend="clipdrop", base_url=fake.base_url, folder={"recursive": True}).with_key()
    inbox = setup.inbox
    (inbox / "real").mkdir(parents=True)
    (inbox / "link.jpg").symlink_to(secret_image)
    (inbox / "key.jpg").symlink_to(key_file)
    (inbox / "real" / "deep.jpg").symlink_to(secret_image)
    (inbox / "album").symlink_to(elsewhere / "folder")  # a symlinked folder
    (inbox / "album.jpg").symlink_to(elsewhere / "folder")  # ... named like an image
    os.link(hard_target, inbox / "hard.jpg")
    normal = unique_image(inbox / "real" / "normal.jpg", (64, 48), seed=904)
    trial = Trial(setup, fake, {normal: Original(0, "real/normal.jpg", normal)})
    trial.start_sampler()
    result = trial.once()
    assert result.returncode == 0, result.stderr[-3000:]
    report("fault", fault="planted-links:inbox")

    forbidden = {sha256_path(path) for path in targets}
    assert not forbidden & _uploaded(fake), "a file from outside the inbox was uploaded"
    assert len(fake.calls("sync")) == 1
    for path, snapshot in before.items():
        assert _snapshot(path) == snapshot, f"{path} was changed or moved"
    for link in ("link.jpg", "key.jpg", "real/deep.jpg", "album", "album.jpg"):
        assert (inbox / link).is_symlink(), f"{link} was moved"
    assert os.stat(inbox / "hard.jpg").st_nlink == 2
    for kind in ("outbox", "done", "failed"):
        for name in files(setup.path(kind)):
            assert sha256_path(setup.path(kind) / name) not in forbidden, f"{kind}/{name} holds a file from elsewhere"
    assert files(setup.outbox) == ["real/normal.jpg"]
    assert files(setup.failed) == []
    with pytest.raises(AssertionError, match="left in inbox"):
        check_final(setup, trial.originals)  # the planted links are still there, by design
    text = Path(trial.logs[0]).read_text()
    assert CANARY_KEY not in text


def test_claim_never_follows_a_symlink_swapped_in_after_the_scan(tmp_path: Path) -> None:
    """If a settled file is swapped for a symlink, or its folder for a symlinked folder, just
    before the claim, the claim refuses (O_NOFOLLOW on every component) and moves nothing."""
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    secret = elsewhere / "x.jpg"
    secret.write_bytes(b"\xff\xd8\xff secret \xff\xd9")
    inbox = tmp_path / "inbox"
    (inbox / "sub").mkdir(parents=True)
    (inbox / "x.jpg").symlink_to(secret)
    with pytest.raises(ClaimRefused, match="symbolic link"):
        claim(inbox, "x.jpg", None, "d1", "f")
    os.rmdir(inbox / "sub")
    (inbox / "sub").symlink_to(elsewhere)
    with pytest.raises(ClaimRefused, match="cannot open the folder"):
        claim(inbox, "sub/x.jpg", None, "d1", "f")
    assert secret.read_bytes() == b"\xff\xd8\xff secret \xff\xd9"
    assert [path for path in (inbox / ".folderd").rglob("*") if path.is_file()] == []
    report("fault", fault="planted-links:claim-race")


def test_outputs_never_written_through_planted_symlinks(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If outbox/photo.jpg, done/photo.jpg and failed/bad.jpg(.error.json) are planted
    symlinks to victims (and outbox/ghost.jpg dangles), the victims stay untouched, nothing is
    created through the dangling link, and results and originals get other names."""
    fake.rpm = 1_000_000
    setup = site(tmp_path / "site", backend="clipdrop", base_url=fake.base_url).with_key()
    victims = tmp_path / "victims"
    victims.mkdir()
    for kind in ("outbox", "done", "failed"):
        setup.path(kind).mkdir(parents=True)
    planted = {
        setup.outbox / "photo.jpg": victims / "outbox-victim",
        setup.done / "photo.jpg": victims / "done-victim",
        setup.failed / "bad.jpg": victims / "failed-victim",
        setup.failed / "bad.jpg.error.json": victims / "sidecar-victim",
    }
    for link, victim in planted.items():
        victim.write_text(f"do not touch {victim.name}\n")
        link.symlink_to(victim)
    (setup.outbox / "ghost.jpg").symlink_to(victims / "never-created")
    before = {victim: _snapshot(victim) for victim in planted.values()}
    photo = unique_image(setup.inbox / "photo.jpg", (64, 48), seed=911)
    ghost = unique_image(setup.inbox / "ghost.jpg", (64, 48), seed=912)
    bad_data = b"plain text, not an image\n" * 10
    (setup.inbox / "bad.jpg").write_bytes(bad_data)
    trial = Trial(setup, fake, {photo: Original(0, "photo.jpg", photo), ghost: Original(0, "ghost.jpg", ghost)})
    result = trial.once()
    assert result.returncode == 1, result.stderr[-3000:]  # bad.jpg failed
    report("fault", fault="planted-links:outbox")
    for victim, snapshot in before.items():
        assert _snapshot(victim) == snapshot, f"{victim} was written through a planted symlink"
    assert not (victims / "never-created").exists()
    for link, victim in planted.items():
        assert link.is_symlink() and os.readlink(link) == str(victim)
    assert sha256_path(setup.outbox / "photo-1.jpg") and sha256_path(setup.done / "photo-1.jpg") == photo
    assert sha256_path(setup.done / "ghost.jpg") == ghost
    assert (setup.outbox / "ghost-1.jpg").is_file()
    assert (setup.failed / "bad-1.jpg").read_bytes() == bad_data
    assert "not an image" in (setup.failed / "bad-1.jpg.error.json").read_text()


def test_symlinked_subfolder_planted_in_outbox_done_or_failed_is_never_written_through(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If, in a recursive folder, outbox/sub and done/sub are planted symlinks to another
    folder, nothing is written there: the job fails with a reason naming the link and the
    original goes to failed/sub (it used to land, with its result, in the link's target)."""
    fake.rpm = 1_000_000
    setup = site(tmp_path / "site", backend="clipdrop", base_url=fake.base_url, folder={"recursive": True}).with_key()
    victim = tmp_path / "victim"
    victim.mkdir()
    for kind in ("outbox", "done"):
        setup.path(kind).mkdir(parents=True)
        (setup.path(kind) / "sub").symlink_to(victim)
    data = unique_image(setup.inbox / "sub" / "x.jpg", (64, 48), seed=921)
    trial = Trial(setup, fake, {data: Original(0, "sub/x.jpg", data, expect="failed")})
    result = trial.once()
    assert result.returncode == 1, result.stderr[-3000:]
    report("fault", fault="planted-links:outbox-subfolder")
    assert list(victim.iterdir()) == []
    assert sha256_path(setup.failed / "sub" / "x.jpg") == data
    sidecar = (setup.failed / "sub" / "x.jpg.error.json").read_text()
    assert "symbolic link" in sidecar and str(setup.outbox / "sub") in sidecar
    assert fake.records == [], "the upload must not happen when the result has nowhere safe to go"


# =========================================================================== the API key


@pytest.mark.parametrize("endpoint", ["sync", "submit", "download"])
def test_key_never_follows_a_redirect_of_an_upload_or_a_download(tmp_path: Path, fake: FakeClipdrop, endpoint: str) -> None:
    """If an upload (sync, async submit) is answered with a redirect to the storage host, it is
    not followed (the file fails with a reason, the key stays home); a redirected download is
    followed by the keyless session and delivered. The storage host never sees the key."""
    fake.rpm = 1_000_000
    setup = Setup(
        tmp_path, backend="clipdrop", base_url=fake.base_url, folder={"mode": "sync" if endpoint == "sync" else "async"}
    ).with_key()
    data = unique_image(setup.inbox / "r.jpg", (64, 48), seed=931)
    fake.inject(endpoint, "redirect")
    report("fault", fault=f"api:redirect-{endpoint}")
    upload = endpoint in ("sync", "submit")
    trial = Trial(setup, fake, {data: Original(0, "r.jpg", data, expect="failed" if upload else "done")})
    result = trial.once()
    assert result.returncode == (1 if upload else 0), result.stderr[-3000:]
    assert [record.fault for record in fake.records if record.fault] == ["redirect"]
    assert fake.leaks() == 0
    assert all(record.api_key is None for record in fake.calls("download"))
    trial.check()
    if upload:
        assert "the API answered with a redirect folderd does not follow" in (setup.failed / "r.jpg.error.json").read_text()
        assert fake.charged() == 0


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660], ids=["0640", "0604", "0660"])
def test_run_and_once_refuse_a_key_file_others_can_read(tmp_path: Path, fake: FakeClipdrop, mode: int) -> None:
    """If clipdrop.api_key_file is readable by group or others, `folderd run` and `once`
    refuse to start (exit 2) with a message saying to chmod 600, without printing the key
    or touching the inbox; with mode 0600 the same setup works."""
    fake.rpm = 1_000_000
    key_file = tmp_path / "clipdrop.key"
    key_file.write_text(CANARY_KEY + "\n")
    key_file.chmod(mode)
    setup = site(tmp_path / "site", backend="clipdrop", base_url=fake.base_url, clipdrop={"api_key_file": str(key_file)})
    data = unique_image(setup.inbox / "a.jpg", (64, 48), seed=941)
    for command in ("once", "run"):
        result = subprocess.run(
            setup.command(command, "-c", str(setup.config)),
            env=setup.env,
            capture_output=True,
            text=True,
            timeout=30,
            cwd=ROOT,
            check=False,
        )
        output = result.stdout + result.stderr
        assert result.returncode == 2, output[-3000:]
        assert f"readable by group or others (mode {mode:04o}); run: chmod 600 {key_file}" in output
        assert CANARY_KEY not in output
        assert files(setup.inbox) == ["a.jpg"] and fake.records == []
    report("fault", fault=f"key-file-mode:{mode:o}")
    key_file.chmod(0o600)
    trial = Trial(setup, fake, {data: Original(0, "a.jpg", data)})
    assert trial.once().returncode == 0
    trial.check()


def test_key_and_signatures_never_in_any_output_of_any_command(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If a key from api_key_file drives a batch with expired URLs, cut downloads and server
    errors at debug level, then status, status --json, check and plan run, neither the key nor
    any signed-URL signature appears in any output, state file, sidecar or result."""
    fake.rpm = 1_000_000
    key_file = tmp_path / "clipdrop.key"
    key_file.write_text(CANARY_KEY + "\n")
    key_file.chmod(0o600)
    setup = two_folder_setup(tmp_path / "site", fake, clipdrop={"api_key_file": str(key_file)})
    setup.env.pop("CLIPDROP_API_KEY", None)
    originals = write_batch(setup, 6, seed=951)
    for original in originals.values():
        original.expect = "either"
    fake.inject("result", "expired-url", times=2)
    fake.inject("download", "500")
    fake.inject("download", "truncate")
    fake.inject("status", "502-html")
    fake.inject("sync", "413-html")
    report("fault", fault="api:secrets-batch")
    trial = Trial(setup, fake, originals)
    trial.start_sampler()
    daemon = trial.start()
    try:
        daemon.wait_for(
            lambda: len(files(setup.done)) + len(files(setup.path("done", 1))) + len(files(setup.failed)) >= 7, what="the batch finished"
        )
        daemon.process.send_signal(signal.SIGHUP)  # a reload re-reads the key
        time.sleep(0.5)
        assert daemon.stop() == 0
    finally:
        if daemon.process.poll() is None:
            daemon.kill()
    outputs = [daemon.log_text()]
    for args in (("status",), ("status", "--json"), ("check",), ("plan",), ("plan", "--json")):
        result = setup.cli(*args)
        outputs.append(result.stdout + result.stderr)
    trial.check()
    secrets = [CANARY_KEY, *signatures(fake)]
    assert len(secrets) >= 3
    stored = b"\n".join(path.read_bytes() for path in (tmp_path / "site").rglob("*") if path.is_file() and not path.is_symlink())
    for secret in secrets:
        assert all(secret not in text for text in outputs), f"{secret[:8]}... in a command's output"
        assert secret.encode() not in stored, f"{secret[:8]}... stored under the folders or state"
    assert fake.leaks() == 0


# =========================================================================== two daemons


def test_two_daemons_with_their_own_state_share_an_inbox_and_take_each_file_once(tmp_path: Path, fake: FakeClipdrop) -> None:
    """If two daemons (separate state dirs) watch the same inboxes and deliver to the same
    folders, and one of them is killed -9 mid-batch and restarted, each file is claimed by
    exactly one daemon, delivered once, and paid once."""
    fake.latency = 0.02
    first = two_folder_setup(tmp_path / "a", fake)
    second = two_folder_setup(tmp_path / "b", fake)
    second.data["folders"] = first.data["folders"]
    second.write()
    originals, writes = batch_files(first, 40, seed=961)
    one, two = Trial(first, fake, originals), Trial(second, fake, originals)
    one.start_sampler()
    daemons = [one.start(), two.start()]
    try:
        for daemon, setup in zip(daemons, (first, second)):
            daemon.wait_for(lambda setup=setup: (setup.state / "status.json").exists(), what="started")
        write_all(writes, pause=0.005)
        time.sleep(0.4)
        one.kill_at(daemons[0], 0.0)
        daemons[1].wait_for(lambda: len(files(first.done)) + len(files(first.path("done", 1))) >= 10, what="progress")
        restarted = one.start()
        daemons.append(restarted)
        restarted.wait_for(
            lambda: len(files(first.done)) + len(files(first.path("done", 1))) == 40, timeout=30, what="every file delivered"
        )
        for daemon in daemons[1:]:
            assert daemon.stop() == 0
    finally:
        for daemon in daemons:
            if daemon.process.poll() is None:
                daemon.kill()
    one.check()  # exactly once in done with one result, no partial file, no resubmit; ledger A finished
    jobs_a, jobs_b = first.ledger_jobs(), second.ledger_jobs()
    assert all(job["state"] in ("archived", "failed") for job in jobs_b.values())
    claimed = sorted(job["sha256"] for job in [*jobs_a.values(), *jobs_b.values()])
    assert claimed == sorted(originals), "each file claimed by exactly one of the two daemons"
    assert jobs_a and jobs_b, "both daemons took part"
    paid = fake.submissions()
    for sha in originals:
        assert paid.get(sha, 0) == 1 or any(
            job.get("maybe_paid_twice") for job in [*jobs_a.values(), *jobs_b.values()] if job["sha256"] == sha
        )

"""Fixtures shared by the suite: the fake Clipdrop server and folder setups."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from folderd import logs
from tests.fake_clipdrop import FakeClipdrop
from tests.harness import CANARY_KEY, Setup


@pytest.fixture(autouse=True)
def _reset_logging() -> Iterator[None]:
    """Global logging state (structlog config, registered secrets) is reset around each test."""
    yield
    structlog.reset_defaults()
    logs.reset_secrets()


@pytest.fixture
def fake() -> Iterator[FakeClipdrop]:
    """A fake Clipdrop API on loopback that knows the canary key, with 1000 credits."""
    server = FakeClipdrop(keys={CANARY_KEY: 1000}, async_duration=0.3)
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert server.errors() == [], server.errors()


@pytest.fixture
def local_setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path, backend="local")


@pytest.fixture
def api_setup(tmp_path: Path, fake: FakeClipdrop) -> Setup:
    return Setup(tmp_path, backend="clipdrop", base_url=fake.base_url).with_key()

"""Fixtures shared by the suite: the fake Clipdrop server and folder setups."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

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
def start_fake() -> Iterator[Callable[..., FakeClipdrop]]:
    """Start fake Clipdrop APIs on loopback that know the canary key (1000 credits); each is
    stopped at teardown and must have seen no error of its own."""
    servers: list[FakeClipdrop] = []

    def start(**options: Any) -> FakeClipdrop:
        server = FakeClipdrop(**{"keys": {CANARY_KEY: 1000}, **options})
        server.start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.stop()
    for server in servers:
        assert server.errors() == [], server.errors()


@pytest.fixture
def fake(start_fake: Callable[..., FakeClipdrop]) -> FakeClipdrop:
    """A fake Clipdrop API whose async tasks take 0.3 s."""
    return start_fake(async_duration=0.3)


@pytest.fixture
def local_setup(tmp_path: Path) -> Setup:
    return Setup(tmp_path, backend="local")


@pytest.fixture
def api_setup(tmp_path: Path, fake: FakeClipdrop) -> Setup:
    return Setup(tmp_path, backend="clipdrop", base_url=fake.base_url).with_key()

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.world import Agent, Image, World, agents, bake_image
from tests.sshd import Sshd, SshUser, ssh_user, start_sshd, utmp_file

__all__ = ["ssh_user"]


@pytest.fixture
def sshd(tmp_path: Path, ssh_user: SshUser) -> Iterator[Sshd]:
    """An sshd of the test's own: an agent reads its whole log from the start (as on a
    host's first run), so the log must hold only this test's logins."""
    with utmp_file(), start_sshd(tmp_path / "sshd", ssh_user) as server:
        yield server


@pytest.fixture(scope="session")
def image(tmp_path_factory: pytest.TempPathFactory) -> Image:
    return bake_image(tmp_path_factory.mktemp("image"))


@pytest.fixture(scope="session")
def world(tmp_path_factory: pytest.TempPathFactory, image: Image) -> Iterator[World]:
    """One collector for every test's hosts (each test has hosts of its own), the image
    registered."""
    world = World(tmp_path_factory.mktemp("collector"), image).start()
    try:
        world.register_image()
        yield world
    finally:
        world.close()


@pytest.fixture
def new_agent(world: World, tmp_path: Path) -> Iterator[Callable[..., Agent]]:
    with agents(world, tmp_path) as make:
        yield make

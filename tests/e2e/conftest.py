from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.e2e.world import Agent, Image, World, agents, bake_image
from tests.sshd import ssh_user, sshd

__all__ = ["ssh_user", "sshd"]


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

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

import pyneuron


@pytest.fixture(params=pyneuron.available_simd_levels())
def simd(request: pytest.FixtureRequest) -> Iterator[str]:
    """Run the test at every SIMD level this CPU supports."""
    previous = pyneuron.simd_level()
    pyneuron.set_simd_level(request.param)
    yield request.param
    pyneuron.set_simd_level(previous)


@pytest.fixture(params=[1, 3])
def threads(request: pytest.FixtureRequest) -> Iterator[int]:
    """Run the test with one and several worker threads."""
    previous = pyneuron.num_threads()
    pyneuron.set_num_threads(request.param)
    yield request.param
    pyneuron.set_num_threads(previous)


@pytest.fixture(scope="session", autouse=True)
def _outside_the_source_tree(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """Run from a scratch directory, so that child processes (`python -c`, Ray workers,
    which put the working directory on sys.path) import the installed pyneuron, not the
    source tree's, which has no compiled engine."""
    previous = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(previous)

from __future__ import annotations

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

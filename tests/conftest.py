from __future__ import annotations

import logging
import os
from collections.abc import Iterator

import numpy as np
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


@pytest.fixture(scope="session")
def tiny_project(tmp_path_factory):
    """A folder of images, a concept store over them and a model file."""
    from PIL import Image

    root = tmp_path_factory.mktemp("project")
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir()
    n = 12
    pixels = rng.integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)
    for i in range(n):
        Image.fromarray(pixels[i]).save(images / f"{i:02d}.png")
    masks = np.zeros((3, n, 8, 8), dtype=bool)
    masks[0, :, :4] = True
    masks[1, ::2] = True
    masks[2, :, :, ::3] = True
    pyneuron.ConceptStore.from_masks(masks, ["top", "even", "stripes"]).save(root / "store")
    (root / "net.py").write_text(
        "import torch\n"
        "def build():\n"
        "    torch.manual_seed(0)\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2, padding=1),"
        " torch.nn.ReLU())\n"
    )
    return root


#: Set to "0" while a test cluster runs (see ``cluster``).
LOOPBACK_ONLY = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


@pytest.fixture(scope="module")
def cluster():
    """A local Ray cluster for the module: a head node without CPUs and two worker nodes
    with one CPU each, all on 127.0.0.1 (skipped when Ray is not installed)."""
    # Single-machine mode: Ray then resolves 127.0.0.1 to itself, not to this host's
    # network address (which the loopback-bound nodes do not listen on). Read when Ray is
    # imported, and inherited by the nodes and by drivers started from the tests.
    previous = os.environ.get(LOOPBACK_ONLY)
    os.environ[LOOPBACK_ONLY] = "0"
    ray = pytest.importorskip(
        "ray", reason="the Ray backend needs Ray: pip install 'pyneuron[ray]'"
    )
    from ray.cluster_utils import Cluster

    nodes = Cluster(
        initialize_head=True,
        head_node_args={"num_cpus": 0, "node_ip_address": "127.0.0.1", "include_dashboard": False},
    )
    try:
        for _ in range(2):
            nodes.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        ray.init(address=nodes.address, logging_level=logging.WARNING, log_to_driver=False)
        nodes.wait_for_nodes()
        yield nodes
    finally:
        ray.shutdown()
        nodes.shutdown()
        if previous is None:
            os.environ.pop(LOOPBACK_ONLY)
        else:
            os.environ[LOOPBACK_ONLY] = previous

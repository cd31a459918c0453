"""Shared test setup: CPU runs use Triton's interpreter; GPU tests are marked and skipped without CUDA."""

import os
import sys

import pytest
import torch

HERE = os.path.dirname(__file__)
sys.path.insert(0, HERE)  # tests import the oracle as `oracle`

if not torch.cuda.is_available():
    # Without a GPU, Triton kernels run under the interpreter (numpy on the CPU).
    os.environ.setdefault("TRITON_INTERPRET", "1")

# Every call of a prepared launch (the launchers' per-signature plans) checks that its arguments
# have the launch key of the plan's first call: each test is also a test of the plan keys.
from flashfuse.kernels import launch as _launch  # noqa: E402

_launch.audit = True


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run on the device machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dynamo(request):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    yield
    # A Triton kernel that fails falls back to the reference kernel with a warning, and the
    # reference gives the right answer: a test comparing results would pass on the fallback.
    # Only tests marked kernel_fallback may cause one.
    fell_back = counters["flashfuse"]["kernel_fallback"]
    if fell_back and request.node.get_closest_marker("kernel_fallback") is None:
        pytest.fail(f"{fell_back} Triton kernel call(s) fell back to the reference kernel (see the 'flashfuse' log)")

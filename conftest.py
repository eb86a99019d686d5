"""GPU gating and the data-check switch for pytest and nbval.

* Tests marked `gpu` are skipped where no usable GPU is found.
* Notebook cells tagged `gpu` are skipped by nbval there too (the stored outputs, from a GPU run,
  stay in the book; the cells are just not re-run).
* `DSA_REQUIRE_GPU=1` (set by `python3 dev.py gpu`) turns those skips into failures: on the GPU
  machine nothing may be skipped silently.
* The suite runs with the package's checks of device data ON (`DSA_CHECK=1`, see
  dsa_tutorial.checks; the notebook kernels nbval starts inherit it): every index, position and
  length a test passes is validated. Tests of the default, unchecked path switch them off
  themselves (`checks.data_checks(False)`).
"""
from __future__ import annotations

import os

import pytest

os.environ.setdefault("DSA_CHECK", "1")

from dsa_tutorial.kernels import gpu_available  # noqa: E402

GPU_TAG = "gpu"


def _is_gpu_cell(item) -> bool:
    cell = getattr(item, "cell", None)  # nbval's IPyNbCell items carry their notebook cell
    return cell is not None and GPU_TAG in cell.get("metadata", {}).get("tags", [])


def pytest_collection_modifyitems(config, items):
    have_gpu = gpu_available()
    required = os.environ.get("DSA_REQUIRE_GPU") == "1"
    if required and not have_gpu:
        raise pytest.UsageError("DSA_REQUIRE_GPU=1 but no usable GPU (torch.cuda and CuPy) was found")
    if have_gpu:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy (none found)")
    for item in items:
        if item.get_closest_marker("gpu") is not None or _is_gpu_cell(item):
            item.add_marker(skip)

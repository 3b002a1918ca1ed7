"""The rule by which a CUDA library's own version meets what TensorFlow's and-cuda extra asks of its wheel (the
libraries themselves are loaded for real in the image: tests/test_image.py)."""

from __future__ import annotations

import pytest
from packaging.requirements import Requirement

from trainer.gpus import LIBRARIES, _extra_requirements, version_meets


@pytest.mark.parametrize("version, requirement, meets", [
    ((12, 9, 3), "nvidia-cublas-cu12<13.0,>=12.5.3.2", True),  # a library reports fewer parts than its wheel
    ((12, 5, 3), "nvidia-cublas-cu12<13.0,>=12.5.3.2", True),
    ((12, 4, 9), "nvidia-cublas-cu12<13.0,>=12.5.3.2", False),
    ((13, 0, 0), "nvidia-cublas-cu12<13.0,>=12.5.3.2", False),
    ((9, 28, 0), "nvidia-cudnn-cu12<10.0,>=9.3.0.75", True),
    ((8, 9, 7), "nvidia-cudnn-cu12<10.0,>=9.3.0.75", False),  # the cuDNN of tensorflow/tensorflow:2.21.0-gpu
    ((9, 1, 0), "nvidia-cudnn-cu12<10.0,>=9.3.0.75", False),
    ((12, 9), "nvidia-nvjitlink-cu12<13.0,>=12.5.82", True),
])
def test_a_librarys_version_meets_its_wheels_requirement_part_by_part(version, requirement, meets):
    assert version_meets(version, Requirement(requirement)) is meets


def test_every_checked_library_comes_from_a_wheel_tensorflows_and_cuda_extra_asks_for():
    asked = _extra_requirements()
    assert {library.wheel for library in LIBRARIES} <= set(asked)
    # The extra's wheels that ship no library TensorFlow loads: ptxas and the CUDA headers (nvcc), for XLA.
    assert set(asked) - {library.wheel for library in LIBRARIES} == {"nvidia-cuda-nvcc-cu12"}

"""Fixtures of the core tests: the tiny random pipelines, one fresh pair per test module (tests hook and trace
them, so no module sees another's state)."""

from __future__ import annotations

import pytest

from attnscope.tiny import build_tiny_flux_pipeline, build_tiny_sd3_pipeline


@pytest.fixture(scope="module")
def flux():
    return build_tiny_flux_pipeline(seed=0)


@pytest.fixture(scope="module")
def sd3():
    return build_tiny_sd3_pipeline(seed=0)

"""Shared test configuration: hypothesis profiles and real-tool requirements.

Profiles: "ci" (default) is bounded so the suite fits CI; ZCORE_DEEP=1 selects "deep",
which runs at least 20 times more examples per property.
"""

from __future__ import annotations

import os
import shutil

import pytest
from hypothesis import HealthCheck, settings

CI_EXAMPLES = 40
settings.register_profile(
    "ci",
    max_examples=CI_EXAMPLES,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.register_profile(
    "deep",
    max_examples=CI_EXAMPLES * 25,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
settings.load_profile("deep" if os.environ.get("ZCORE_DEEP") == "1" else "ci")

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str) -> str:
    """Path of an external tool; skips the test when it is missing, but fails in CI, where
    .ci/run installs every tool the tests use."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (apt-get install it; .ci/run does)"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    return path

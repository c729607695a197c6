"""The one rule for a test whose outside tool (node, Chromium, promtool...) is missing.

Such a test skips on a developer's machine, and fails in CI (``CI`` set to anything but
empty, ``0``, ``false`` or ``no``), where .ci/run installs every tool the suite needs.
"""

import os
from typing import NoReturn

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() not in ("", "0", "false", "no")


def missing_tool(reason: str, install: str) -> NoReturn:
    """Skip the test for ``reason``, or fail it in CI; ``install`` says how to get the tool."""
    if in_ci():
        pytest.fail(f"{reason}; CI must have it ({install})")
    pytest.skip(f"{reason} ({install})")

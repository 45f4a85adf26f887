"""Fixtures of the integration tests: Debian's Chromium for the browser tests (never a downloaded build).

`make test` installs it when it is missing. Set MASKSERVE_SKIP_BROWSER=1 to skip the browser tests on a machine
that cannot have it; without that a missing browser fails them rather than hiding.
"""

from __future__ import annotations

import os
import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = [
    "--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


@pytest.fixture(scope="module")
def browser_path() -> str:
    if os.environ.get("MASKSERVE_SKIP_BROWSER") == "1":
        pytest.skip("MASKSERVE_SKIP_BROWSER=1")
    if not os.path.exists(CHROMIUM):
        pytest.fail("Debian's chromium is missing: run `make test` (it installs it) or apt-get install chromium")
    return CHROMIUM

"""Shared pytest fixtures."""

from __future__ import annotations

from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = REPO_ROOT.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir() -> Path:
    """The read-only ``../shared`` folder beside the checkout; skips the test when it is absent."""
    if not (SHARED_DIR / "README.md").is_file():
        pytest.skip(f"needs ../shared (looked in {SHARED_DIR}), which a fresh clone does not have")
    return SHARED_DIR

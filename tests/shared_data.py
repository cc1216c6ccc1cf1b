"""The public prompt sets the tests read (``../shared/data`` beside the checkout, or ``$SRUM_SHARED_DATA``):
never copied into the repository, so a test that needs one skips with the path when it is absent."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(os.environ.get("SRUM_SHARED_DATA") or Path(__file__).resolve().parents[2] / "shared" / "data")
GENEVAL = SHARED_DATA / "geneval" / "evaluation_metadata.jsonl"
COMPBENCH = SHARED_DATA / "t2i-compbench" / "val_comp.json"


def require(*paths: Path) -> None:
    """Skip the calling test, naming the first missing file."""
    for path in paths:
        if not path.is_file():
            pytest.skip(f"{path} not present (set SRUM_SHARED_DATA)")

"""Shared pytest set-up: deterministic seeds and quiet, single-machine defaults."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")  # local Ray stays on 127.0.0.1

from tests.vllm_server import vllm_server  # noqa: E402,F401  (session fixture: one real vLLM server)


def pytest_collection_modifyitems(config, items):
    """The tests on the real vLLM server run last: its session-wide server (about 2 GB and a polling engine
    worker) then never shares the two cores with the rest of the suite."""
    items.sort(key=lambda item: item.get_closest_marker("vllm") is not None)  # stable: order kept otherwise

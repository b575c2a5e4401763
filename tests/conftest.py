"""Shared fixtures: a tiny demo model trained once per test session."""

from __future__ import annotations

import pytest

from memslot.demo.recipe import TINY, train_demo


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete model folder from the TINY recipe (trains in seconds on a CPU)."""
    out = tmp_path_factory.mktemp("tiny-model")
    report = train_demo(out, TINY, device="cpu", progress=False)
    assert report["train_exact_match"] > 0.5, report  # a fixture that learned nothing is a bug
    return out

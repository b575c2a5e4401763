"""Shared fixtures: a tiny demo model trained once per test session."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton's CPU interpreter must be chosen before the first Triton or Gluon module is
    # imported (its setting is read once): the kernel tests run under it on a machine without
    # a GPU, whichever test module imports Triton first
    os.environ.setdefault("TRITON_INTERPRET", "1")

from memslot.demo.recipe import TINY, train_demo  # noqa: E402


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A complete model folder from the TINY recipe (trains in seconds on a CPU)."""
    out = tmp_path_factory.mktemp("tiny-model")
    report = train_demo(out, TINY, device="cpu", progress=False)
    assert report["train_exact_match"] > 0.5, report  # a fixture that learned nothing is a bug
    return out

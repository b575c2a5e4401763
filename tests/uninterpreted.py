"""Calls into a test module in a child process with Triton's interpreter off.

Compiling for a GPU target needs Triton's real compiler; under the interpreter (which the CPU
test run chooses before Triton is imported) Triton's own library functions are interpreted
ones that no compiler can call.
"""

import json
import os
import subprocess
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def call(module: str, expression: str, timeout: float = 1200, env: dict | None = None):
    """``module.expression`` (a call of one of the test module's functions) evaluated in a child
    Python with the interpreter off: what it returns, through JSON. An answer {"skip": why}
    skips the calling test."""
    child_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"} | (env or {})
    code = (
        f"import json, sys; sys.path.insert(0, {HERE!r}); import {module} as t; "
        f"print(json.dumps(t.{expression}))"
    )
    child = subprocess.run(
        [sys.executable, "-c", code], env=child_env, capture_output=True, text=True,
        timeout=timeout,
    )  # fmt: skip
    assert child.returncode == 0, child.stderr[-4000:]
    answer = json.loads(child.stdout.strip().splitlines()[-1])
    if isinstance(answer, dict) and "skip" in answer:
        pytest.skip(answer["skip"])
    return answer

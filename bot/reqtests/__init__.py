"""Requirement tests: evidence that a change does what was asked, obtained by execution.

A requirement test is kept only if it fails at the start commit (an assertion, or a name
that does not exist yet) and passes with the change; a test that already passes at the
start proves nothing about the change and is discarded, with the reason recorded.

Where tests come from, in order of trust:

- ``example``: examples stated in the requirement (``f(x) == y``, ``>>>`` lines, "f(x)
  returns y") become assertions directly, without the model;
- ``model``: otherwise the model writes a test in the repository's own layout.

Both run in the sandbox (``bot.validate.run_tests``) with pytest; the same run measures
which changed lines the tests executed (coverage.py, see ``bot.changed_lines``).

The parts: ``examples`` (extraction and the example test file), ``model_test`` (the prompt
and the model's answer), ``runner`` (pytest and coverage in the sandbox), ``check`` (fail
at the start, pass with the change).
"""

from bot.reqtests.check import FAIL_KINDS, failures_text, prove
from bot.reqtests.examples import (
    MAX_EXAMPLES,
    Example,
    example_test_file,
    extract_examples,
    locate,
    test_dir,
)
from bot.reqtests.model_test import TEST_WRITER_SYSTEM, model_test_prompt, parse_model_test
from bot.reqtests.runner import Run, failure_kind, run_in_sandbox, suite_args

__all__ = [
    "FAIL_KINDS", "MAX_EXAMPLES", "TEST_WRITER_SYSTEM", "Example", "Run", "example_test_file",
    "extract_examples", "failure_kind", "failures_text", "locate", "model_test_prompt",
    "parse_model_test", "prove", "run_in_sandbox", "suite_args", "test_dir",
]

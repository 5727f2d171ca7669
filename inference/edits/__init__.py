"""Edit formats: parse a model's answer into file edits, guard them, apply them.

Two formats, both parsed tolerantly because small models write messy answers:

- ``whole``: each changed file's path on a line of its own (or on the fence's info line),
  then a fenced code block with the complete new content.
- ``search_replace``: a path line, then blocks of ``<<<<<<< SEARCH`` / ``=======`` /
  ``>>>>>>> REPLACE``; several blocks for one file accumulate, an empty SEARCH creates a
  new file (or appends to an existing one).

`parse_edits` never raises on any text: what it cannot read becomes a sentence in
`ParsedEdits.problems`. Paths are normalised lexically (quotes, backticks, ``./`` and
backslashes removed) and never resolved here; `check_edits` is the guard that decides
whether a path may be written, and `apply_edits` computes every new file in memory before
writing any of them, so a refused or failing edit leaves the working tree untouched.

The parts: `parse` (the answer into edits), `apply` (guard and write), `definition` (one
Python definition swapped by name), `formats` (instructions and the default format).
"""

from __future__ import annotations

from inference.edits.apply import TRUNCATION_MARKER, EditRejected, apply_edits, check_edits
from inference.edits.definition import (
    Definition,
    definition_answer,
    definitions,
    find_definition,
)
from inference.edits.formats import FORMATS, default_format_for, describe_format
from inference.edits.parse import normalize_path, parse_edits

__all__ = [
    "FORMATS",
    "TRUNCATION_MARKER",
    "Definition",
    "EditRejected",
    "apply_edits",
    "check_edits",
    "default_format_for",
    "definition_answer",
    "definitions",
    "describe_format",
    "find_definition",
    "normalize_path",
    "parse_edits",
]

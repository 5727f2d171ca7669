"""System-prompt instructions for each edit format, each with a tiny example.

Plain text only: `inference.edits.describe_format` hands these out, the prompt builder puts
them in the system message, and the parsers in `inference.edits` read what comes back.
"""

from __future__ import annotations

WHOLE_INSTRUCTIONS = """\
Answer with the complete new content of every file you change or create.
For each file: write its path, relative to the repository root, on a line of its own,
then the whole file in a fenced code block. Nothing else goes between the path and the block.
Never shorten a file: no "..." and no "rest unchanged" comments.

Example:

src/greet.py
```python
def greet(name):
    return f"Hello, {name}!"
```
"""

SEARCH_REPLACE_INSTRUCTIONS = """\
Describe each change as a SEARCH/REPLACE block: the file's path, relative to the repository
root, on a line of its own, then

<<<<<<< SEARCH
lines copied exactly from the current file, enough of them to be unique
=======
the lines that take their place
>>>>>>> REPLACE

Copy the SEARCH lines exactly, indentation included. Prefer several small blocks to one big
one; blocks for the same file are applied in order. To create a new file, leave SEARCH empty.

Example:

src/greet.py
<<<<<<< SEARCH
    return "Hello " + name
=======
    return f"Hello, {name}!"
>>>>>>> REPLACE
"""

INSTRUCTIONS = {
    "whole": WHOLE_INSTRUCTIONS,
    "search_replace": SEARCH_REPLACE_INSTRUCTIONS,
}

"""Edit formats: parsing messy model answers, guarding paths, applying all-or-nothing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.ports import FileEdit, SearchReplace
from bot.settings import RepoConfig
from inference.edits import (
    FORMATS,
    EditRejected,
    apply_edits,
    check_edits,
    default_format_for,
    describe_format,
    normalize_path,
    parse_edits,
)

FENCE = "```"


def by_path(parsed):
    return {e.path: e for e in parsed.edits}


# ================================================================ whole format


def test_whole_realistic_answer_with_prose_and_path_styles():
    text = (
        "Sure! Here is the updated code.\n\n"
        "**`src/app.py`**\n"
        f"{FENCE}python\n"
        "def greet(name):\n"
        '    return f"Hello, {name}!"\n'
        f"{FENCE}\n\n"
        "And the tests:\n\n"
        "File: tests/test_app.py\n"
        f"{FENCE}python\n"
        "from src.app import greet\n"
        f"{FENCE}\n"
        "### ./docs/usage.md\n"
        f"{FENCE}markdown\n"
        "# Usage\n"
        f"{FENCE}\n"
        "`setup.cfg`:\n"
        f"{FENCE}ini\n"
        "[metadata]\n"
        f"{FENCE}\n"
        f"{FENCE}python pkg/util.py\n"
        "X = 1\n"
        f"{FENCE}\n"
        "Let me know if you need anything else!\n"
    )
    parsed = parse_edits(text, "whole")
    assert parsed.problems == []
    assert parsed.well_formed
    edits = by_path(parsed)
    assert list(edits) == [
        "src/app.py",
        "tests/test_app.py",
        "docs/usage.md",
        "setup.cfg",
        "pkg/util.py",
    ]
    assert edits["src/app.py"].content == 'def greet(name):\n    return f"Hello, {name}!"\n'
    assert edits["tests/test_app.py"].content == "from src.app import greet\n"
    assert edits["docs/usage.md"].content == "# Usage\n"
    assert edits["pkg/util.py"].content == "X = 1\n"
    assert all(e.replacements == () for e in parsed.edits)


def test_whole_crlf_and_prose_line_naming_the_file():
    text = (
        "I changed the greeting in `src/app.py` as requested:\r\n"
        "```python\r\n"
        "print('hi')\r\n"
        "\r\n"
        "print('bye')\r\n"
        "```\r\n"
    )
    parsed = parse_edits(text, "whole")
    assert parsed.problems == []
    assert by_path(parsed)["src/app.py"].content == "print('hi')\n\nprint('bye')\n"


def test_whole_missing_closing_fence_is_kept_and_reported():
    text = "src/a.py\n```python\nA = 1\n```\nsrc/b.py\n```python\ndef f():\n    return"
    parsed = parse_edits(text, "whole")
    edits = by_path(parsed)
    assert edits["src/a.py"].content == "A = 1\n"
    assert edits["src/b.py"].content == "def f():\n    return\n"
    assert parsed.problems == ["answer ended inside a code block for src/b.py"]
    assert not parsed.well_formed


def test_whole_unclosed_block_before_next_file():
    text = "a.py\n```python\nA = 1\n\nb.py\n```python\nB = 2\n```\n"
    parsed = parse_edits(text, "whole")
    edits = by_path(parsed)
    assert edits["a.py"].content == "A = 1\n"
    assert edits["b.py"].content == "B = 2\n"
    assert parsed.problems == ["code block for a.py was not closed before the next file"]


def test_whole_block_without_path_is_a_problem():
    text = "Run this first:\n```bash\npip install -e .\n```\nsrc/x.py\n```\nX = 1\n```\n"
    parsed = parse_edits(text, "whole")
    assert [e.path for e in parsed.edits] == ["src/x.py"]
    assert len(parsed.problems) == 1
    assert parsed.problems[0].startswith("code block without a file path")


def test_whole_nested_fence_in_markdown_file():
    text = (
        "README.md\n"
        "````markdown\n"
        "# Title\n"
        "```python\n"
        "x = 1\n"
        "```\n"
        "````\n"
        "docs/guide.md\n"
        "```markdown\n"
        "Intro\n"
        "```bash\n"
        "make test\n"
        "```\n"
        "Outro\n"
        "```\n"
    )
    parsed = parse_edits(text, "whole")
    assert parsed.problems == []
    edits = by_path(parsed)
    assert edits["README.md"].content == "# Title\n```python\nx = 1\n```\n"
    assert edits["docs/guide.md"].content == "Intro\n```bash\nmake test\n```\nOutro\n"


def test_whole_path_in_first_line_comment_and_later_block_wins():
    text = (
        "```python\n# src/mod.py\nA = 1\n```\n"
        "Oops, corrected version:\n\nsrc/mod.py\n```python\nA = 2\n```\n"
    )
    parsed = parse_edits(text, "whole")
    assert parsed.problems == []
    assert [(e.path, e.content) for e in parsed.edits] == [("src/mod.py", "A = 2\n")]


def test_whole_lazy_or_mixed_answers_are_problems():
    lazy = "src/a.py\n```python\nimport os\n# ... rest of the file unchanged\n```\n"
    assert "leaves out part of the file" in parse_edits(lazy, "whole").problems[0]
    mixed = "src/a.py\n```python\n<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n```\n"
    assert "SEARCH/REPLACE markers" in parse_edits(mixed, "whole").problems[0]


def test_no_edits_at_all_is_reported():
    for fmt in FORMATS:
        parsed = parse_edits("I cannot help with that.", fmt)
        assert parsed.edits == []
        assert parsed.problems == ["no file edits found in the answer"]
        assert not parsed.well_formed


def test_unknown_format_is_a_caller_error():
    with pytest.raises(ValueError):
        parse_edits("x", "udiff")
    with pytest.raises(ValueError):
        describe_format("udiff")


# ================================================================ search/replace format


def test_search_replace_realistic_answer():
    text = (
        "I'll make the greeting friendlier and add a helper.\n\n"
        "src/app.py\n"
        "```python\n"
        "<<<<<<< SEARCH\n"
        "def greet(name):\n"
        '    return "Hello " + name\n'
        "=======\n"
        "def greet(name):\n"
        '    return f"Hello, {name}!"\n'
        ">>>>>>> REPLACE\n"
        "```\n\n"
        "```python\n"
        "<<<<<<< SEARCH\n"
        "import os\n"
        "=======\n"
        "import os\n"
        "import sys\n"
        ">>>>>>> REPLACE\n"
        "```\n\n"
        "Now a new module:\n\n"
        "```python\n"
        "`src/helpers.py`\n"
        "<<<<<<< SEARCH\n"
        "=======\n"
        "def helper():\n"
        "    pass\n"
        ">>>>>>> REPLACE\n"
        "```\n"
        "Done!\n"
    )
    parsed = parse_edits(text, "search_replace")
    assert parsed.problems == []
    edits = by_path(parsed)
    assert list(edits) == ["src/app.py", "src/helpers.py"]
    assert edits["src/app.py"].replacements == (
        SearchReplace(
            'def greet(name):\n    return "Hello " + name\n',
            'def greet(name):\n    return f"Hello, {name}!"\n',
        ),
        SearchReplace("import os\n", "import os\nimport sys\n"),
    )
    assert edits["src/helpers.py"].replacements == (
        SearchReplace("", "def helper():\n    pass\n"),
    )
    assert all(e.content is None for e in parsed.edits)


def test_search_replace_tolerates_marker_lengths_trailing_spaces_and_crlf():
    text = (
        ".\\pkg\\mod.py\r\n"
        "<<<<<  SEARCH   \r\n"
        "a = 1\r\n"
        "=========  \r\n"
        "a = 2\r\n"
        ">>>>>>>>> REPLACE \r\n"
    )
    parsed = parse_edits(text, "search_replace")
    assert parsed.problems == []
    assert parsed.edits == [FileEdit("pkg/mod.py", replacements=(SearchReplace("a = 1\n", "a = 2\n"),))]


def test_search_replace_path_on_fence_and_bold_path():
    text = (
        "```python src/a.py\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n```\n"
        "**src/b.py**\n<<<<<<< SEARCH\np\n=======\nq\n>>>>>>> REPLACE\n"
    )
    parsed = parse_edits(text, "search_replace")
    assert parsed.problems == []
    assert [e.path for e in parsed.edits] == ["src/a.py", "src/b.py"]


def test_search_replace_truncated_and_broken_blocks():
    text = (
        "src/a.py\n<<<<<<< SEARCH\nx\n=======\ny\n>>>>>>> REPLACE\n"
        "src/b.py\n<<<<<<< SEARCH\nold\n>>>>>>> REPLACE\n"
        "src/c.py\n<<<<<<< SEARCH\nold\n=======\nnew but cut off"
    )
    parsed = parse_edits(text, "search_replace")
    assert [e.path for e in parsed.edits] == ["src/a.py"]
    assert parsed.problems == [
        "SEARCH/REPLACE block for src/b.py has no ======= line",
        "answer ended inside a SEARCH/REPLACE block for src/c.py",
    ]


def test_search_replace_block_without_any_path():
    parsed = parse_edits("<<<<<<< SEARCH\na\n=======\nb\n>>>>>>> REPLACE\n", "search_replace")
    assert parsed.edits == []
    assert parsed.problems[0].startswith("SEARCH/REPLACE block without a file path")


@pytest.mark.parametrize(
    "raw, expected",
    [
        ("`src/app.py`", "src/app.py"),
        ("'./src/app.py'", "src/app.py"),
        ('"src\\\\pkg\\\\x.py"', "src/pkg/x.py"),
        ("**src/app.py**:", "src/app.py"),
        ("src//./app.py", "src/app.py"),
        ("../x.py", "../x.py"),
        ("/etc/passwd", "/etc/passwd"),
    ],
)
def test_normalize_path(raw, expected):
    assert normalize_path(raw) == expected


# ================================================================ guard


@pytest.fixture
def repo(tmp_path: Path) -> Path:
    root = tmp_path / "repo"
    (root / "src").mkdir(parents=True)
    (root / ".git").mkdir()
    (root / ".git" / "config").write_text("[core]\n")
    (root / "src" / "app.py").write_text("def greet(name):\n    return 'Hello ' + name\n")
    return root


CONFIG = RepoConfig()


def refused(edit: FileEdit, repo: Path, config: RepoConfig = CONFIG) -> str:
    with pytest.raises(EditRejected) as info:
        check_edits([edit], repo, config)
    return str(info.value)


@pytest.mark.parametrize(
    "path, words",
    [
        ("../x", ["../x", ".."]),
        ("src/../../x", ["src/../../x", ".."]),
        ("/etc/passwd", ["/etc/passwd", "absolute"]),
        ("C:\\x", ["C:\\x", "absolute"]),
        ("c:/windows/x", ["absolute"]),
        ("\\\\server\\share\\x", ["absolute"]),
        (".git/config", [".git/config", ".git/"]),
        ("src/.git/hooks/pre-commit", [".git/"]),
        (".github/workflows/ci.yml", [".github/workflows/ci.yml", "protected", ".github/workflows/**"]),
        ("./.github//workflows/ci.yml", ["protected", ".github/workflows/**"]),
        (".GitHub/workflows/ci.yml", ["protected"]),
        (".env", [".env", "protected", ".env*"]),
        ("config/.env.local", ["protected"]),
        ("keys/server.pem", ["keys/server.pem", "protected", "*.pem"]),
        ("", ["empty"]),
        ("src/", ["directory"]),
        ("src", ["directory"]),
    ],
)
def test_check_refuses_paths(repo, path, words):
    message = refused(FileEdit(path, content="x\n"), repo)
    assert message.startswith("refused: ")
    for word in words:
        assert word in message


def test_protected_path_message(repo):
    message = refused(FileEdit(".github/workflows/ci.yml", content="on: push\n"), repo)
    assert message == "refused: .github/workflows/ci.yml is a protected path (.github/workflows/**)"


def test_check_refuses_symlink_escape(repo, tmp_path):
    (repo / "out").symlink_to(tmp_path.parent, target_is_directory=True)
    (repo / "link.py").symlink_to(tmp_path / "elsewhere.py")
    for path in ("out/x.py", "link.py"):
        message = refused(FileEdit(path, content="x\n"), repo)
        assert path in message and "outside the repository" in message
    assert not (tmp_path / "elsewhere.py").exists()


def test_check_follows_symlinks_inside_repo(repo):
    (repo / ".github" / "workflows").mkdir(parents=True)
    (repo / "docs").symlink_to(repo / ".github", target_is_directory=True)
    (repo / "gitdir").symlink_to(repo / ".git", target_is_directory=True)
    message = refused(FileEdit("docs/workflows/ci.yml", content="x\n"), repo)
    assert "protected" in message and ".github/workflows/ci.yml" in message
    assert ".git/" in refused(FileEdit("gitdir/config", content="x\n"), repo)
    (repo / "alias.py").symlink_to(repo / "src" / "app.py")
    check_edits([FileEdit("alias.py", content="x\n")], repo, CONFIG)
    # The file that changes is the link's target, and that is the path reported.
    assert apply_edits([FileEdit("alias.py", content="x = 2\n")], repo, CONFIG) == ["src/app.py"]
    assert (repo / "src" / "app.py").read_text() == "x = 2\n"
    assert (repo / "alias.py").is_symlink()


def test_check_allowed_paths_size_and_nul(repo):
    config = RepoConfig(allowed_paths=["src/**", "docs/*.md"], max_file_bytes=100)
    check_edits([FileEdit("src/new.py", content="x = 1\n")], repo, config)
    message = refused(FileEdit("setup.py", content="x\n"), repo, config)
    assert "setup.py" in message and "allowed paths" in message
    message = refused(FileEdit("src/big.py", content="x" * 100), repo, config)
    assert "src/big.py" in message and "101 bytes" in message and "max_file_bytes" in message
    check_edits([FileEdit("src/ok.py", content="x" * 99)], repo, config)
    message = refused(FileEdit("src/bin.py", content="a\x00b\n"), repo, config)
    assert "src/bin.py" in message and "NUL" in message
    sr = FileEdit("src/app.py", replacements=(SearchReplace("a\n", "\x00\n"),))
    assert "NUL" in refused(sr, repo, config)


def test_check_reports_every_refusal(repo):
    edits = [FileEdit("../a", content="x"), FileEdit("src/ok.py", content="x"), FileEdit(".env", content="x")]
    with pytest.raises(EditRejected) as info:
        check_edits(edits, repo, CONFIG)
    assert len(info.value.reasons) == 2
    assert "../a" in info.value.reasons[0] and ".env" in info.value.reasons[1]


def test_refuses_writing_below_a_file(repo):
    assert "src/app.py is a file" in refused(FileEdit("src/app.py/x.py", content="x"), repo)


# ================================================================ apply


def snapshot(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and not p.is_symlink()
    }


def test_apply_whole_and_search_replace(repo):
    edits = [
        FileEdit("src/app.py", replacements=(
            SearchReplace("    return 'Hello ' + name\n", "    return f'Hello, {name}!'\n"),
        )),
        FileEdit("src/new.py", content="X = 1"),
        FileEdit("src/same.py", replacements=(SearchReplace("", "A = 1\n"),)),
    ]
    changed = apply_edits(edits, repo, CONFIG)
    assert changed == ["src/app.py", "src/new.py", "src/same.py"]
    assert (repo / "src/app.py").read_text() == "def greet(name):\n    return f'Hello, {name}!'\n"
    assert (repo / "src/new.py").read_text() == "X = 1\n"
    assert (repo / "src/same.py").read_text() == "A = 1\n"
    # Appending with an empty SEARCH, and an edit that changes nothing.
    changed = apply_edits(
        [
            FileEdit("src/same.py", replacements=(SearchReplace("", "B = 2\n"),)),
            FileEdit("src/new.py", content="X = 1\n"),
        ],
        repo,
        CONFIG,
    )
    assert changed == ["src/same.py"]
    assert (repo / "src/same.py").read_text() == "A = 1\nB = 2\n"


def test_apply_one_bad_edit_writes_nothing(repo):
    before = snapshot(repo)
    edits = [
        FileEdit("src/new.py", content="X = 1\n"),
        FileEdit("src/app.py", replacements=(SearchReplace("def greet(name):\n", "def hi(name):\n"),)),
        FileEdit("src/app.py", replacements=(SearchReplace("no such line\n", "x\n"),)),
    ]
    with pytest.raises(EditRejected) as info:
        apply_edits(edits, repo, CONFIG)
    assert "src/app.py" in str(info.value) and "no such line" in str(info.value)
    assert info.value.refused is False  # a mismatch is worth another attempt
    assert snapshot(repo) == before
    assert not (repo / "src/new.py").exists()
    # A refused path among good edits: nothing is written either.
    with pytest.raises(EditRejected) as info:
        apply_edits([FileEdit("src/new.py", content="X\n"), FileEdit(".env", content="K=1\n")], repo, CONFIG)
    assert info.value.refused is True
    assert snapshot(repo) == before
    assert not any(p.name.startswith(".codeloop-") for p in repo.rglob("*"))


def test_apply_size_limit_checks_search_replace_result(repo):
    config = RepoConfig(max_file_bytes=60)
    before = snapshot(repo)
    sr = SearchReplace("def greet(name):\n", "def greet(name):\n    '''A long docstring here.'''\n")
    with pytest.raises(EditRejected) as info:
        apply_edits([FileEdit("src/app.py", replacements=(sr,))], repo, config)
    assert "max_file_bytes" in str(info.value)
    assert snapshot(repo) == before


def test_search_replace_whitespace_tolerant(repo):
    path = repo / "src" / "m.py"
    path.write_text("class A:\n    def f(self):  \n        return 1\n")
    # Trailing whitespace differs.
    apply_edits(
        [FileEdit("src/m.py", replacements=(SearchReplace("    def f(self):\n", "    def g(self):\n"),))],
        repo,
        CONFIG,
    )
    assert path.read_text() == "class A:\n    def g(self):\n        return 1\n"
    # Indentation missing in SEARCH and REPLACE: matched stripped, REPLACE re-indented.
    apply_edits(
        [FileEdit("src/m.py", replacements=(
            SearchReplace("def g(self):\n    return 1\n", "def g(self):\n    return 2\n"),
        ))],
        repo,
        CONFIG,
    )
    assert path.read_text() == "class A:\n    def g(self):\n        return 2\n"


def test_search_replace_ambiguous_and_missing(repo):
    path = repo / "src" / "dup.py"
    path.write_text("x = 1\ny = 2\nx = 1\n")
    with pytest.raises(EditRejected) as info:
        apply_edits([FileEdit("src/dup.py", replacements=(SearchReplace("x = 1\n", "x = 3\n"),))], repo, CONFIG)
    assert "src/dup.py" in str(info.value) and "2 places" in str(info.value) and "x = 1" in str(info.value)
    # Exact match is unique, even though a looser match would find two places.
    path.write_text("x = 1\nx = 1   \n")
    apply_edits([FileEdit("src/dup.py", replacements=(SearchReplace("x = 1\n", "x = 3\n"),))], repo, CONFIG)
    assert path.read_text() == "x = 3\nx = 1   \n"
    with pytest.raises(EditRejected) as info:
        apply_edits([FileEdit("src/dup.py", replacements=(SearchReplace("z = 9\n", "q\n"),))], repo, CONFIG)
    assert "not found" in str(info.value) and "'z = 9'" in str(info.value)
    with pytest.raises(EditRejected) as info:
        apply_edits([FileEdit("src/nope.py", replacements=(SearchReplace("a\n", "b\n"),))], repo, CONFIG)
    assert "does not exist" in str(info.value)


def test_apply_keeps_newline_conventions(repo):
    crlf = repo / "src" / "win.py"
    crlf.write_bytes(b"a = 1\r\nb = 2\r\n")
    bare = repo / "src" / "bare.py"
    bare.write_bytes(b"a = 1\nb = 2")
    apply_edits(
        [
            FileEdit("src/win.py", replacements=(SearchReplace("b = 2\n", "b = 3\n"),)),
            FileEdit("src/bare.py", replacements=(SearchReplace("b = 2\n", "b = 3\n"),)),
        ],
        repo,
        CONFIG,
    )
    assert crlf.read_bytes() == b"a = 1\r\nb = 3\r\n"
    assert bare.read_bytes() == b"a = 1\nb = 3"


def test_apply_preserves_mode(repo):
    script = repo / "run.sh"
    script.write_text("echo hi\n")
    script.chmod(0o755)
    apply_edits([FileEdit("run.sh", content="echo bye\n")], repo, CONFIG)
    assert script.read_text() == "echo bye\n"
    assert os.stat(script).st_mode & 0o777 == 0o755


def test_parse_then_apply_end_to_end(repo):
    answer = (
        "src/app.py\n```python\n<<<<<<< SEARCH\n    return 'Hello ' + name\n=======\n"
        "    return 'Hi ' + name\n>>>>>>> REPLACE\n```\n"
    )
    parsed = parse_edits(answer, "search_replace")
    assert parsed.well_formed
    assert apply_edits(parsed.edits, repo, CONFIG) == ["src/app.py"]
    assert "Hi " in (repo / "src/app.py").read_text()


# ================================================================ format choice


@pytest.mark.parametrize(
    "model, fmt",
    [
        ("smollm2-135m-instruct", "whole"),
        ("HuggingFaceTB/SmolLM2-360M-Instruct", "whole"),
        ("SmolLM2-1.7B-Instruct", "whole"),
        ("qwen2.5-coder-0.5b", "whole"),
        ("llama-3.2-1b-instruct", "whole"),
        ("qwen2.5-coder-3b", "whole"),
        ("transformers:smollm2", "whole"),
        ("qwen2.5-coder:7b", "search_replace"),
        ("qwen2.5-14b-instruct", "search_replace"),
        ("Qwen/Qwen2.5-Coder-32B-Instruct", "search_replace"),
        ("llama-3.3-70b", "search_replace"),
        ("mixtral-8x7b", "search_replace"),
        ("gpt-4o", "search_replace"),
    ],
)
def test_default_format_for(model, fmt):
    assert default_format_for(model) == fmt


def test_describe_format_has_an_example_the_parser_reads():
    for fmt in FORMATS:
        text = describe_format(fmt)
        example = text.split("Example:", 1)[1]
        parsed = parse_edits(example, fmt)
        assert parsed.well_formed, (fmt, parsed.problems)
        assert [e.path for e in parsed.edits] == ["src/greet.py"]


# ================================================================ properties

FRAGMENTS = [
    "```", "```python", "````", "~~~", "```python src/a.py", "``` `b.py`", "```py:c/d.py",
    "<<<<<<< SEARCH", "<<<<< SEARCH  ", "<<<<<<<<<< SEARCH", "=======", "=====", "==========",
    ">>>>>>> REPLACE", ">>>>>>>>> REPLACE ", "src/app.py", "`x.py`", "**y.py**", "File: z.py",
    "# ./w/v.py", "../evil.py", "/etc/passwd", "C:\\x.py", ".git/config", "Makefile", "",
    " ", "\t", "Here is the code:", "def f():", "    return 1", "# ... rest unchanged",
    "\r", "\x00", "é/ü.py", "`", "**", ":", "a" * 300 + ".py",
]

fragment_text = st.lists(
    st.one_of(st.sampled_from(FRAGMENTS), st.text(max_size=12)), max_size=40
).flatmap(
    lambda parts: st.lists(st.sampled_from(["\n", "\r\n", "", " "]), min_size=len(parts), max_size=len(parts)).map(
        lambda seps: "".join(p + s for p, s in zip(parts, seps))
    )
)


def _assert_sane(parsed):
    assert isinstance(parsed.problems, list)
    for edit in parsed.edits:
        assert edit.path and "\\" not in edit.path and not edit.path.startswith("./")
        assert (edit.content is None) != (edit.replacements == ())


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=st.text(), fmt=st.sampled_from(FORMATS))
def test_parse_never_raises_on_arbitrary_text(text, fmt):
    _assert_sane(parse_edits(text, fmt))


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(text=fragment_text, fmt=st.sampled_from(FORMATS))
def test_parse_never_raises_on_marker_soup(text, fmt):
    _assert_sane(parse_edits(text, fmt))


safe_line = st.text(
    alphabet=st.characters(codec="utf-8", exclude_characters="\n\r`~<>=\x00\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"),
    max_size=30,
)
path_st = st.lists(st.from_regex(r"[a-z][a-z0-9_]{0,8}", fullmatch=True), min_size=1, max_size=3).map(
    lambda parts: "/".join(parts) + ".py"
)


@settings(max_examples=300, deadline=None)
@given(files=st.dictionaries(path_st, st.lists(safe_line, max_size=8), min_size=1, max_size=4))
def test_whole_round_trip(files):
    text = "Here you go.\n\n" + "".join(
        f"{path}\n```python\n" + "".join(line + "\n" for line in lines) + "```\n\n"
        for path, lines in files.items()
    )
    parsed = parse_edits(text, "whole")
    assert parsed.problems == []
    assert {e.path: e.content for e in parsed.edits} == {
        p: "".join(line + "\n" for line in lines) for p, lines in files.items()
    }


@settings(max_examples=300, deadline=None)
@given(
    blocks=st.lists(
        st.tuples(path_st, st.lists(safe_line, max_size=5), st.lists(safe_line, max_size=5)),
        min_size=1,
        max_size=5,
    )
)
def test_search_replace_round_trip(blocks):
    text = "".join(
        f"{path}\n```python\n<<<<<<< SEARCH\n" + "".join(s + "\n" for s in search)
        + "=======\n" + "".join(r + "\n" for r in replace) + ">>>>>>> REPLACE\n```\n\n"
        for path, search, replace in blocks
    )
    parsed = parse_edits(text, "search_replace")
    assert parsed.problems == []
    expected: dict[str, list[SearchReplace]] = {}
    for path, search, replace in blocks:
        expected.setdefault(path, []).append(
            SearchReplace("".join(s + "\n" for s in search), "".join(r + "\n" for r in replace))
        )
    assert {e.path: list(e.replacements) for e in parsed.edits} == expected


def test_whole_shell_example_mentioning_a_file_is_not_that_file():
    text = (
        "Then run `pytest tests/test_app.py`:\n```bash\npytest -q\n```\n"
        "Updated `tests/test_app.py`:\n```python\ndef test_ok():\n    pass\n```\n"
    )
    parsed = parse_edits(text, "whole")
    assert [(e.path, e.content) for e in parsed.edits] == [
        ("tests/test_app.py", "def test_ok():\n    pass\n")
    ]
    assert parsed.problems[0].startswith("code block without a file path")

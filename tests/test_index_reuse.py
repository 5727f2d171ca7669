"""The retrieval index is reused: the same directory in every process, and a fresh
process re-reads only what changed and ranks as a full re-index would."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from inference.context import RepoIndex
from tests.test_prompt_fit import make_repo

ROOT = Path(__file__).resolve().parents[1]

CHILD = """
import json, sys
from pathlib import Path
from bot.pipeline.prompt import slug as _slug
from inference.context import RepoIndex
home, repo = Path(sys.argv[1]), sys.argv[2]
index = RepoIndex(home / _slug(repo))
s = index.update(Path(repo))
print(json.dumps({"slug": _slug(repo), "read": s.files_read,
                  "ranked": [(r.path, r.score) for r in index.rank(sys.argv[3], k=5)]}))
"""


def fresh(home: Path, repo: Path, query: str, seed: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONHASHSEED": seed}
    out = subprocess.run([sys.executable, "-c", CHILD, str(home), str(repo), query], env=env,
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_a_fresh_process_reuses_the_index_and_reads_only_what_changed(tmp_path):
    files = {f"pkg/mod{i}.py": f"def helper_{i}(value):\n    return value * {i}\n"
             for i in range(30)}
    files["pkg/session.py"] = "class Session:\n    def merge(self, other):\n        pass\n"
    repo = make_repo(tmp_path / "repo", files)
    home = tmp_path / "index"
    first = fresh(home, repo, "Session merge", seed="1")
    second = fresh(home, repo, "Session merge", seed="2")  # another hash seed: same slug
    assert first["slug"] == second["slug"]
    assert [p.name for p in home.iterdir()] == [first["slug"]]  # nothing piles up
    assert first["read"] == 32 and second["read"] == 0
    assert second["ranked"] == first["ranked"]
    # Change two files, one with a word new to the whole repository.
    (repo / "pkg/mod3.py").write_text("def helper_3(value):\n    return zanzibar(value)\n")
    (repo / "pkg/new.py").write_text("def merge_sessions(a, b):\n    return a\n")
    third = fresh(home, repo, "zanzibar merge sessions", seed="3")
    assert third["read"] == 2
    full = RepoIndex(tmp_path / "scratch")
    full.update(repo)
    expected = [(r.path, r.score) for r in full.rank("zanzibar merge sessions", k=5)]
    assert [tuple(x) for x in third["ranked"]] == expected  # as a full re-index ranks
    assert {"pkg/mod3.py", "pkg/new.py"} <= {p for p, _ in third["ranked"]}  # new text found


def test_a_renamed_file_keeps_its_counts_under_its_new_path(tmp_path):
    files = {f"pkg/mod{i}.py": f"def helper_{i}(value):\n    return value * {i}\n"
             for i in range(10)}
    files["billing/ledger.py"] = "def post_entry(ledger, amount):\n    return ledger + amount\n"
    files["docs/accounts.md"] = "Each entry in the accounts ledger is posted once.\n"
    repo = make_repo(tmp_path / "repo", files)
    home = tmp_path / "index"
    fresh(home, repo, "ledger", seed="1")
    # Moved to a directory whose name is a word of the query: the path counts change, the
    # content is not read again.
    (repo / "accounts").mkdir()
    subprocess.run(["git", "mv", "billing/ledger.py", "accounts/ledger_entries.py"], cwd=repo,
                   check=True)
    moved = fresh(home, repo, "post an entry to the accounts ledger", seed="2")
    assert moved["read"] == 0
    full = RepoIndex(tmp_path / "scratch")
    full.update(repo)
    expected = [(r.path, r.score) for r in full.rank("post an entry to the accounts ledger", k=5)]
    assert [tuple(x) for x in moved["ranked"]] == expected
    assert "accounts/ledger_entries.py" in [p for p, _ in expected]

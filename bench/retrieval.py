"""Benchmark repository retrieval (inference/context.py and the modules it uses) on a real
git history.

    python bench/retrieval.py REPO_PATH [--commits 100] [--sample 30]

Works on a temporary clone; REPO_PATH is never modified. Prints one table:

- full index time (empty cache) and the incremental re-index after changing 10 files, each
  in a fresh process;
- query latency p50/p99 over the messages of the last non-merge commits, in a fresh process
  right after its re-index (the first query included) and in a warm one;
- recall@5 / recall@10: for a sample of those commits, the tree at the commit's parent is
  indexed and the commit message is the query; the answer is the set of files the commit
  modified or deleted (files it added cannot be retrieved). codeloop's ranking is compared
  with plain BM25 over whole files (bm25s's default tokenisation, no chunks, no boosts),
  and with its own chunked BM25 without the boosts.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import bm25s
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from inference.context import RepoIndex
from inference.rank import RankWeights

_WORD_RE = re.compile(r"(?u)\b\w\w+\b")  # bm25s.tokenize's default pattern
NO_BOOSTS = RankWeights(
    path_mentioned=0.0,
    name_mentioned=0.0,
    stem_mentioned=0.0,
    symbol_mentioned=0.0,
    symbol_word=0.0,
    paired_test=0.0,
)


def git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(cwd), *args], check=True, capture_output=True, text=True
    ).stdout


@dataclass
class Commit:
    sha: str
    parents: list[str]
    message: str


def recent_commits(repo: Path, n: int) -> list[Commit]:
    out = git(repo, "log", "--no-merges", f"-n{n}", "--format=%H%x1f%P%x1f%B%x1e", "HEAD")
    commits = []
    for record in out.split("\x1e"):
        record = record.strip("\n")
        if not record:
            continue
        sha, parents, message = record.split("\x1f", 2)
        commits.append(Commit(sha, parents.split(), message.strip()))
    return commits


class PlainBM25:
    """Baseline: bm25s over whole files, bm25s's default tokenisation (words of 2+ word
    characters, lowercased, English stopwords), no chunks, no boosts. Tokens are cached by
    blob id so that re-indexing at another commit only tokenises changed files."""

    def __init__(self) -> None:
        self.tokens: dict[str, list[str]] = {}
        self.stop = set(bm25s.stopwords.STOPWORDS_EN)
        self.paths: list[str] = []
        self.retriever: bm25s.BM25 | None = None

    def tokenize(self, text: str) -> list[str]:
        return [w for w in _WORD_RE.findall(text.lower()) if w not in self.stop]

    def update(self, repo: Path, files: list[tuple[str, str]]) -> None:
        docs = []
        for path, blob in files:
            if blob not in self.tokens:
                text = (repo / path).read_text(encoding="utf-8", errors="replace")
                self.tokens[blob] = self.tokenize(text)
            docs.append(self.tokens[blob] or [""])
        self.paths = [p for p, _ in files]
        self.retriever = bm25s.BM25()
        self.retriever.index(docs, show_progress=False)

    def rank(self, query: str, k: int) -> list[str]:
        assert self.retriever is not None
        ids = self.retriever.get_tokens_ids(list(dict.fromkeys(self.tokenize(query))))
        if not ids:
            return []
        scores = self.retriever.get_scores_from_ids(ids)
        order = sorted(
            (i for i in np.flatnonzero(scores > 0)), key=lambda i: (-scores[i], self.paths[i])
        )
        return [self.paths[i] for i in order[:k]]


_CHILD = """
import json, sys, time
from pathlib import Path
from bot.pipeline.prompt import slug as _slug
from inference.context import RepoIndex
home, repo, query, k = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], int(sys.argv[4])
queries = json.loads(Path(sys.argv[5]).read_text()) if len(sys.argv) > 5 else []
d = home / "index" / _slug(str(repo))
index = RepoIndex(d)
s = index.update(repo)
ranked = [r.path for r in index.rank(query, k=k)] if query else []
latencies = []
for q in queries:
    t = time.perf_counter()
    index.rank(q, k=10)
    latencies.append((time.perf_counter() - t) * 1000)
print(json.dumps({"seconds": s.seconds, "read": s.files_read, "total": s.files_total,
                  "indexed": s.files_indexed, "skipped": s.files_skipped, "dir": str(d),
                  "ranked": ranked, "latencies": latencies}))
"""


def fresh_update(home: Path, repo: Path, query: str = "", k: int = 10,
                 queries: list[str] | None = None) -> dict:
    """`RepoIndex.update` in a new Python process, in the pipeline's index directory; then,
    when `queries` are given, each one ranked once in that process, in order."""
    root = Path(__file__).resolve().parents[1]
    extra = []
    if queries:
        extra = [str(home / "queries.json")]
        (home / "queries.json").write_text(json.dumps(queries))
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(home), str(repo), query, str(k), *extra],
        check=True, capture_output=True, text=True, cwd=root,
        env={**os.environ, "PYTHONPATH": str(root)},
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(np.array(values), q)) if values else float("nan")


def recall(found: list[str], gold: set[str], k: int) -> float:
    return len(set(found[:k]) & gold) / len(gold)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("repo", type=Path, help="a git repository (bare or not); left untouched")
    ap.add_argument("--commits", type=int, default=100, help="recent non-merge commits to query")
    ap.add_argument("--sample", type=int, default=30, help="commits to score recall on")
    ap.add_argument("--modify", type=int, default=10, help="files changed for the re-index")
    ap.add_argument("--repeat", type=int, default=3,
                    help="rounds of changing those files, each re-indexed in a fresh process")
    args = ap.parse_args(argv)

    rows: list[tuple[str, str]] = []
    with tempfile.TemporaryDirectory(prefix="codeloop-bench-") as tmp:
        clone = Path(tmp) / "clone"
        cache = Path(tmp) / "cache"
        t = time.perf_counter()
        subprocess.run(["git", "clone", "-q", str(args.repo.resolve()), str(clone)], check=True)
        clone_s = time.perf_counter() - t

        # ---------------------------------------------------- full and incremental index
        # Each measure runs in a fresh process, as a worker, a restart or a CLI run does:
        # the index directory is the pipeline's own (settings.index_dir / its stable slug).
        home = Path(tmp) / "home"
        full = fresh_update(home, clone)
        skipped = ", ".join(f"{k} {v}" for k, v in full["skipped"].items()) or "none"
        rows.append(("files listed / indexed", f"{full['total']} / {full['indexed']}"))
        rows.append(("files skipped", skipped))
        rows.append(("full index (empty cache, fresh process)",
                     f"{full['seconds']:.2f} s ({full['read']} read)"))
        rows.append(("pipeline index directory (same in every process)", full["dir"]))

        index = RepoIndex(Path(full["dir"]))
        index.update(clone)
        paths = [f.path for f in index.files]
        step = max(1, len(paths) // max(1, args.modify))
        changed = paths[::step][: args.modify]
        incs = []
        for _ in range(max(1, args.repeat)):  # each round changes the same files again
            for p in changed:
                with open(clone / p, "a", encoding="utf-8") as fh:
                    fh.write("\ncodeloop bench edit: zanzibarquux\n")
            incs.append(fresh_update(home, clone, query="zanzibarquux", k=len(changed)))
        inc_s = statistics.median(i["seconds"] for i in incs)
        each = ", ".join(f"{i['seconds']:.2f}" for i in incs)
        found = all(any(path in changed for path in i["ranked"]) for i in incs)
        rows.append(
            (
                f"re-index after changing {len(changed)} files (fresh process, median of "
                f"{len(incs)})",
                f"{inc_s:.2f} s ({incs[0]['read']} read; new text found: {found}) — "
                f"{full['seconds'] / max(inc_s, 1e-9):.1f}× faster than full "
                f"[{each}]",
            )
        )
        commits = recent_commits(clone, args.commits)
        noop = fresh_update(home, clone, queries=[c.message for c in commits])
        rows.append(("re-index, nothing changed (fresh process)",
                     f"{noop['seconds']:.2f} s ({noop['read']} read)"))
        first, lat = noop["latencies"][:1], noop["latencies"]
        rows.append(
            (
                f"query latency in that fresh process, {len(lat)} commit messages",
                f"first {first[0] if first else float('nan'):.1f} ms, "
                f"p50 {percentile(lat, 50):.1f} ms, p99 {percentile(lat, 99):.1f} ms",
            )
        )
        git(clone, "checkout", "-q", "--force", "HEAD")

        # ---------------------------------------------------- query latency at HEAD
        index.update(clone)
        latencies = []
        for c in commits:
            t = time.perf_counter()
            index.rank(c.message, k=10)
            latencies.append((time.perf_counter() - t) * 1000)
        rows.append(
            (
                f"query latency over {len(commits)} commit messages (warm process)",
                f"p50 {percentile(latencies, 50):.1f} ms, p99 {percentile(latencies, 99):.1f} ms",
            )
        )

        # ---------------------------------------------------- recall at each parent
        candidates = [c for c in commits if len(c.parents) == 1]
        stride = max(1, len(candidates) // max(1, args.sample))
        ordered = candidates[::stride] + [c for i, c in enumerate(candidates) if i % stride]
        baseline = PlainBM25()
        results: dict[str, list[tuple[float, float]]] = {
            "codeloop": [],
            "codeloop, no boosts": [],
            "plain BM25, whole files": [],
        }
        update_s = []
        used = 0
        t_recall = time.perf_counter()
        for c in ordered:
            if used >= args.sample:
                break
            parent = c.parents[0]
            touched = git(
                clone, "diff", "--name-only", "--no-renames", "--diff-filter=MD", parent, c.sha
            ).split("\n")
            git(clone, "checkout", "-q", "--force", "--detach", parent)
            stats = index.update(clone)
            update_s.append(stats.seconds)
            indexed = {f.path: f.blob for f in index.files}
            gold = {p for p in touched if p in indexed}
            if not gold:
                continue
            used += 1
            baseline.update(clone, sorted(indexed.items()))
            ours = [r.path for r in index.rank(c.message, k=10)]
            saved, index.weights = index.weights, NO_BOOSTS
            plain_chunks = [r.path for r in index.rank(c.message, k=10)]
            index.weights = saved
            plain = baseline.rank(c.message, k=10)
            for name, found_paths in (
                ("codeloop", ours),
                ("codeloop, no boosts", plain_chunks),
                ("plain BM25, whole files", plain),
            ):
                results[name].append((recall(found_paths, gold, 5), recall(found_paths, gold, 10)))
        recall_s = time.perf_counter() - t_recall
        rows.append(
            (
                f"re-index at {len(update_s)} parent commits",
                f"median {statistics.median(update_s):.2f} s" if update_s else "-",
            )
        )
        for name, values in results.items():
            if values:
                r5 = sum(v[0] for v in values) / len(values)
                r10 = sum(v[1] for v in values) / len(values)
                rows.append(
                    (f"recall@5 / @10, {name}", f"{r5:.3f} / {r10:.3f} ({len(values)} commits)")
                )
        rows.append(("clone / recall phase", f"{clone_s:.1f} s / {recall_s:.1f} s"))

    width = max(len(k) for k, _ in rows)
    print(f"retrieval bench: {args.repo}")
    print(f"{'measure'.ljust(width)} | value")
    print(f"{'-' * width}-|-{'-' * 40}")
    for k, v in rows:
        print(f"{k.ljust(width)} | {v}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

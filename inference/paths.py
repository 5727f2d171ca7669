"""Which repository paths a model should not read, and which are tests: plain functions of a
path string, with no I/O, so every part can share one copy of the lists."""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Protocol

# One copy of the lists, for retrieval (inference/index.py) and training data hygiene
# (training/hygiene.py). Names are compared in lower case.
VENDORED_DIRS = frozenset({
    "vendor", "vendored", "node_modules", "bower_components", "third_party", "third-party",
    "site-packages", "dist-packages", ".venv", "venv", "external",
})
LOCK_NAMES = frozenset({
    "package-lock.json", "npm-shrinkwrap.json", "yarn.lock", "pnpm-lock.yaml", "poetry.lock",
    "pipfile.lock", "cargo.lock", "gemfile.lock", "composer.lock", "go.sum", "uv.lock",
    "pdm.lock", "flake.lock", "packages.lock.json", "mix.lock", "podfile.lock",
})
GENERATED_SUFFIXES = (".lock", ".min.js", ".min.css", ".js.map", ".css.map", ".map", "_pb2.py",
                      "_pb2_grpc.py", ".pb.go")


class SkipLists(Protocol):
    """The lists `path_skip_reason` reads (`inference.index.IndexOptions` has them)."""

    vendored_dirs: frozenset[str]
    lock_names: frozenset[str]
    generated_suffixes: tuple[str, ...]


def path_kind(path: str, options: SkipLists | None = None) -> str | None:
    """"vendored", "lock" or "generated" when the path's name alone says so, else None.
    Without `options`, the lists above."""
    vendored = options.vendored_dirs if options is not None else VENDORED_DIRS
    locks = options.lock_names if options is not None else LOCK_NAMES
    suffixes = options.generated_suffixes if options is not None else GENERATED_SUFFIXES
    parts = path.lower().split("/")
    if any(part in vendored for part in parts[:-1]):
        return "vendored"
    name = parts[-1]
    if name in locks or name.endswith(".lock"):
        return "lock"
    if name.endswith(suffixes) or ".generated." in name or "_generated." in name:
        return "generated"
    return None


def path_skip_reason(path: str, options: SkipLists | None = None) -> str | None:
    """Why retrieval leaves a path out by its name alone ("vendored", "generated"), or None."""
    kind = path_kind(path, options)
    return "generated" if kind == "lock" else kind


def is_test_path(path: str) -> bool:
    """Whether a path looks like a test file (test_x.py, x_test.go, x.test.ts, tests/...)."""
    p = PurePosixPath(path)
    name = p.name
    stem = name.split(".")[0]
    return (
        stem.startswith("test_")
        or stem.endswith(("_test", "_spec"))
        or ".test." in name
        or ".spec." in name
        or any(part in ("tests", "test", "__tests__", "spec") for part in p.parts[:-1])
    )


def source_stem_of_test(path: str) -> str | None:
    """The stem of the source file a test file is named after (test_x.py, x_test.go,
    x.test.ts: "x"), or None."""
    stem = PurePosixPath(path).name.split(".")[0]
    if stem.startswith("test_"):
        return stem[5:]
    for suffix in ("_test", "_spec"):
        if stem.endswith(suffix):
            return stem[: -len(suffix)]
    name = PurePosixPath(path).name
    if ".test." in name or ".spec." in name:
        return stem
    return None

"""Which part may import which (docs/architecture.md's table), checked like import-linter:
every `import` in the code, at module level or inside a function, is an edge; an edge from a
part to one it may not use fails here. Also: every module imports on its own in a fresh
interpreter (no import-order cycle), and no import cycle runs through the inner parts.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("bot", "inference", "feedback", "training")

# Parts, by module name prefix (the longest match wins).
PARTS = {
    "bot.ports": "kernel", "bot.settings": "kernel", "bot.repo_config": "kernel",
    "bot.store": "kernel", "bot.git": "kernel", "bot.logs": "kernel", "bot.leases": "kernel",
    "bot.scrub": "kernel",
    "inference": "inference",
    # The model server's client (served models, runtime LoRA loading, load): inference-side,
    # and it imports only the kernel and inference.
    "bot.vllm": "inference",
    "feedback": "feedback",
    "bot.pipeline": "pipeline", "bot.jobs": "pipeline", "bot.validate": "pipeline",
    "bot.workspace": "pipeline", "bot.forges": "pipeline", "bot.deliveries": "pipeline",
    "bot.reqtests": "pipeline", "bot.verdict": "pipeline", "bot.changed_lines": "pipeline",
    "bot.environments": "pipeline",
    "bot.sandbox": "kernel",
    "training": "training",
    "bot": "edges",  # slack, github, web, cli, dashboard, serve, runtime, doctor, notify, ...
}
MAY_IMPORT = {
    "kernel": {"kernel"},
    "inference": {"kernel", "inference"},
    "feedback": {"kernel", "feedback"},
    "pipeline": {"kernel", "inference", "pipeline"},
    # and the pipeline's validation (the gate runs tests and HumanEval in the sandbox)
    "training": {"kernel", "inference", "feedback", "training", "bot.validate", "bot.sandbox"},
    "edges": {"kernel", "inference", "feedback", "pipeline", "training", "edges"},
}
# Known edges against the table, each with why it is still there. The test fails when one
# disappears (delete it here) or a new one appears (fix the import, or argue for it here).
KNOWN: set[tuple[str, str]] = set()


def part_of(module: str) -> str:
    best = max((p for p in PARTS if module == p or module.startswith(p + ".")), key=len)
    return PARTS[best]


def modules() -> dict[str, Path]:
    out = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            rel = path.relative_to(ROOT).with_suffix("")
            parts = list(rel.parts)
            if parts[-1] == "__init__":
                parts.pop()
            if "migrations" in parts:
                continue
            out[".".join(parts)] = path
    return out


def imports_of(module: str, path: Path, known: set[str]) -> set[str]:
    """Project modules `module` imports anywhere in its code (resolved to known modules)."""
    tree = ast.parse(path.read_text(), str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def add(name: str) -> None:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            found.add(name)

    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in PACKAGES:
                    add(alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")
                up = up[: len(up) - (node.level - 1)]
                base = ".".join(up + ([base] if base else []))
            if base.split(".")[0] not in PACKAGES:
                continue
            for alias in node.names:
                full = f"{base}.{alias.name}"
                add(full if full in known else base)
    return found


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {m: imports_of(m, p, known) for m, p in mods.items()}


def test_every_import_follows_the_table_of_parts():
    bad = set()
    for src, targets in graph().items():
        allowed = MAY_IMPORT[part_of(src)]
        for dst in targets:
            if part_of(dst) in allowed or dst in allowed:
                continue
            bad.add((src, dst))
    assert bad - KNOWN == set(), f"imports against the table: {sorted(bad - KNOWN)}"
    assert KNOWN - bad == set(), f"fixed, remove from KNOWN: {sorted(KNOWN - bad)}"


def test_training_and_feedback_import_no_composition_root_and_start_no_work():
    g = graph()
    for src, targets in g.items():
        if src.startswith(("training", "feedback")):
            assert not targets & {"bot.runtime", "bot.serve", "bot.cli"}, (src, targets)
        if src.startswith("feedback"):
            assert "bot.jobs" not in targets, f"{src} submits jobs itself"


def _cycles(g: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]
    sys.setrecursionlimit(10_000)

    def visit(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in g.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(g):
        if v not in index:
            visit(v)
    return out


def test_no_import_cycle_through_the_inner_parts():
    """Edges (the composition roots and features) may import each other lazily; no cycle
    may pass through the kernel, inference, feedback, pipeline or training."""
    g = graph()
    for comp in _cycles(g):
        inner = [m for m in comp if part_of(m) != "edges"]
        assert not inner, f"import cycle through {inner}: {comp}"


def test_every_module_imports_on_its_own():
    """Each module in a fresh interpreter: an import-order cycle fails here."""
    names = sorted(m for m in modules() if not m.endswith("__main__"))
    script = (
        "import importlib, os, sys\n"
        "bad = []\n"
        "for name in sys.argv[1:]:\n"
        "    pid = os.fork()\n"
        "    if pid == 0:\n"
        "        try:\n"
        "            importlib.import_module(name)\n"
        "        except BaseException as exc:\n"
        "            print(name, type(exc).__name__, exc, flush=True)\n"
        "            os._exit(1)\n"
        "        os._exit(0)\n"
        "    _, status = os.waitpid(pid, 0)\n"
        "    if status:\n"
        "        bad.append(name)\n"
        "print('FAILED', bad)\n"
        "sys.exit(1 if bad else 0)\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, *names], cwd=ROOT, capture_output=True,
                          text=True, timeout=600,
                          env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""Several processes opening a fresh database at once migrate it once (issue 15, item 16).

Six real processes (as compose starts web, worker and scheduler together) each open the
store at the same instant; on SQLite and PostgreSQL every one of them must come up with the
newest schema and none may fail with "table alembic_version already exists".
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bot.store.db import Store, schema_is_current

ROOT = Path(__file__).resolve().parent.parent
OPEN_AT = """
import sys, time
from bot.store.db import Store
start = float(sys.argv[2])
time.sleep(max(0.0, start - time.time()))
store = Store(sys.argv[1])
print("ok", len(store.tables()))
"""


def test_processes_starting_together_migrate_once(db_url):
    start = time.time() + 4.0  # all imports done; then every process migrates at once
    procs = [
        subprocess.Popen([sys.executable, "-c", OPEN_AT, db_url, str(start)], cwd=ROOT,
                         env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for _ in range(6)
    ]
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    assert [rc for rc, _, _ in results] == [0] * 6, [err[-800:] for _, _, err in results]
    counts = {out.split()[1] for _, out, _ in results}
    assert len(counts) == 1  # every process saw the whole schema
    store = Store(db_url, auto_migrate=False)
    try:
        assert schema_is_current(store.engine)
    finally:
        store.close()

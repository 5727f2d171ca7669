"""Ingress under a burst: GitHub webhook deliveries and Slack events, signed, over HTTP.

    .venv/bin/python bench/ingress.py [--deliveries 400] [--levels 1,4,16] [--duplicates 0.05]
                                      [--db postgresql+psycopg://postgres@127.0.0.1:5432/test]

The real web app (bot.web.create_app with the GitHub and Slack features) runs in its own
process under uvicorn, with the real store and a real huey queue (SQLite file); this process
sends `--deliveries` requests at each concurrency level (1, 4 and 16 client threads by
default), GitHub and Slack mixed half and half, plus a share of redeliveries (the same
X-GitHub-Delivery / event_id again, as both services do on a timeout). For each level it
prints acknowledgement latency p50/p99/max, deliveries per second, and the server's own CPU
time per delivery (user + system time of the server process, all threads, from /proc): the
work one acknowledgement costs, apart from the clients. Then it checks that every delivery
is stored exactly once and enqueued exactly once.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

GITHUB_SECRET = "bench-webhook-secret"
SLACK_SECRET = "bench-signing-secret"
SLACK_TOKEN = "xoxb-bench-not-a-real-token"


def settings_for(home: Path, db_url: str | None):
    from bot.settings import GitHubSettings, Settings, SlackSettings, StoreSettings

    return Settings(
        home=home,
        store=StoreSettings(url=db_url),
        github=GitHubSettings(webhook_secret=GITHUB_SECRET),
        slack=SlackSettings(signing_secret=SLACK_SECRET, bot_token=SLACK_TOKEN),
    )


# ---------------------------------------------------------------- the server process


def serve(home: Path, db_url: str | None, port: int) -> None:
    import uvicorn

    from bot.runtime import build_queue
    from bot.slack.app import BotIdentity
    from bot.store.db import Store
    from bot.web import WebContext, create_app, default_features

    settings = settings_for(home, db_url)
    store = Store(settings.database_url)
    huey = build_queue(settings, lambda: None)  # enqueue only: no consumer in this bench
    ctx = WebContext(settings=settings, store=store, enqueue_delivery=huey.codeloop_handle_delivery,
                     extras={"slack_bot_identity": BotIdentity("UBENCHBOT", "BBENCHBOT")})
    app = create_app(ctx, default_features(settings))
    # uvicorn re-raises SIGTERM after its graceful shutdown, to the handler it found: make
    # that a no-op, so the enqueues still in flight are drained below before exiting.
    signal.signal(signal.SIGTERM, lambda *_: None)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)
    if ctx.recorder is not None:  # enqueues follow the answers; let the last ones land
        ctx.recorder.drain(timeout=60)


# ---------------------------------------------------------------- the load


def github_delivery(n: int) -> tuple[str, bytes, dict]:
    from bot.github.webhook import sign

    payload = {
        "action": "labeled",
        "label": {"name": "codeloop"},
        "issue": {"number": n, "title": f"Bench issue {n}", "body": "Add a helper.",
                  "user": {"login": "alice"}, "labels": [{"name": "codeloop"}]},
        "repository": {"full_name": "acme/widgets", "name": "widgets", "owner": {"login": "acme"},
                       "default_branch": "main"},
        "sender": {"login": "alice"},
        "installation": {"id": 42},
    }
    body = json.dumps(payload).encode()
    delivery = str(uuid.uuid4())
    headers = {"X-GitHub-Event": "issues", "X-GitHub-Delivery": delivery,
               "X-Hub-Signature-256": sign(GITHUB_SECRET, body),
               "Content-Type": "application/json"}
    return "/github/webhook", body, headers


def slack_event(n: int) -> tuple[str, bytes, dict]:
    from tests.slack_signing import event_body, signed_headers

    ts = f"{1_700_000_000 + n}.{n:06d}"
    event = {"type": "message", "channel": "C0BENCH", "user": "UALICE", "text": f"Add helper {n}",
             "ts": ts, "event_ts": ts, "channel_type": "channel"}
    body = event_body(event, event_id=f"Ev{uuid.uuid4().hex[:16].upper()}")
    return "/slack/events", body.encode(), signed_headers(SLACK_SECRET, body)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def server_cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deliveries", type=int, default=400, help="unique deliveries per level")
    parser.add_argument("--levels", default="1,4,16", help="client threads, one run per level")
    parser.add_argument("--duplicates", type=float, default=0.05,
                        help="share of deliveries sent a second time (redeliveries)")
    parser.add_argument("--db", default=None, help="database URL (default: a SQLite file)")
    parser.add_argument("--serve", nargs=2, metavar=("HOME", "PORT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        serve(Path(args.serve[0]), args.db, int(args.serve[1]))
        return 0

    import httpx
    from sqlalchemy import func, select

    from bot.store.db import Store
    from bot.store.models import Delivery

    levels = [int(x) for x in args.levels.split(",")]
    rows: list[tuple] = []
    bad_total = 0
    unique_total = 0
    with tempfile.TemporaryDirectory(prefix="codeloop-bench-ingress-") as tmp:
        home = Path(tmp)
        db_url = args.db
        if db_url and db_url.startswith("postgresql"):  # a fresh database for this run
            import psycopg

            name = f"codeloop_bench_{uuid.uuid4().hex[:8]}"
            admin = db_url.replace("postgresql+psycopg://", "postgresql://")
            with psycopg.connect(admin, autocommit=True) as conn:
                conn.execute(f'CREATE DATABASE "{name}"')
            db_url = db_url.rsplit("/", 1)[0] + "/" + name
        Store(settings_for(home, db_url).database_url).close()  # migrate before the clock
        port = free_port()
        server = subprocess.Popen(
            [sys.executable, __file__, "--serve", str(home), str(port),
             *(["--db", db_url] if db_url else [])],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        base = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    if httpx.get(base + "/healthz", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None or time.monotonic() > deadline:
                    print(server.stdout.read() if server.stdout else "")
                    raise SystemExit("the web server did not start")
                time.sleep(0.1)

            random.seed(7)
            counter = iter(range(10**9))
            for level in levels:
                unique = []
                for _ in range(args.deliveries):
                    i = next(counter)
                    unique.append(github_delivery(i) if i % 2 == 0 else slack_event(i))
                repeats = random.sample(unique, int(len(unique) * args.duplicates))
                plan = unique + repeats
                random.shuffle(plan)
                unique_total += len(unique)
                results: list[tuple[str, float, int]] = []
                lock = threading.Lock()
                local = threading.local()

                def send(item) -> None:
                    client = getattr(local, "client", None)
                    if client is None:
                        client = local.client = httpx.Client(base_url=base, timeout=30)
                    path, body, headers = item
                    started = time.perf_counter()
                    status = client.post(path, content=body, headers=headers).status_code
                    elapsed = (time.perf_counter() - started) * 1000
                    with lock:
                        results.append((path.split("/")[1], elapsed, status))

                cpu0 = server_cpu_seconds(server.pid)
                started = time.perf_counter()
                with ThreadPoolExecutor(level) as pool:
                    list(pool.map(send, plan))
                wall = time.perf_counter() - started
                cpu = server_cpu_seconds(server.pid) - cpu0
                lat = [ms for _, ms, _ in results]
                bad = sum(1 for r in results if r[2] >= 400)
                bad_total += bad
                rows.append((level, percentile(lat, 50), percentile(lat, 99), max(lat),
                             len(plan) / wall, cpu / len(plan) * 1000, bad))
        finally:
            server.terminate()
            server.wait(timeout=90)
            log_tail = server.stdout.read()[-2000:] if server.stdout else ""

        store = Store(settings_for(home, db_url).database_url)
        with store.session() as s:
            stored = s.scalar(select(func.count()).select_from(Delivery))
            by_source = dict(s.execute(select(Delivery.source, func.count())
                                       .group_by(Delivery.source)).all())
        store.close()
        from huey import SqliteHuey

        queued = sum(SqliteHuey(name, filename=str(home / "queue.db")).pending_count()
                     for name in ("codeloop", "codeloop-deliveries"))

    load = os.getloadavg()
    print(f"machine: {os.cpu_count()} CPUs, load {load[0]:.2f}; store: "
          f"{'PostgreSQL' if db_url else 'SQLite'}; queue: huey on SQLite; "
          f"{args.deliveries} deliveries (+{args.duplicates:.0%} redeliveries) per level")
    print("| clients | p50 ms | p99 ms | max ms | deliveries/s | server CPU ms/delivery | errors |")
    print("|--------:|-------:|-------:|-------:|-------------:|-----------------------:|-------:|")
    for level, p50, p99, worst, rate, cpu_ms, bad in rows:
        print(f"| {level:>7} | {p50:>6.1f} | {p99:>6.1f} | {worst:>6.0f} | {rate:>12.0f} "
              f"| {cpu_ms:>22.2f} | {bad:>6} |")
    print(f"deliveries stored: {stored} of {unique_total} unique "
          f"({by_source.get('github', 0)} GitHub, {by_source.get('slack', 0)} Slack); "
          f"handle tasks enqueued: {queued}")
    ok = not bad_total and stored == unique_total and queued == stored
    if not ok and log_tail.strip():
        print("server log (tail):\n" + log_tail)
    print("every delivery stored exactly once and enqueued once: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

"""`codeloop doctor`: check each configured part and say, in one line each, what to fix.

Database (reachable, migrated), queue, model backend (models served, adapters loaded;
or the embedded model's file), Slack (token through `auth.test`, signing secret),
GitHub (App installation and permissions, or a token; webhook secret), sandbox.
Parts that are not configured are reported as skipped. Any failure → exit status 1.
"""

from __future__ import annotations

from collections.abc import Callable

from bot.checks import Check
from bot.checks import err as _err
from bot.github import check as github_check
from bot.settings import Settings


# ---------------------------------------------------------------- store and queue


def check_database(settings: Settings) -> Check:
    from sqlalchemy import text

    from bot.store.db import make_engine, schema_is_current

    engine = make_engine(settings.database_url)
    where = engine.url.render_as_string(hide_password=True)
    try:
        with engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        current = schema_is_current(engine)
    except Exception as exc:  # noqa: BLE001
        return Check("database", "fail", f"cannot reach {where} ({_err(exc)}) — start the "
                     "database or fix CODELOOP_STORE__URL")
    finally:
        engine.dispose()
    if not current:
        return Check("database", "fail", f"{where} is not migrated to the newest schema — run "
                     "`codeloop migrate`")
    return Check("database", "ok", f"{where} reachable and migrated")


def check_queue(settings: Settings) -> Check:
    url = settings.queue.url
    if url and url.startswith("redis"):
        try:
            import redis

            client = redis.Redis.from_url(url, socket_connect_timeout=3, socket_timeout=3)
            client.ping()
            client.close()
        except Exception as exc:  # noqa: BLE001
            return Check("queue", "fail", f"cannot reach Redis at {_hide(url)} ({_err(exc)}) — "
                         "start Redis or fix CODELOOP_QUEUE__URL")
        return Check("queue", "ok", f"Redis at {_hide(url)} answers")
    path = settings.home / "queue.db"
    try:
        import sqlite3

        path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=5)
        conn.execute("PRAGMA user_version")
        conn.close()
    except Exception as exc:  # noqa: BLE001
        return Check("queue", "fail", f"cannot open the SQLite queue {path} ({_err(exc)}) — make "
                     "CODELOOP_HOME writable or set CODELOOP_QUEUE__URL=redis://…")
    return Check("queue", "ok", f"SQLite queue at {path} (one machine; Redis for several)")


def _hide(url: str) -> str:
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a URL SQLAlchemy parses
        return url.split("@")[-1]


# ---------------------------------------------------------------- backend


def _active_adapters(settings: Settings) -> list[str]:
    """Names of promoted model versions that should be served (best effort)."""
    from sqlalchemy import select

    from bot.store.db import make_engine
    from bot.store.models import ModelVersion

    engine = make_engine(settings.database_url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(select(ModelVersion.name, ModelVersion.adapter_path)
                                .where(ModelVersion.status == "active")).all()
        return [name for name, path in rows if path]
    except Exception:  # noqa: BLE001 - the database check reports this
        return []
    finally:
        engine.dispose()


def check_backend(settings: Settings, timeout: float = 5.0) -> Check:
    b = settings.backend
    if b.kind == "transformers":
        from inference.backends.embedded import EmbeddedModelMissing, find_gguf, is_converted

        if is_converted(settings.embedded.cache_dir):
            return Check("backend", "ok",
                         f"embedded model converted in {settings.embedded.cache_dir}")
        try:
            gguf = find_gguf()
        except EmbeddedModelMissing as exc:
            return Check("backend", "fail", str(exc))
        return Check("backend", "ok", f"embedded model file {gguf.name} present (converted on "
                     "first use, about 20 s)")
    import httpx

    url = b.base_url.rstrip("/") + "/models"
    headers = {"Authorization": f"Bearer {b.api_key.get_secret_value()}"}
    try:
        response = httpx.get(url, headers=headers, timeout=timeout)
    except httpx.HTTPError as exc:
        return Check("backend", "fail", f"cannot reach the model server at {b.base_url} "
                     f"({_err(exc)}) — start vLLM (deploy/vllm/serve-gpu.sh) or fix "
                     "CODELOOP_BACKEND__BASE_URL")
    if response.status_code in (401, 403):
        return Check("backend", "fail", f"{url} answered {response.status_code} — set "
                     "CODELOOP_BACKEND__API_KEY to the server's --api-key")
    if response.status_code != 200:
        return Check("backend", "fail", f"{url} answered {response.status_code}: "
                     f"{response.text[:200]}")
    try:
        cards = response.json()["data"]
        served = [card["id"] for card in cards]
    except (ValueError, KeyError, TypeError):
        return Check("backend", "fail", f"{url} did not answer an OpenAI model list — is "
                     "CODELOOP_BACKEND__BASE_URL an OpenAI-compatible /v1 URL?")
    if b.model not in served:
        return Check("backend", "fail", f"the server does not serve {b.model!r} (it serves "
                     f"{', '.join(served) or 'nothing'}) — set CODELOOP_BACKEND__MODEL or "
                     "the server's --served-model-name")
    missing = [name for name in _active_adapters(settings) if name not in served]
    if missing:
        return Check("backend", "fail", f"promoted adapter(s) {', '.join(missing)} are not "
                     "loaded — load them with POST /v1/load_lora_adapter (bot.vllm.load_adapter)")
    adapters = [card["id"] for card in cards if card.get("parent")]
    extra = f", adapters: {', '.join(adapters)}" if adapters else ", no adapters loaded"
    return Check("backend", "ok", f"{b.base_url} serves {b.model}{extra}")


# ---------------------------------------------------------------- Slack


def slack_configured(settings: Settings) -> bool:
    s = settings.slack
    return any(v is not None for v in (s.bot_token, s.signing_secret, s.app_token))


def check_slack_token(settings: Settings, timeout: float = 5.0) -> Check:
    from slack_sdk import WebClient
    from slack_sdk.errors import SlackApiError

    s = settings.slack
    if s.bot_token is None or not s.bot_token.get_secret_value():
        return Check("slack token", "fail", "CODELOOP_SLACK__BOT_TOKEN is not set — copy the Bot "
                     "User OAuth Token (xoxb-…) from the Slack app's OAuth & Permissions page")
    client = WebClient(token=s.bot_token.get_secret_value(), base_url=s.api_url,
                       timeout=int(max(timeout, 1)))
    try:
        answer = client.auth_test()
    except SlackApiError as exc:
        error = exc.response.get("error", "unknown error") if exc.response is not None else "?"
        return Check("slack token", "fail", f"Slack rejected the bot token ({error}) — set "
                     "CODELOOP_SLACK__BOT_TOKEN to the app's current Bot User OAuth Token (xoxb-…)")
    except Exception as exc:  # noqa: BLE001 - network errors
        return Check("slack token", "fail", f"cannot reach the Slack API at {s.api_url} "
                     f"({_err(exc)}) — check the network or CODELOOP_SLACK__API_URL; until it "
                     "answers, `codeloop web` runs with Slack degraded (events are stored, "
                     "/readyz says so) and asks again every "
                     f"{s.auth_retry_seconds:g} s")
    return Check("slack token", "ok", f"bot {answer.get('user')} in workspace {answer.get('team')}")


def check_slack_signing(settings: Settings) -> Check:
    s = settings.slack
    if s.signing_secret is not None and s.signing_secret.get_secret_value():
        return Check("slack signing secret", "ok", "set")
    if s.app_token is not None:
        return Check("slack signing secret", "ok", "not set; Socket Mode (app token) needs none")
    return Check("slack signing secret", "fail", "CODELOOP_SLACK__SIGNING_SECRET is not set: "
                 "events from Slack cannot be verified and are refused — copy it from the app's "
                 "Basic Information page")


# ---------------------------------------------------------------- sandbox


def check_sandbox(settings: Settings) -> Check:
    """Prove the sandbox: a self-test inside it tries every escape, and each must fail."""
    from bot.sandbox import self_test

    if settings.sandbox.isolation == "none":
        return Check("sandbox", "fail", "CODELOOP_SANDBOX__ISOLATION=none: repository code (tests "
                     "a model wrote) runs unconfined on this host with the bot's access — set it "
                     "to bwrap and install bubblewrap")
    result = self_test(settings.sandbox)
    if result.error and not result.attempts:
        return Check("sandbox", "fail", f"{result.error}; workers refuse jobs until it works")
    lines = [f"{'blocked' if blocked else 'ESCAPED'}: {name} ({detail})"
             for name, blocked, detail in result.attempts]
    if result.error:
        lines.append(result.error)
    summary = (f"self-test: {sum(b for _, b, _ in result.attempts)}/{len(result.attempts)} "
               "escape attempts blocked")
    from bot.sandbox.cgroup import placement

    box = settings.sandbox
    where, why = placement()
    if where is not None:
        lines.append(f"memory: {box.total_memory_mb} MB for each sandbox run as a whole "
                     f"({where.describe()}), {box.memory_mb} MB a process")
    else:
        lines.append(f"memory: {box.memory_mb} MB a process only ({why}); a sandbox's "
                     "processes together are not bounded — run the worker as root, or delegate "
                     "the cgroup v2 memory and pids controllers to it")
    unsafe = []
    if box.network == "allow":
        unsafe.append("CODELOOP_SANDBOX__NETWORK=allow: tests share the host's network (unsafe)")
    if box.setup_network == "host":
        unsafe.append("CODELOOP_SANDBOX__SETUP_NETWORK=host: set-up steps share the host's "
                      "network, its local services included (unsafe)")
    else:
        more = ", …" if len(box.setup_hosts) > 4 else ""
        lines.append(f"set-up network: HTTPS to {len(box.setup_hosts)} hosts "
                     f"({', '.join(box.setup_hosts[:4])}{more}) through codeloop's proxy, "
                     "nothing else")
    lines += unsafe
    body = summary + "".join(f"\n        {line}" for line in lines)
    return Check("sandbox", "ok" if result.ok and not unsafe else
                 ("warn" if result.ok else "fail"), body)


# ---------------------------------------------------------------- repository environments


def check_environments(settings: Settings) -> Check:
    """The cache of repositories' own environments (`.codeloop.yml` `setup:`)."""
    from bot.environments import cache_state

    state = cache_state(settings)
    if not state["venv"]:
        return Check("environments", "fail", "this Python cannot create virtual environments "
                     "(python -m venv): repositories with `setup:` steps cannot be validated")
    return Check("environments", "ok", f"{state['count']} built under {state['dir']} "
                 f"({state['mb']} of {settings.sandbox.env_cache_mb} MB; least recently used "
                 "evicted first)" + "".join(f"\n        {line}" for line in state["lines"]))


# ---------------------------------------------------------------- all of it


PARTS = ("database", "queue", "backend", "slack", "github", "sandbox", "environments")


def run_checks(settings: Settings, timeout: float = 5.0,
               only: tuple[str, ...] = PARTS) -> list[Check]:
    """The checks of the parts named in `only` (all by default), in a fixed order."""
    checks: list[tuple[str, Callable[[], Check]]] = [
        ("database", lambda: check_database(settings)),
        ("queue", lambda: check_queue(settings)),
        ("backend", lambda: check_backend(settings, timeout)),
    ]
    if slack_configured(settings):
        checks += [("slack", lambda: check_slack_token(settings, timeout)),
                   ("slack", lambda: check_slack_signing(settings))]
    if github_check.wanted(settings):
        checks += [("github", lambda: github_check.check_access(settings, timeout)),
                   ("github", lambda: github_check.check_webhook_secret(settings))]
    checks.append(("sandbox", lambda: check_sandbox(settings)))
    checks.append(("environments", lambda: check_environments(settings)))
    out = []
    for part, check in checks:
        if part not in only:
            continue
        try:
            out.append(check())
        except Exception as exc:  # noqa: BLE001 - one broken check must not hide the others
            out.append(Check(part, "fail", f"the check crashed: {_err(exc)}"))
    if "slack" in only and not slack_configured(settings):
        out.append(Check("slack", "skip", "not configured (set CODELOOP_SLACK__BOT_TOKEN to "
                         "use Slack)"))
    if "github" in only and not github_check.wanted(settings):
        out.append(Check("github", "skip", "not configured (CODELOOP_FORGE__KIND=local)"))
    return out


def doctor(settings: Settings, write: Callable[[str], None] = print, timeout: float = 5.0,
           only: tuple[str, ...] = PARTS) -> int:
    """Print one line per check; 1 when anything failed, else 0."""
    results = run_checks(settings, timeout, only)
    for check in results:
        write(check.line())
    failed = [c for c in results if c.status == "fail"]
    write(f"{len(failed)} problem(s) to fix" if failed else "all checks passed")
    return 1 if failed else 0

"""The dashboard in headless Chromium (Debian's chromium driven by Playwright): log in, see a
job a test ran, its stages and validation output, the pull requests with their review
outcome, a model's page with its loss chart, and the retraining schedule. A screenshot of
each page goes to test-output/dashboard/."""

from __future__ import annotations

import os
import re
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest
import uvicorn
from pydantic import SecretStr

from bot import jobs
from bot.runtime import build_runtime, execute
from bot.serve import build_app
from bot.settings import WebSettings
from bot.store.models import ModelVersion
from feedback.signals import record_local_review
from tests.support import make_settings
from tests.fakes import GOOD, ScriptedBackend

TOKEN = "dashboard-test-token-5e1"
CHROMIUM = os.environ.get("CODELOOP_TEST_CHROMIUM", "/usr/bin/chromium")
SHOTS = Path(__file__).resolve().parents[1] / "test-output" / "dashboard"


def _chromium() -> str:
    path = CHROMIUM if Path(CHROMIUM).exists() else shutil.which("chromium")
    if not path:
        if os.environ.get("CI"):
            raise AssertionError("chromium is missing: apt-get install -y chromium")
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    return path


def serve_app(app):
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off",
                                           access_log=False))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the web server did not start"
        time.sleep(0.02)
    return server, thread, sock, f"http://127.0.0.1:{port}"


@pytest.fixture
def dashboard(tmp_path, sample_repo):
    settings = make_settings(tmp_path / "home", web=WebSettings(dashboard_token=SecretStr(TOKEN)))
    runtime = build_runtime(settings, backend=ScriptedBackend(GOOD))
    sub = jobs.submit(runtime.store, source="cli", repo=str(sample_repo),
                      requirement="Add a whisper(text) helper", max_bytes=100_000,
                      requester="ada")
    outcome = execute(runtime, sub.job_id)
    assert outcome.state == "succeeded", outcome.error
    record_local_review(runtime.store, outcome.result["pull_request_id"],
                        kind="changes_requested", body="Also handle empty text", author="grace")
    with runtime.store.session() as s:
        version = ModelVersion(name="repo-v1", base_model="smollm2-135m-instruct",
                               adapter_path="/models/adapters/repo-v1", status="active",
                               metrics={"eval_loss": 1.234, "tests_pass_rate": 0.75,
                                        "humaneval_pass_at_1": 0.05})
        s.add(version)
        s.flush()
        version_id = version.id
    server, thread, sock, url = serve_app(
        build_app(settings, runtime.store, enqueue_delivery=lambda pk: None)
    )
    SHOTS.mkdir(parents=True, exist_ok=True)
    try:
        yield {"url": url, "settings": settings, "runtime": runtime, "job_id": sub.job_id,
               "version_id": version_id, "pr_number": outcome.result["number"]}
    finally:
        server.should_exit = True
        thread.join(timeout=10)
        sock.close()


@pytest.fixture
def browser():
    from playwright.sync_api import sync_playwright

    executable = _chromium()
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=executable, headless=True,
                                     args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            yield chromium
        finally:
            chromium.close()


def login(page, url: str, token: str = TOKEN) -> None:
    page.goto(f"{url}/")
    assert page.url.startswith(f"{url}/login")  # not logged in: the login page
    page.fill("input[name=token]", token)
    page.click("button[type=submit]")


def test_log_in_and_see_jobs_pull_requests_and_models(dashboard, browser):
    url = dashboard["url"]
    page = browser.new_page(viewport={"width": 1280, "height": 900})

    # A wrong token is refused with a message, and no session is made.
    login(page, url, token="not-the-token")
    assert page.get_by_role("alert").inner_text() == "That token is not the dashboard token."
    page.screenshot(path=str(SHOTS / "login-refused.png"), full_page=True)
    assert page.context.cookies() == []

    login(page, url)
    page.wait_for_selector("table#jobs")
    row = page.locator(f"tr[data-job='{dashboard['job_id']}']")
    assert row.locator(".state").inner_text() == "succeeded"
    assert "ada" in row.inner_text() and "Add a whisper(text) helper" in row.inner_text()
    assert f"#{dashboard['pr_number']}" in row.inner_text()
    page.screenshot(path=str(SHOTS / "jobs.png"), full_page=True)

    row.locator(f"a[href='/jobs/{dashboard['job_id']}']").click()
    page.wait_for_selector("table#stages")
    stages = page.locator("table#stages tbody tr")
    names = [stages.nth(i).locator("td").first.inner_text() for i in range(stages.count())]
    assert names[:5] == ["workspace", "context", "prompt", "generate-1", "validate-1"]
    assert names[-1] == "publish"
    took = page.locator("table#stages tbody tr").first.locator("td").nth(3).inner_text()
    assert took.endswith(("ms", " s", "min"))
    validation = page.locator("#validation").inner_text()
    assert "tests: passed" in validation and "passed" in validation  # the sandbox's pytest output
    page.screenshot(path=str(SHOTS / "job.png"), full_page=True)

    page.click("text=Pull requests")
    pr = page.locator(f"tr[data-pr='{dashboard['pr_number']}']")
    assert pr.locator(".outcome").inner_text() == "changes requested"
    assert "changes_requested by grace" in pr.inner_text()
    page.screenshot(path=str(SHOTS / "pulls.png"), full_page=True)

    page.click("header >> text=Models")
    model = page.locator("tr[data-model='repo-v1']")
    assert "active" in model.inner_text() and "1.234" in model.inner_text()
    model.locator("a", has_text="repo-v1").click()
    page.wait_for_selector("table#metrics")
    assert "tests_pass_rate" in page.locator("table#metrics").inner_text()
    assert page.locator("#loss svg").count() == 1  # the chart (its data: see the next test)
    page.screenshot(path=str(SHOTS / "model.png"), full_page=True)

    # Logging out ends the session.
    page.click("text=Log out")
    page.goto(f"{url}/pulls")
    assert page.url.startswith(f"{url}/login")


def test_forged_cookie_and_missing_token(dashboard, tmp_path):
    import httpx

    url = dashboard["url"]
    with httpx.Client(base_url=url, follow_redirects=False) as client:
        assert client.get("/").status_code == 303
        forged = httpx.Client(base_url=url, follow_redirects=False,
                              cookies={"codeloop_dashboard": f"{int(time.time())}.abc.deadbeef"})
        assert forged.get("/").status_code == 303
        forged.close()
        ok = client.post("/login", data={"token": TOKEN})
        assert ok.status_code == 303 and "httponly" in ok.headers["set-cookie"].lower()
        assert client.get("/").status_code == 200
        # A form posted without the session's CSRF token changes nothing.
        assert client.post("/schedule/pause", data={"repo": "x"}).status_code in (403, 404)
        # The metrics and health endpoints are not behind the login.
        assert client.get("/metrics").status_code == 200
    # Without a token there is no dashboard at all.
    plain = make_settings(tmp_path / "plain")
    from starlette.testclient import TestClient

    from bot.store.db import Store

    app = build_app(plain, Store(plain.database_url), enqueue_delivery=lambda pk: None)
    with TestClient(app) as client:
        assert client.get("/", follow_redirects=False).status_code == 404
        assert client.get("/login").status_code == 404


def test_model_loss_chart_and_the_retraining_schedule(dashboard, browser):
    """The learning loop's parts: a training run's losses drawn on the model page, and the
    schedule changed from the browser (through training.schedule, stored for the scheduler)."""
    pytest.importorskip("training.schedule", reason="the learning loop is not in this build")
    from bot.store.models import TrainingRun
    from training import schedule

    url, runtime = dashboard["url"], dashboard["runtime"]
    losses = [{"step": step, "loss": round(2.5 * 0.8 ** step + 0.3, 4)} for step in range(12)]
    with runtime.store.session() as s:
        s.add(TrainingRun(key="repo:test-run", repo="acme/widgets", trigger="manual",
                          requested_by="ada", state="succeeded", losses=losses,
                          model_version_id=dashboard["version_id"], reason="promoted"))
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    login(page, url)
    page.goto(f"{url}/models/{dashboard['version_id']}")
    chart = page.locator("#loss svg.loss-chart")
    assert chart.count() == 1
    points = chart.locator("polyline.loss").get_attribute("points").split()
    assert len(points) == len(losses)
    ys = [float(p.split(",")[1]) for p in points]
    assert ys[0] < ys[-1]  # the loss falls: later points sit lower (larger y) on the chart
    assert chart.locator("circle title").first.text_content() == "step 0: loss 2.8000"
    assert "promoted" in page.locator("table#runs").inner_text()
    chart.screenshot(path=str(SHOTS / "loss-chart.png"))
    page.screenshot(path=str(SHOTS / "model-with-chart.png"), full_page=True)

    settings = dashboard["settings"]
    page.click("header >> text=Schedule")
    page.fill("#set-schedule input[name=repo]", "acme/widgets")
    page.fill("#set-schedule input[name=cron]", "0 3 * * 0")
    page.click("#set-schedule button[type=submit]")
    page.get_by_role("status").wait_for(state="visible")  # the answer page, once it has loaded
    row = page.locator("tr[data-repo='acme/widgets']")
    assert row.locator(".cron").inner_text() == "0 3 * * 0"
    stored = {s["repo"]: s for s in schedule.show_schedules(settings)}
    assert stored["acme/widgets"]["cron"] == "0 3 * * 0" and not stored["acme/widgets"]["paused"]

    row.locator("button", has_text="Pause").click()
    assert page.locator("tr[data-repo='acme/widgets'] .paused").inner_text() == "paused"
    assert schedule.show_schedules(settings)[0]["paused"] is True
    page.screenshot(path=str(SHOTS / "schedule.png"), full_page=True)

    # A wrong cron expression is refused with a message and changes nothing.
    page.fill("#set-schedule input[name=repo]", "acme/widgets")
    page.fill("#set-schedule input[name=cron]", "every sunday")
    page.click("#set-schedule button[type=submit]")
    page.get_by_role("alert").wait_for(state="visible")
    assert schedule.show_schedules(settings)[0]["cron"] == "0 3 * * 0"

    page.locator("tr[data-repo='acme/widgets'] button", has_text="Resume").click()
    assert schedule.show_schedules(settings)[0]["paused"] is False

    # Retrain now: a manual training run is recorded (and queued for a worker with a GPU).
    page.locator("tr[data-repo='acme/widgets'] button", has_text="Retrain now").click()
    status = page.get_by_role("status").inner_text()
    assert re.fullmatch(r"Training run \d+ for acme/widgets is queued\.", status), status
    run_id = int(status.split()[2])
    with runtime.store.session() as s:
        run = s.get(TrainingRun, run_id)
        assert (run.repo, run.trigger, run.requested_by) == ("acme/widgets", "manual", "dashboard")
    assert f"#{run_id}" in page.locator("table#runs").inner_text()
    page.screenshot(path=str(SHOTS / "schedule-retrain.png"), full_page=True)

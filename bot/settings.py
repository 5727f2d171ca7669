"""Process settings (environment, `CODELOOP_` prefix); per-repository config (`.codeloop.yml`)
is in bot/repo_config.py and importable from here.

One `Settings` object is built at each entry point and passed down; nothing here reads the
environment at import time.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

# `.codeloop.yml` lives in bot/repo_config.py; these names stay importable from here.
from bot.repo_config import (  # noqa: F401
    ALWAYS_PROTECTED,
    DEFAULT_PROTECTED,
    RepoConfig,
    RepoConfigError,
    parse_repo_config,
)


def _default_home() -> Path:
    return Path.home() / ".codeloop"


def _default_model_cache() -> Path:
    return Path.home() / ".cache" / "codeloop" / "models"


class StoreSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description="SQLAlchemy database URL. Default: a SQLite file in the home directory. "
        "PostgreSQL: postgresql+psycopg://user@host:5432/db",
    )


class QueueSettings(BaseModel):
    url: str | None = Field(
        default=None,
        description="huey storage: empty for a SQLite file in the home directory, or redis://host:6379/0",
    )
    workers: int = Field(default=1, ge=1, description="Jobs a worker runs at once.")
    lease_seconds: int = Field(
        default=120,
        ge=5,
        description="How long a job's claim lasts without a heartbeat before another worker may "
        "resume it (a worker killed mid-job is resumed after this).",
    )
    backend_wait_seconds: float = Field(
        default=30.0,
        ge=0,
        description="When the model server is unreachable, a job goes back to the queue and is "
        "retried after this delay (doubled on each try, at most 10 minutes).",
    )
    max_runs: int = Field(
        default=6,
        ge=1,
        description="Most times a job is started; after that, a job still waiting for the model "
        "server fails with a message saying so.",
    )


class BackendSettings(BaseModel):
    kind: Literal["transformers", "openai"] = Field(
        default="transformers",
        description="transformers: the embedded CPU model. openai: vLLM or any OpenAI-compatible server.",
    )
    model: str = Field(
        default="smollm2-135m-instruct",
        description="Model name: the embedded model's name, or the served model / LoRA adapter name.",
    )
    base_url: str = Field(
        default="http://127.0.0.1:8000/v1", description="OpenAI-compatible server URL (kind=openai)."
    )
    api_key: SecretStr = Field(
        default=SecretStr("EMPTY"), description="API key for the OpenAI-compatible server."
    )
    timeout_seconds: float = Field(default=600.0, gt=0, description="Per-request timeout.")
    max_retries: int = Field(default=4, ge=0, description="Retries on 429/5xx and connection errors.")
    max_new_tokens: int = Field(default=384, ge=1, description="Most tokens one generation may produce.")
    temperature: float = Field(default=0.0, ge=0, description="Sampling temperature (0 = greedy).")
    context_tokens: int | None = Field(
        default=None,
        ge=256,
        description="Model context window in tokens (prompt + answer). Default: what the model "
        "says (the embedded model's config; max_model_len from the server's /v1/models); a "
        "number caps it.",
    )
    supports_prefill: bool = Field(
        default=True,
        description="Whether the server continues a final assistant message (vLLM does: "
        "continue_final_message). Used to start whole-file answers for small models.",
    )


class EmbeddedSettings(BaseModel):
    cache_dir: Path = Field(
        default_factory=_default_model_cache,
        description="Where the embedded model's GGUF file is converted to safetensors once.",
    )
    threads: int = Field(default=0, ge=0, description="torch CPU threads (0 = torch's default).")
    adapter_path: Path | None = Field(
        default=None, description="A PEFT LoRA adapter directory to load on top of the base model."
    )


class PipelineSettings(BaseModel):
    max_attempts: int = Field(
        default=3, ge=1, description="Generations per job: the first plus retries with the errors."
    )
    max_requirement_bytes: int = Field(
        default=100_000, ge=100, description="Longer requirements are truncated, with a note."
    )
    context_files: int = Field(default=6, ge=1, description="Most files put in the prompt.")
    context_min_score: float = Field(
        default=0.5,
        ge=0,
        le=1,
        description="Files scoring below this share of the best file's score stay out of the prompt.",
    )
    prefill: Literal["auto", "off"] = Field(
        default="auto",
        description="auto: with the whole-file format, start the answer with the most relevant "
        "file's current content so small models continue it; off: never.",
    )
    requirement_tests: Literal["auto", "examples", "off"] | None = Field(
        default=None,
        description="Tests of the requested behaviour that must fail at the start commit and "
        "pass with the change. auto: the requirement's stated examples, else a test the model "
        "writes; examples: only the stated examples; off: none (the verdict says so). "
        "Default: auto on an OpenAI-compatible server, examples on the embedded CPU model "
        "(a 135M model's own tests are rarely right, and each costs a generation).",
    )
    candidates: int | None = Field(
        default=None,
        ge=1,
        le=16,
        description="Changes generated per attempt; the best validated one is kept (all are "
        "stored). Empty: 4 on an OpenAI-compatible server (one batched request), 1 on the "
        "embedded model.",
    )
    candidate_temperature: float = Field(
        default=0.8, ge=0, le=2,
        description="Sampling temperature for candidates beyond the first (they must differ).",
    )
    candidate_concurrency: int = Field(
        default=2, ge=1, le=16, description="Candidates validated at once (parallel sandboxes)."
    )

    def requirement_tests_for(self, backend_kind: str) -> str:
        if self.requirement_tests is not None:
            return self.requirement_tests
        return "auto" if backend_kind == "openai" else "examples"

    def candidates_for(self, backend_kind: str) -> int:
        if self.candidates is not None:
            return self.candidates
        return 4 if backend_kind == "openai" else 1


class SandboxSettings(BaseModel):
    isolation: Literal["bwrap", "none"] = Field(
        default="bwrap",
        description="bwrap: repository code (tests, set-up steps) runs in a bubblewrap sandbox; "
        "if it does not work, nothing runs and the job fails with the fix. none: UNSAFE, runs "
        "repository code (which a model wrote) directly on this host with the bot's access.",
    )
    timeout_seconds: float = Field(default=300.0, gt=0, description="Test command time limit.")
    memory_mb: int = Field(default=2048, ge=64, description="Address-space limit per process.")
    total_memory_mb: int = Field(
        default=4096, ge=64,
        description="Memory limit of a whole sandbox run (every process together), enforced "
        "with a control group where codeloop may create one (root with cgroup v1, or a "
        "delegated cgroup v2 sub-tree; `codeloop doctor` says which).",
    )
    network: Literal["isolate", "allow"] = Field(
        default="isolate",
        description="isolate: tests run in an empty network namespace (loopback only). allow: "
        "tests share the host's network, local services included (unsafe).",
    )
    uid: int = Field(
        default=2_000_000_000, ge=1, le=4_294_900_000,
        description="When codeloop runs as root: the first of 1,024 unprivileged user ids that "
        "repository code runs as, one per sandbox running at once (so one sandbox's processes "
        "never count against another's process limit). Pick a range no account uses.",
    )
    read_only_paths: list[Path] = Field(
        default_factory=list,
        description="Extra host directories made visible (read-only) in the sandbox, e.g. a "
        "toolchain outside /usr. Never put secrets or CODELOOP_HOME here.",
    )
    ruff: bool = Field(default=True, description="Run `ruff check` on changed Python files.")
    setup_network: Literal["allowlist", "host"] = Field(
        default="allowlist",
        description="allowlist: set-up steps reach only `setup_hosts` (HTTPS through codeloop's "
        "proxy; never this host's own services, its link or cloud metadata). host: set-up "
        "steps share the host's network, local services included (unsafe: set-up runs the "
        "commit's build scripts, which a model may have written).",
    )
    setup_hosts: list[str] = Field(
        default_factory=lambda: [
            "pypi.org", "files.pythonhosted.org", "github.com", "codeload.github.com",
            "objects.githubusercontent.com", "registry.npmjs.org", "registry.yarnpkg.com",
            "index.crates.io", "static.crates.io", "proxy.golang.org", "sum.golang.org",
        ],
        description="Hosts set-up steps may reach (port 443 or 80, through the proxy): exact "
        "names or `*.example.com`. Add your package mirror here.",
    )
    setup_timeout_seconds: float = Field(
        default=900.0, gt=0, description="Time limit of each `.codeloop.yml` set-up step."
    )
    env_cache_mb: int = Field(
        default=4096, ge=0,
        description="Size of the repository environments kept under CODELOOP_HOME/envs; the "
        "least recently used go first.",
    )


class WebSettings(BaseModel):
    host: str = Field(default="127.0.0.1", description="Address the web server listens on.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port of the web server.")
    public_url: str | None = Field(
        default=None, description="URL people reach the web server at (links in messages)."
    )
    dashboard_token: SecretStr | None = Field(
        default=None, description="Token that logs in to the dashboard (no token: dashboard off)."
    )


class ForgeSettings(BaseModel):
    kind: Literal["local", "github"] = Field(
        default="local",
        description="local: repositories on this machine, branches as pull requests. "
        "github: GitHub through the App (or a personal access token).",
    )


class GitHubSettings(BaseModel):
    api_url: str = Field(
        default="https://api.github.com", description="GitHub REST API URL (GitHub Enterprise: …/api/v3)."
    )
    app_id: int | None = Field(default=None, description="GitHub App id.")
    private_key: SecretStr | None = Field(
        default=None, description="GitHub App private key (PEM text)."
    )
    private_key_path: Path | None = Field(
        default=None, description="GitHub App private key file (instead of private_key)."
    )
    token: SecretStr | None = Field(
        default=None,
        description="Personal access token, for a single-repository set-up without an App.",
    )
    webhook_secret: SecretStr | None = Field(
        default=None, description="Secret that signs webhook deliveries (X-Hub-Signature-256)."
    )
    bot_name: str = Field(
        default="codeloop", description="Name that `@name` comments address the bot by."
    )
    installation_id: int | None = Field(
        default=None,
        description="GitHub App installation id; empty: looked up per repository through the API.",
    )
    bot_login: str = Field(
        default="codeloop[bot]",
        description="Login the bot's own comments carry (its comments never trigger it).",
    )
    max_retries: int = Field(
        default=6, ge=0, description="Retries of a GitHub call on 5xx and rate-limit answers."
    )
    retry_backoff: float = Field(
        default=0.5, ge=0, description="Backoff factor (seconds) between retries of 5xx answers."
    )
    secondary_rate_wait: float = Field(
        default=60.0, ge=0,
        description="Seconds to wait after a secondary rate limit that names no Retry-After.",
    )
    seconds_between_requests: float = Field(
        default=0.25, ge=0,
        description="Least time between two GitHub API calls of one process (GitHub's guidance).",
    )
    seconds_between_writes: float = Field(
        default=1.0, ge=0,
        description="Least time between two content-creating GitHub calls (comments, pull "
        "requests), as GitHub asks of integrations to avoid secondary rate limits.",
    )
    merged_repos: list[str] = Field(
        default_factory=list,
        description="owner/name of repositories whose merged pull requests (anyone's) are stored "
        "as training material; empty: every repository the App receives events from.",
    )


class SlackSettings(BaseModel):
    bot_token: SecretStr | None = Field(default=None, description="Bot token (xoxb-…).")
    signing_secret: SecretStr | None = Field(
        default=None, description="Signing secret that verifies requests from Slack."
    )
    app_token: SecretStr | None = Field(
        default=None, description="App-level token (xapp-…) for Socket Mode."
    )
    api_url: str = Field(
        default="https://slack.com/api/", description="Slack Web API URL."
    )
    admins: list[str] = Field(
        default_factory=list, description="Slack user ids allowed to run maintainer commands."
    )
    github_logins: dict[str, str] = Field(
        default_factory=dict, description="Slack user id → GitHub login, to mention requesters."
    )
    revisers: list[str] = Field(
        default_factory=list,
        description="Slack user ids whose replies in any codeloop thread revise its pull "
        "request (besides the requester and admins); others revise only by mentioning the bot.",
    )
    update_interval_seconds: float = Field(
        default=2.0,
        ge=0,
        description="Least time between two edits of one progress message; faster stage "
        "changes are coalesced into the next edit.",
    )
    rate_limit_retries: int = Field(
        default=3, ge=0, description="Retries of a Web API call Slack answered `ratelimited` (429)."
    )
    timeout_seconds: float = Field(default=30.0, gt=0, description="Slack Web API call timeout.")
    auth_retry_seconds: float = Field(
        default=30.0, gt=0,
        description="While Slack's auth.test fails (Slack unreachable at start), the web "
        "server runs degraded and asks again this often.",
    )


class OpsSettings(BaseModel):
    log_format: Literal["auto", "json", "text"] = Field(
        default="auto",
        description="Log lines of `codeloop serve|web|worker|scheduler`: json, text, or auto "
        "(text on a terminal, JSON otherwise).",
    )


class TrainingSettings(BaseModel):
    """The learning loop: dataset, LoRA training, the evaluation gate, schedule and serving."""

    schedule: str = Field(
        default="0 3 * * 0",
        description="Default retraining schedule (cron: minute hour day month weekday; "
        "an optional leading seconds field is accepted). Default: Sundays at 03:00 UTC.",
    )
    min_new_examples: int = Field(
        default=20, ge=0,
        description="A run with fewer new merged changes since the last run is skipped.",
    )
    holdout_share: float = Field(
        default=0.1, ge=0, lt=1, description="Newest share of examples held out for evaluation."
    )
    max_seq_len: int = Field(default=2048, ge=64, description="Longest training sequence (tokens).")
    lora_rank: int = Field(default=16, ge=1, le=64, description="LoRA rank (vLLM serves up to 16).")
    lora_alpha: int = Field(default=32, ge=1, description="LoRA alpha.")
    learning_rate: float = Field(default=2e-4, gt=0, description="LoRA learning rate.")
    epochs: float = Field(default=2.0, gt=0, description="Epochs over the SFT examples.")
    max_steps: int = Field(default=-1, description="Stop after this many steps (-1: by epochs).")
    batch_size: int = Field(default=1, ge=1, description="Examples per device per step.")
    grad_accum: int = Field(default=8, ge=1, description="Gradient accumulation steps.")
    min_preference_pairs: int = Field(
        default=50, ge=1,
        description="DPO runs after SFT when there are this many preference pairs.",
    )
    min_kto_examples: int = Field(
        default=100, ge=1,
        description="KTO runs after SFT (when DPO does not) with this many labelled examples.",
    )
    near_duplicate_threshold: float = Field(
        default=0.85, gt=0, le=1, description="MinHash Jaccard above which examples are duplicates."
    )
    eval_max_examples: int = Field(
        default=50, ge=0, description="Most held-out changes the gate evaluates."
    )
    eval_generate: bool = Field(
        default=True,
        description="Generate on held-out changes for the well-formed edit rate and tests.",
    )
    eval_max_new_tokens: int = Field(
        default=512, ge=1, description="Most tokens one evaluation answer may produce."
    )
    humaneval_subset: int = Field(
        default=20, ge=0, description="HumanEval problems in the guard (0 turns the guard off)."
    )
    replay_jobs: int = Field(
        default=0, ge=0,
        description="Held-out merged changes the gate replays through the whole pipeline with "
        "each model (their tests run after: the resolved share; needs the repository's "
        "test_command; 0 turns the replay off).",
    )
    gate_margin: float = Field(
        default=0.02, ge=0,
        description="Tolerance: a metric may be worse by this much (relative for loss, "
        "absolute for rates) beyond its confidence interval before the gate rejects.",
    )
    gate_confidence: float = Field(
        default=0.95, gt=0, lt=1, description="Confidence level of the gate's intervals."
    )
    auto_promote: bool = Field(
        default=True, description="Promote a candidate that passes the gate without a person."
    )
    canary_share: float = Field(
        default=1.0, ge=0, le=1,
        description="Share of jobs the newest promoted version serves; the rest go to the one "
        "it replaced (1.0: all jobs to the new version).",
    )
    adapters_dir: Path | None = Field(
        default=None, description="Where adapters and run artifacts go (default: HOME/adapters)."
    )


class Settings(BaseSettings):
    """Root settings object: CODELOOP_ prefix, `__` between nested names."""

    model_config = SettingsConfigDict(
        env_prefix="CODELOOP_", env_nested_delimiter="__", extra="ignore"
    )

    home: Path = Field(
        default_factory=_default_home,
        description="Data directory: database, queue, workspaces, index cache.",
    )
    log_level: str = Field(default="INFO", description="Logging level.")
    failpoint: str | None = Field(
        default=None,
        description="Fault injection for tests: `kill:<point>` makes this process kill itself "
        "with SIGKILL when a job reaches that point (a stage name such as `generate-1`, or "
        "`publish:pushed`, `publish:opened`). Never set it in production.",
    )
    store: StoreSettings = Field(default_factory=StoreSettings, description="Database.")
    queue: QueueSettings = Field(default_factory=QueueSettings, description="Job queue.")
    backend: BackendSettings = Field(default_factory=BackendSettings, description="Model backend.")
    embedded: EmbeddedSettings = Field(
        default_factory=EmbeddedSettings, description="Embedded CPU model."
    )
    pipeline: PipelineSettings = Field(
        default_factory=PipelineSettings, description="Generation pipeline."
    )
    sandbox: SandboxSettings = Field(
        default_factory=SandboxSettings, description="Test sandbox."
    )
    web: WebSettings = Field(default_factory=WebSettings, description="Web server.")
    forge: ForgeSettings = Field(default_factory=ForgeSettings, description="Where PRs go.")
    github: GitHubSettings = Field(default_factory=GitHubSettings, description="GitHub.")
    slack: SlackSettings = Field(default_factory=SlackSettings, description="Slack.")
    training: TrainingSettings = Field(
        default_factory=TrainingSettings, description="Learning loop: training, gate, schedule."
    )
    ops: OpsSettings = Field(default_factory=OpsSettings, description="Operations: logs.")

    @property
    def database_url(self) -> str:
        return self.store.url or f"sqlite:///{self.home / 'codeloop.db'}"

    @property
    def workspaces_dir(self) -> Path:
        return self.home / "workspaces"

    @property
    def index_dir(self) -> Path:
        return self.home / "index"

    def secret_values(self) -> list[str]:
        """Every secret value configured, for scrubbing logs and sandbox environments."""
        out: list[str] = []

        def walk(model: BaseModel) -> None:
            for name in type(model).model_fields:
                value = getattr(model, name)
                if isinstance(value, SecretStr):
                    raw = value.get_secret_value()
                    if raw and raw != "EMPTY":
                        out.append(raw)
                elif isinstance(value, BaseModel):
                    walk(value)

        walk(self)
        if self.github.private_key_path and self.github.private_key_path.is_file():
            out.append(self.github.private_key_path.read_text().strip())
        return out

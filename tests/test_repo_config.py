"""`.codeloop.yml` is outside data (anyone with push access writes it): any text either parses
into a RepoConfig or gives one RepoConfigError that names the problem; nothing else escapes."""

from __future__ import annotations

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bot.settings import RepoConfig, RepoConfigError, parse_repo_config

KEYS = list(RepoConfig.model_fields) + ["test_comand", "labels ", ""]
scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True),
                    st.text(max_size=30))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=10), inner, max_size=4)),
    max_leaves=12)
configs = st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=12)), values,
                          max_size=6)


def _parse(text: str) -> RepoConfig | None:
    try:
        return parse_repo_config(text)
    except RepoConfigError as exc:
        assert str(exc).startswith(".codeloop.yml")
        return None


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.text(max_size=300))
def test_arbitrary_text_never_escapes_as_anything_but_a_config_error(text):
    _parse(text)


@settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(configs)
def test_arbitrary_yaml_mappings_parse_or_name_the_bad_key(data):
    text = yaml.safe_dump(data, allow_unicode=True)
    config = _parse(text)
    if config is not None:
        assert set(data) <= set(RepoConfig.model_fields)
        for glob in config.protected_paths + config.allowed_paths:
            assert not glob.startswith("/")


@pytest.mark.parametrize("text, words", [
    ("test_comand: pytest\n", "test_comand"),
    ("protected_paths: [/etc/passwd]\n", "relative"),
    ("labels: {a: 1}\n", "labels"),
    ("- a\n- b\n", "mapping"),
    ("key: [unclosed\n", "not valid YAML"),
    ("max_file_bytes: -5\n", "max_file_bytes"),
])
def test_bad_configs_name_the_problem(text, words):
    with pytest.raises(RepoConfigError, match=words.replace("[", r"\[")):
        parse_repo_config(text)


def test_default_protected_paths_guard_ci_and_secrets():
    config = parse_repo_config("test_command: pytest\n")
    for path in (".github/workflows/ci.yml", ".env", "deploy/.env.prod", "certs/server.pem",
                 "id.key"):
        assert config.is_protected(path), path
    assert not config.is_protected("src/app.py")

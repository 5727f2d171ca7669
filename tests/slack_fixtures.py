"""The Slack test fixtures of test_slack_edge.py (a local Slack Web API server, a sample
repository, a harness factory), for other test modules: `pytest_plugins = [...]`."""

from tests.test_slack_edge import harness_factory, repo, slack_api  # noqa: F401

"""GitHub: a labelled issue becomes a pull request; reviews become revisions and signals.

`install` wires the feature into a runtime (bot.runtime.build_runtime); `webhook.routes`
serves `POST /github/webhook` (bot.web.default_features).
"""

from __future__ import annotations

from collections.abc import Callable

from bot.settings import Settings


def configured(settings: Settings) -> bool:
    """Whether GitHub credentials are set (an App with a key, or a personal token)."""
    gh = settings.github
    return gh.token is not None or (
        gh.app_id is not None and (gh.private_key is not None or gh.private_key_path is not None)
    )


def install(
    settings: Settings,
    store,
    by_source: dict,
    handlers: dict,
    enqueue_job: Callable[[int], object],
    clients=None,
):
    """Register the GitHub notifier and delivery handler; returns the clients used."""
    from bot.forges.github_auth import GitHubClients
    from bot.github.handler import GitHubHandler
    from bot.github.notifier import GitHubNotifier

    clients = clients or GitHubClients(settings.github)
    notifier = GitHubNotifier(store, clients)
    by_source["github"] = notifier
    handlers["github"] = GitHubHandler(settings, store, clients, notifier, enqueue_job)
    return clients

"""Slack: requirements posted in a channel become pull requests; the thread tells the story.

- `app`: the slack-bolt app (HTTP at POST /slack/events, or Socket Mode); it only stores
  and enqueues deliveries.
- `events`: Slack payloads → typed values.
- `handler`: the worker side of a delivery (submit, revise, link, maintainer commands).
- `notifier`: one progress message per job, edited in place.
- `signing`: sign a request the way Slack does (tests and bench/ingress.py).
"""

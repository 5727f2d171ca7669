"""One module per GitHub feature; `bot.github.handler.ROUTES` sends each event to one.

Each handler is `handle(github_handler, event, view) -> request id | None` and raises
`bot.deliveries.Ignored` for a delivery it does not act on.
"""

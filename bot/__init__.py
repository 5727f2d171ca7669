"""The bot: edges (CLI, web), durable jobs, the pipeline, forges and the store."""

"""Generation: backends, repository context, prompts and edit formats."""

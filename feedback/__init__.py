"""Review signals: approvals, requested changes, comments, merges and closes, stored per pull request."""

"""The GitHub webhook events codeloop subscribes to (the GitHub App manifest lists exactly these).

issues (labelled issues start jobs), issue_comment (`@codeloop` comments), pull_request
(merged / closed: review signals, merged changes), pull_request_review and
pull_request_review_comment (review signals, revisions), push (merged code for training).
"""

GITHUB_EVENTS: tuple[str, ...] = (
    "issues",
    "issue_comment",
    "pull_request",
    "pull_request_review",
    "pull_request_review_comment",
    "push",
)

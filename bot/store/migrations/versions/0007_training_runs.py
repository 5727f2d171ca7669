"""training runs under a lease (one running run per repository); merged changes' base branch

Revision ID: 0007
Revises: 0005
"""

import sqlalchemy as sa
from alembic import op

revision = "0007"
down_revision = "0005"
branch_labels = None
depends_on = None

RUNNING = sa.text("state = 'running'")


def upgrade() -> None:
    with op.batch_alter_table("training_runs") as batch:
        batch.add_column(sa.Column("runs", sa.Integer(), nullable=False, server_default="0"))
        batch.add_column(sa.Column("lease_owner", sa.String(length=200), nullable=True))
        batch.add_column(sa.Column("lease_until", sa.DateTime(), nullable=True))
    # Before leases, two runs of one repository could both be `running` (or stuck there after
    # a crash). Keep the newest per repository (the recovery sweep takes it over: it has no
    # lease) and end the others, so the one-running-run index can be built.
    op.execute(
        "UPDATE training_runs SET state = 'failed', "
        "reason = 'interrupted: a newer run of this repository was running when codeloop "
        "was upgraded' "
        "WHERE state = 'running' AND id NOT IN "
        "(SELECT max_id FROM (SELECT max(id) AS max_id FROM training_runs "
        "WHERE state = 'running' GROUP BY repo) AS newest)"
    )
    op.create_index("uq_training_runs_one_running", "training_runs", ["repo"], unique=True,
                    sqlite_where=RUNNING, postgresql_where=RUNNING)
    with op.batch_alter_table("merged_changes") as batch:
        batch.add_column(sa.Column("base_ref", sa.String(length=300), nullable=True))


def downgrade() -> None:
    with op.batch_alter_table("merged_changes") as batch:
        batch.drop_column("base_ref")
    op.drop_index("uq_training_runs_one_running", table_name="training_runs")
    with op.batch_alter_table("training_runs") as batch:
        batch.drop_column("lease_until")
        batch.drop_column("lease_owner")
        batch.drop_column("runs")

"""Jobs' models and datasets as foreign keys: an upload a stored job uses cannot be deleted.

``job_models.model_id`` gains a foreign key to ``models``; a new ``job_datasets`` table links a
job to its dataset the same way. Links to models that no longer exist (their jobs had finished
when they were deleted) are removed first; ``job_datasets`` is filled from each job's spec, for
the datasets that still exist. On SQLite ``job_models`` is rebuilt (batch mode); nothing refers
to it, so rebuilding it touches no other table.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-23 12:00:00
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("DELETE FROM job_models WHERE model_id NOT IN (SELECT id FROM models)")
    with op.batch_alter_table("job_models") as batch:
        batch.create_foreign_key("fk_job_models_model_id", "models", ["model_id"], ["id"])

    op.create_table(
        "job_datasets",
        sa.Column("job_id", sa.String(40), nullable=False),
        sa.Column("dataset_id", sa.String(40), nullable=False),
        sa.ForeignKeyConstraint(["job_id"], ["jobs.id"], ondelete="CASCADE"),
        sa.ForeignKeyConstraint(["dataset_id"], ["datasets.id"]),
        sa.PrimaryKeyConstraint("job_id"),
    )
    op.create_index("ix_job_datasets_dataset_id", "job_datasets", ["dataset_id"])

    jobs = sa.table("jobs", sa.column("id"), sa.column("spec", sa.JSON()))
    datasets = sa.table("datasets", sa.column("id"))
    named = jobs.c.spec["dataset_id"].as_string()
    op.execute(
        sa.insert(
            sa.table("job_datasets", sa.column("job_id"), sa.column("dataset_id"))
        ).from_select(
            ["job_id", "dataset_id"],
            sa.select(jobs.c.id, named).where(named.in_(sa.select(datasets.c.id))),
        )
    )


def downgrade() -> None:
    op.drop_table("job_datasets")
    with op.batch_alter_table("job_models") as batch:
        batch.drop_constraint("fk_job_models_model_id", type_="foreignkey")

"""job dependencies and triggers: a job may wait for another (a quantize for its merge); the daemon records
what made it queue a job (a dropped folder, a checkpoint, a pipeline rule, a followed commit) so it never
queues it twice, even after a crash

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-29 04:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0005'
down_revision: Union[str, Sequence[str], None] = '0004'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.add_column(sa.Column('after_job_id', sa.Integer(), nullable=True))
        batch_op.create_foreign_key(batch_op.f('fk_jobs_after_job_id_jobs'), 'jobs', ['after_job_id'], ['id'],
                                    ondelete='SET NULL')
        batch_op.create_index(batch_op.f('ix_jobs_after_job_id'), ['after_job_id'], unique=False)
    op.create_table(
        'triggers',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('source', sa.String(length=32), nullable=False),
        sa.Column('key', sa.String(length=64), nullable=False),
        sa.Column('subject', sa.Text(), nullable=False),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('detail', sa.JSON(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], name=op.f('fk_triggers_job_id_jobs'), ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_triggers')),
        sa.UniqueConstraint('source', 'key', name=op.f('uq_triggers_source_key')),
    )


def downgrade() -> None:
    """Downgrade schema."""
    op.drop_table('triggers')
    with op.batch_alter_table('jobs', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_jobs_after_job_id'))
        batch_op.drop_constraint(batch_op.f('fk_jobs_after_job_id_jobs'), type_='foreignkey')
        batch_op.drop_column('after_job_id')

"""tokens and event actors: `registry serve` authenticates requests with tokens (only their sha256 is stored)
and records in each event which token (or anonymous reader) did it; artifacts are indexed in listing order
(newest first), so the catalog's first page at 10,000 artifacts is an index scan, not a sort

Revision ID: 0006
Revises: 0005
Create Date: 2026-12-06 04:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0006'
down_revision: Union[str, Sequence[str], None] = '0005'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None

LIVE = "revoked_at IS NULL"  # a name is unique among live tokens; revoking one frees its name


def upgrade() -> None:
    """Upgrade schema."""
    op.create_table(
        'tokens',
        sa.Column('id', sa.Integer(), nullable=False),
        sa.Column('name', sa.String(length=255), nullable=False),
        sa.Column('role', sa.String(length=16), nullable=False),
        sa.Column('token_hash', sa.String(length=64), nullable=False),
        sa.Column('prefix', sa.String(length=12), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('last_used_at', sa.DateTime(), nullable=True),
        sa.Column('revoked_at', sa.DateTime(), nullable=True),
        sa.PrimaryKeyConstraint('id', name=op.f('pk_tokens')),
        sa.UniqueConstraint('token_hash', name=op.f('uq_tokens_token_hash')),
    )
    with op.batch_alter_table('tokens', schema=None) as batch_op:
        batch_op.create_index('uq_tokens_live_name', ['name'], unique=True,
                              sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE))
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.add_column(sa.Column('actor', sa.String(length=255), nullable=True))
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.create_index('ix_artifacts_created_at_id', ['created_at', 'id'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('artifacts', schema=None) as batch_op:
        batch_op.drop_index('ix_artifacts_created_at_id')
    with op.batch_alter_table('events', schema=None) as batch_op:
        batch_op.drop_column('actor')
    with op.batch_alter_table('tokens', schema=None) as batch_op:
        batch_op.drop_index('uq_tokens_live_name', sqlite_where=sa.text(LIVE), postgresql_where=sa.text(LIVE))
    op.drop_table('tokens')

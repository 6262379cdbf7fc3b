"""blob pins: a running ingest's claim on blobs it published or reused, so gc leaves them alone

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-01 10:00:00.000000

"""
from typing import Sequence, Union

from alembic import op
import sqlalchemy as sa


# revision identifiers, used by Alembic.
revision: str = '0003'
down_revision: Union[str, Sequence[str], None] = '0002'
branch_labels: Union[str, Sequence[str], None] = None
depends_on: Union[str, Sequence[str], None] = None


def upgrade() -> None:
    """Upgrade schema."""
    # No foreign key to blobs: a pin is taken before the blob's row exists (and keeps an orphan file alive).
    op.create_table(
        'blob_pins',
        sa.Column('sha256', sa.String(length=64), nullable=False),
        sa.Column('owner', sa.String(length=255), nullable=False),
        sa.Column('expires_at', sa.DateTime(), nullable=False),
        sa.PrimaryKeyConstraint('sha256', 'owner', name=op.f('pk_blob_pins')),
    )
    with op.batch_alter_table('blob_pins', schema=None) as batch_op:
        batch_op.create_index(batch_op.f('ix_blob_pins_owner'), ['owner'], unique=False)


def downgrade() -> None:
    """Downgrade schema."""
    with op.batch_alter_table('blob_pins', schema=None) as batch_op:
        batch_op.drop_index(batch_op.f('ix_blob_pins_owner'))
    op.drop_table('blob_pins')

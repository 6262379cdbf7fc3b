"""Alembic environment: runs on the connection the registry hands over, or on REGISTRY_DATABASE_URL."""
from alembic import context
from sqlalchemy import create_engine

from registry.config import load_settings
from registry.models import Base

target_metadata = Base.metadata


def run_migrations(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata,
                      render_as_batch=connection.dialect.name == "sqlite")
    with context.begin_transaction():
        context.run_migrations()


connection = context.config.attributes.get("connection")
if connection is not None:
    run_migrations(connection)
else:
    engine = create_engine(load_settings().database_url)
    with engine.begin() as conn:
        run_migrations(conn)

"""Alembic environment: online migrations on the engine the caller put in config.attributes.

Without one (plain `alembic` CLI use), it builds an engine from `sqlalchemy.url`.
render_as_batch lets later migrations ALTER tables on SQLite (copy-and-move).
"""
from __future__ import annotations

from alembic import context

from loraserve.registry.db import make_engine
from loraserve.registry.models import Base

config = context.config
engine = config.attributes.get("engine") or make_engine(config.get_main_option("sqlalchemy.url"))

with engine.connect() as connection:
    context.configure(connection=connection, target_metadata=Base.metadata, render_as_batch=True,
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()

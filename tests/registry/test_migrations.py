"""The Alembic migrations build exactly the schema the models describe, on SQLite and PostgreSQL."""
from __future__ import annotations

from pathlib import Path

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text

from loraserve.registry import db
from loraserve.registry.models import Base


def test_migrations_match_models(db_url: str | None, tmp_path: Path) -> None:
    engine = db.make_engine(db_url or f"sqlite:///{tmp_path / 'm.db'}")
    try:
        db.upgrade(engine)
        db.upgrade(engine)  # a second start is a no-op
        with engine.connect() as conn:
            diff = compare_metadata(MigrationContext.configure(conn, opts={"compare_type": True}), Base.metadata)
            assert diff == []
            assert conn.execute(text("SELECT version_num FROM alembic_version")).scalar() == "0001"
        assert set(inspect(engine).get_table_names()) >= {"adapters", "adapter_versions", "adapter_aliases",
                                                          "adapter_tags"}
        if engine.dialect.name == "sqlite":
            with engine.connect() as conn:
                assert conn.execute(text("PRAGMA foreign_keys")).scalar() == 1
                assert conn.execute(text("PRAGMA journal_mode")).scalar() == "wal"
        from alembic import command

        command.downgrade(db.alembic_config(engine), "base")
        assert "adapter_versions" not in inspect(engine).get_table_names()
        db.upgrade(engine)
        assert "adapter_versions" in inspect(engine).get_table_names()
    finally:
        engine.dispose()

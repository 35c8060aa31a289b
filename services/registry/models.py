"""Registry metadata tables (SQLAlchemy 2.0 typed models).

    adapters          one row per name; `last_version` only grows, so versions are never reused
    adapter_versions  one immutable row per (adapter, version); `digest` names the stored blob
    adapter_aliases   (adapter, alias) -> version row
    adapter_tags      (version row, key) -> value

A version row exists only once its blob is in the store (blob first, then row), so every
row's digest can be downloaded. Migrations in migrations/versions/ mirror these models; a
test checks that they agree.
"""
from __future__ import annotations

from datetime import datetime, timezone

from sqlalchemy import (JSON, BigInteger, Boolean, DateTime, Float, ForeignKey, Integer, MetaData, String, Text,
                        UniqueConstraint)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class Adapter(Base):
    __tablename__ = "adapters"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(200), unique=True)
    last_version: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    versions: Mapped[list[AdapterVersionRow]] = relationship(back_populates="adapter", passive_deletes=True)


class AdapterVersionRow(Base):
    __tablename__ = "adapter_versions"
    __table_args__ = (UniqueConstraint("adapter_id", "version", name="uq_adapter_versions_adapter_id_version"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"), index=True)
    version: Mapped[int] = mapped_column(Integer)
    format: Mapped[str] = mapped_column(String(16))            # "hf" | "nemo"
    base_model: Mapped[str] = mapped_column(String(500), default="", index=True)
    description: Mapped[str] = mapped_column(Text, default="")
    rank: Mapped[int] = mapped_column(Integer)
    alpha: Mapped[float] = mapped_column(Float)
    use_rslora: Mapped[bool] = mapped_column(Boolean, default=False)
    target_modules: Mapped[list[str]] = mapped_column(JSON)
    num_layers: Mapped[int] = mapped_column(Integer, default=0)
    size_bytes: Mapped[int] = mapped_column(BigInteger)
    digest: Mapped[str] = mapped_column(String(71), index=True)  # "sha256:" + 64 hex
    artifact_type: Mapped[str] = mapped_column(String(16))      # "tar" | "tar.gz" | "zip" | "nemo"
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), default=utcnow)

    adapter: Mapped[Adapter] = relationship(back_populates="versions")
    tags: Mapped[list[AdapterTag]] = relationship(back_populates="version_row", cascade="all, delete-orphan",
                                                  passive_deletes=True, order_by="AdapterTag.key")
    aliases: Mapped[list[AdapterAlias]] = relationship(back_populates="version_row", cascade="all, delete-orphan",
                                                       passive_deletes=True, order_by="AdapterAlias.alias")


class AdapterAlias(Base):
    __tablename__ = "adapter_aliases"
    __table_args__ = (UniqueConstraint("adapter_id", "alias", name="uq_adapter_aliases_adapter_id_alias"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    adapter_id: Mapped[int] = mapped_column(ForeignKey("adapters.id", ondelete="CASCADE"))
    alias: Mapped[str] = mapped_column(String(100))
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"), index=True)

    version_row: Mapped[AdapterVersionRow] = relationship(back_populates="aliases")


class AdapterTag(Base):
    __tablename__ = "adapter_tags"
    __table_args__ = (UniqueConstraint("version_id", "key", name="uq_adapter_tags_version_id_key"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    version_id: Mapped[int] = mapped_column(ForeignKey("adapter_versions.id", ondelete="CASCADE"))
    key: Mapped[str] = mapped_column(String(200))
    value: Mapped[str] = mapped_column(Text)

    version_row: Mapped[AdapterVersionRow] = relationship(back_populates="tags")

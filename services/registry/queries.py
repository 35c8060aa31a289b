"""Read-side queries over the registry tables (called inside a session by RegistryService)."""
from __future__ import annotations

from sqlalchemy import Select, and_, func, or_, select
from sqlalchemy.orm import Session, selectinload

from .errors import InvalidArgument, NotFound
from .models import Adapter, AdapterAlias, AdapterVersionRow
from .records import ALIAS_RE, LATEST, AdapterRecord, check_name, decode_page_token, encode_page_token

DEFAULT_PAGE_SIZE = 50
MAX_PAGE_SIZE = 1000


def resolve(s: Session, name: str, version: int, alias: str) -> AdapterVersionRow:
    """The row `version` (> 0) or `alias` names; neither (or alias "latest") = highest version."""
    check_name(name)
    if version < 0:
        raise InvalidArgument("version must be > 0 (or 0 with an alias)")
    if version and alias:
        raise InvalidArgument("give a version or an alias, not both")
    if alias and alias != LATEST and not ALIAS_RE.fullmatch(alias):
        raise InvalidArgument("bad alias: start with a letter; letters, digits, '.', '_', '-', at most 100 characters")
    ad = s.scalar(select(Adapter).where(Adapter.name == name))
    if ad is None:
        raise NotFound(f"no adapter named {name!r}")
    base = select(AdapterVersionRow).where(AdapterVersionRow.adapter_id == ad.id)
    if version:
        row = s.scalar(base.where(AdapterVersionRow.version == version))
        if row is None:
            raise NotFound(f"adapter {name!r} has no version {version}")
    elif alias and alias != LATEST:
        row = s.scalar(base.join(AdapterAlias, AdapterAlias.version_id == AdapterVersionRow.id)
                       .where(AdapterAlias.adapter_id == ad.id, AdapterAlias.alias == alias))
        if row is None:
            raise NotFound(f"adapter {name!r} has no alias {alias!r}")
    else:
        row = s.scalar(base.order_by(AdapterVersionRow.version.desc()).limit(1))
        if row is None:
            raise NotFound(f"adapter {name!r} has no versions left")
    return row


def record_of(s: Session, row: AdapterVersionRow, name: str) -> AdapterRecord:
    latest = s.scalar(select(func.max(AdapterVersionRow.version))
                      .where(AdapterVersionRow.adapter_id == row.adapter_id))
    return AdapterRecord.from_row(row, name, latest or 0)


def _list_query(base_model: str, name_prefix: str, latest_only: bool) -> Select:
    """(row, name, latest version of that name) for every matching version."""
    latest = (select(AdapterVersionRow.adapter_id, func.max(AdapterVersionRow.version).label("v"))
              .group_by(AdapterVersionRow.adapter_id).subquery())
    q = (select(AdapterVersionRow, Adapter.name, latest.c.v).select_from(AdapterVersionRow)
         .join(Adapter, Adapter.id == AdapterVersionRow.adapter_id)
         .join(latest, latest.c.adapter_id == AdapterVersionRow.adapter_id)
         .options(selectinload(AdapterVersionRow.tags), selectinload(AdapterVersionRow.aliases)))
    if latest_only:
        q = q.where(AdapterVersionRow.version == latest.c.v)
    if base_model:
        q = q.where(AdapterVersionRow.base_model == base_model)
    if name_prefix:
        q = q.where(Adapter.name.startswith(name_prefix, autoescape=True))
    return q


def list_page(s: Session, page_size: int, page_token: str, base_model: str, name_prefix: str,
              latest_only: bool) -> tuple[list[AdapterRecord], str]:
    """One page ordered by (name, version), and the next page's token ("" at the end).

    Keyset pagination: the token holds the last (name, version) shown plus the filters, so
    pages stay consistent while versions are added or deleted between calls.
    """
    if page_size < 0:
        raise InvalidArgument("page_size must be >= 0")
    page_size = min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)
    filters: list[object] = [base_model, name_prefix, latest_only]
    q = _list_query(base_model, name_prefix, latest_only)
    if page_token:
        last_name, last_version = decode_page_token(page_token, filters)
        q = q.where(or_(Adapter.name > last_name,
                        and_(Adapter.name == last_name, AdapterVersionRow.version > last_version)))
    rows = s.execute(q.order_by(Adapter.name, AdapterVersionRow.version).limit(page_size + 1)).all()
    records = [AdapterRecord.from_row(row, name, v) for row, name, v in rows[:page_size]]
    token = encode_page_token(records[-1].name, records[-1].version, filters) if len(rows) > page_size else ""
    return records, token

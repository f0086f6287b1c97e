"""Shared pieces of the emulator's REST handlers: registry, answers, paging, filters.

A handler is ``handler(store, body, query) -> answer``; ``body`` is the parsed JSON (or
the query string of a GET, or the saved parts of a multipart upload, or an
:class:`Upload` for a raw ``application/octet-stream`` body). The answer is a JSON-able
value, a :class:`FileBody` (bytes on disk, served with Range) or :class:`Raw`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sly_emulator._store import ApiError, Store

logger = logging.getLogger(__name__)

#: The page size when a list call gives none (the SDK's ``API_DEFAULT_PER_PAGE``).
DEFAULT_PER_PAGE = 500
#: A bigger per_page is cut to this, as a real server caps pages.
MAX_PER_PAGE = 10_000


@dataclass
class FileBody:
    """Bytes ``[offset, offset + size)`` of a file on disk, served with Range support."""

    path: Path
    size: int
    etag: str
    offset: int = 0
    content_type: str = "application/octet-stream"


@dataclass
class Raw:
    """A ready body (multipart answers)."""

    data: bytes
    content_type: str


@dataclass
class Upload:
    """A raw request body saved to disk (``file-storage.upload`` from the async SDK)."""

    path: Path


Handler = Callable[[Store, Any, dict[str, str]], Any]


class Registry:
    """Method name -> handler, filled by the ``@registry.method("x.y")`` decorator."""

    def __init__(self) -> None:
        self.methods: dict[str, Handler] = {}

    def method(self, name: str) -> Callable[[Handler], Handler]:
        def register(func: Handler) -> Handler:
            self.methods[name] = func
            return func

        return register


def need(body: Any, key: str) -> Any:
    """``body[key]``, or the 400 a real server gives for a missing field."""
    if not isinstance(body, dict) or key not in body:
        raise ApiError(400, f"field '{key}' is required")
    return body[key]


def as_dict(body: Any) -> dict[str, Any]:
    return body if isinstance(body, dict) else {}


def _matches(doc: dict[str, Any], field: str, op: str, value: Any) -> bool:
    got = doc.get(field)
    if op == "=":
        return bool(got == value)
    if op == "!=":
        return bool(got != value)
    if op == "in":
        return bool(got in (value or []))
    if op == "not in":
        return bool(got not in (value or []))
    if op in (">", ">=", "<", "<="):
        if got is None or value is None:
            return False
        try:
            return bool(
                {
                    ">": got > value,
                    ">=": got >= value,
                    "<": got < value,
                    "<=": got <= value,
                }[op]
            )
        except TypeError:
            return False
    raise ApiError(400, f"filter operator {op!r} is not supported")


def filtered(docs: list[dict[str, Any]], filters: Any) -> list[dict[str, Any]]:
    """Apply the SDK's ``filter`` list (``{"field", "operator", "value"}``, all ANDed)."""
    for f in filters or []:
        if not isinstance(f, dict) or "field" not in f:
            raise ApiError(400, "a filter needs field, operator and value")
        field, op, value = str(f["field"]), str(f.get("operator", "=")), f.get("value")
        docs = [d for d in docs if _matches(d, field, op, value)]
    return docs


def sorted_docs(docs: list[dict[str, Any]], body: dict[str, Any]) -> list[dict[str, Any]]:
    """Order by ``sort`` (default id) and ``sort_order`` (asc/desc), as list calls do."""
    key = str(body.get("sort") or "id")
    reverse = str(body.get("sort_order") or "asc").lower() == "desc"

    def order(doc: dict[str, Any]) -> tuple[bool, Any]:
        value = doc.get(key)
        return value is None, 0 if value is None else value

    return sorted(docs, key=order, reverse=reverse)


def page_args(body: dict[str, Any]) -> tuple[int, int]:
    """(page, per_page) of a list call, validated."""
    per_page = body.get("per_page") or DEFAULT_PER_PAGE
    page = body.get("page") or 1
    if isinstance(per_page, bool) or isinstance(page, bool):
        raise ApiError(400, "page and per_page must be positive integers")
    if not isinstance(per_page, int) or not isinstance(page, int) or min(per_page, page) < 1:
        raise ApiError(400, "page and per_page must be positive integers")
    return page, min(per_page, MAX_PER_PAGE)


def paged(total: int, per_page: int, entities: list[dict[str, Any]]) -> dict[str, Any]:
    """The list envelope ``get_list_all_pages`` reads."""
    return {
        "total": total,
        "perPage": per_page,
        "pagesCount": max(1, -(-total // per_page)),
        "entities": entities,
    }


def paged_json(total: int, per_page: int, entities: list[str]) -> Raw:
    """:func:`paged` with entities that are JSON text already (served as they are)."""
    head = json.dumps(
        {"total": total, "perPage": per_page, "pagesCount": max(1, -(-total // per_page))}
    )
    body = f'{head[:-1]}, "entities": [{", ".join(entities)}]}}'
    return Raw(body.encode(), "application/json")


def raw_list(items: list[str]) -> Raw:
    """A JSON list of items that are JSON text already."""
    return Raw(f"[{', '.join(items)}]".encode(), "application/json")


def list_fields(body: dict[str, Any]) -> list[str] | None:
    """The ``fields`` a list call asks for (None: every field), checked."""
    fields = body.get("fields")
    if fields is None:
        return None
    if not isinstance(fields, list) or not all(isinstance(f, str) for f in fields):
        raise ApiError(400, "fields must be a list of field names")
    return fields


def project(docs: list[dict[str, Any]], fields: list[str] | None) -> list[dict[str, Any]]:
    """``docs`` cut to ``fields`` (a field a document lacks is null), or as they are."""
    if fields is None:
        return docs
    return [{f: d.get(f) for f in fields} for d in docs]


def page_of(docs: list[dict[str, Any]], body: Any) -> dict[str, Any]:
    """Filter, sort and cut one page out of ``docs`` (small lists: teams, projects...)."""
    body = as_dict(body)
    page, per_page = page_args(body)
    docs = sorted_docs(filtered(docs, body.get("filter")), body)
    return paged(len(docs), per_page, docs[(page - 1) * per_page : page * per_page])

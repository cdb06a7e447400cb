"""Signed asset URLs: Microsoft Planetary Computer's SAS tokens (``stac.sign``).

Planetary Computer serves its COGs from Azure Blob Storage, which answers only requests whose
query string carries a SAS token. The token of a collection comes from the token endpoint
``{sign_url}/{collection}`` (``GET``, public, no key), which answers
``{"token": "<query string>", "msft:expiry": "<ISO 8601 time>"}``. A token is cached per
(endpoint, collection) for the process and fetched again when it expires within
:data:`RENEW_BEFORE` of its use.

The catalog's hrefs stay unsigned everywhere (items, fingerprints, descriptions, messages);
:func:`storage.sign_with` registers each href with its signer, and the storage module signs it when
it is requested or opened (:func:`storage.rasterio_path`, the http backend), so a dataset opened
after a renewal carries the new token (GDAL's ``/vsicurl/`` caches by URL: a new token is a new
URL, read afresh, and the old URL's cache ages out).
"""

from __future__ import annotations

import datetime as dt
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass

from sitsflow import storage
from sitsflow.errors import BadInputError, InputNotFoundError

#: a token expiring sooner than this after its use is fetched again
RENEW_BEFORE = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class _Token:
    query: str
    expiry: dt.datetime


_tokens: dict[tuple[str, str], _Token] = {}
_lock = threading.Lock()


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _fetch(endpoint: str, collection: str, where: str) -> _Token:
    url = f"{endpoint.rstrip('/')}/{collection}"
    try:
        doc = json.loads(storage.read_bytes(url))
        token = doc["token"]
        expiry = dt.datetime.fromisoformat(str(doc["msft:expiry"]).replace("Z", "+00:00"))
    except (InputNotFoundError, BadInputError) as exc:
        raise BadInputError(f"{where}.sign: the token endpoint refused collection {collection!r}: {exc}") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise BadInputError(
            f"{where}.sign: {url} answered no token (expected JSON with 'token' and 'msft:expiry': {exc!r}); "
            f"is {where}.sign_url a Planetary Computer token endpoint?"
        ) from None
    if not isinstance(token, str) or not token:
        raise BadInputError(f"{where}.sign: {url} answered an empty token")
    storage.add_secret(token)
    return _Token(token.lstrip("?"), expiry if expiry.tzinfo else expiry.replace(tzinfo=dt.UTC))


def token(endpoint: str, collection: str, where: str = "stac") -> str:
    """The SAS token (a query string without ``?``) of ``collection``: cached, renewed when it
    expires within :data:`RENEW_BEFORE`."""
    key = (endpoint, collection)
    with _lock:
        found = _tokens.get(key)
        if found is None or found.expiry - _now() < RENEW_BEFORE:
            found = _tokens[key] = _fetch(endpoint, collection, where)
        return found.query


def signed(href: str, query: str) -> str:
    """``href`` with the query string ``query`` appended (``?`` or ``&``)."""
    return f"{href}{'&' if '?' in href else '?'}{query}"


def register(hrefs: dict[str, str | None], endpoint: str, where: str = "stac") -> None:
    """Sign the http(s) ``hrefs`` (href -> its item's collection) with Planetary Computer's tokens
    from ``endpoint`` whenever the storage module requests or opens them."""
    for href, collection in hrefs.items():
        if not storage.is_http(href):
            continue  # local or s3:// assets need no token
        if not collection:
            raise BadInputError(f"{where}.sign: the asset {href} belongs to an item without a collection to sign for")
        storage.sign_with(href, _signer(endpoint, collection, where))


def _signer(endpoint: str, collection: str, where: str) -> Callable[[str], str]:
    def sign(href: str) -> str:
        return signed(href, token(endpoint, collection, where))

    return sign

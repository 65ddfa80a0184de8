"""What the service tells its callers when a request cannot be served as asked (the HTTP layer
maps each to a status: 404, 422, 503)."""

from __future__ import annotations


class UnknownItem(KeyError):
    """The item is not in the catalog (or has no embedding)."""


class BadItem(ValueError):
    """An upsert that cannot be applied (missing fields, undecodable image); a 422 for clients."""


class NoEncoder(RuntimeError):
    """The release's image encoder is absent or unavailable, so images cannot be embedded."""

"""API keys, checked once for every HTTP request and WebSocket handshake (an ASGI middleware).

Bound to loopback, keys are optional (a local developer needs none), but a key that is given
must be right. Bound to any other address, every route needs a key except ``/healthz`` and the
call page's own static files (the page asks the person for the key and sends it with its
requests). Keys come in ``Authorization: Bearer KEY``, ``X-API-Key: KEY`` or, for clients
that cannot set headers (a browser WebSocket, some WHEP players), ``?key=KEY``.
"""

from __future__ import annotations

import hmac
import ipaddress
import json
from collections.abc import Iterable
from urllib.parse import parse_qs

from starlette.types import ASGIApp, Receive, Scope, Send

from pipeline.errors import ConfigError

OPEN_PATHS = {"/healthz"}


def is_loopback_host(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_auth_config(host: str, keys: list[str]) -> None:
    """Refuse to start open to the network: a non-loopback bind without keys is a config error."""
    if not is_loopback_host(host) and not keys:
        raise ConfigError(
            f"config key 'server.api_keys': required when server.host is not loopback (host is {host!r}); "
            "set LIPSTREAM_SERVER__API_KEYS='[\"a-long-random-key\"]'"
        )


class ApiKeyMiddleware:
    def __init__(self, app: ASGIApp, keys: Iterable[str], required: bool, public_files: set[str]) -> None:
        self.app = app
        self.keys = [k.encode() for k in keys]
        self.required = required
        self.public = OPEN_PATHS | public_files

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self.public:
            await self.app(scope, receive, send)
            return
        key = _presented_key(scope)
        if key is None and not self.required:
            await self.app(scope, receive, send)
            return
        if key is not None and any(hmac.compare_digest(key.encode(), k) for k in self.keys):
            await self.app(scope, receive, send)
            return
        reason = "missing API key" if key is None else "wrong API key"
        if scope["type"] == "websocket":
            # Closing before accept makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": reason})
            return
        body = json.dumps({"error": "Unauthorized", "detail": reason}).encode()
        await send({
            "type": "http.response.start",
            "status": 401,
            "headers": [(b"content-type", b"application/json"), (b"www-authenticate", b"Bearer")],
        })
        await send({"type": "http.response.body", "body": body})


def _presented_key(scope: Scope) -> str | None:
    headers = dict(scope.get("headers") or [])
    auth = headers.get(b"authorization", b"").decode("latin-1")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    if b"x-api-key" in headers:
        return headers[b"x-api-key"].decode("latin-1").strip()
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    if "key" in query:
        return query["key"][0]
    return None


class BodyLimitMiddleware:
    """Refuses request bodies over a limit with 413, before the route reads them into memory."""

    def __init__(self, app: ASGIApp, default_limit: int, limits_by_prefix: dict[str, int] | None = None) -> None:
        self.app = app
        self.default_limit = default_limit
        self.by_prefix = limits_by_prefix or {}

    def _limit(self, path: str) -> int:
        for prefix, limit in self.by_prefix.items():
            if path.startswith(prefix):
                return limit
        return self.default_limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self._limit(scope["path"])
        headers = dict(scope.get("headers") or [])
        declared = headers.get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(send, limit)
            return
        seen = 0
        responded = False

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message):
            nonlocal responded
            if message["type"] == "http.response.start":
                responded = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not responded:
                await _too_large(send, limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Send, limit: int) -> None:
    body = json.dumps({"error": "PayloadTooLarge", "detail": f"request body over the {limit}-byte limit"}).encode()
    await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})

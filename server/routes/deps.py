"""Shared route dependencies: the app state every route works on."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.requests import HTTPConnection

if TYPE_CHECKING:
    from server.app import AppState


def app_state(conn: HTTPConnection) -> AppState:
    return conn.app.state.lipstream

"""Avatar ids.

An id becomes a directory name under the avatars root and appears in URLs, so it is checked
against a strict whitelist before any path is built from it: no ``..``, no separators, no
uppercase (case-insensitive file systems would otherwise merge ``Demo`` and ``demo``), and no
leading ``.``/``-``/``_`` (dot-dirs are the store's temp dirs; a leading dash reads as a CLI flag).
"""

from __future__ import annotations

import re

from pipeline.errors import InvalidAvatarId

AVATAR_ID_PATTERN = r"[a-z0-9][a-z0-9_-]{0,63}"
_ID_RE = re.compile(AVATAR_ID_PATTERN)


def validate_avatar_id(s: str) -> str:
    """Return ``s`` unchanged if it is a valid avatar id, else raise :class:`InvalidAvatarId`."""
    if not isinstance(s, str) or _ID_RE.fullmatch(s) is None:
        shown = s if isinstance(s, str) else type(s).__name__
        if isinstance(shown, str) and len(shown) > 80:
            shown = shown[:77] + "..."
        raise InvalidAvatarId(
            f"invalid avatar id {shown!r}: use 1-64 characters a-z 0-9 _ - starting with a letter or digit"
        )
    return s


def is_valid_avatar_id(s: str) -> bool:
    return isinstance(s, str) and _ID_RE.fullmatch(s) is not None

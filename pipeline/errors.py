"""User-facing errors.

Every failure a person can cause (a bad file, an unknown avatar, a face-less image) raises a
subclass of :class:`LipstreamError` whose message is one clear line. The CLI prints that line and
exits non-zero; the server maps it to an HTTP status. Anything else is a bug and keeps its
traceback.
"""

from __future__ import annotations


class LipstreamError(Exception):
    """An error caused by input, with a message meant for the person who gave it."""

    #: HTTP status the server answers with when this error reaches an API boundary.
    http_status: int = 400
    #: Process exit code used by the CLI.
    exit_code: int = 2


class InputError(LipstreamError):
    """A file or value given by the user cannot be used (not audio, empty, unreadable)."""


class AvatarNotFound(LipstreamError):
    http_status = 404


class InvalidAvatarId(LipstreamError):
    pass


class NoFaceFound(LipstreamError):
    http_status = 422


class AvatarExists(LipstreamError):
    http_status = 409


class ConfigError(LipstreamError):
    """A configuration key or value is wrong; the message names the key."""

    exit_code = 78  # EX_CONFIG from sysexits.h


class EngineUnavailable(LipstreamError):
    """An engine's requirements (packages, weights, device) are missing."""

    http_status = 503

"""Avatars: prepared once from a video or an image, then shared read-only by every session."""

"""Talking to the server's worker processes: message channels and shared-memory frame rings."""

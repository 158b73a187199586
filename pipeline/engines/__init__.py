"""Lip-sync engines behind one small interface (:mod:`pipeline.engines.base`)."""

from pipeline.engines.registry import available_engines, create_engine

__all__ = ["available_engines", "create_engine"]

"""Engine plug-ins by name; heavy engines are imported only when asked for."""

from __future__ import annotations

import importlib
from typing import Any

from pipeline.engines.base import Engine
from pipeline.errors import EngineUnavailable

# name -> "module:Class"; imported lazily so the default install never imports torch.
_ENGINES: dict[str, str] = {
    "lite": "pipeline.engines.lite:LiteEngine",
    "musetalk": "pipeline.engines.musetalk.engine:MuseTalkEngine",
}


def available_engines() -> list[str]:
    return sorted(_ENGINES)


def create_engine(name: str, **options: Any) -> Engine:
    try:
        target = _ENGINES[name]
    except KeyError:
        raise EngineUnavailable(
            f"unknown engine {name!r}; available: {', '.join(available_engines())}"
        ) from None
    module_name, class_name = target.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise EngineUnavailable(f"engine {name!r} needs a package that is not installed: {exc}") from exc
    return getattr(module, class_name)(**options)

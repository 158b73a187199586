"""``lipstream doctor``: what this machine has for lipstream, as one table a person can act on."""

from __future__ import annotations

import importlib.metadata
import platform
import shutil
import sys
from dataclasses import dataclass

from server.config import Settings

OK, MISSING, WARN = "ok", "missing", "warn"


@dataclass
class Row:
    group: str
    item: str
    status: str
    detail: str
    needed: bool  # a missing needed row makes doctor exit non-zero


def _package(name: str, needed: bool) -> Row:
    try:
        return Row("package", name, OK, importlib.metadata.version(name), needed)
    except importlib.metadata.PackageNotFoundError:
        hint = "pip install -e ." if needed else "pip install -e '.[gpu]' (only for the musetalk engine)"
        return Row("package", name, MISSING, hint, needed)


def _codec_rows() -> list[Row]:
    import av

    rows = []
    for name, mode, what in [
        ("libx264", "w", "H.264 encoder (MP4, RTMP)"),
        ("aac", "w", "AAC encoder"),
        ("h264", "r", "H.264 decoder"),
        ("mp3float", "r", "MP3 decoder"),
        ("opus", "r", "Opus decoder"),
        ("vorbis", "r", "Vorbis decoder"),
        ("flac", "r", "FLAC decoder"),
        ("aac", "r", "AAC decoder"),
    ]:
        try:
            av.codec.Codec(name, mode)
            rows.append(Row("codec", f"{name} ({'enc' if mode == 'w' else 'dec'})", OK, what, True))
        except Exception:  # noqa: BLE001 - PyAV raises several types for an unknown codec
            rows.append(Row("codec", f"{name} ({'enc' if mode == 'w' else 'dec'})", MISSING, what, True))
    return rows


def _gpu_rows(settings: Settings) -> list[Row]:
    wanted = [d for d in settings.engine.devices if d.startswith("cuda")]
    needed = bool(wanted)
    try:
        import torch  # noqa: PLC0415 - optional extra
    except ImportError:
        return [Row("gpu", "torch", MISSING, "no torch: CPU engines only", needed)]
    if not torch.cuda.is_available():
        return [Row("gpu", "cuda", MISSING, f"torch {torch.__version__} sees no CUDA device", needed)]
    rows = []
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        rows.append(Row("gpu", f"cuda:{index}", OK, f"{props.name}, {props.total_memory / 2**30:.0f} GiB", needed))
    for name in wanted:  # configured in engine.devices but not on this machine
        if int(name.partition(":")[2]) >= torch.cuda.device_count():
            rows.append(Row("gpu", name, MISSING, f"in engine.devices, but torch sees {torch.cuda.device_count()} GPU(s)", True))
    return rows


def _model_rows(settings: Settings) -> list[Row]:
    from pipeline.engines.model_files import MUSETALK_V15_FILES

    needed = settings.engine.name == "musetalk"
    rows = []
    for spec in MUSETALK_V15_FILES:
        found = spec.find(settings.engine.models_dir)
        status = OK if found else (MISSING if spec.required else WARN)
        detail = str(found) if found else f"{spec.what}: not at {settings.engine.models_dir / spec.path}"
        rows.append(Row("model", spec.path, status, detail, needed and spec.required))
    return rows


def _landmark_row() -> Row:
    from pipeline.avatar.landmarks import predictor_model_path
    from pipeline.errors import EngineUnavailable

    try:
        return Row("model", "dlib 68-point landmarks", OK, str(predictor_model_path()), True)
    except EngineUnavailable as exc:
        return Row("model", "dlib 68-point landmarks", MISSING, str(exc), True)


def collect(settings: Settings) -> list[Row]:
    rows = [Row("python", "python", OK, f"{platform.python_version()} ({sys.executable})", True)]
    for name in ["numpy", "av", "opencv-python-headless", "webrtcvad-wheels", "dlib-bin", "fastapi", "uvicorn"]:
        rows.append(_package(name, True))
    for name in ["torch", "diffusers", "transformers"]:
        rows.append(_package(name, settings.engine.name == "musetalk"))
    rows += _codec_rows()
    rows += _gpu_rows(settings)
    rows.append(_landmark_row())
    rows += _model_rows(settings)
    for tool in ["espeak-ng", "nginx"]:
        path = shutil.which(tool)
        rows.append(Row("tool", tool, OK if path else WARN, path or "only used by tests", False))
    return rows


def run_doctor(settings: Settings) -> bool:
    """Prints the table; True when everything the configured engine needs is there."""
    rows = collect(settings)
    widths = [max(len(getattr(r, f)) for r in rows) for f in ("group", "item", "status")]
    print(f"lipstream doctor  (engine={settings.engine.name}, devices={', '.join(settings.engine.devices)})")
    for r in rows:
        print(f"{r.group:<{widths[0]}}  {r.item:<{widths[1]}}  {r.status:<{widths[2]}}  {r.detail}")
    problems = [r for r in rows if r.needed and r.status == MISSING]
    if problems:
        print(f"{len(problems)} needed item(s) missing: {', '.join(r.item for r in problems)}")
    else:
        print("everything the configured engine needs is present")
    return not problems

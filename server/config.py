"""Configuration: one validated tree, from defaults < YAML file (``--config``) < ``LIPSTREAM_*`` env.

Every section forbids unknown keys, so a typo fails at start with the key's dotted name instead of
being silently ignored. Environment variables use ``__`` between levels, e.g.
``LIPSTREAM_ENGINE__NAME=lite`` or ``LIPSTREAM_SERVER__PORT=9000``. ``configs/default.yaml``
documents every key; a test keeps it equal to the defaults below.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from pipeline.errors import ConfigError

log = logging.getLogger("lipstream.config")


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ServerConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    api_keys: list[str] = Field(default_factory=list)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    # How long a thread of the server process may hold the GIL while another waits (ms; Python's
    # default is 5): the event loop gives up the GIL for every copy and system call and must win
    # it back from the channel threads each time (see engine.device_switch_interval_ms).
    switch_interval_ms: float = Field(0.5, gt=0, le=100)
    # WebSocket per-message deflate (RFC 7692) offered to clients: off, because the audio
    # WebSocket carries raw PCM (which hardly compresses) 50 times a second per session, and
    # inflating it ran on the event loop (2.3 % of its samples at 26 sessions on an H200).
    ws_compression: bool = False


class AvatarsConfig(Section):
    dir: Path = Path("avatars")
    default: str = "demo"
    max_seconds: float = Field(60.0, gt=0, le=600)
    max_side: int = Field(1920, ge=64, le=4096)


class EngineConfig(Section):
    name: str = "lite"
    # one engine, batching worker and feature worker per device; sessions are bound to one
    devices: list[str] = Field(default_factory=lambda: ["cpu"])
    dtype: Literal["fp16", "bf16", "fp32"] = "fp16"
    batch_size: int = Field(16, ge=1, le=256)
    # talking sessions per device; 0: measured at start (pipeline/live/calibration.py)
    capacity_sessions: int = Field(0, ge=0)
    capacity_headroom: float = Field(0.9, gt=0, le=1)
    # admission: the share of talking frames (%) a device may be expected to lack time for when
    # sessions that each talk part of the time talk at once (pipeline/live/bursts.py); 100: off
    max_burst_overload_percent: float = Field(1.0, ge=0, le=100)
    # talking sessions at once a device serves during such a burst (its throughput, which the
    # capacity keeps a margin below for sustained load); 0, or any number below the capacity
    # (configured or calibrated): the capacity. Not an error, so that raising the capacity over a
    # shipped config (--set engine.capacity_sessions=40) needs no second override.
    burst_capacity_sessions: int = Field(0, ge=0)
    vad_aggressiveness: int = Field(2, ge=0, le=3)
    models_dir: Path = Path("models")
    # musetalk: how each Whisper window is encoded ("trimmed": over the positions its audio
    # fills, about half of them on average; "padded": Whisper's whole 30 s input). Trimmed
    # agrees at least as well with the whole-file features and costs about half the GPU time
    # (docs/benchmarks.md); padded is the literal official input.
    whisper_windows: Literal["trimmed", "padded"] = "trimmed"
    # musetalk: trimmed windows cut to their last this many seconds (up to the frame's
    # lookahead), each at its place in the 30 s segment; null: the segment's whole past. Every
    # window then costs the same, ~5x less at 5 s than the average whole-past window, and agreed
    # at least as well with the whole-file features on real speech (docs/benchmarks.md).
    whisper_crop_seconds: float | None = Field(None, gt=0, lt=30)
    # musetalk: the VAE decoder's three upsampling layers (nearest 2x, then a 3x3 convolution)
    # as "folded" 2x2 convolutions on the small input, one per output phase: the same function
    # (up to rounding) with 0.45x their arithmetic; "transposed" the same taps as one stride-2
    # transposed convolution (no interleaving copy); "reference" runs diffusers' layers as
    # loaded. None: transposed on a GPU (11 % faster decode on an H200), reference on a CPU.
    vae_upsample: Literal["folded", "transposed", "reference"] | None = None
    # musetalk: "coordinate" refines the compiled VAE decode's kernels by coordinate descent (5 %
    # faster timed alone on an H200, but no less GPU time per frame in the load test, and a start
    # of 264 s instead of ~100), "none".
    compile_tuning: Literal["none", "coordinate"] = "none"
    # musetalk: the device's batching worker prepares the next batch while the GPU runs the one
    # before (picking frames, stacking inputs, launching), instead of leaving the GPU idle for it
    # (pipeline/live/worker.py, "Overlapped batches"). None: on a GPU (with the GPU blend).
    overlap_batches: bool | None = None
    # A speech frame its device cannot make before its release time is skipped (the session
    # holds its last picture for it) instead of made late: frames go out in order, so one made
    # late delays every frame after it, and a burst above capacity would otherwise leave a
    # backlog the sessions never catch up with. Skipped frames are counted (session stats,
    # GET /v1/devices, metrics).
    skip_late_frames: bool = True
    # Frames a device always makes at each batch when it skips (the latest-due ones): 0 = one
    # batch (batch_size). Fewer sheds more of a burst but leaves small batches: on an H200, 1 was
    # worse than 0 (docs/benchmarks.md, run 071645); when every queued frame is late anyway
    # (a device slower than the processing budget) a whole batch is still made.
    skip_keep_frames: int = Field(0, ge=0, le=256)
    # Most an idle device waits for a fuller batch (ms) while the earliest queued frame's
    # deadline allows it; 0: a batch starts on whatever is queued. On an H200 at 16 all-talking
    # sessions, 15 left 2.1-2.9 % of frames late or held against 4.4-48.7 % without
    # (docs/benchmarks.md, 2026-12-03 night).
    batch_gather_ms: float = Field(15.0, ge=0, le=200)
    # musetalk: most Whisper windows (talking sessions' frames) per encoder pass
    whisper_batch: int = Field(8, ge=1, le=64)
    # where each device's engine, feature and batching workers run: "process" = a spawned
    # process per device (its own GIL: a GPU's feature path and batch dispatch no longer
    # compete with the API, clocks and outputs); "thread" = threads of the server process;
    # "auto" = process for cuda devices, thread for cpu ones (no gain on few cores)
    device_workers: Literal["auto", "process", "thread"] = "auto"
    # How long a device process's thread may hold the GIL while another waits for it (Python's
    # sys.setswitchinterval, whose default is 5 ms). The engine and feature threads mostly wait
    # on the GPU and need the GIL back from the paste, finisher and channel threads at every
    # wake-up. On an H200 at 16 talking sessions, 0.5 ms took the feature stage's p95 from 85 ms
    # to 31-67 ms and late frames from 49-66 % to 4-42 % (docs/benchmarks.md, runs 122248-123024).
    device_switch_interval_ms: float = Field(0.5, gt=0, le=100)

    def workers_in_processes(self) -> bool:
        if self.device_workers == "auto":
            return any(device_key(name)[0] == "cuda" for name in self.devices)
        return self.device_workers == "process"

    @field_validator("name")
    @classmethod
    def _known_engine(cls, value: str) -> str:
        from pipeline.engines import available_engines

        if value not in available_engines():
            raise ValueError(f"unknown engine {value!r}; available: {', '.join(available_engines())}")
        return value

    @model_validator(mode="before")
    @classmethod
    def _renamed_device(cls, data: Any) -> Any:
        """``device: X``, the key before several devices, still works as ``devices: [X]``."""
        if isinstance(data, dict) and "device" in data:
            if "devices" in data:
                raise ValueError("give 'engine.devices' only ('engine.device' is its old, one-device form)")
            old = data["device"]
            log.warning("config key 'engine.device' is deprecated: use 'engine.devices: [%s]'", old)
            data = {key: value for key, value in data.items() if key != "device"}
            data["devices"] = [old]
        return data

    @field_validator("devices")
    @classmethod
    def _device_names(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError("name at least one device, e.g. [cpu] or [cuda:0, cuda:1]")
        seen: dict[tuple[str, int], str] = {}
        for name in value:
            key = device_key(name)
            if key in seen:
                raise ValueError(f"device {name!r} is listed twice (as {seen[key]!r} too)")
            seen[key] = name
        return value


def device_key(name: str) -> tuple[str, int]:
    """``("cpu", N)`` or ``("cuda", N)`` for a device name ``cpu``, ``cpu:N`` or ``cuda:N``.

    ``cpu:N`` names several CPU workers (a many-core machine can run several lite workers, and
    tests exercise several devices without a GPU); ``cpu`` is ``cpu:0``."""
    kind, colon, index = name.partition(":")
    if kind not in {"cpu", "cuda"} or (colon and not index.isdigit()) or (kind == "cuda" and not colon):
        raise ValueError(f"device must be 'cpu', 'cpu:N' or 'cuda:N', got {name!r}")
    return kind, int(index or 0)


def engine_device(name: str) -> str:
    """The torch device an engine on device ``name`` uses: ``cpu:N`` workers all run on ``cpu``."""
    kind, index = device_key(name)
    return "cpu" if kind == "cpu" else f"cuda:{index}"


def engine_options(engine: EngineConfig, device: str | None = None) -> dict[str, Any]:
    """Constructor arguments for the configured engine on ``device`` (default: the first
    configured one). The lite engine takes none: it has no weights and always runs on the CPU."""
    if engine.name == "musetalk":
        return {
            "device": engine_device(device or engine.devices[0]),
            "dtype": engine.dtype,
            "models_dir": engine.models_dir,
            "batch_size": engine.batch_size,
            "whisper_windows": engine.whisper_windows,
            "whisper_crop_seconds": engine.whisper_crop_seconds,
            "vae_upsample": engine.vae_upsample,
            "compile_tuning": engine.compile_tuning,
            "overlap_batches": engine.overlap_batches,
            "whisper_batch": engine.whisper_batch,
        }
    return {}


class RenderConfig(Section):
    crf: int = Field(20, ge=0, le=51)
    preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
    ] = "veryfast"
    audio_bitrate: int = Field(192_000, ge=32_000, le=512_000)


class IceServer(Section):
    urls: list[str]
    username: str | None = None
    credential: str | None = None


class WebRtcConfig(Section):
    ice_servers: list[IceServer] = Field(default_factory=list)
    host_addresses: list[str] = Field(default_factory=list)
    # processes running the WebRTC peers (encoding, RTP); 0: one per four cores, 1 to 8
    peer_processes: int = Field(0, ge=0, le=64)
    # Niceness the peer processes add to their own (Linux scheduling priority; 0 leaves them at
    # the server's). The peers' encoders are most of the server's CPU (~23 % of a core per
    # session), and when the box's cores run short the kernel shares them out by weight: a
    # higher niceness makes the encoders yield to the event loop and the device processes,
    # whose lateness delays every session, not one peer's next packet.
    peer_nice: int = Field(0, ge=0, le=19)
    # 20 ms packets a microphone's (or WHIP sender's) jitter buffer holds after the one it
    # releases. aiortc holds 4, smoothing playback on a speaker we do not have: 80 ms before a
    # caller's words reach the session. 1 measured ~70 ms less mouth latency than 4 on WebRTC
    # calls (docs/benchmarks.md); reordered packets are still put in order either way.
    mic_prefetch_packets: int = Field(1, ge=1, le=8)


class SessionsConfig(Section):
    jitter_seconds: float = Field(0.04, ge=0, le=1)
    processing_seconds: float = Field(0.06, ge=0.005, le=2)
    # share of frames a new session is expected to speak in (admission counts its demand by it)
    expected_talk_fraction: float = Field(1.0, gt=0, le=1)
    idle_timeout_seconds: float = Field(300.0, gt=0)
    vanish_timeout_seconds: float = Field(1.5, gt=0, le=30)
    # a microphone that fell behind (its audio delayed on the way) catches up in its pauses
    mic_catch_up: bool = True


class LimitsConfig(Section):
    max_sessions: int = Field(8, ge=1)
    audio_buffer_seconds: float = Field(30.0, gt=0, le=3600)
    ws_message_bytes: int = Field(1_048_576, ge=1024)
    request_body_bytes: int = Field(65_536, ge=1024)
    upload_bytes: int = Field(209_715_200, ge=1024)


class RtmpConfig(Section):
    video_bitrate: int = Field(2_500_000, ge=100_000, le=50_000_000)
    gop_seconds: float = Field(2.0, gt=0, le=10)
    preset: Literal[
        "ultrafast", "superfast", "veryfast", "faster", "fast", "medium", "slow", "slower", "veryslow"
    ] = "veryfast"
    audio_bitrate: int = Field(128_000, ge=32_000, le=512_000)
    reconnect_initial_seconds: float = Field(1.0, gt=0, le=600)
    reconnect_max_seconds: float = Field(30.0, gt=0, le=3600)
    max_retries: int = Field(0, ge=0)
    timeout_seconds: float = Field(5.0, gt=0, le=120)
    max_outputs_per_session: int = Field(4, ge=1, le=64)


class RecordingsConfig(Section):
    dir: Path = Path("recordings")
    max_bytes: int = Field(4_294_967_296, ge=65_536)
    min_free_bytes: int = Field(1_073_741_824, ge=0)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="LIPSTREAM_", env_nested_delimiter="__", extra="forbid", validate_assignment=True
    )

    server: ServerConfig = Field(default_factory=ServerConfig)
    avatars: AvatarsConfig = Field(default_factory=AvatarsConfig)
    engine: EngineConfig = Field(default_factory=EngineConfig)
    render: RenderConfig = Field(default_factory=RenderConfig)
    sessions: SessionsConfig = Field(default_factory=SessionsConfig)
    limits: LimitsConfig = Field(default_factory=LimitsConfig)
    webrtc: WebRtcConfig = Field(default_factory=WebRtcConfig)
    rtmp: RtmpConfig = Field(default_factory=RtmpConfig)
    recordings: RecordingsConfig = Field(default_factory=RecordingsConfig)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # First wins: the environment overrides the YAML file (passed as init values).
        return env_settings, init_settings


#: Names the config file when ``--config`` is not given.
CONFIG_ENV = "LIPSTREAM_CONFIG"


def load_settings(path: Path | None = None) -> Settings:
    """Defaults, then the YAML file at ``path``, then ``LIPSTREAM_*`` variables; ConfigError if wrong."""
    _check_environment()
    if path is None and os.environ.get(CONFIG_ENV):
        path = Path(os.environ[CONFIG_ENV])
    values: dict[str, Any] = {}
    source = "LIPSTREAM_* environment"
    if path is not None:
        source = f"config file '{path}' or LIPSTREAM_* environment"
        values = _read_yaml(path)
    try:
        return Settings(**values)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def _check_environment() -> None:
    """pydantic-settings ignores unknown variables; a misspelt one should fail like a bad key."""
    known = {CONFIG_ENV}
    for section, field in Settings.model_fields.items():
        known.add(f"LIPSTREAM_{section.upper()}")
        for key in field.annotation.model_fields:  # type: ignore[union-attr]
            known.add(f"LIPSTREAM_{section.upper()}__{key.upper()}")
    for name in os.environ:
        if name.upper().startswith("LIPSTREAM_") and name.upper() not in known:
            raise ConfigError(
                f"environment variable {name} names no config key "
                "(use LIPSTREAM_<SECTION>__<KEY>, e.g. LIPSTREAM_SERVER__PORT)"
            )


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read config file '{path}': {exc.strerror or exc}") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file '{path}' is not valid YAML: {str(exc).splitlines()[0]}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of sections at the top level")
    return data


def _describe(exc: ValidationError, source: str) -> str:
    """One line naming the first wrong key, e.g. ``config key 'engine.batch_size': ...``."""
    problems = []
    for err in exc.errors():
        key = ".".join(str(part) for part in err["loc"]) or "(top level)"
        message = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            message = "unknown key"
        problems.append(f"config key '{key}': {message}")
    more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
    return f"{problems[0]}{more} [{source}]"

"""Config: defaults equal the documented default.yaml; wrong keys/values fail naming the key."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from pipeline.errors import ConfigError
from server.config import Settings, load_settings

ROOT = Path(__file__).resolve().parent.parent


def test_default_yaml_documents_every_key_with_its_default() -> None:
    documented = yaml.safe_load((ROOT / "configs" / "default.yaml").read_text())
    defaults = Settings().model_dump(mode="json")
    assert documented == defaults


def test_default_yaml_comments_every_key() -> None:
    lines = (ROOT / "configs" / "default.yaml").read_text().splitlines()
    for i, line in enumerate(lines):
        stripped = line.strip()
        if line.startswith("  ") and stripped and not stripped.startswith("#"):
            assert lines[i - 1].strip().startswith("#"), f"key without a comment: {stripped}"


def test_yaml_then_environment_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("server:\n  port: 9000\nengine:\n  batch_size: 4\n")
    assert load_settings(path).server.port == 9000
    monkeypatch.setenv("LIPSTREAM_SERVER__PORT", "7000")
    settings = load_settings(path)
    assert (settings.server.port, settings.engine.batch_size) == (7000, 4)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("engine:\n  batchsize: 3\n", "engine.batchsize"),
        ("engine:\n  name: nosuch\n", "engine.name"),
        ("engine:\n  devices: [gpu0]\n", "engine.devices"),
        ("engine:\n  devices: [cuda:0, cuda:0]\n", "engine.devices"),
        ("sessions:\n  expected_talk_fraction: 0\n", "sessions.expected_talk_fraction"),
        ("engine:\n  max_burst_overload_percent: 101\n", "engine.max_burst_overload_percent"),
        ("engine:\n  max_burst_overload_percent: -1\n", "engine.max_burst_overload_percent"),
        ("engine:\n  burst_capacity_sessions: -1\n", "engine.burst_capacity_sessions"),
        ("server:\n  port: 70000\n", "server.port"),
        ("engine:\n  whisper_windows: cropped\n", "engine.whisper_windows"),
        ("engine:\n  whisper_crop_seconds: 0\n", "engine.whisper_crop_seconds"),
        ("engine:\n  whisper_batch: 0\n", "engine.whisper_batch"),
        ("engine:\n  skip_late_frames: sometimes\n", "engine.skip_late_frames"),
        ("engine:\n  vae_upsample: bilinear\n", "engine.vae_upsample"),
        ("engine:\n  compile_tuning: max\n", "engine.compile_tuning"),
        ("engine:\n  overlap_batches: sometimes\n", "engine.overlap_batches"),
        ("engine:\n  skip_keep_frames: -1\n", "engine.skip_keep_frames"),
        ("engine:\n  device_switch_interval_ms: 0\n", "engine.device_switch_interval_ms"),
        ("engine:\n  batch_gather_ms: -1\n", "engine.batch_gather_ms"),
        ("server:\n  switch_interval_ms: 0\n", "server.switch_interval_ms"),
        ("bogus: 1\n", "bogus"),
    ],
)
def test_wrong_key_or_value_names_the_key(tmp_path: Path, text: str, key: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=f"'{key}'"):
        load_settings(path)


def test_unknown_environment_variable_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LIPSTREAM_ENGINE__BATCHSIZE", "3")
    with pytest.raises(ConfigError, match="LIPSTREAM_ENGINE__BATCHSIZE"):
        load_settings()


def test_unreadable_and_malformed_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load_settings(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("server: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_settings(listy)


def test_the_old_device_key_still_names_one_device(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("engine:\n  device: cuda:1\n")
    assert load_settings(path).engine.devices == ["cuda:1"]
    path.write_text("engine:\n  device: cuda:1\n  devices: [cuda:0]\n")
    with pytest.raises(ConfigError, match="give 'engine.devices' only"):
        load_settings(path)
    path.write_text("engine:\n  device: gpu0\n")
    with pytest.raises(ConfigError, match="'engine.devices'"):
        load_settings(path)


def test_the_capacity_raised_over_the_shipped_gpu_config_starts(monkeypatch: pytest.MonkeyPatch) -> None:
    """configs/gpu.yaml sets a burst capacity of 18; raising the capacity past it (as the load
    bench does) must not stop the server: the burst capacity then counts as the capacity."""
    monkeypatch.setenv("LIPSTREAM_ENGINE__CAPACITY_SESSIONS", "40")
    engine = load_settings(Path(__file__).parent.parent / "configs" / "gpu.yaml").engine
    assert (engine.capacity_sessions, engine.burst_capacity_sessions) == (40, 18)


def test_devices_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    from server.config import engine_device, engine_options

    monkeypatch.setenv("LIPSTREAM_ENGINE__DEVICES", '["cuda:0", "cuda:1", "cpu:2"]')
    settings = load_settings()
    assert settings.engine.devices == ["cuda:0", "cuda:1", "cpu:2"]
    assert [engine_device(d) for d in settings.engine.devices] == ["cuda:0", "cuda:1", "cpu"]
    settings.engine.name = "musetalk"
    assert engine_options(settings.engine)["device"] == "cuda:0"
    assert engine_options(settings.engine, "cpu:2")["device"] == "cpu"
    assert engine_options(settings.engine)["whisper_crop_seconds"] is None
    monkeypatch.setenv("LIPSTREAM_ENGINE__WHISPER_CROP_SECONDS", "5")
    cropped = load_settings().engine
    cropped.name = "musetalk"
    assert engine_options(cropped)["whisper_crop_seconds"] == 5
    assert engine_options(cropped)["overlap_batches"] is None  # the engine's choice: on on a GPU
    monkeypatch.setenv("LIPSTREAM_ENGINE__OVERLAP_BATCHES", "false")
    waited = load_settings().engine
    waited.name = "musetalk"
    assert engine_options(waited)["overlap_batches"] is False

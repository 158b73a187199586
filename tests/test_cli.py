"""The CLI as a person uses it: real processes, exit codes, one-line errors, nothing left behind."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from tests.speech import write_wav


def lipstream(*args: str, avatars: Path, extra_env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LIPSTREAM_")}
    env["LIPSTREAM_AVATARS__DIR"] = str(avatars)
    env.update(extra_env or {})
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args], capture_output=True, text=True, env=env, timeout=300
    )


def assert_clean_failure(result: subprocess.CompletedProcess, needle: str) -> None:
    assert result.returncode != 0, result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected one error line, got: {result.stderr!r}"
    assert lines[0].startswith("error: ") and needle in lines[0], lines[0]
    assert "Traceback" not in result.stderr


def leftovers(root: Path, keep: set[str] = frozenset()) -> list[str]:
    return sorted(p.name for p in root.iterdir() if p.name not in keep) if root.exists() else []


def test_help_lists_every_command(tmp_path: Path) -> None:
    result = lipstream("--help", avatars=tmp_path)
    assert result.returncode == 0
    for command in ["serve", "render", "doctor", "avatar"]:
        assert command in result.stdout
    sub = lipstream("avatar", "--help", avatars=tmp_path)
    for command in ["prepare", "list", "check", "delete"]:
        assert command in sub.stdout


def test_bad_config_key_fails_naming_it(tmp_path: Path) -> None:
    config = tmp_path / "bad.yaml"
    config.write_text("engine:\n  batchsize: 4\n")
    result = lipstream("--config", str(config), "avatar", "list", avatars=tmp_path / "avatars")
    assert_clean_failure(result, "engine.batchsize")
    assert result.returncode == 78
    assert leftovers(tmp_path / "avatars") == []


def test_bad_environment_key_fails(tmp_path: Path) -> None:
    result = lipstream("avatar", "list", avatars=tmp_path, extra_env={"LIPSTREAM_SERVER__PROT": "1"})
    assert_clean_failure(result, "LIPSTREAM_SERVER__PROT")


@pytest.mark.parametrize("bad_id", ["../evil", "a/b", "/abs", "UPPER", ""])
def test_avatar_ids_with_path_tricks_are_refused(tmp_path: Path, bad_id: str) -> None:
    avatars = tmp_path / "avatars"
    image = tmp_path / "face.png"
    cv2.imwrite(str(image), np.zeros((64, 64, 3), np.uint8))
    result = lipstream("avatar", "prepare", str(image), "--id", bad_id, "--quiet", avatars=avatars)
    assert_clean_failure(result, "invalid avatar id")
    assert leftovers(avatars) == []
    assert not (tmp_path / "evil").exists()


def test_image_without_a_face(tmp_path: Path) -> None:
    avatars = tmp_path / "avatars"
    image = tmp_path / "wall.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(image), (rng.random((240, 320, 3)) * 40 + 100).astype(np.uint8))
    result = lipstream("avatar", "prepare", str(image), "--id", "wall", "--quiet", avatars=avatars)
    assert_clean_failure(result, "no face")
    assert leftovers(avatars) == []


@pytest.mark.parametrize("content", [b"", b"\x00\x01garbage" * 300])
def test_unreadable_video(tmp_path: Path, content: bytes) -> None:
    avatars = tmp_path / "avatars"
    video = tmp_path / "clip.mp4"
    video.write_bytes(content)
    result = lipstream("avatar", "prepare", str(video), "--id", "clip", "--quiet", avatars=avatars)
    assert_clean_failure(result, "clip.mp4")
    assert leftovers(avatars) == []


def test_unknown_avatar(tmp_path: Path) -> None:
    wav = write_wav(tmp_path / "a.wav", np.zeros(16000, np.float32), 16000)
    result = lipstream(
        "render", "--avatar", "nobody", "--audio", str(wav), "--out", str(tmp_path / "o.mp4"), "--quiet",
        avatars=tmp_path / "avatars",
    )
    assert_clean_failure(result, "unknown avatar 'nobody'")
    assert not (tmp_path / "o.mp4").exists()
    for command in (["avatar", "check", "nobody"], ["avatar", "delete", "nobody"]):
        assert_clean_failure(lipstream(*command, avatars=tmp_path / "avatars"), "unknown avatar 'nobody'")


def test_render_refuses_non_audio_and_empty_audio(tmp_path: Path, avatars_root: Path) -> None:
    before = leftovers(avatars_root)
    not_audio = tmp_path / "notes.wav"
    not_audio.write_text("this is not audio at all\n" * 50)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    zero = write_wav(tmp_path / "zero.wav", np.zeros(0, np.float32), 16000)
    image = tmp_path / "picture.mp3"
    cv2.imwrite(str(tmp_path / "p.png"), np.zeros((32, 32, 3), np.uint8))
    image.write_bytes((tmp_path / "p.png").read_bytes())
    for audio in (not_audio, empty, zero, image):
        out = tmp_path / f"{audio.stem}.mp4"
        result = lipstream(
            "render", "--avatar", "demo", "--audio", str(audio), "--out", str(out), "--quiet", avatars=avatars_root
        )
        assert_clean_failure(result, audio.name)
        assert not out.exists()
        assert not [p for p in tmp_path.iterdir() if "partial" in p.name]
    assert leftovers(avatars_root) == before


def test_prepare_list_check_delete_roundtrip(tmp_path: Path) -> None:
    from pipeline.avatar.demo import demo_image

    avatars = tmp_path / "avatars"
    image = tmp_path / "astronaut.png"
    cv2.imwrite(str(image), demo_image())
    prepared = lipstream("avatar", "prepare", str(image), "--id", "astro", "--quiet", avatars=avatars)
    assert prepared.returncode == 0, prepared.stderr
    assert "astro" in lipstream("avatar", "list", avatars=avatars).stdout
    check = lipstream("avatar", "check", "astro", avatars=avatars)
    assert check.returncode == 0 and "lite" in check.stdout and "musetalk" in check.stdout
    again = lipstream("avatar", "prepare", str(image), "--id", "astro", "--quiet", avatars=avatars)
    assert_clean_failure(again, "astro")
    assert lipstream("avatar", "delete", "astro", avatars=avatars).returncode == 0
    assert leftovers(avatars) == []


def test_doctor_prints_a_table(tmp_path: Path) -> None:
    result = lipstream("doctor", avatars=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    for item in ["python", "libx264", "musetalkV15/unet.pth", "dlib 68-point landmarks"]:
        assert item in result.stdout


def test_render_command_writes_a_playable_mp4(tmp_path: Path) -> None:
    """The README's command, as a person types it: the demo avatar is prepared on first use."""
    import av

    from tests.speech import speech_clip

    clip = speech_clip(tmp_path / "speech.wav", sample_rate=44100)
    avatars = tmp_path / "avatars"
    out = tmp_path / "out.mp4"
    result = lipstream("render", "--avatar", "demo", "--audio", str(clip.path), "--out", str(out), avatars=avatars)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout and (avatars / "demo" / "avatar.json").is_file()
    assert "rendering" in result.stderr  # the progress bar
    with av.open(str(out)) as container:
        video = container.streams.video[0]
        audio = container.streams.audio[0]
        assert video.codec_context.name == "h264" and audio.codec_context.name == "aac"
        assert audio.rate == 44100
        frames = sum(1 for _ in container.decode(video=0))
    assert frames == int(clip.duration * 25)

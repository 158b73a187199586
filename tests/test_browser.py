"""The call page in a real browser: Debian's Chromium, driven by chromedriver through Selenium.

The real server runs as a subprocess, offering only 127.0.0.1 as its ICE address; Chromium's
fake microphone plays espeak-ng speech. The page is asserted from inside itself: the remote
<video> plays 512x512 frames that look like the demo avatar's preview, the live stats show a
frame rate, no error is shown, and Hang up ends the session on the server.

Nothing leaves the machine: the server offers loopback candidates only and drops the browser's
others, and Chromium's background services are off, with a dead loopback proxy for any HTTP
that is not to loopback.
"""

from __future__ import annotations

import time
from pathlib import Path

import httpx
import pytest

from tests.live_server import running_server
from tests.speech import speech_clip

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")

pytestmark = [pytest.mark.browser, pytest.mark.slow]

# The current video frame and the avatar preview, drawn at the video's size; their mean
# absolute difference per channel (0..255), and the preview's own mean (what a black frame scores).
COMPARE_JS = """
const done = arguments[arguments.length - 1];
const video = document.getElementById("avatar-video");
const w = video.videoWidth, h = video.videoHeight;
const pixels = (source) => {
  const canvas = document.createElement("canvas");
  canvas.width = w; canvas.height = h;
  const ctx = canvas.getContext("2d", {willReadFrequently: true});
  ctx.drawImage(source, 0, 0, w, h);
  return ctx.getImageData(0, 0, w, h).data;
};
const img = new Image();
img.onload = () => {
  const a = pixels(video), b = pixels(img);
  let diff = 0, level = 0, n = 0;
  for (let i = 0; i < a.length; i += 4) {
    for (let c = 0; c < 3; c++) { diff += Math.abs(a[i + c] - b[i + c]); level += b[i + c]; n++; }
  }
  done({diff: diff / n, previewMean: level / n});
};
img.onerror = () => done({error: "preview did not load"});
img.src = "/v1/avatars/demo/preview.jpg";
"""


def _chrome_options(webdriver, wav: Path, profile: Path):
    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for flag in (
        "--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1200,900",
        "--disable-background-networking", "--no-first-run", "--no-default-browser-check",
        "--disable-component-update", "--disable-sync", "--disable-quic", "--disable-default-apps",
        "--disable-extensions", "--disable-domain-reliability", "--disable-client-side-phishing-detection",
        "--metrics-recording-only", "--safebrowsing-disable-auto-update",
        # Loopback bypasses a proxy implicitly; anything else would go to this dead one.
        "--proxy-server=http://127.0.0.1:9",
        "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
        f"--use-file-for-fake-audio-capture={wav}",
        "--autoplay-policy=no-user-gesture-required",
        "--allow-loopback-in-peer-connection",
        "--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,OptimizationHints,Translate",
        f"--user-data-dir={profile}",
    ):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return options


@pytest.fixture
def server(avatars_root: Path, tmp_path: Path):
    """The real server on a free loopback port, ICE on 127.0.0.1 only; yields its base URL."""
    with running_server(avatars_root, tmp_path, {"server": {"log_level": "info"}}) as url:
        yield url


@pytest.fixture
def browser(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    if not CHROMIUM.exists() or not CHROMEDRIVER.exists():
        pytest.skip(f"needs {CHROMIUM} and {CHROMEDRIVER} (Debian packages chromium, chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    # 48 kHz mono 16-bit speech for the fake microphone (Chromium loops it).
    wav = speech_clip(tmp_path / "mic.wav", sample_rate=48000, silence_before=0.5, silence_after=0.5).path
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    # Belt and braces: the explicit driver path already keeps Selenium Manager from running.
    monkeypatch.setenv("SE_OFFLINE", "true")
    driver = webdriver.Chrome(
        service=Service(executable_path=str(CHROMEDRIVER), log_output=str(tmp_path / "chromedriver.log")),
        options=_chrome_options(webdriver, wav, profile),
    )
    driver.set_script_timeout(10)
    try:
        yield driver
    finally:
        try:
            for entry in driver.get_log("browser"):
                print("browser:", entry.get("level"), entry.get("message"))
        except Exception as exc:  # noqa: BLE001 - diagnostics only
            print("browser log unavailable:", exc)
        driver.quit()


def _wait(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def test_call_page_plays_the_avatar(server: str, browser, tmp_path: Path) -> None:
    from selenium.webdriver.common.by import By

    d = browser
    d.get(f"{server}/")
    js = d.execute_script

    # Before the call: idle, server ready, the demo avatar picked.
    _wait(lambda: js("return !document.getElementById('start').disabled"), 10, "the Start button to enable")
    assert js("return document.body.dataset.callState") == "idle"
    _wait(lambda: js("return document.querySelector('input[name=avatar]:checked')?.value"), 10, "the avatar list")
    assert js("return document.querySelector('input[name=avatar]:checked').value") == "demo"
    d.save_screenshot(str(tmp_path / "before-call.png"))

    d.find_element(By.ID, "start").click()

    def call_state() -> str | bool:
        state = js("return document.body.dataset.callState")
        if state in ("failed", "ended"):
            shown = js("return document.getElementById('error').textContent")
            pytest.fail(f"call state {state}; error shown: {shown!r}")
        return state == "connected"

    _wait(call_state, 20, "callState == connected")
    session_id = js("return window.lipstream.sessionId")
    assert session_id and js("return window.lipstream.pc.connectionState") == "connected"

    # The remote video plays 512x512 frames.
    _wait(lambda: js("const v = document.getElementById('avatar-video'); return v.videoWidth > 0 && v.readyState >= 2"),
          10, "the first video frame")
    video = js("const v = document.getElementById('avatar-video');"
               "return {w: v.videoWidth, h: v.videoHeight, paused: v.paused};")
    assert (video["w"], video["h"]) == (512, 512), video
    assert not video["paused"]
    frames = "return document.getElementById('avatar-video').getVideoPlaybackQuality().totalVideoFrames"
    before = js(frames)
    time.sleep(1.5)
    after = js(frames)
    assert after - before >= 20, f"only {after - before} frames in 1.5 s"

    # ...that show the avatar: the same picture as its preview, up to VP8 and the moving mouth.
    result = d.execute_async_script(COMPARE_JS)
    assert "error" not in result, result
    assert result["previewMean"] > 50, result  # a black frame would score this much: far above the bound
    assert result["diff"] < 25, result

    # Live stats: a frame rate after a few seconds, no error shown.
    def fps_shown() -> float | None:
        text = js("return document.getElementById('stat-fps').textContent")
        try:
            return float(text) or None
        except ValueError:
            return None

    fps = _wait(fps_shown, 5, "a number in the fps stat")
    assert 10 <= fps <= 40, fps
    assert js("return document.getElementById('error').hidden") is True, js(
        "return document.getElementById('error').textContent")
    stats = js("return document.getElementById('stats').innerText")
    d.save_screenshot(str(tmp_path / "in-call.png"))
    print(f"in call: fps {fps}, frames +{after - before} in 1.5 s, diff {result['diff']:.1f}\n{stats}")

    # Hang up: the server ends the session.
    d.find_element(By.ID, "hangup").click()
    assert js("return document.body.dataset.callState") == "ended"

    def no_sessions() -> bool:
        return httpx.get(f"{server}/v1/sessions", timeout=2).json()["sessions"] == []

    _wait(no_sessions, 3, "the server to end the session")

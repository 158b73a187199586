// lipstream call page: the microphone goes to the server, the avatar's video and voice come back
// on the same RTCPeerConnection. Plain JS, no build step, nothing loaded from elsewhere.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const video = $("avatar-video");
  const KEY_STORE = "lipstream.apiKey";

  // Exposed for tests and curious people: the live call's peer, session and state.
  const call = (window.lipstream = { pc: null, sessionId: null, state: "idle", avatar: null });
  let mic = null;        // the microphone MediaStream
  let statsTimer = null;
  let lastVideo = null;  // previous inbound-rtp video report, for an fps fallback
  let serverReady = false;
  const previews = {};   // avatar id -> object URL of its preview

  // ------------------------------------------------------------------ errors and states
  class ApiError extends Error {
    constructor(status, body) {
      super((body && (body.detail || body.error)) || `HTTP ${status}`);
      this.status = status;
      this.type = body && body.error;
    }
  }

  function showError(message) {
    const box = $("error");
    box.textContent = message;
    box.hidden = !message;
  }

  function setCallState(state) {
    call.state = state;
    document.body.dataset.callState = state;
    $("call-state").textContent = state;
    const live = state === "connecting" || state === "connected";
    $("start").disabled = live || !serverReady;
    $("hangup").disabled = !live;
    $("interrupt").disabled = state !== "connected";
    $("avatar-picker").disabled = live;
    $("hint").hidden = live;
  }

  // ------------------------------------------------------------------ API, with the key when needed
  let keyPrompt = null;

  function askForKey(reason) {
    if (keyPrompt) return keyPrompt;
    const form = $("key-form");
    form.hidden = false;
    showError(`API key needed (${reason}).`);
    $("api-key").focus();
    keyPrompt = new Promise((resolve) => {
      form.onsubmit = (event) => {
        event.preventDefault();
        sessionStorage.setItem(KEY_STORE, $("api-key").value.trim());
        form.hidden = true;
        showError("");
        keyPrompt = null;
        resolve();
      };
    });
    return keyPrompt;
  }

  function authHeaders() {
    const key = sessionStorage.getItem(KEY_STORE);
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  async function api(path, { method = "GET", json, raw = false, keepalive = false } = {}) {
    for (;;) {
      const headers = authHeaders();
      if (json !== undefined) headers["Content-Type"] = "application/json";
      const response = await fetch(path, {
        method, headers, keepalive, body: json === undefined ? undefined : JSON.stringify(json),
      });
      if (response.status === 401) {
        const body = await response.json().catch(() => ({}));
        await askForKey(body.detail || "unauthorized");
        continue;
      }
      if (!response.ok) {
        const body = await response.json().catch(() => null);
        throw new ApiError(response.status, body);
      }
      if (raw) return response;
      return response.status === 204 ? null : response.json();
    }
  }

  // ------------------------------------------------------------------ server readiness
  async function checkReady() {
    const pill = $("server-status");
    let next = 5000;
    try {
      // Off loopback /readyz needs the key too: ask for it (once), check again when given.
      const response = await fetch("/readyz", { headers: authHeaders() });
      if (response.status === 401) {
        serverReady = false;
        pill.textContent = "needs an API key";
        pill.className = "pill starting";
        setCallState(call.state);
        await askForKey("missing or wrong API key");
        return checkReady();
      }
      const body = await response.json();
      serverReady = body.status === "ready";
      pill.textContent = body.status + (body.detail ? `: ${body.detail}` : "");
      pill.className = `pill ${body.status}`;
      if (body.status === "starting") next = 1000;
    } catch (e) {
      serverReady = false;
      pill.textContent = "unreachable";
      pill.className = "pill failed";
      next = 2000;
    }
    setCallState(call.state);
    setTimeout(checkReady, next);
  }

  // ------------------------------------------------------------------ avatar picker
  async function loadAvatars() {
    const box = $("avatars");
    let list;
    try {
      list = (await api("/v1/avatars")).avatars;
    } catch (e) {
      box.textContent = `cannot list avatars: ${e.message}`;
      return;
    }
    if (!list.length) {
      box.textContent = "no avatars prepared yet (lipstream avatar prepare …)";
      return;
    }
    const chosen = list.some((a) => a.id === "demo") ? "demo" : list[0].id;
    box.replaceChildren(...list.map((a) => {
      const label = document.createElement("label");
      label.className = "avatar";
      const input = document.createElement("input");
      Object.assign(input, { type: "radio", name: "avatar", value: a.id, checked: a.id === chosen });
      input.addEventListener("change", () => selectAvatar(a.id));
      const img = document.createElement("img");
      img.alt = "";
      img.width = img.height = 96;
      const caption = document.createElement("span");
      caption.textContent = `${a.id} · ${a.width}×${a.height}`;
      label.append(input, img, caption);
      loadPreview(a.id).then((url) => { if (url) img.src = url; });
      return label;
    }));
    selectAvatar(chosen);
  }

  // Previews are fetched (not linked) so the API key can travel in a header.
  async function loadPreview(id) {
    if (!(id in previews)) {
      previews[id] = api(`/v1/avatars/${encodeURIComponent(id)}/preview.jpg`, { raw: true })
        .then(async (r) => URL.createObjectURL(await r.blob()))
        .catch(() => null);
    }
    return previews[id];
  }

  async function selectAvatar(id) {
    call.avatar = id;
    const url = await loadPreview(id);
    if (url && call.avatar === id) video.poster = url;
  }

  // ------------------------------------------------------------------ the call
  function micMessage(err) {
    switch (err && err.name) {
      case "NotAllowedError":
      case "SecurityError":
        return "Microphone access was denied. Allow the microphone for this page (the icon in the address bar) and start the call again.";
      case "NotFoundError":
      case "OverconstrainedError":
        return "No microphone found. Connect one and start the call again.";
      case "NotReadableError":
      case "AbortError":
        return "The microphone could not be opened (another application may be using it).";
      default:
        return `Microphone error: ${(err && err.message) || err}`;
    }
  }

  function iceGatheringDone(pc, timeoutMs = 5000) {
    if (pc.iceGatheringState === "complete") return Promise.resolve();
    return new Promise((resolve) => {
      const done = () => {
        if (pc.iceGatheringState !== "complete") return;
        pc.removeEventListener("icegatheringstatechange", done);
        resolve();
      };
      pc.addEventListener("icegatheringstatechange", done);
      setTimeout(resolve, timeoutMs); // go with the candidates gathered so far
    });
  }

  async function startCall() {
    showError("");
    setCallState("connecting");
    $("connection-state").textContent = "–";
    if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
      fail("The microphone needs a secure page: open it over https or on localhost.");
      return;
    }
    $("mic-state").textContent = "asking for permission…";
    try {
      mic = await navigator.mediaDevices.getUserMedia({
        audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
        video: false,
      });
    } catch (err) {
      fail(micMessage(err));
      $("mic-state").textContent = err && err.name === "NotAllowedError" ? "denied" : "unavailable";
      return;
    }
    const [track] = mic.getAudioTracks();
    $("mic-state").textContent = track.label ? `on (${track.label})` : "on";

    const pc = (call.pc = new RTCPeerConnection());
    const remote = new MediaStream();
    video.srcObject = remote;
    pc.addTrack(track, mic);
    pc.addTransceiver("video", { direction: "recvonly" });
    pc.ontrack = (event) => {
      remote.addTrack(event.track);
      video.play().catch(() => showError("Playback was blocked by the browser: click the video to start it."));
    };
    pc.onconnectionstatechange = () => {
      if (call.pc !== pc) return;
      const s = pc.connectionState;
      $("connection-state").textContent = s;
      if (s === "connected") setCallState("connected");
      else if (s === "failed") fail("The connection to the server failed (no network path for the media).");
    };

    try {
      await pc.setLocalDescription(await pc.createOffer());
      await iceGatheringDone(pc);
      if (call.pc !== pc) return; // hung up meanwhile
      const answer = await api("/v1/calls", {
        method: "POST",
        json: { sdp: pc.localDescription.sdp, type: "offer", avatar: call.avatar || undefined },
      });
      call.sessionId = answer.session_id;
      if (call.pc !== pc) { endSession(answer.session_id); return; }
      await pc.setRemoteDescription({ type: "answer", sdp: answer.sdp });
    } catch (err) {
      if (call.pc === pc) fail(err instanceof ApiError ? err.message : `Could not start the call: ${err.message || err}`);
      return;
    }
    lastVideo = null;
    statsTimer = setInterval(refreshStats, 1000);
  }

  function endSession(id) {
    if (id) api(`/v1/sessions/${encodeURIComponent(id)}`, { method: "DELETE", keepalive: true }).catch(() => {});
  }

  function teardown() {
    clearInterval(statsTimer);
    statsTimer = null;
    endSession(call.sessionId);
    if (call.pc) call.pc.close();
    if (mic) mic.getTracks().forEach((t) => t.stop());
    call.pc = call.sessionId = mic = null;
    video.srcObject = null;
    $("mic-state").textContent = "not in use";
  }

  function fail(message) {
    teardown();
    showError(message);
    setCallState("failed");
  }

  function hangUp() {
    teardown();
    $("connection-state").textContent = "closed";
    setCallState("ended");
  }

  async function interrupt() {
    if (!call.sessionId) return;
    try {
      await api(`/v1/sessions/${encodeURIComponent(call.sessionId)}/interrupt`, { method: "POST" });
    } catch (err) {
      showError(`Interrupt failed: ${err.message}`);
    }
  }

  // ------------------------------------------------------------------ live stats, every second
  const fmt = (v, digits = 0) => (v === null || v === undefined ? "–" : Number(v).toFixed(digits));

  async function refreshStats() {
    const pc = call.pc;
    const id = call.sessionId;
    if (!pc) return;
    let inbound = null;
    try {
      (await pc.getStats()).forEach((r) => {
        if (r.type === "inbound-rtp" && (r.kind || r.mediaType) === "video") inbound = r;
      });
    } catch (e) { /* closed meanwhile */ }
    let fps = null;
    if (inbound) {
      fps = inbound.framesPerSecond;
      if ((fps === undefined || fps === null) && lastVideo && inbound.framesDecoded !== undefined) {
        const seconds = (inbound.timestamp - lastVideo.timestamp) / 1000;
        if (seconds > 0) fps = (inbound.framesDecoded - lastVideo.framesDecoded) / seconds;
      }
      lastVideo = inbound;
    }
    $("stat-fps").textContent = fps === null || fps === undefined ? "–" : fmt(fps, 1);

    let server = null;
    if (id) {
      try {
        server = await api(`/v1/sessions/${encodeURIComponent(id)}`);
      } catch (err) {
        if (err.status === 404 && call.sessionId === id) {
          call.sessionId = null; // already gone on the server
          fail("The server ended this session.");
          return;
        }
      }
    }
    const s = (server && server.stats) || {};
    $("stat-dropped").textContent = inbound && inbound.framesDropped !== undefined ? fmt(inbound.framesDropped) : "–";
    $("stat-server-dropped").textContent = server ? `${fmt(s.late_frames)} / ${fmt(s.dropped_frames)}` : "–";
    $("stat-latency").textContent = s.latency_ms_p50 !== null && s.latency_ms_p50 !== undefined
      ? `p50 ${fmt(s.latency_ms_p50)} ms · p95 ${fmt(s.latency_ms_p95)} ms`
      : "– (speak to measure)";
    $("stat-session").textContent = server ? server.state : "–";
    $("stat-buffered").textContent = server ? `${fmt(s.buffered_seconds, 2)} s` : "–";
  }

  // ------------------------------------------------------------------ wiring
  $("start").addEventListener("click", startCall);
  $("hangup").addEventListener("click", hangUp);
  $("interrupt").addEventListener("click", interrupt);
  video.addEventListener("click", () => video.play().then(() => showError("")).catch(() => {}));
  window.addEventListener("pagehide", () => { if (call.pc) teardown(); });

  setCallState("idle");
  checkReady();
  loadAvatars();
})();

"""The ``lipstream`` command: serve, avatars, offline render, doctor.

Errors a person can cause (``LipstreamError``) are printed as one line on stderr with a non-zero
exit code; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from pipeline.errors import LipstreamError
from server.config import Settings, engine_options, load_settings
from server.progress import progress_bar

app = typer.Typer(
    help="lipstream: a real-time lip-synced avatar server (WebRTC, RTMP, MP4).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
avatar_app = typer.Typer(help="Prepare, list, check and delete avatars.", no_args_is_help=True)
app.add_typer(avatar_app, name="avatar")

ConfigOption = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", help="YAML config file (default: built-in defaults, configs/default.yaml)."),
]
QuietOption = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]


class _State:
    config_path: Path | None = None
    _settings: Settings | None = None

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = load_settings(self.config_path)
        return self._settings


state = _State()


@app.callback()
def _root(config: ConfigOption = None) -> None:
    state.config_path = config
    state._settings = None
    # Validate at start, so a wrong key fails before any work (and names the key).
    _ = state.settings


def _store():
    from pipeline.avatar.store import AvatarStore

    return AvatarStore(state.settings.avatars.dir)


def _load_avatar(avatar_id: str, quiet: bool = True):
    """Loads an avatar; the demo avatar is prepared on first use."""
    from pipeline.avatar.demo import DEMO_ID, ensure_demo_avatar
    from pipeline.avatar.ids import validate_avatar_id

    store = _store()
    validate_avatar_id(avatar_id)
    if avatar_id == DEMO_ID and not store.exists(avatar_id):
        if not quiet:
            typer.echo("preparing the demo avatar (first use)...", err=True)
        return ensure_demo_avatar(store)
    return store.load(avatar_id)


@app.command()
def serve(
    host: Annotated[Optional[str], typer.Option(help="Listen address (overrides server.host).")] = None,
    port: Annotated[Optional[int], typer.Option(help="Listen port (overrides server.port).")] = None,
    rtmp: Annotated[
        Optional[list[str]],
        typer.Option(
            "--rtmp",
            help="Stream a session created at start-up to this rtmp:// or rtmps:// URL (repeatable). "
            "Push its audio to /v1/sessions/SESSION_ID/audio.",
        ),
    ] = None,
    session_id: Annotated[
        Optional[str],
        typer.Option("--session-id", help="Id of the start-up session (default 'live' with --rtmp)."),
    ] = None,
) -> None:
    """Start the HTTP/WebRTC server."""
    import faulthandler

    from server.app import run_server

    # A fatal signal (a crash in a native library: SIGSEGV, SIGBUS, SIGABRT) writes every thread's
    # Python stack into the log instead of ending the process without a word (a load test's
    # server once vanished between two scenarios, and its log said nothing).
    faulthandler.enable(all_threads=True)

    settings = state.settings
    if host is not None:
        settings.server.host = host
    if port is not None:
        settings.server.port = port
    boot = None
    if rtmp or session_id is not None:
        from pipeline.media.rtmp import parse_rtmp_url
        from server.outputs import BootSession, check_session_id

        for url in rtmp or []:
            parse_rtmp_url(url)  # a wrong URL stops here, before the server starts
        boot = BootSession(check_session_id(session_id or "live"), tuple(rtmp or ()))
        typer.echo(
            f"session '{boot.session_id}' starts with the server ({len(boot.rtmp)} RTMP output(s)); "
            f"push its audio to ws://{settings.server.host}:{settings.server.port}/v1/sessions/{boot.session_id}/audio",
            err=True,
        )
    run_server(settings, boot)


@avatar_app.command("prepare")
def avatar_prepare(
    source: Annotated[Path, typer.Argument(help="A video (any format PyAV reads) or an image.")],
    avatar_id: Annotated[str, typer.Option("--id", help="Avatar id: a-z 0-9 _ -, up to 64 characters.")],
    overwrite: Annotated[bool, typer.Option(help="Replace an existing avatar of that id.")] = False,
    quiet: QuietOption = False,
) -> None:
    """Prepare an avatar: frames at 25 fps, face boxes, landmarks, blending masks."""
    from pipeline.avatar.ids import validate_avatar_id
    from pipeline.avatar.prepare import prepare_avatar

    validate_avatar_id(avatar_id)
    settings = state.settings
    with progress_bar(f"preparing {avatar_id}", quiet) as progress:
        avatar = prepare_avatar(
            source,
            avatar_id,
            _store(),
            max_seconds=settings.avatars.max_seconds,
            max_side=settings.avatars.max_side,
            overwrite=overwrite,
            progress=progress,
            parsing_model_path=settings.engine.models_dir / "face-parse-bisent/79999_iter.pth",
        )
    width, height = avatar.size
    typer.echo(f"prepared avatar '{avatar.id}': {avatar.frame_count} frames, {width}x{height}, at {avatar.root}")


@avatar_app.command("list")
def avatar_list() -> None:
    """List prepared avatars."""
    rows = _store().list()
    if not rows:
        typer.echo("no avatars yet (the demo avatar is prepared on first use)")
        return
    typer.echo(f"{'id':<24} {'frames':>6} {'size':>10}  source")
    for meta in rows:
        size = f"{meta.get('width')}x{meta.get('height')}"
        source = (meta.get("source") or {}).get("name", "")
        typer.echo(f"{meta['id']:<24} {meta.get('frame_count', '?'):>6} {size:>10}  {source}")


@avatar_app.command("check")
def avatar_check(avatar_id: Annotated[str, typer.Argument(help="Avatar id.")]) -> None:
    """Report what is cached and valid for an avatar, per engine. Exit 1 if something is invalid."""
    from pipeline.avatar.check import check_avatar
    from pipeline.avatar.ids import validate_avatar_id

    validate_avatar_id(avatar_id)
    rows = check_avatar(_store(), avatar_id)
    width = max(len(row.item) for row in rows)
    for row in rows:
        typer.echo(f"{row.item:<{width}}  {row.status:<8} {row.detail}")
    if any(row.status == "invalid" for row in rows):
        raise typer.Exit(1)


@avatar_app.command("delete")
def avatar_delete(avatar_id: Annotated[str, typer.Argument(help="Avatar id.")]) -> None:
    """Delete a prepared avatar and its caches."""
    from pipeline.avatar.ids import validate_avatar_id

    validate_avatar_id(avatar_id)
    _store().delete(avatar_id)
    typer.echo(f"deleted avatar '{avatar_id}'")


@app.command()
def render(
    avatar: Annotated[str, typer.Option(help="Avatar id (see `lipstream avatar list`).")],
    audio: Annotated[Path, typer.Option(help="Speech: wav, mp3, m4a, ogg, flac or opus; any rate/channels.")],
    out: Annotated[Path, typer.Option(help="Output MP4 (H.264 + AAC).")],
    engine: Annotated[Optional[str], typer.Option(help="Engine (overrides engine.name).")] = None,
    quiet: QuietOption = False,
) -> None:
    """Render a lip-synced MP4 of an avatar speaking an audio file."""
    from pipeline.engines import create_engine
    from pipeline.render import render_to_file

    settings = state.settings
    if engine is not None:
        settings.engine.name = engine
    loaded = _load_avatar(avatar, quiet)
    lip_engine = create_engine(settings.engine.name, **engine_options(settings.engine))
    try:
        with progress_bar("rendering", quiet) as progress:
            result = render_to_file(
                loaded,
                audio,
                out,
                lip_engine,
                batch_size=settings.engine.batch_size,
                vad_aggressiveness=settings.engine.vad_aggressiveness,
                progress=progress,
                **settings.render.model_dump(),
            )
    finally:
        lip_engine.close()
    typer.echo(
        f"wrote {out}: {result.frames} frames, {result.duration:.2f} s "
        f"({result.duration / max(result.seconds, 1e-9):.1f}x real time)"
    )


@app.command()
def doctor() -> None:
    """Check Python, packages, codecs, GPUs and model files, in a table."""
    from server.doctor import run_doctor

    ok = run_doctor(state.settings)
    if not ok:
        raise typer.Exit(1)


def main() -> None:
    try:
        app()
    except LipstreamError as exc:
        typer.echo(f"error: {exc}", err=True)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()

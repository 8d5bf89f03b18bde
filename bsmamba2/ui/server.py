"""The web app: one page (static/) and a small JSON interface over a `JobQueue`, served by uvicorn.

    GET    /api/options                   models, formats and defaults for the page's settings
    GET    /api/jobs                      every job, in the order received
    POST   /api/jobs?name=&model=&...     the body is the audio file itself; answers the new job
    GET    /api/jobs/{id}                 one job
    POST   /api/jobs/{id}/cancel          stop it (queued: dropped; running: at its next block)
    DELETE /api/jobs/{id}                 forget it and delete its files
    GET    /api/jobs/{id}/files/{key}     a file the job lists (a stem, the mixture, a picture, stems.zip)

Errors answer {"error": "<one line>"}: 400 bad input, 403 a change asked by another site's page, 404 unknown job
or file, 413 too large. The upload is the raw request body rather than a form, so its size is counted as it
streams in and nothing parses it in memory. Other web sites open in the same browser are kept out: a request that
changes something must come from this page (its Origin), and on a loopback address the app answers only to
loopback names (so a site whose name is made to point at 127.0.0.1 cannot read the jobs).
"""
from __future__ import annotations

import argparse
import ipaddress
import logging
import shutil
import signal
import socket
import tempfile
import webbrowser
from pathlib import Path
from typing import Optional
from urllib.parse import urlsplit

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from .. import hub
from ..audio import OUTPUT_FORMATS, check_output_format
from ..errors import BSMamba2Error
from ..runtime import TorchrunEnv, setup_process
from ..separate import load_separator
from ..sizes import MB, megabytes
from .jobs import Job, JobQueue, Settings

log = logging.getLogger("bsmamba2")

STATIC = Path(__file__).parent / "static"
CHECKPOINT = "--checkpoint"  # the model choice of `bsmamba2 ui --checkpoint PATH`; no registry name starts with -
MEDIA_TYPES = {".wav": "audio/wav", ".flac": "audio/flac", ".mp3": "audio/mpeg", ".ogg": "audio/ogg",
               ".oga": "audio/ogg", ".opus": "audio/ogg", ".png": "image/png", ".zip": "application/zip"}
LOOPBACK_NAMES = ["127.0.0.1", "localhost", "::1"]


class UploadTooLarge(BSMamba2Error):
    def __init__(self, name: str, limit_mb: float):
        super().__init__(f"{name}: larger than the upload limit of {limit_mb:g} MB (start the app with "
                         "--max-upload-mb to change it)")


class Models:
    """The models the page offers (the registry's, and the command's --checkpoint) and the one separator kept
    loaded: a job whose settings match the previous job's reuses it, another one replaces it."""

    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.entries = hub.registry()
        default = hub.DEFAULT_MODEL if hub.DEFAULT_MODEL in self.entries else list(self.entries)[0]
        self.default = args.model or (CHECKPOINT if args.checkpoint else default)
        self.loaded: tuple[Optional[Settings], object] = (None, None)
        self.checkpoint_stems: list[str] = []  # known once the --checkpoint model has been loaded

    def check(self, name: str) -> None:
        if name != CHECKPOINT or not self.args.checkpoint:
            hub.get_model(name)  # the CLI's message for an unknown name

    def separator(self, settings: Settings):
        if self.loaded[0] != settings:
            self.loaded = (None, None)  # the old model is freed before the new one loads
            chosen = argparse.Namespace(**{
                **vars(self.args), "tta": settings.tta, "quantize": settings.quantize,
                "model": None if settings.model == CHECKPOINT else settings.model,
                "checkpoint": self.args.checkpoint if settings.model == CHECKPOINT else None,
                # --config is meant for the model the command was started with
                "config": self.args.config if settings.model == self.default else None})
            self.loaded = (settings, load_separator(chosen, two_stems=settings.two_stems,
                                                   file_format=settings.file_format, filename="{stem}.{ext}"))
            if settings.model == CHECKPOINT:
                self.checkpoint_stems = list(self.loaded[1].model.stems)
        return self.loaded[1]

    def describe(self, device_type: str) -> dict:
        choices = []
        if self.args.checkpoint:
            choices.append({"id": CHECKPOINT, "label": Path(self.args.checkpoint).name,
                            "stems": self.checkpoint_stems, "note": "--checkpoint"})
        for name, entry in self.entries.items():
            if entry.package_file is not None:
                note = "bundled"
            elif hub.is_cached(entry):
                note = "downloaded"
            else:
                note = f"downloads {megabytes(entry.size)} on first use" if entry.size else "downloads"
            choices.append({"id": name, "label": name, "stems": list(entry.stems), "note": note,
                            "description": entry.description})
        return {"models": choices, "default_model": self.default, "int8": device_type == "cpu",
                "default_int8": self.args.quantize == "int8", "default_tta": self.args.tta}


def writable_formats() -> list[str]:
    """The output formats the libsndfile here can write."""
    formats = []
    for name in OUTPUT_FORMATS:
        try:
            check_output_format(name)
            formats.append(name)
        except BSMamba2Error:
            pass
    return formats


def create_app(queue: JobQueue, models: Models, page_options: dict, max_upload_mb: float,
               allowed_hosts: list[str]) -> Starlette:
    def error(message: str, status: int = 400) -> JSONResponse:
        return JSONResponse({"error": message}, status)

    def from_another_site(request: Request) -> bool:
        origin = request.headers.get("origin")
        return origin is not None and urlsplit(origin).netloc != request.headers.get("host")

    def find(request: Request) -> Optional[Job]:
        return queue.jobs.get(request.path_params["job_id"])

    def job_to_change(request: Request, action: str) -> tuple[Optional[Job], Optional[Response]]:
        """(the job, None), or (None, the refusal to answer)."""
        job = find(request)
        if job is None:
            return None, error("no such job", 404)
        if from_another_site(request):
            return None, error(f"only this app's page may {action} jobs", 403)
        return job, None

    def describe(job: Job) -> dict:
        return {**job.describe(), "position": queue.queue_position(job)}

    async def options(request: Request) -> Response:
        return JSONResponse({**page_options, **models.describe(page_options["device"])})

    async def list_jobs(request: Request) -> Response:
        return JSONResponse([describe(job) for job in list(queue.jobs.values())])

    async def submit(request: Request) -> Response:
        if from_another_site(request):
            return error("only this app's page may add jobs", 403)
        query = request.query_params
        name = query.get("name", "upload")
        settings = Settings(model=query.get("model", models.default), two_stems=query.get("stems") or None,
                            file_format=query.get("format", "wav"), tta=query.get("tta") == "1",
                            quantize="int8" if query.get("int8") == "1" else None)
        try:  # before the upload: the checks that need no audio
            models.check(settings.model)
            check_output_format(settings.file_format)
        except BSMamba2Error as problem:
            return error(str(problem))
        limit = max_upload_mb * MB
        if int(request.headers.get("content-length") or 0) > limit:
            return error(UploadTooLarge(name, max_upload_mb).args[0], 413)
        job = queue.new_job(name, settings)
        try:
            received = 0
            with open(job.input, "wb") as file:
                async for part in request.stream():
                    received += len(part)
                    if received > limit:
                        raise UploadTooLarge(name, max_upload_mb)
                    file.write(part)
            await run_in_threadpool(queue.check_audio, job)
        except BaseException as problem:  # refused, or the client went away mid-upload: nothing of it is kept
            shutil.rmtree(job.folder, ignore_errors=True)
            if not isinstance(problem, BSMamba2Error):
                raise
            return error(str(problem), 413 if isinstance(problem, UploadTooLarge) else 400)
        queue.submit(job)
        return JSONResponse(describe(job), 201)

    async def show(request: Request) -> Response:
        job = find(request)
        return JSONResponse(describe(job)) if job else error("no such job", 404)

    async def cancel(request: Request) -> Response:
        job, refusal = job_to_change(request, "cancel")
        if refusal is not None:
            return refusal
        queue.cancel(job)
        return JSONResponse(describe(job))

    async def remove(request: Request) -> Response:
        job, refusal = job_to_change(request, "remove")
        if refusal is not None:
            return refusal
        queue.remove(job)
        return Response(status_code=204)

    async def download(request: Request) -> Response:
        job = find(request)
        entry = job.files.get(request.path_params["key"]) if job else None
        if entry is None:  # only the files the job lists: nothing from the request reaches the file system
            return error("no such file", 404)
        path, download_name = entry
        return FileResponse(path, media_type=MEDIA_TYPES.get(path.suffix), filename=download_name)

    async def page(request: Request) -> Response:
        return FileResponse(STATIC / "index.html", media_type="text/html")

    return Starlette(routes=[
        Route("/", page),
        Route("/api/options", options),
        Route("/api/jobs", list_jobs, methods=["GET"]),
        Route("/api/jobs", submit, methods=["POST"]),
        Route("/api/jobs/{job_id}", show, methods=["GET"]),
        Route("/api/jobs/{job_id}", remove, methods=["DELETE"]),
        Route("/api/jobs/{job_id}/cancel", cancel, methods=["POST"]),
        Route("/api/jobs/{job_id}/files/{key}", download),
        Mount("/static", StaticFiles(directory=STATIC)),
    ], middleware=[Middleware(TrustedHostMiddleware, allowed_hosts=allowed_hosts)])


class App:
    """The web app with its worker, listening; `serve()` runs until Ctrl-C (or `server.should_exit`), then cancels
    the jobs and deletes the working folder unless `args.keep`."""

    def __init__(self, args: argparse.Namespace):
        self.keep = args.keep
        if args.max_upload_mb <= 0:
            raise BSMamba2Error(f"--max-upload-mb {args.max_upload_mb:g}: must be positive")
        models = Models(args)
        models.check(models.default)
        first = Settings(models.default, tta=args.tta, quantize=args.quantize)
        device = models.separator(first).device  # a bad --checkpoint or --device stops here, not in a job
        self.socket = listening_socket(args.host, args.port)
        host, port = self.socket.getsockname()[:2]
        self.url = f"http://{f'[{host}]' if ':' in host else host}:{port}/"
        self.loopback = ipaddress.ip_address(host).is_loopback
        self.workdir = Path(tempfile.mkdtemp(prefix="bsmamba2-ui-"))
        self.queue = JobQueue(self.workdir, models.separator)
        page_options = {"device": device.type, "formats": writable_formats(), "default_format": "wav",
                        "max_upload_mb": args.max_upload_mb}
        app = create_app(self.queue, models, page_options, args.max_upload_mb,
                         LOOPBACK_NAMES if self.loopback else ["*"])
        self.server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))

    def serve(self) -> None:
        try:
            self.server.run(sockets=[self.socket])
        finally:
            self.queue.stop()
            self.socket.close()
            if not self.keep:
                shutil.rmtree(self.workdir, ignore_errors=True)


def listening_socket(host: str, port: int) -> socket.socket:
    """Bound before the server starts, so the URL (and a port 0's number) is known before anyone visits it."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as problem:
        sock.close()
        raise BSMamba2Error(f"cannot listen on {host}:{port}: {problem.strerror or problem} (choose another --port "
                            "or --host)") from None
    sock.listen(64)
    return sock


def run(args: argparse.Namespace) -> int:
    setup_process(threads=TorchrunEnv.from_environ().cpu_threads())  # as `bsmamba2 separate` does
    # A service manager's stop (SIGTERM) ends the app as Ctrl-C does, deleting the working folder: uvicorn hands the
    # signal on once it has shut down, and by default it would end the process before any clean-up.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    app = App(args)
    if not app.loopback:
        log.warning("warning: --host %s lets other machines on the network use this app and read what is uploaded "
                    "to it; it has no login", args.host)
    print(f"BSMamba2 is ready at {app.url} (Ctrl-C stops it; working folder {app.workdir}, "
          f"{'kept' if args.keep else 'deleted'} at the end)", flush=True)
    if not args.no_browser:
        webbrowser.open(app.url)
    try:
        app.serve()
    except KeyboardInterrupt:  # uvicorn hands Ctrl-C on once it has shut down: the usual way to stop
        pass
    print("BSMamba2 stopped", flush=True)
    return 0

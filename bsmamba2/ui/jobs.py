"""The web page's jobs: one uploaded song each, separated one at a time, in the order received, by a worker thread.

A job's files live in its own folder under the working folder, under names made here (the request's file name is
only shown and offered as the download name):

    <job id>/mixture<.ext>       the upload (its extension kept only if it is a known audio one)
    <job id>/mixture.wav         a 16-bit copy to play, when browsers cannot play the upload's format
    <job id>/stems/<stem>.<ext>  written by `Separator.separate_file`
    <job id>/pictures/<name>.png the spectrograms
    <job id>/stems.zip           every stem, as <track>/<stem>.<ext>

Whatever goes wrong in a job (a bad file, a failed download, a bug) fails that job with a one-line message and the
worker goes on to the next.
"""
from __future__ import annotations

import logging
import secrets
import shutil
import threading
import time
import zipfile
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Callable, Optional

from ..audio import AUDIO_EXTENSIONS, AudioReader, AudioWriter
from ..errors import BSMamba2Error
from ..files import atomic_write, track_name
from . import spectrogram

log = logging.getLogger("bsmamba2")

# what every current browser plays in an <audio> element; the other inputs get a WAV copy to play
BROWSER_PLAYABLE = (".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus")
MIXTURE = "mixture"
ACTIVE = ("queued", "loading", "separating", "finishing")


@dataclass(frozen=True)
class Settings:
    """What the page asks of one job. model: a registry name, or the model the command was started with."""

    model: str
    two_stems: Optional[str] = None  # None: every stem of the model
    file_format: str = "wav"
    tta: bool = False
    quantize: Optional[str] = None


class Cancelled(Exception):
    """Raised inside the worker between blocks when the job's cancel was asked for."""


@dataclass(eq=False)  # a job is itself: found in the queue by identity
class Job:
    id: str
    name: str  # the uploaded file's name, for the page and the download names
    settings: Settings
    folder: Path
    input: Path
    status: str = "queued"  # queued, loading, separating, finishing, done, failed, cancelled
    fraction: float = 0.0
    separating_since: Optional[float] = None
    seconds_left: Optional[float] = None
    wall_seconds: Optional[float] = None
    error: Optional[str] = None
    # what the page may fetch: file key → (path, download name); the only files the server hands out
    files: dict = field(default_factory=dict)
    stems: list = field(default_factory=list)
    axes: Optional[dict] = None  # the spectrograms' ticks (spectrogram.axes), once they are drawn
    cancel: threading.Event = field(default_factory=threading.Event)

    @property
    def track(self) -> str:
        return track_name(self.name)

    def describe(self) -> dict:
        return {"id": self.id, "name": self.name, "status": self.status, "fraction": round(self.fraction, 4),
                "seconds_left": None if self.seconds_left is None else round(self.seconds_left, 1),
                "wall_seconds": None if self.wall_seconds is None else round(self.wall_seconds, 2),
                "error": self.error, "settings": vars(self.settings), "stems": self.stems,
                "files": sorted(self.files), "axes": self.axes}


def display_name(name: str) -> str:
    """The last part of a file name as a browser sends it (some send a Windows or a fake path); never a name that
    means a folder, since it also names the track's folder in the zip."""
    name = PureWindowsPath(PurePosixPath(name).name).name.strip()
    return name if name.strip(".") else "upload"


class JobQueue:
    """Jobs in order received, computed one at a time by a worker thread with separators from `make_separator`
    (which may keep the last one: a job with the same settings then reuses its loaded model)."""

    def __init__(self, workdir: Path, make_separator: Callable[[Settings], object]):
        self.workdir, self.make_separator = workdir, make_separator
        self.jobs: dict[str, Job] = {}  # every job not removed, in the order received
        self.pending: deque = deque()
        self.changed = threading.Condition()
        self.stopping = False
        self.worker = threading.Thread(target=self._work, name="bsmamba2-ui-worker", daemon=True)
        self.worker.start()

    def new_job(self, name: str, settings: Settings) -> Job:
        """A job with its own empty folder; its upload goes to `job.input`, then `submit(job)` queues it."""
        job_id = secrets.token_hex(8)
        folder = self.workdir / job_id
        folder.mkdir(parents=True)
        name = display_name(name)
        extension = Path(name).suffix.lower()
        return Job(job_id, name, settings, folder, folder / (MIXTURE + (extension if extension in AUDIO_EXTENSIONS
                                                                         else "")))

    def check_audio(self, job: Job) -> None:
        """Refuse an upload that is not audio, as `bsmamba2 separate` would, in words naming the user's file."""
        try:
            AudioReader(job.input).close()
        except BSMamba2Error as error:
            raise BSMamba2Error(self._in_users_words(job, str(error))) from None

    def submit(self, job: Job) -> None:
        with self.changed:
            self.jobs[job.id] = job
            self.pending.append(job)
            self.changed.notify_all()

    def queue_position(self, job: Job) -> Optional[int]:
        with self.changed:
            return self.pending.index(job) + 1 if job in self.pending else None

    def cancel(self, job: Job) -> None:
        """A queued job is dropped from the queue; a running one stops at its next block."""
        with self.changed:
            job.cancel.set()
            if job in self.pending:
                self.pending.remove(job)
                job.status = "cancelled"

    def remove(self, job: Job) -> None:
        """Forget the job and delete its files (once it has stopped, if it is running)."""
        with self.changed:
            self.cancel(job)
            self.jobs.pop(job.id, None)
            if job.status not in ACTIVE:
                shutil.rmtree(job.folder, ignore_errors=True)

    def stop(self) -> None:
        """Cancel what is running and queued and wait for the worker."""
        with self.changed:
            self.stopping = True
            for job in list(self.jobs.values()):
                self.cancel(job)
            self.changed.notify_all()
        self.worker.join()

    def _work(self) -> None:
        while True:
            with self.changed:
                while not self.pending and not self.stopping:
                    self.changed.wait()
                if self.stopping:
                    return
                job = self.pending.popleft()
                job.status = "loading"
            started = time.perf_counter()
            try:
                self._run(job)
                job.status = "done"
            except Cancelled:
                job.status = "cancelled"
            except BSMamba2Error as error:
                job.status, job.error = "failed", self._in_users_words(job, str(error))
            except Exception as error:  # a bug or a device failure fails this job, never the app
                log.error("unexpected failure on %s", job.name, exc_info=True)
                job.status, job.error = "failed", self._in_users_words(job, f"{type(error).__name__}: {error}")
            job.wall_seconds = time.perf_counter() - started
            job.seconds_left = None
            with self.changed:
                if job.status != "done":
                    shutil.rmtree(job.folder / "stems", ignore_errors=True)
                if job.id not in self.jobs:  # removed while it ran
                    shutil.rmtree(job.folder, ignore_errors=True)

    def _run(self, job: Job) -> None:
        separator = self.make_separator(job.settings)
        if job.cancel.is_set():
            raise Cancelled
        job.status, job.separating_since = "separating", time.perf_counter()

        def on_progress(done: float, total: float) -> None:
            if job.cancel.is_set():
                raise Cancelled
            job.fraction = min(1.0, done / total)
            elapsed = time.perf_counter() - job.separating_since
            job.seconds_left = elapsed * (1 - job.fraction) / job.fraction if job.fraction else None

        stems = separator.separate_file(job.input, job.folder / "stems", on_progress=on_progress)
        job.status = "finishing"
        extension = next(iter(stems.values())).suffix
        playable = job.input
        if job.input.suffix not in BROWSER_PLAYABLE:
            playable = job.folder / (MIXTURE + ".wav")
            write_wav_copy(job.input, playable)
        pictures = {name: job.folder / "pictures" / f"{name}.png" for name in [MIXTURE, *stems]}
        axes = spectrogram.draw({MIXTURE: job.input, **stems}, pictures)
        archive = job.folder / "stems.zip"
        with atomic_write(archive) as file, zipfile.ZipFile(file, "w", zipfile.ZIP_STORED) as bundle:
            for name, path in stems.items():  # audio hardly compresses: stored as it is
                bundle.write(path, f"{job.track}/{name}{extension}")
        job.files = {MIXTURE: (playable, job.name if playable == job.input else f"{job.track}.wav"),
                     **{name: (path, f"{job.track}_{name}{extension}") for name, path in stems.items()},
                     **{f"{name}.png": (path, f"{job.track}_{name}.png") for name, path in pictures.items()},
                     "stems.zip": (archive, f"{job.track}_stems.zip")}
        job.stems, job.axes, job.fraction = list(stems), axes, 1.0

    def _in_users_words(self, job: Job, message: str) -> str:
        """A message with the job's generated paths replaced by the name the user knows."""
        return message.replace(str(job.input), job.name).replace(str(job.folder), job.track)


def write_wav_copy(source: Path, target: Path) -> None:
    """A 16-bit WAV of `source` at its own rate, for a browser that cannot play the original."""
    with AudioReader(source) as reader:
        writer = AudioWriter(target, reader.sample_rate, reader.channels, "wav", "16")
        try:
            for block in reader.blocks():
                writer.write(block)
        except BaseException:
            writer.discard()
            raise
        writer.commit()

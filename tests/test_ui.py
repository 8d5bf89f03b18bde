"""`bsmamba2 ui` through its HTTP interface: a real server on 127.0.0.1 with a tiny model."""
import io
import signal
import socket
import subprocess
import sys
import time
import zipfile
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import soundfile as sf

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from bsmamba2 import Separator  # noqa: E402
from bsmamba2.audio import AudioReader  # noqa: E402
from bsmamba2.cli import build_parser  # noqa: E402
from bsmamba2.errors import BSMamba2Error  # noqa: E402
from bsmamba2.ui import jobs, server, spectrogram  # noqa: E402
from separation_fixtures import noise, save_tiny_checkpoint, write_audio  # noqa: E402
from ui_server import TIMEOUT, call, running_app  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("model") / "tiny.ckpt")


@pytest.fixture(scope="module")
def app(checkpoint):
    with running_app("--checkpoint", str(checkpoint), "--max-upload-mb", "1") as app:
        yield app


def upload(app, path, name=None, **settings):
    return call("POST", app.url + "api/jobs", params={"name": name or path.name, **settings}, data=path.read_bytes())


def wait(app, job_id, until=lambda job: job["status"] not in jobs.ACTIVE):
    deadline = time.monotonic() + TIMEOUT
    while True:
        job = call("GET", f"{app.url}api/jobs/{job_id}").json()
        if until(job):
            return job
        assert time.monotonic() < deadline, job
        time.sleep(0.05)


def fetch(app, job_id, key, **headers):
    return call("GET", f"{app.url}api/jobs/{job_id}/files/{key}", headers=headers)


def test_upload_poll_download(app, checkpoint, tmp_path):
    song = write_audio(tmp_path / "My Song.flac", noise(2, 44100 * 2, seed=1), 44100)
    answer = upload(app, song, name="C:\\music\\My Song.flac", format="flac", tta="1")
    assert answer.status_code == 201, answer.text
    job = wait(app, answer.json()["id"])
    assert (job["status"], job["error"], job["name"], job["fraction"]) == ("done", None, "My Song.flac", 1.0)
    assert job["stems"] == ["vocals", "drums"]
    assert job["settings"] == {"model": server.CHECKPOINT, "two_stems": None, "file_format": "flac", "tta": True,
                               "quantize": None}

    expected = Separator(checkpoint, device="cpu", file_format="flac", tta=True).separate_file(song, tmp_path / "cli")
    for stem in ("vocals", "drums"):
        download = fetch(app, job["id"], stem)
        assert download.status_code == 200 and download.headers["content-type"] == "audio/flac"
        assert download.headers["content-disposition"].endswith(f"My%20Song_{stem}.flac")
        assert download.content == expected[stem].read_bytes()
    assert fetch(app, job["id"], "mixture").content == song.read_bytes()
    seek = fetch(app, job["id"], "vocals", Range="bytes=100-199")  # what a player asks for when seeking
    assert seek.status_code == 206 and seek.content == expected["vocals"].read_bytes()[100:200]

    with zipfile.ZipFile(io.BytesIO(fetch(app, job["id"], "stems.zip").content)) as bundle:
        assert bundle.namelist() == ["My Song/vocals.flac", "My Song/drums.flac"]
        assert bundle.read("My Song/drums.flac") == expected["drums"].read_bytes()

    pictures = {}
    for name in ("mixture", "vocals", "drums"):
        picture = fetch(app, job["id"], f"{name}.png")
        assert picture.headers["content-type"] == "image/png" and picture.content[:8] == b"\x89PNG\r\n\x1a\n"
        width, height = np.frombuffer(picture.content[16:24], ">u4")
        assert (width, height) == (jobs.spectrogram.COLUMNS, jobs.spectrogram.ROWS)
        pictures[name] = picture.content
    assert len(set(pictures.values())) == 3
    assert job["axes"] == spectrogram.axes(2.0, 22050)  # 2 s at 44.1 kHz


def test_spectrogram_axes_in_seconds_and_kilohertz():
    """Ticks where the pictures put those times (linear) and frequencies (log-spaced rows, 30 Hz at the bottom)."""
    axes = spectrogram.axes(10.0, 22050)
    assert [label for _, label in axes["time"]] == ["2 s", "4 s", "6 s", "8 s"]  # none at the right edge
    assert [position for position, _ in axes["time"]] == pytest.approx([0.2, 0.4, 0.6, 0.8])
    assert [label for _, label in axes["frequency"]] == ["0.1 kHz", "1 kHz", "10 kHz"]
    rows = np.geomspace(spectrogram.LOWEST_HZ, 22050, spectrogram.ROWS + 1)  # the rows' edges, bottom up
    for position, label in axes["frequency"]:
        hz = 1000 * float(label.split()[0])
        assert rows[round(position * spectrogram.ROWS)] == pytest.approx(hz, rel=0.02)
    long = spectrogram.axes(215.0, 4000)  # a 3:35 song at 8 kHz: 30 s steps, no 10 kHz above its 4 kHz
    assert [label for _, label in long["time"]] == [f"{30 * n} s" for n in range(1, 7)]  # 210 s: at the edge
    assert [label for _, label in long["frequency"]] == ["0.1 kHz", "1 kHz"]


def test_two_stems_and_a_format_browsers_cannot_play(app, tmp_path):
    """An AIFF upload gets a WAV copy for the mixture's player; two stems are the stem and the rest."""
    wave = noise(1, 22050, seed=2)
    song = tmp_path / "take.aiff"
    sf.write(song, wave.T, 22050, subtype="PCM_16")
    job = wait(app, upload(app, song, stems="drums").json()["id"])
    assert (job["status"], job["stems"]) == ("done", ["drums", "no_drums"])
    mixture = fetch(app, job["id"], "mixture")
    assert mixture.headers["content-type"] == "audio/wav" and 'filename="take.wav"' in mixture.headers[
        "content-disposition"]
    played, rate = sf.read(io.BytesIO(mixture.content), dtype="int16")
    assert rate == 22050 and np.array_equal(played, sf.read(song, dtype="int16")[0])
    drums, no_drums = (sf.read(io.BytesIO(fetch(app, job["id"], name).content))[0] for name in ("drums", "no_drums"))
    np.testing.assert_allclose(drums + no_drums, sf.read(song)[0], atol=1e-4)  # 24-bit rounding of each


def test_a_file_that_is_not_audio_is_refused_in_the_clis_words(app, tmp_path):
    fake = tmp_path / "notes.mp3"
    fake.write_text("these are my lyrics, not a song\n")
    answer = upload(app, fake, name="song.mp3")
    with pytest.raises(BSMamba2Error) as cli:
        AudioReader(fake)
    assert answer.status_code == 400
    assert answer.json() == {"error": str(cli.value).replace(str(fake), "song.mp3")}
    assert "song.mp3: not an audio file" in answer.json()["error"]
    listed = {job["id"] for job in call("GET", app.url + "api/jobs").json()}
    assert {folder.name for folder in app.workdir.iterdir()} == listed  # no job, no folder left for it


def test_an_oversize_file_is_refused_and_not_kept(app, tmp_path):
    big = write_audio(tmp_path / "long.wav", noise(2, 252_489, seed=3), 44100)
    assert 10 ** 6 < big.stat().st_size < 2 ** 20  # over 1 MB as it is counted (10^6 bytes), under 1 MiB
    before = set(app.workdir.iterdir())
    answer = upload(app, big)
    assert answer.status_code == 413
    assert answer.json()["error"] == ("long.wav: larger than the upload limit of 1 MB (start the app with "
                                      "--max-upload-mb to change it)")

    def chunks():  # no Content-Length: the limit is counted as the body streams in
        data = big.read_bytes()
        for start in range(0, len(data), 65536):
            yield data[start:start + 65536]

    streamed = call("POST", app.url + "api/jobs", params={"name": "long.wav"}, data=chunks())
    assert streamed.status_code == 413 and "upload limit of 1 MB" in streamed.json()["error"]
    assert set(app.workdir.iterdir()) == before


def test_unknown_model_or_format_is_refused_before_the_upload(app, tmp_path):
    song = write_audio(tmp_path / "song.wav", noise(2, 4410, seed=4), 44100)
    answer = upload(app, song, model="no-such-model")
    assert answer.status_code == 400 and answer.json()["error"].startswith("unknown model 'no-such-model' (known: ")
    answer = upload(app, song, format="aac")
    assert answer.status_code == 400 and answer.json()["error"].startswith("format aac: must be one of wav, flac")


def test_cancel_a_running_and_a_queued_job(checkpoint, tmp_path):
    song = write_audio(tmp_path / "long.wav", noise(1, 8000 * 60, seed=5), 8000)
    with running_app("--checkpoint", str(checkpoint), "--chunk", "0.05") as app:
        first, second = (upload(app, song).json()["id"] for _ in range(2))
        assert call("GET", f"{app.url}api/jobs/{second}").json()["position"] == 1
        running = wait(app, first, until=lambda job: job["fraction"] > 0)
        assert running["status"] == "separating" and running["seconds_left"] > 0
        cancelled = call("POST", f"{app.url}api/jobs/{second}/cancel").json()
        assert (cancelled["status"], cancelled["position"]) == ("cancelled", None)
        call("POST", f"{app.url}api/jobs/{first}/cancel")
        job = wait(app, first)
        assert job["status"] == "cancelled" and job["fraction"] < 1 and job["files"] == []
        assert not (app.workdir / first / "stems").exists()
        assert fetch(app, first, "vocals").status_code == 404
        # the app goes on: the next job runs
        short = write_audio(tmp_path / "short.wav", noise(1, 8000, seed=6), 8000)
        assert wait(app, upload(app, short).json()["id"])["status"] == "done"


def test_a_crash_in_a_job_fails_that_job_only(app, tmp_path, monkeypatch):
    song = write_audio(tmp_path / "song.wav", noise(2, 4410, seed=7), 44100)

    def broken(*args):
        raise RuntimeError("the picture broke")

    monkeypatch.setattr(jobs.spectrogram, "levels_db", broken)
    job = wait(app, upload(app, song).json()["id"])
    assert (job["status"], job["error"], job["files"]) == ("failed", "RuntimeError: the picture broke", [])
    monkeypatch.undo()
    assert wait(app, upload(app, song).json()["id"])["status"] == "done"


def test_only_listed_files_are_served_and_removal_deletes_them(app, tmp_path):
    song = write_audio(tmp_path / "song.wav", noise(2, 4410, seed=8), 44100)
    job = wait(app, upload(app, song).json()["id"])
    folder = app.workdir / job["id"]
    for key in ("..%2f..%2f..%2fetc%2fpasswd", "mixture.wav", "stems", "vocals.wav", "%2e%2e"):
        assert fetch(app, job["id"], key).status_code == 404, key
    assert call("GET", f"{app.url}api/jobs/../../etc/passwd").status_code == 404
    sneaky = wait(app, upload(app, song, name="../..").json()["id"])
    with zipfile.ZipFile(io.BytesIO(fetch(app, sneaky["id"], "stems.zip").content)) as bundle:
        assert sneaky["name"] == "upload" and bundle.namelist() == ["upload/vocals.wav", "upload/drums.wav"]
    assert call("DELETE", f"{app.url}api/jobs/{job['id']}").status_code == 204
    assert not folder.exists() and call("GET", f"{app.url}api/jobs/{job['id']}").status_code == 404
    assert job["id"] not in [listed["id"] for listed in call("GET", app.url + "api/jobs").json()]


def test_an_upload_named_with_dots_gets_a_plain_track_name(app, tmp_path):
    """`...wav` without its extension is "..": as the zip's folder, naive unzip tools would write a folder up."""
    song = write_audio(tmp_path / "song.wav", noise(2, 4410, seed=10), 44100)
    job = wait(app, upload(app, song, name="...wav").json()["id"])
    with zipfile.ZipFile(io.BytesIO(fetch(app, job["id"], "stems.zip").content)) as bundle:
        assert bundle.namelist() == ["track/vocals.wav", "track/drums.wav"]
    assert 'filename="track_vocals.wav"' in fetch(app, job["id"], "vocals").headers["content-disposition"]


def test_an_upload_cut_short_leaves_nothing(app):
    """A client that goes away mid-upload: its job folder and partial file are deleted."""
    before = set(app.workdir.iterdir())
    address = urlsplit(app.url)
    with socket.create_connection((address.hostname, address.port)) as client:
        client.sendall(f"POST /api/jobs?name=song.wav HTTP/1.1\r\nHost: {address.netloc}\r\n"
                       "Content-Length: 1000000\r\n\r\n".encode() + bytes(100_000))
        deadline = time.monotonic() + TIMEOUT
        while set(app.workdir.iterdir()) == before:  # the upload has started
            assert time.monotonic() < deadline
            time.sleep(0.02)
    deadline = time.monotonic() + 10
    while set(app.workdir.iterdir()) != before:
        assert time.monotonic() < deadline, "the cut upload's folder is still there"
        time.sleep(0.02)


def test_other_web_sites_cannot_read_or_change_the_jobs(app, tmp_path):
    """A page of another site open in the same browser may send requests here: it is refused."""
    song = write_audio(tmp_path / "song.wav", noise(2, 4410, seed=9), 44100)
    rebound = call("GET", app.url + "api/jobs", headers={"Host": f"attacker.example:{urlsplit(app.url).port}"})
    assert rebound.status_code == 400  # a name made to point at 127.0.0.1 (DNS rebinding) gets nothing
    forged = call("POST", app.url + "api/jobs", params={"name": "song.wav"}, data=song.read_bytes(),
                  headers={"Origin": "http://attacker.example"})
    assert forged.status_code == 403 and forged.json() == {"error": "only this app's page may add jobs"}
    ours = call("POST", app.url + "api/jobs", params={"name": "song.wav"}, data=song.read_bytes(),
                headers={"Origin": app.url.rstrip("/")})
    assert ours.status_code == 201
    job_url = f"{app.url}api/jobs/{ours.json()['id']}"
    assert call("DELETE", job_url, headers={"Origin": "http://attacker.example"}).status_code == 403
    assert call("POST", job_url + "/cancel", headers={"Origin": "http://attacker.example"}).status_code == 403
    assert wait(app, ours.json()["id"])["status"] == "done"


def test_the_page_and_its_options(app):
    page = call("GET", app.url)
    assert page.status_code == 200 and b'<script src="/static/app.js">' in page.content
    assert call("GET", app.url + "static/app.js").status_code == 200
    options = call("GET", app.url + "api/options").json()
    assert options["default_model"] == server.CHECKPOINT and options["max_upload_mb"] == 1
    assert options["models"][0] == {"id": server.CHECKPOINT, "label": "tiny.ckpt", "stems": ["vocals", "drums"],
                                    "note": "--checkpoint"}
    assert {"synth-4stem", "synth-vocals"} <= {model["id"] for model in options["models"]}
    msst = next(model for model in options["models"] if model["id"] == "bsmamba2-vocals-msst")
    assert msst["note"] in ("downloads 192.6 MB on first use", "downloaded")  # MB = 10^6 bytes, as README says
    assert {"wav", "flac"} <= set(options["formats"]) and options["int8"] is True


@pytest.mark.parametrize("keep", [False, True])
def test_the_working_folder_goes_when_the_app_stops_unless_kept(checkpoint, keep):
    with running_app("--checkpoint", str(checkpoint), *(["--keep"] if keep else [])) as app:
        assert app.workdir.is_dir() and app.url.startswith("http://127.0.0.1:")
    assert app.workdir.exists() == keep
    if keep:
        app.workdir.rmdir()


def test_start_up_errors_are_one_line(checkpoint, tmp_path):
    with running_app("--checkpoint", str(checkpoint)) as app:
        port = app.url.rsplit(":", 1)[1].rstrip("/")
        with pytest.raises(BSMamba2Error, match=f"^cannot listen on 127.0.0.1:{port}: .*choose another --port"):
            server.App(build_parser().parse_args(["ui", "--port", port, "--checkpoint", str(checkpoint)]))
    with pytest.raises(BSMamba2Error, match="^--max-upload-mb 0: must be positive$"):
        server.App(build_parser().parse_args(["ui", "--max-upload-mb", "0"]))
    with pytest.raises(BSMamba2Error, match="^unknown model 'nope'"):
        server.App(build_parser().parse_args(["ui", "--model", "nope"]))


def test_without_the_extra_the_command_says_what_to_install():
    code = ("import sys\n"
            "sys.modules['starlette'] = None  # as if not installed\n"
            "from bsmamba2.cli import main\n"
            "sys.exit(main(['ui', '--no-browser']))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=TIMEOUT)
    assert done.returncode == 2
    assert done.stderr == 'bsmamba2 ui: error: the web app needs starlette: pip install "bsmamba2[ui]"\n'


@pytest.mark.slow
@pytest.mark.parametrize("stop", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_the_command_warns_off_loopback_and_ctrl_c_or_sigterm_stops_it_cleanly(checkpoint, stop):
    """SIGTERM is a service manager's stop: it ends the app as Ctrl-C does, working folder included."""
    command = subprocess.Popen([sys.executable, "-m", "bsmamba2", "ui", "--host", "0.0.0.0", "--port", "0",
                                "--no-browser", "--checkpoint", str(checkpoint)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        ready = command.stdout.readline()
        assert ready.startswith("BSMamba2 is ready at http://0.0.0.0:"), command.stderr.read()
        workdir = Path(ready.split("working folder ")[1].split(", deleted")[0])
        assert workdir.is_dir()
        local = ready.split()[4].replace("0.0.0.0", "127.0.0.1")
        assert call("GET", local + "api/jobs").json() == []  # serving: Ctrl-C now goes to the server
        command.send_signal(stop)
        out, err = command.communicate(timeout=TIMEOUT)
    finally:
        command.kill()
    assert command.returncode == 0 and out == "BSMamba2 stopped\n"
    assert "warning: --host 0.0.0.0 lets other machines on the network use this app" in err
    assert not workdir.exists()

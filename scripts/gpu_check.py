"""The CUDA path checked on a real GPU in one run: mamba-ssm and causal-conv1d built from source for the GPU present,
every scan backend against the reference, the network under each backend, a bf16 training step, `bsmamba2 separate
--device cuda` and the scan benchmark. One JSON of results and a log; the exit status is 1 on any failure.

    scripts/gpu_check.sh                 # on a CUDA machine, no network: wheels and sdists from gpu_wheels/
    scripts/gpu_check.sh --dry-run       # the same pipeline on the CPU: no build, small shapes (about a minute)

Stages, each bounded in time so that the whole run ends within --time-limit:
  environment  a virtualenv that sees the running Python's packages (its torch), with the project installed in it
               (editable) and what the project needs beyond those installed from the --wheels folder, offline;
  build        causal-conv1d and mamba-ssm, in parallel, from their sdists in --wheels: setup.py's own -gencode list
               removed so that torch compiles for the present GPU only (TORCH_CUDA_ARCH_LIST), *_FORCE_BUILD so
               that setup.py never looks for a prebuilt wheel online, MAX_JOBS = all cores; a wheel built earlier for
               the same GPU architecture and torch (the local version tag says which) is installed instead;
  tests        `pytest -m cuda tests/ops`: every backend against `reference` (fp32 and bf16, outputs and gradients),
               the mixer, the conv, and the paper network (stems vs the `torch` backend, a bf16 training step):
               the cases that need no kernel while the kernels build, the others (`kernel_tests`) after;
  separate     `bsmamba2 separate --device cuda` on a generated song, its stems against `--device cpu`'s;
  benchmark    `benchmark_mamba_ssm.py --json` on CUDA for every backend but torch+compile (its compiles take
               minutes): mixer, time-path and band-path shapes, and the whole model under each backend.
The dry run uses the CPU instances of the model-level and scan tests and the benchmark's --quick shapes instead.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import random
import re
import shutil
import signal
import site
import struct
import subprocess
import sys
import tarfile
import time
import wave
from pathlib import Path
from typing import Optional

REPO = Path(__file__).resolve().parents[1]
MiB = 2 ** 20
OUT_FILE_LIMIT = 16 * MiB        # the largest file the GPU machine's $OUT brings back
OUT_PLUS = "_plus_"              # $OUT brings back only names of letters, digits, '.', '_' and '-': '+' is spelt so
# distribution name → (its import and file name, the prefix of its setup.py's environment variables)
KERNEL_PACKAGES = {"causal-conv1d": ("causal_conv1d", "CAUSAL_CONV1D"), "mamba-ssm": ("mamba_ssm", "MAMBA")}
SETUP_GENCODE = re.compile(r'cc_flag\.append\("-gencode"\)\s*\n\s*cc_flag\.append\("arch=compute_\w+,code=sm_\w+"\)')
MIN_SEPARATE_SDR_DB = 50.0       # stems from --device cuda against --device cpu's (other scan kernels), float32
BENCHMARK_MAX_ERROR = 1e-2       # the tests hold tight tolerances; this catches a gross error at the larger shapes
# CUDA mode: the paper network on 3 s of audio; the dry run: the model test's small config and length.
TEST_MODEL = {"BSMAMBA2_TEST_MODEL_CONFIG": "bsmamba2_vocals", "BSMAMBA2_TEST_AUDIO_SECONDS": "3"}
KERNEL_CASES = "triton or cuda-"  # pytest -k: the cases of the `triton` and `cuda` backends (tests/ops/devices.py)
PASSING = ("passed", "skipped")  # stage statuses that do not fail the run ("skipped": the dry run's build)


class Run:
    """What the stages share: paths, the deadline, the log, and the results written after every stage."""

    def __init__(self, args):
        self.args = args
        self.cuda = not args.dry_run
        self.started = time.monotonic()
        self.out = Path(args.out).resolve()
        self.work = Path(args.work_dir).resolve()
        self.venv = self.work / "venv"
        self.python = self.venv / "bin" / "python"
        self.out.mkdir(parents=True, exist_ok=True)
        (self.work / "logs").mkdir(parents=True, exist_ok=True)
        self.log_path = self.out / "gpu-check.log"
        self.log_path.write_text("")
        date = datetime.datetime.now(datetime.timezone.utc)
        self.results = {"date": date.strftime("%Y-%m-%dT%H:%M:%SZ"), "mode": "cuda" if self.cuda else "dry-run",
                        "command": " ".join(["scripts/gpu_check.sh", *sys.argv[1:]]), "passed": None, "stages": {}}
        self.name_results(f"{date:%Y-%m-%d}-{'gpu' if self.cuda else 'cpu-dry-run'}.json")

    def name_results(self, name: str) -> None:
        """Where the JSON goes (renamed once the GPU is known: benchmarks/results/<date>-h200.json is its home)."""
        previous = getattr(self, "results_path", None)
        self.results_path = self.out / name
        if previous is not None and previous.exists():
            previous.replace(self.results_path)

    def remaining(self) -> float:
        return self.args.time_limit - (time.monotonic() - self.started)

    def log(self, message: str) -> None:
        line = f"[{time.monotonic() - self.started:6.1f} s] {message}"
        print(line, flush=True)
        with open(self.log_path, "a") as file:
            file.write(line + "\n")

    def record(self, stage: str, status: str, seconds: float, **details) -> dict:
        self.results["stages"][stage] = {"status": status, "seconds": round(seconds, 1), **details}
        self.log(f"{stage}: {status} in {seconds:.0f} s" + (f" ({details['reason']})" if "reason" in details else ""))
        self.save()
        return self.results["stages"][stage]

    def save(self) -> None:
        failed = [name for name, stage in self.results["stages"].items() if stage["status"] not in PASSING]
        self.results["passed"] = not failed
        self.results["failed_stages"] = failed
        temporary = self.results_path.with_suffix(".json.partial")
        temporary.write_text(json.dumps(self.results, indent=2) + "\n")
        temporary.replace(self.results_path)

    def env(self, **extra) -> dict:
        """The environment of every command: the venv first on PATH, then the running Python's own bin folder
        (ninja, pip's console scripts), no stray BSMAMBA2_SCAN."""
        env = {key: value for key, value in os.environ.items() if key != "BSMAMBA2_SCAN"}
        env["PATH"] = os.pathsep.join([str(self.venv / "bin"), str(Path(sys.executable).parent), env.get("PATH", "")])
        env["PYTHONUNBUFFERED"] = "1"
        env.update(extra)
        return env

    def run(self, name: str, command: list, timeout: float, env: Optional[dict] = None) -> tuple:
        """Run `command` with its output in logs/NAME.txt (then appended to the log). Returns (exit status, or None
        if it was stopped at `timeout`; seconds; the output's lines)."""
        output = self.work / "logs" / f"{name}.txt"
        self.log(f"$ {' '.join(map(str, command))}   (at most {timeout:.0f} s)")
        start = time.monotonic()
        with open(output, "w") as file:
            process = subprocess.Popen(list(map(str, command)), stdout=file, stderr=subprocess.STDOUT, cwd=REPO,
                                       start_new_session=True, env=env or self.env())
            status = wait(process, timeout)
        text = output.read_text(errors="replace")
        with open(self.log_path, "a") as file:
            file.write(text)
        return status, time.monotonic() - start, text.strip().splitlines()


def wait(process: subprocess.Popen, timeout: float) -> Optional[int]:
    """The exit status, or None after killing the process and its children at `timeout`."""
    try:
        return process.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        return None


def stage_budget(run: Run, cap: float, keep: float) -> float:
    """Seconds a stage may take: at most `cap`, leaving `keep` seconds for the stages after it."""
    return min(cap, run.remaining() - keep)


# ---- environment -----------------------------------------------------------------------------------------------

def make_environment(run: Run) -> bool:
    """A fresh venv whose .pth adds the running Python's site folders (a venv made from a venv would otherwise see
    only the base interpreter's packages, not this one's torch), then `pip install -e .` offline."""
    start = time.monotonic()
    shutil.rmtree(run.venv, ignore_errors=True)
    try:
        subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(run.venv)], check=True,
                       capture_output=True, text=True)
        site_packages = Path(subprocess.check_output(
            [str(run.python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    except subprocess.CalledProcessError as error:
        run.record("environment", "failed", time.monotonic() - start,
                   reason=f"making the venv: {(error.stderr or str(error)).strip()[-500:]}")
        return False
    folders = [folder for folder in site.getsitepackages() if Path(folder).is_dir()]
    (site_packages / "_gpu_check_base.pth").write_text(
        "".join(f"import site; site.addsitedir({folder!r})\n" for folder in folders))
    wheels = Path(run.args.wheels).resolve()
    command = [run.python, "-m", "pip", "install", "--no-index", "--no-build-isolation", "--disable-pip-version-check",
               "--find-links", wheels, "-e", REPO]
    status, _, tail = run.run("environment", command, stage_budget(run, 180, 60))
    if status != 0:
        run.record("environment", "failed", time.monotonic() - start, reason=failure_reason(status, tail))
        return False
    installed = [line.split("Successfully installed ", 1)[1] for line in tail if "Successfully installed" in line]
    run.record("environment", "passed", time.monotonic() - start, venv=str(run.venv), base_site=folders,
               installed=installed[0].split() if installed else [])
    return True


def probe(run: Run) -> dict:
    """Versions and devices as the venv's Python sees them (run there: this driver needs no torch)."""
    try:
        output = subprocess.run([str(run.python), __file__, "--probe"], capture_output=True, text=True, cwd=REPO,
                                env=run.env(), timeout=max(run.remaining(), 30))
    except subprocess.TimeoutExpired as error:
        raise ProbeError(f"no answer in {error.timeout:.0f} s") from None
    lines = [line for line in output.stdout.splitlines() if line.startswith("{")]
    if output.returncode != 0 or not lines:
        raise ProbeError(f"exit {output.returncode}: {output.stderr.strip()[-1500:]}")
    return json.loads(lines[-1])


class ProbeError(Exception):
    pass


def describe_host() -> dict:
    """Run by the venv's Python: versions, the device, and why each backend cannot run there (null: it can)."""
    import importlib.metadata
    import platform

    import torch

    from bsmamba2.config import SCAN_BACKENDS
    from bsmamba2.ops.backends import unavailable_reason

    def version(name):
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    capability = torch.cuda.get_device_capability() if cuda else None
    def first_line(command: list, containing: str = ""):
        if not shutil.which(command[0]):
            return None
        lines = subprocess.run(command, capture_output=True, text=True).stdout.splitlines()
        return next((line.strip() for line in lines if containing in line), None)

    return {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
            "gpu": torch.cuda.get_device_name() if cuda else None,
            "capability": f"{capability[0]}.{capability[1]}" if cuda else None,
            "gpu_memory_gib": round(torch.cuda.get_device_properties(0).total_memory / 2 ** 30, 1) if cuda else None,
            "driver": first_line(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
            "nvcc": first_line(["nvcc", "--version"], "release"), "cpu_count": os.cpu_count(),
            **{name: version(name) for name in ("triton", "numpy", *KERNEL_PACKAGES)},
            "backends_unavailable": {name: unavailable_reason(name, device) for name in SCAN_BACKENDS}}


# ---- build -----------------------------------------------------------------------------------------------------

def local_version(host: dict) -> str:
    """The wheels' local version tag, naming what they were built for: e.g. sm90.torch2.11.0.cu130."""
    return f"sm{host['capability'].replace('.', '')}.torch{re.sub(r'[^a-z0-9]+', '.', host['torch'].lower())}"


def start_builds(run: Run, host: dict) -> dict:
    """Start both builds in parallel (each its own ninja, MAX_JOBS all cores: 14 translation units on 16 cores);
    a package with a wheel built earlier for this GPU and torch, or that cannot be built, is settled at once."""
    start = time.monotonic()
    built = run.work / "wheels"
    built.mkdir(exist_ok=True)
    tag = local_version(host)
    wheels = Path(run.args.wheels).resolve()
    builds, results = {}, {}
    for distribution, (name, prefix) in KERNEL_PACKAGES.items():
        for carried in wheels.rglob(f"{name}-*{OUT_PLUS}{tag}-*.whl"):   # a wheel brought back from $OUT
            shutil.copy2(carried, built / carried.name.replace(OUT_PLUS, "+"))
        earlier = sorted(built.glob(f"{name}-*+{tag}-*.whl"))
        if earlier:
            results[distribution] = {"status": "prebuilt", "wheel": earlier[-1].name}
            continue
        try:
            source = prepare_source(run, wheels, name)
        except BuildError as error:
            results[distribution] = {"status": "failed", "reason": str(error)}
            continue
        env = run.env(MAX_JOBS=str(os.cpu_count()), TORCH_CUDA_ARCH_LIST=host["capability"],
                      **{f"{prefix}_FORCE_BUILD": "TRUE", f"{prefix}_LOCAL_VERSION": tag})
        log = open(run.work / "logs" / f"build-{name}.txt", "w")
        command = [str(run.python), "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
                   "--disable-pip-version-check", "-v", "--wheel-dir", str(built), str(source)]
        run.log(f"building {source.name} for compute capability {host['capability']} (log: {log.name})")
        builds[distribution] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=source, env=env,
                                                 start_new_session=True), time.monotonic(), log, source)
    deadline = start + stage_budget(run, run.args.build_limit, 200)
    return {"start": start, "deadline": deadline, "processes": builds, "results": results, "built": built}


def finish_builds(run: Run, host: dict, builds: dict) -> None:
    """Wait for the builds until their deadline, then install what was built (or built earlier)."""
    results, built, tag = builds["results"], builds["built"], local_version(host)
    for distribution, (process, began, log, source) in builds["processes"].items():
        status = wait(process, builds["deadline"] - time.monotonic())
        log.close()
        seconds = round(time.monotonic() - began, 1)
        text = Path(log.name).read_text(errors="replace")
        with open(run.log_path, "a") as file:
            file.write(f"---- build log of {distribution} (last 60 lines)\n" + "\n".join(text.splitlines()[-60:])
                       + "\n")
        name = KERNEL_PACKAGES[distribution][0]
        wheel = sorted(built.glob(f"{name}-*+{tag}-*.whl"))
        if status == 0 and wheel:
            results[distribution] = {"status": "built", "seconds": seconds, "wheel": wheel[-1].name,
                                     "cu_files": len(list(source.rglob("*.cu")))}
        else:
            results[distribution] = {"status": "failed", "seconds": seconds,
                                     "reason": failure_reason(status, text.splitlines(), compile_errors=True)}
    for distribution, result in results.items():
        if result["status"] in ("built", "prebuilt"):
            install_wheel(run, distribution, result, built / result["wheel"])
    failed = [d for d, r in results.items() if r["status"] not in ("built", "prebuilt")]
    run.record("build", "failed" if failed else "passed", time.monotonic() - builds["start"], packages=results,
               **({"reason": f"{', '.join(failed)} not built"} if failed else {}))


class BuildError(Exception):
    pass


def prepare_source(run: Run, wheels: Path, name: str) -> Path:
    """Unpack the newest sdist of `name` and make its setup.py compile for the present GPU only."""
    sdists = sorted(wheels.glob(f"{name}-*.tar.gz"), key=lambda path: version_key(path.name[len(name) + 1:-7]))
    if not sdists:
        raise BuildError(f"no {name}-*.tar.gz in {wheels} (scripts/gpu_wheels.sh fetches it)")
    target = run.work / "src"
    shutil.rmtree(target / sdists[-1].name[:-7], ignore_errors=True)
    with tarfile.open(sdists[-1]) as archive:
        members = [m for m in archive.getmembers() if m.isfile() or m.isdir()]   # no links out of the folder
        safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}      # Python ≥ 3.12 (and backports)
        archive.extractall(target, members=members, **safe)
    source = target / sdists[-1].name[:-7]
    setup = source / "setup.py"
    text, count = SETUP_GENCODE.subn("pass", setup.read_text())
    if count == 0:
        raise BuildError(f"{setup.name} of {source.name} lists no -gencode flags where expected: cannot restrict "
                         "the build to the present GPU")
    setup.write_text(text)
    return source


def version_key(version: str) -> tuple:
    return tuple(int(part) if part.isdigit() else 0 for part in re.split(r"[.+-]", version))


def install_wheel(run: Run, distribution: str, result: dict, wheel: Path) -> None:
    """pip install the wheel offline; a wheel built here is also copied to --out when small enough to come back."""
    status, _, tail = run.run(f"install-{distribution}", [run.python, "-m", "pip", "install", "--no-deps", "--no-index",
                                                          "--disable-pip-version-check", wheel], 120)
    if status != 0:
        result.update(status="failed", reason="pip install: " + failure_reason(status, tail))
        return
    result["wheel_mib"] = round(wheel.stat().st_size / MiB, 1)
    if result["status"] == "built":
        if wheel.stat().st_size <= OUT_FILE_LIMIT:
            shutil.copy2(wheel, run.out / wheel.name.replace("+", OUT_PLUS))
            result["copied_to_out"] = True
        else:
            result["copied_to_out"] = False


def failure_reason(status: Optional[int], lines: list, compile_errors: bool = False) -> str:
    if status is None:
        return "stopped at its time limit"
    errors = [line.strip() for line in lines if compile_errors and re.search(r"\berror\b", line)]
    return f"exit {status}: " + " | ".join((errors[:3] or [line.strip() for line in lines[-3:]]))[:1500]


# ---- tests -----------------------------------------------------------------------------------------------------

def run_tests(run: Run, stage: str = "tests", keep: float = 100) -> None:
    """pytest, its JUnit report read back into the results: each test's outcome and recorded numbers. On CUDA,
    stage `tests` runs the cases that need no kernel (while the kernels build), `kernel_tests` the others."""
    report = run.work / f"{stage}.xml"
    if run.cuda:
        selection = ["-m", "cuda", "-k", KERNEL_CASES if stage == "kernel_tests" else f"not ({KERNEL_CASES})",
                     "tests/ops"]
        env = run.env(**TEST_MODEL)
    else:
        selection, env = ["-m", "not cuda", "tests/ops/test_backends_in_model.py",
                          "tests/ops/test_scan_backends.py::test_backend_matches_reference", "-k", "torch or broken"], \
            run.env()
    command = [run.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
               f"--junitxml={report}", *selection]
    status, seconds, tail = run.run(stage, command, stage_budget(run, 300, keep), env=env)
    cases = read_junit(report) if report.exists() else []
    counts = {outcome: sum(case["outcome"] == outcome for case in cases) for outcome in ("passed", "failed", "skipped")}
    passed = status == 0 and counts["passed"] > 0
    reason = failure_reason(status, tail) if status != 0 else "no test passed: " + (tail or ["no output"])[-1]
    run.record(stage, "passed" if passed else "failed", seconds, counts=counts, cases=cases,
               **({} if passed else {"reason": reason}))


def read_junit(path: Path) -> list:
    import xml.etree.ElementTree as ElementTree

    cases = []
    for case in ElementTree.parse(path).iter("testcase"):
        outcome, message = "passed", None
        for child in case:
            if child.tag in ("failure", "error", "skipped"):
                outcome = "skipped" if child.tag == "skipped" else "failed"
                message = (child.get("message") or "").splitlines()[0][:300] if child.get("message") else None
        entry = {"test": f"{case.get('file', case.get('classname'))}::{case.get('name')}", "outcome": outcome,
                 "seconds": round(float(case.get("time", 0)), 2)}
        properties = {p.get("name"): number(p.get("value")) for p in case.iter("property")}
        entry.update({"properties": properties} if properties else {})
        entry.update({"message": message} if message else {})
        cases.append(entry)
    return cases


def number(text: str):
    try:
        return float(text)
    except (TypeError, ValueError):
        return text


# ---- separate --------------------------------------------------------------------------------------------------

def write_song(path: Path, seconds: float, rate: int = 44100) -> None:
    """A stereo 16-bit WAV: a chord with vibrato in both channels, a pulse panned left, a little noise."""
    generator = random.Random(0)
    frames = bytearray()
    for n in range(int(seconds * rate)):
        t = n / rate
        voice = sum(0.12 * math.sin(2 * math.pi * f * t + 3 * math.sin(2 * math.pi * 5 * t)) for f in (220, 277, 330))
        pulse = 0.3 * math.sin(2 * math.pi * 60 * t) * math.exp(-8 * (t % 0.5))
        noise = 0.01 * generator.uniform(-1, 1)
        frames += struct.pack("<hh", *(int(32767 * max(-1.0, min(1.0, s))) for s in (voice + pulse + noise,
                                                                                      voice + noise)))
    with wave.open(str(path), "wb") as file:
        file.setnchannels(2)
        file.setsampwidth(2)
        file.setframerate(rate)
        file.writeframes(bytes(frames))


def compare_stems(song: Path, stems: Path, reference: Optional[Path]) -> dict:
    """Run by the venv's Python: for each stem in `stems`, whether it has the song's length, rate and channels,
    and its SDR against the same stem in `reference` (a folder of stems from another run), if given."""
    import soundfile

    from bsmamba2.metrics import usdr

    expected = soundfile.info(str(song))
    report = {}
    for path in sorted(stems.glob("*.wav")):
        data, rate = soundfile.read(str(path), always_2d=True)
        report[path.stem] = {"as_input": (data.shape, rate) == ((expected.frames, expected.channels),
                                                                expected.samplerate)}
        if reference is not None and (reference / path.name).exists():
            report[path.stem]["sdr_db"] = round(usdr(soundfile.read(str(reference / path.name))[0].T, data.T), 1)
    return report


def run_separate(run: Run) -> None:
    """`bsmamba2 separate` (the bundled model) on a generated song: on the CPU, then on CUDA against it."""
    start = time.monotonic()
    folder = run.work / "separate"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    song = folder / "song.wav"
    write_song(song, 6.0 if run.cuda else 2.0)
    devices = ["cpu", "cuda"] if run.cuda else ["cpu"]
    stems, details, problems = {}, {}, []
    for device in devices:
        command = [run.venv / "bin" / "bsmamba2", "separate", song, "-o", folder / device, "--device", device,
                   "--bit-depth", "32f", "--force"]
        status, seconds, lines = run.run(f"separate-{device}", command, stage_budget(run, 120, 60))
        backend = next((line.split("scan backend: ", 1)[1] for line in lines if "scan backend: " in line), None)
        details[device] = {"exit": status, "seconds": round(seconds, 1), "scan_backend": backend}
        if status != 0:
            problems.append(f"--device {device}: {failure_reason(status, lines)}")
            continue
        reference = folder / "cpu" / "song" if device != "cpu" else None
        command = [run.python, __file__, "--compare-stems", song, folder / device / "song", reference or ""]
        compared, _, lines = run.run(f"stems-{device}", command, 60)
        answer = next((line for line in reversed(lines) if line.startswith("{")), None)
        stems[device] = json.loads(answer) if compared == 0 and answer else {}
        details[device]["stems"] = stems[device]
        if not stems[device]:
            problems.append(f"--device {device} wrote no stems" if compared == 0 else
                            f"reading the stems of --device {device}: {failure_reason(compared, lines)}")
        for stem, facts in stems[device].items():
            if not facts["as_input"]:
                problems.append(f"--device {device}: {stem} differs from the input in length, rate or channels")
            if not facts.get("sdr_db", math.inf) >= MIN_SEPARATE_SDR_DB:
                problems.append(f"--device {device}: {stem} at {facts['sdr_db']} dB SDR from the CPU's (at least "
                                f"{MIN_SEPARATE_SDR_DB:.0f} expected)")
    run.record("separate", "failed" if problems else "passed", time.monotonic() - start, devices=details,
               stems=sorted(stems.get("cpu", {})), **({"reason": "; ".join(problems)} if problems else {}))


# ---- benchmark -------------------------------------------------------------------------------------------------

def run_benchmark(run: Run) -> None:
    """benchmark_mamba_ssm.py --json, one run per group of shapes so that a run stopped at the deadline loses only
    its own group; every record is kept, and a per-backend table of median seconds. The whole model runs on the
    backend `auto` picks (`cuda` where it imports), and again under BSMAMBA2_SCAN=torch and =triton (from those two
    runs only the model's records are kept: their scan rows repeat the first run's)."""
    start = time.monotonic()
    if run.cuda:
        common = ["--device", "cuda", "--backends", "reference", "torch", "triton", "cuda"]
        model_only = ["--paths", "mixer", "--backends", "torch"]
        groups = [("mixer", ["--paths", "mixer"], {}),
                  *((f"model-{backend}", model_only, {"BSMAMBA2_SCAN": backend}) for backend in ("torch", "triton")),
                  ("time", ["--paths", "time", "--model-config"], {}),
                  ("band", ["--paths", "band", "--model-config"], {})]
    else:
        common = ["--device", "cpu", "--quick", "--backends", "reference", "torch", "cuda", "--repeats", "1",
                  "--audio-seconds", "0.25"]
        groups = [("mixer", ["--paths", "mixer", "--model-config", "configs/small.yaml"], {})]
    records, runs, problems = [], [], []
    for group, extra, env in groups:
        budget = stage_budget(run, 600, 10)
        if budget < 30:
            runs.append({"group": group, "status": "skipped: out of time"})
            problems.append(f"{group}: not run, out of time")
            continue
        output = run.work / f"benchmark-{group}.json"
        command = [run.python, REPO / "benchmark_mamba_ssm.py", "--json", output, "--force", "--quiet", *common,
                   *extra]
        status, seconds, tail = run.run(f"benchmark-{group}", command, budget, env=run.env(**env))
        runs.append({"group": group, "exit": status, "seconds": round(seconds, 1), **env})
        if status != 0 or not output.exists():
            problems.append(f"{group}: {failure_reason(status, tail)}")
            continue
        records += [record for record in json.loads(output.read_text())
                    if not env or record["section"] == "model"]
    for record in records:
        what = f"{record['section']} {record.get('backend') or record.get('config') or ''} {record['pass']}"
        if "failed" in record:
            problems.append(f"{what}: {record['failed']}")
        elif not record.get("max_abs_err", 0) <= BENCHMARK_MAX_ERROR * max(1.0, record.get("ref_max_abs", 0)):
            problems.append(f"{what} {record['batch']}×{record['seqlen']}: max abs error {record['max_abs_err']:.2e} "
                            f"from reference")
    run.record("benchmark", "failed" if problems else "passed", time.monotonic() - start, runs=runs,
               median_seconds=speed_table(records), records=records,
               **({"reason": "; ".join(problems)[:2000]} if problems else {}))


def speed_table(records: list) -> dict:
    """{"time path 62×801 fwdbwd": {"torch": s, "cuda": s, ...}, "model <config>": {backend: s per audio s}}."""
    table = {}
    for record in records:
        if "seconds" not in record:
            continue
        if record["section"] == "model":
            table.setdefault(f"model {record['config_name']} (s per audio s)", {})[record["backend"]] = \
                round(record["seconds_per_audio_second"], 4)
        else:
            key = f"{record['section']} {record['batch']}×{record['seqlen']} {record['pass']}"
            table.setdefault(key, {})[record["backend"]] = round(record["seconds"], 6)
    return table


# ---- main ------------------------------------------------------------------------------------------------------

CHECKS = {"tests": lambda run: run_tests(run, "kernel_tests" if run.cuda else "tests"), "separate": run_separate,
          "benchmark": run_benchmark}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the pipeline on the CPU: no build, small shapes")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "build" / "gpu-check" / "out"),
                        help="where the JSON, the log and built wheels go (default: $OUT, else build/gpu-check/out)")
    parser.add_argument("--wheels", default=str(REPO / "gpu_wheels"),
                        help="wheels and sdists from scripts/gpu_wheels.sh, and wheels built earlier "
                             "(default: gpu_wheels/)")
    parser.add_argument("--work-dir", default=str(REPO / "build" / "gpu-check"),
                        help="the venv, sources, built wheels (reused by a later run) and logs "
                             "(default: build/gpu-check)")
    parser.add_argument("--time-limit", type=float, default=570,
                        help="seconds for the whole run; each stage takes at most what the later ones leave "
                             "(default: 570, for a 600 s command limit)")
    parser.add_argument("--build-limit", type=float, default=330, help="seconds for the build (default: 330)")
    parser.add_argument("--stages", default=",".join(CHECKS), type=lambda text: text.split(","),
                        help=f"the checks to run after the environment and the build, comma-separated (default: "
                             f"{','.join(CHECKS)}; e.g. benchmark alone, to finish one that ran out of time)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare-stems", nargs=3, metavar=("SONG", "STEMS", "REFERENCE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = set(args.stages) - set(CHECKS)
    if unknown:
        raise SystemExit(f"--stages: unknown {', '.join(sorted(unknown))} (choose from {', '.join(CHECKS)})")
    if args.probe:
        print(json.dumps(describe_host()))
        return 0
    if args.compare_stems:
        song, stems, reference = args.compare_stems
        print(json.dumps(compare_stems(Path(song), Path(stems), Path(reference) if reference else None)))
        return 0
    run = Run(args)
    run.log(f"gpu_check ({run.results['mode']}): results in {run.results_path}, log in {run.log_path}")
    if not make_environment(run):
        return 1
    try:
        host = run.results["host"] = probe(run)
    except ProbeError as error:
        run.record("environment", "failed", 0, reason=f"the venv's Python cannot import torch or bsmamba2: {error}")
        return 1
    if run.cuda and not host["gpu"]:
        run.record("device", "failed", 0, reason="torch sees no CUDA device (use --dry-run on a CPU machine)")
        return 1
    run.log(f"{host['gpu'] or 'CPU'}, torch {host['torch']} (CUDA {host['cuda']}), Python {host['python']}")
    some = "" if args.stages == list(CHECKS) else "-" + "-".join(args.stages)
    if run.cuda:
        run.name_results(f"{run.results['date'][:10]}-{gpu_slug(host['gpu'])}{some}.json")
        builds = start_builds(run, host)
        if "tests" in args.stages:              # the cases that need no kernel, while the kernels build
            run_tests(run, "tests", keep=250)   # for the kernel tests, separate and benchmark after the build
        finish_builds(run, host, builds)
        try:
            host = run.results["host"] = probe(run)
        except ProbeError as error:       # e.g. importing a kernel crashed the interpreter
            host["backends_unavailable"].update(cuda=str(error), triton=str(error))
        broken = {name: host["backends_unavailable"][name] for name in ("cuda", "triton")
                  if host["backends_unavailable"][name]}
        if broken and run.results["stages"]["build"]["status"] == "passed":
            run.record("kernels", "failed", 0, reason=f"built and installed, but: {json.dumps(broken)}")
    else:
        run.record("build", "skipped", 0, reason="dry run: no build")
    unavailable = {name: reason for name, reason in host["backends_unavailable"].items() if reason}
    run.log(f"backends that cannot run here: {json.dumps(unavailable)}")
    for name in args.stages:
        CHECKS[name](run)
    run.save()
    run.log(f"{'PASSED' if run.results['passed'] else 'FAILED: ' + ', '.join(run.results['failed_stages'])}; "
            f"{run.results_path}")
    return 0 if run.results["passed"] else 1


def gpu_slug(name: str) -> str:
    """'NVIDIA H200' → 'h200': the name benchmarks/results/<date>-<slug>.json gives the file."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower().replace("nvidia", "")).strip("-")


if __name__ == "__main__":
    sys.exit(main())

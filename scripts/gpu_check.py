"""The CUDA path checked on a real GPU: mamba-ssm and causal-conv1d built from source for the GPU present, every
scan backend against the reference, the network under each backend, a bf16 training step, `bsmamba2 separate
--device cuda` and the scan benchmark. One JSON of results and a log per run; the exit status is 1 on any failure.

    scripts/gpu_check.sh --stages build     # on a CUDA machine, no network: build the kernels (their wheels to --out)
    scripts/gpu_check.sh --stages separate,kernel_tests,benchmark      # then the checks, with the wheels built
    scripts/gpu_check.sh --dry-run          # the same pipeline on the CPU: no build, small shapes (about a minute)

Stages, each bounded in time so that the run ends within --time-limit, and each leaving the checks selected after
it the seconds they need (STAGE_NEEDS):
  environment   always: a virtualenv that sees the running Python's packages (its torch), with the project installed
                in it (editable) and what the project needs beyond those installed from the --wheels folder, offline;
  build         always first, and on CUDA always installs the wheels built earlier for this GPU architecture and
                torch (the local version tag says which): in the work folder, or carried in --wheels whole or in parts
                (as they come back from --out). Only when selected does it build the missing ones, from their sdists
                in --wheels and nothing else running: setup.py's own -gencode list removed so that torch compiles for
                the present GPU only (TORCH_CUDA_ARCH_LIST), *_FORCE_BUILD so that setup.py never looks for a
                prebuilt wheel online, MAX_JOBS = all cores, nvcc's optimizer on all cores, causal-conv1d (the long
                pole) at full priority and mamba-ssm niced; the wheels go to --out, split where too large to come back;
  separate      `bsmamba2 separate --device cuda` on a generated song, its stems against `--device cpu`'s;
  kernel_tests  `pytest -m cuda tests/ops`, the `cuda` and `triton` backends' cases: against `reference` (fp32 and
                bf16, outputs and gradients), the mixer, the conv, the paper network (stems vs the `torch` backend, a
                bf16 training step); Triton compiles and autotunes mamba_ssm's kernels here first (minutes);
  benchmark     `benchmark_mamba_ssm.py --json` on CUDA for every backend but torch+compile (its compiles take
                minutes): mixer, time-path and band-path shapes, and the whole model under each backend;
  tests         the same pytest selection's cases that need no kernel.
The dry run skips the build and kernel_tests, and uses the CPU instances of the model-level and scan tests and the
benchmark's --quick shapes.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
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
# What the GPU machine's $OUT brings back: at most 8 files of at most 16 MiB each (--out-file-mib), 64 MiB together,
# named with letters, digits, '.', '_' and '-' only ('+' is spelt OUT_PLUS); the results JSON and the log keep
# OUT_RESULTS (files, bytes) of that room.
OUT_FILES, OUT_TOTAL, OUT_RESULTS = 8, 64 * MiB, (2, 2 * MiB)
OUT_PLUS = "_plus_"
# a part of a wheel split to come back through $OUT: <wheel's $OUT name>.sha256-<whole wheel's>.part<i>of<n>
WHEEL_PART = re.compile(r"(?P<wheel>.+\.whl)\.sha256-(?P<digest>[0-9a-f]{64})\.part(?P<index>\d+)of(?P<count>\d+)")
# distribution name → (its import and file name, the prefix of its setup.py's environment variables)
KERNEL_PACKAGES = {"causal-conv1d": ("causal_conv1d", "CAUSAL_CONV1D"), "mamba-ssm": ("mamba_ssm", "MAMBA")}
# causal-conv1d's causal_conv1d_bwd.cu, one translation unit, was still compiling after 345 s on the H200 machine's 16
# cores (its three other units had ended): it gets the cores first, the other builds run niced.
LONG_POLE = "causal-conv1d"
SETUP_GENCODE = re.compile(r'cc_flag\.append\("-gencode"\)\s*\n\s*cc_flag\.append\("arch=compute_\w+,code=sm_\w+"\)')
MIN_SEPARATE_SDR_DB = 50.0       # stems from --device cuda against --device cpu's (other scan kernels), float32
BENCHMARK_MAX_ERROR = 1e-2       # the tests hold tight tolerances; this catches a gross error at the larger shapes
# CUDA mode: the paper network on 3 s of audio; the dry run: the model test's small config and length.
TEST_MODEL = {"BSMAMBA2_TEST_MODEL_CONFIG": "bsmamba2_vocals", "BSMAMBA2_TEST_AUDIO_SECONDS": "3"}
# pytest -k: the cases of the `cuda` and `triton` backends (tests/ops/devices.py), the `cuda` ones first: they take
# seconds, the `triton` ones wait for Triton to compile and autotune mamba_ssm's kernels (minutes on a fresh machine)
KERNEL_CASES = ("cuda-", "triton")
PASSING = ("passed", "skipped")  # stage statuses that do not fail the run ("skipped": in the dry run)
# Seconds each check is sure of when selected: the stages before it leave it this much. Measured on the H200: the
# no-kernel tests took 87 s; Triton's first compile of mamba_ssm's kernels passed 79 s before one test had ended.
STAGE_NEEDS = {"separate": 60, "kernel_tests": 180, "benchmark": 60, "tests": 100}
AFTER_BUILD = 30                 # seconds the build leaves for installing, probing and copying the wheels


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
        self.part_size = int(args.out_file_mib * MiB)
        self.log_path = self.out / "gpu-check.log"
        self.log_path.write_text("")
        date = datetime.datetime.now(datetime.timezone.utc)
        self.results = {"date": date.strftime("%Y-%m-%dT%H:%M:%SZ"), "mode": "cuda" if self.cuda else "dry-run",
                        "command": " ".join(["scripts/gpu_check.sh", *sys.argv[1:]]), "passed": None, "stages": {}}
        self.name_results("gpu" if self.cuda else "cpu-dry-run")

    def name_results(self, machine: str) -> None:
        """Where the JSON goes: <date>-<machine>[-<stages>].json, the stages named when not all ran (renamed once the
        GPU is known: benchmarks/results/<date>-h200.json is its home)."""
        stages = "" if self.args.stages == STAGES else "-" + "-".join(self.args.stages)
        previous = getattr(self, "results_path", None)
        self.results_path = self.out / f"{self.results['date'][:10]}-{machine}{stages}.json"
        if previous is not None and previous.exists():
            previous.replace(self.results_path)

    def remaining(self) -> float:
        return self.args.time_limit - (time.monotonic() - self.started)

    def budget(self, stage: str, cap: float) -> float:
        """Seconds a command of `stage` may take: at most `cap`, leaving each check selected after it its
        STAGE_NEEDS (all of them, for the environment, which comes before every stage)."""
        stages = self.args.stages
        later = stages[stages.index(stage) + 1:] if stage in stages else stages
        return min(cap, self.remaining() - sum(STAGE_NEEDS.get(name, 0) for name in later))

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
    """The exit status, or None after stopping the process at `timeout`."""
    try:
        return process.wait(timeout=max(timeout, 1))
    except subprocess.TimeoutExpired:
        return stop(process)


def stop(process: subprocess.Popen, grace: float = 10) -> None:
    """Interrupt the process and its children (its process group), as Ctrl-C would, so that pytest still writes
    its report of the tests it finished; kill them if they have not ended after `grace` seconds."""
    os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


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
    status, _, tail = run.run("environment", command, run.budget("environment", 180))
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
    """Settle each package with a wheel built earlier for this GPU and torch (gather_wheels brings those carried in
    --wheels into the work folder); when `build` is among the stages, start building the others, all at once."""
    start = time.monotonic()
    built = run.work / "wheels"
    built.mkdir(exist_ok=True)
    tag = local_version(host)
    wheels = Path(run.args.wheels).resolve()
    for problem in gather_wheels(wheels, built):
        run.log(f"left out of {wheels}: {problem}")
    builds, results = {}, {}
    for distribution, (name, prefix) in KERNEL_PACKAGES.items():
        earlier = sorted(built.glob(f"{name}-*+{tag}-*.whl"))
        if earlier:
            results[distribution] = {"status": "prebuilt", "wheel": earlier[-1].name}
            continue
        if "build" not in run.args.stages:
            results[distribution] = {"status": "failed", "reason": f"no wheel built earlier for {tag} (in {built} or "
                                                                   f"{wheels}), and `build` is not among --stages"}
            continue
        try:
            source = prepare_source(run, wheels, name)
        except BuildError as error:
            results[distribution] = {"status": "failed", "reason": str(error)}
            continue
        # NINJA_STATUS: each finished unit's time in the log (ninja prints the status when a command ends)
        env = run.env(MAX_JOBS=str(os.cpu_count()), TORCH_CUDA_ARCH_LIST=host["capability"],
                      NVCC_APPEND_FLAGS="--split-compile=0", NINJA_STATUS="[%f/%t after %e s] ",
                      **{f"{prefix}_FORCE_BUILD": "TRUE", f"{prefix}_LOCAL_VERSION": tag})
        log = open(run.work / "logs" / f"build-{name}.txt", "w")
        command = [str(run.python), "-m", "pip", "wheel", "--no-deps", "--no-index", "--no-build-isolation",
                   "--disable-pip-version-check", "-v", "--wheel-dir", str(built), str(source)]
        if distribution != LONG_POLE:
            command = ["nice", "-n", "10", *command]
        run.log(f"building {source.name} for compute capability {host['capability']} (log: {log.name})")
        # its own process group, to be stopped whole; the check's session, where niceness ranks the builds (the
        # kernel's autogroup scheduling would weigh each session alike)
        builds[distribution] = (subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, cwd=source, env=env,
                                                 preexec_fn=os.setpgrp), time.monotonic(), log, source)
    deadline = time.monotonic() + run.budget("build", math.inf) - AFTER_BUILD
    return {"start": start, "deadline": deadline, "processes": builds, "results": results, "built": built}


def finish_builds(run: Run, host: dict, builds: dict) -> None:
    """Wait for the builds until their deadline (each one's time taken as it ends), install what was built or built
    earlier, and copy what was built to --out."""
    results, built, tag, processes = builds["results"], builds["built"], local_version(host), builds["processes"]
    ended = {}
    while len(ended) < len(processes) and time.monotonic() < builds["deadline"]:
        time.sleep(1)
        ended.update({distribution: time.monotonic() for distribution, (process, *_) in processes.items()
                      if distribution not in ended and process.poll() is not None})
    for distribution, (process, began, log, source) in processes.items():
        status = process.returncode if distribution in ended else stop(process)
        seconds = round(ended.get(distribution, time.monotonic()) - began, 1)
        log.close()
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
    send_wheels(run, results, built)
    failed = [d for d, r in results.items() if r["status"] not in ("built", "prebuilt")]
    run.record("build", "failed" if failed else "passed", time.monotonic() - builds["start"], packages=results,
               **({"reason": f"{', '.join(failed)} not built"} if failed else {}))


def send_wheels(run: Run, results: dict, built: Path) -> None:
    """Copy the wheels built here to --out (split_wheel), the long pole's first, while $OUT's room lasts; each
    result lists its files there under "out"."""
    files, size = OUT_RESULTS
    for distribution in sorted(results, key=lambda distribution: distribution != LONG_POLE):
        result = results[distribution]
        if result["status"] != "built":
            continue
        wheel = built / result["wheel"]
        parts = math.ceil(wheel.stat().st_size / run.part_size)
        if files + parts > OUT_FILES or size + wheel.stat().st_size > OUT_TOTAL:
            run.log(f"{wheel.name} ({parts} files) left out of --out: $OUT brings back at most {OUT_FILES} files, "
                    f"{OUT_TOTAL // MiB} MiB")
            result["out"] = []
            continue
        result["out"] = [path.name for path in split_wheel(wheel, run.out, run.part_size)]
        files, size = files + parts, size + wheel.stat().st_size


def split_wheel(wheel: Path, folder: Path, part_size: int) -> list:
    """Copy `wheel` into `folder` under a name $OUT brings back: whole if at most `part_size` bytes, else in numbered
    parts of that size whose names carry the whole wheel's sha256 (WHEEL_PART; gather_wheels joins them)."""
    name = wheel.name.replace("+", OUT_PLUS)
    data = wheel.read_bytes()
    if len(data) <= part_size:
        shutil.copy2(wheel, folder / name)
        return [folder / name]
    digest, count = hashlib.sha256(data).hexdigest(), math.ceil(len(data) / part_size)
    parts = [folder / f"{name}.sha256-{digest}.part{index}of{count}" for index in range(1, count + 1)]
    for index, part in enumerate(parts):
        part.write_bytes(data[index * part_size:(index + 1) * part_size])
    return parts


def gather_wheels(folder: Path, target: Path) -> list:
    """Copy into `target`, under their own names, the wheels in `folder` (and below) as split_wheel left them: whole,
    or in parts, joined and checked against their sha256. Returns what is wrong with the parts left out."""
    for whole in folder.rglob(f"*{OUT_PLUS}*.whl"):
        shutil.copy2(whole, target / whole.name.replace(OUT_PLUS, "+"))
    wheels = {}
    for path in folder.rglob("*.sha256-*"):
        part = WHEEL_PART.fullmatch(path.name)
        if part:
            wheels.setdefault((part["wheel"], part["digest"], int(part["count"])), {})[int(part["index"])] = path
    problems = []
    for (name, digest, count), parts in wheels.items():
        missing = sorted(set(range(1, count + 1)) - set(parts))
        if missing:
            problems.append(f"{name}: part {', '.join(map(str, missing))} of {count} missing")
            continue
        data = b"".join(parts[index].read_bytes() for index in range(1, count + 1))
        if hashlib.sha256(data).hexdigest() != digest:
            problems.append(f"{name}: its {count} parts joined do not have the sha256 their names give")
            continue
        (target / name.replace(OUT_PLUS, "+")).write_bytes(data)
    return problems


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
    """pip install the wheel offline."""
    status, _, tail = run.run(f"install-{distribution}", [run.python, "-m", "pip", "install", "--no-deps", "--no-index",
                                                          "--disable-pip-version-check", wheel], 120)
    if status != 0:
        result.update(status="failed", reason="pip install: " + failure_reason(status, tail))
        return
    result["wheel_mib"] = round(wheel.stat().st_size / MiB, 1)


def failure_reason(status: Optional[int], lines: list, compile_errors: bool = False) -> str:
    if status is None:
        return "stopped at its time limit"
    errors = [line.strip() for line in lines if compile_errors and re.search(r"\berror\b", line)]
    return f"exit {status}: " + " | ".join((errors[:3] or [line.strip() for line in lines[-3:]]))[:1500]


# ---- tests -----------------------------------------------------------------------------------------------------

def run_tests(run: Run, stage: str = "tests") -> None:
    """pytest, its JUnit report read back into the results: each test's outcome and recorded numbers (a run stopped at
    its time limit still reports the tests it finished). On CUDA, stage `kernel_tests` runs the `cuda` and `triton`
    backends' cases (KERNEL_CASES, one pytest run each), `tests` the others."""
    if stage == "kernel_tests" and not run.cuda:
        run.record(stage, "skipped", 0, reason="dry run: no kernels")
        return
    if not run.cuda:
        runs = {stage: ["-m", "not cuda", "tests/ops/test_backends_in_model.py",
                        "tests/ops/test_scan_backends.py::test_backend_matches_reference", "-k", "torch or broken"]}
    elif stage == "kernel_tests":
        runs = {f"{stage}-{case.strip('-')}": ["-m", "cuda", "-k", case, "tests/ops"] for case in KERNEL_CASES}
    else:
        runs = {stage: ["-m", "cuda", "-k", f"not ({' or '.join(KERNEL_CASES)})", "tests/ops"]}
    env = run.env(**TEST_MODEL) if run.cuda else run.env()
    cases, problems, seconds = [], [], 0.0
    for name, selection in runs.items():
        report = run.work / f"{name}.xml"
        report.unlink(missing_ok=True)
        command = [run.python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-o", "junit_family=xunit1",
                   f"--junitxml={report}", *selection]
        status, took, tail = run.run(name, command, run.budget(stage, math.inf), env=env)
        seconds += took
        cases += read_junit(report) if report.exists() else []
        if status != 0:
            problems.append(f"{name}: {failure_reason(status, tail)}")
    counts = {outcome: sum(case["outcome"] == outcome for case in cases) for outcome in ("passed", "failed", "skipped")}
    passed = not problems and counts["passed"] > 0
    reason = "; ".join(problems) if problems else "no test passed"
    run.record(stage, "passed" if passed else "failed", seconds, counts=counts, cases=cases,
               **({} if passed else {"reason": reason}))


def read_junit(path: Path) -> list:
    import xml.etree.ElementTree as ElementTree

    cases = []
    for case in ElementTree.parse(path).iter("testcase"):
        if case.get("name") is None:      # the test running when pytest was interrupted: an empty <testcase>
            continue
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
    """`bsmamba2 separate` (the default model) on a generated song: on the CPU, then on CUDA against it."""
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
        status, seconds, lines = run.run(f"separate-{device}", command, run.budget("separate", 120))
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
        budget = run.budget("benchmark", math.inf)
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

CHECKS = {"separate": run_separate, "kernel_tests": lambda run: run_tests(run, "kernel_tests"),
          "benchmark": run_benchmark, "tests": run_tests}
STAGES = ["build", *CHECKS]      # the default, in this order: first what the H200 runs have not yet passed


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="the pipeline on the CPU: no build, small shapes")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "build" / "gpu-check" / "out"),
                        help="where the JSON, the log and built wheels go (default: $OUT, else build/gpu-check/out)")
    parser.add_argument("--wheels", default=str(REPO / "gpu_wheels"),
                        help="wheels and sdists from scripts/gpu_wheels.sh, and wheels built earlier, whole or in "
                             "parts, as --out received them (default: gpu_wheels/)")
    parser.add_argument("--work-dir", default=str(REPO / "build" / "gpu-check"),
                        help="the venv, sources, built wheels (reused by a later run) and logs "
                             "(default: build/gpu-check)")
    parser.add_argument("--time-limit", type=float, default=570,
                        help="seconds for the whole run; each stage leaves the checks after it the time they "
                             "need (default: 570, for a 600 s command limit)")
    parser.add_argument("--stages", default=list(STAGES), type=lambda text: text.split(","),
                        help=f"the stages after the environment, comma-separated, run in the order given, build "
                             f"first (default: {','.join(STAGES)})")
    parser.add_argument("--out-file-mib", type=float, default=16,
                        help="the largest file --out may hold: a wheel built larger goes there in parts "
                             "(default: 16, what the GPU machine's $OUT brings back)")
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--compare-stems", nargs=3, metavar=("SONG", "STEMS", "REFERENCE"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    unknown = set(args.stages) - set(STAGES)
    if unknown:
        raise SystemExit(f"--stages: unknown {', '.join(sorted(unknown))} (choose from {', '.join(STAGES)})")
    if "build" in args.stages[1:]:
        raise SystemExit("--stages: build comes first (the checks use what it installs)")
    if args.probe:
        print(json.dumps(describe_host()))
        return 0
    if args.compare_stems:
        song, stems, reference = args.compare_stems
        print(json.dumps(compare_stems(Path(song), Path(stems), Path(reference) if reference else None)))
        return 0
    # stop() interrupts commands with SIGINT: started from a shell's background job, this process would otherwise
    # pass on that job's ignored SIGINT to them
    signal.signal(signal.SIGINT, signal.default_int_handler)
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
    if run.cuda:
        run.name_results(gpu_slug(host["gpu"]))
        finish_builds(run, host, start_builds(run, host))
        packages = run.results["stages"]["build"]["packages"].values()
        if any(package["status"] in ("built", "prebuilt") for package in packages):
            try:
                host = run.results["host"] = probe(run)
            except ProbeError as error:   # e.g. importing a kernel crashed the interpreter
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
        if name != "build":
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

"""scripts/gpu_check.sh, the CUDA check: its CPU dry run end to end, a run out of time, the build's preparation of a
kernel sdist and its plumbing with stand-in sdists (the real build needs nvcc and a GPU), and built wheels split to
come back through $OUT and joined again."""
import importlib.util
import hashlib
import io
import json
import math
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_check.sh"


def load_gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def dry_run(tmp_path, *options):
    env = {**os.environ, "PYTHON": sys.executable}
    env.pop("OUT", None)
    done = subprocess.run([str(SCRIPT), "--dry-run", "--out", str(tmp_path / "out"), "--work-dir",
                           str(tmp_path / "work"), "--wheels", str(tmp_path / "no-wheels"), *options],
                          capture_output=True, text=True, env=env, timeout=600)
    results = [path for path in (tmp_path / "out").glob("*.json")]
    assert len(results) == 1, done.stdout + done.stderr
    return done, results[0].name, json.loads(results[0].read_text())


@pytest.mark.slow
def test_dry_run_runs_every_stage_on_the_cpu_and_reports_them(tmp_path):
    done, name, results = dry_run(tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert name.endswith("-cpu-dry-run.json")
    assert results["mode"] == "dry-run" and results["passed"] is True and results["failed_stages"] == []
    assert results["date"].endswith("Z") and results["host"]["torch"] and results["host"]["gpu"] is None
    unavailable = results["host"]["backends_unavailable"]
    assert unavailable["torch"] is None and unavailable["cuda"] == "the tensors are on cpu"
    stages = results["stages"]
    assert list(stages) == ["environment", "build", "separate", "kernel_tests", "benchmark", "tests"]
    assert stages["build"]["status"] == stages["kernel_tests"]["status"] == "skipped"

    cases = {case["test"].split("::", 1)[1]: case for case in stages["tests"]["cases"]}
    assert stages["tests"]["counts"]["failed"] == 0 and stages["tests"]["counts"]["passed"] >= 13
    assert cases["test_stems_agree_with_the_torch_backend[reference-cpu]"]["properties"]["sdr_db"] >= 50
    assert cases["test_a_broken_scan_fails_the_agreement[cpu]"]["properties"]["sdr_db"] < 40
    assert "grad_error" in cases["test_bf16_training_step_agrees_with_the_torch_backend[cuda-cpu]"]["properties"]
    assert all("cpu" in name for name in cases)                               # no CUDA instance is run

    separate = stages["separate"]
    assert separate["stems"] == ["bass", "drums", "other", "vocals"] and separate["devices"]["cpu"]["exit"] == 0
    assert separate["devices"]["cpu"]["scan_backend"].startswith("torch ")
    assert all(facts == {"as_input": True} for facts in separate["devices"]["cpu"]["stems"].values())

    benchmark = stages["benchmark"]
    assert benchmark["median_seconds"]["mixer 2×64 fwdbwd"].keys() == {"reference", "torch"}
    assert benchmark["median_seconds"]["model small (s per audio s)"]["torch"] > 0
    assert any(r.get("unavailable") == "the tensors are on cpu" for r in benchmark["records"] if r["backend"] == "cuda")
    log = (tmp_path / "out" / "gpu-check.log").read_text()
    assert "PASSED" in log and "bsmamba2 separate" in log


def test_a_build_only_dry_run_makes_the_environment_and_names_its_stages(tmp_path):
    done, name, results = dry_run(tmp_path, "--stages", "build")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert name.endswith("-cpu-dry-run-build.json") and results["passed"] is True
    assert list(results["stages"]) == ["environment", "build"]


def test_stages_are_known_and_the_build_comes_first():
    gpu_check = load_gpu_check()
    with pytest.raises(SystemExit, match="unknown bench"):
        gpu_check.main(["--dry-run", "--stages", "separate,bench"])
    with pytest.raises(SystemExit, match="build comes first"):
        gpu_check.main(["--dry-run", "--stages", "separate,build"])


def test_a_command_past_its_time_is_stopped_and_stages_out_of_time_fail(tmp_path):
    gpu_check = load_gpu_check()
    run = gpu_check.Run(gpu_check.parse_args(["--dry-run", "--out", str(tmp_path / "out"), "--work-dir",
                                              str(tmp_path / "work"), "--time-limit", "20"]))
    sleeper = [sys.executable, "-c", "import time; print('started', flush=True); time.sleep(60)"]
    status, seconds, lines = run.run("sleeper", sleeper, timeout=1)
    assert status is None and seconds < 10 and lines[0] == "started"
    assert gpu_check.failure_reason(status, lines) == "stopped at its time limit"
    gpu_check.run_benchmark(run)                       # 20 s left, less than the 30 s a benchmark run needs
    results = json.loads(run.results_path.read_text())
    assert results["passed"] is False and results["failed_stages"] == ["benchmark"]
    assert results["stages"]["benchmark"]["runs"] == [{"group": "mixer", "status": "skipped: out of time"}]
    assert "mixer: not run, out of time" in results["stages"]["benchmark"]["reason"]


def test_pytest_stopped_at_its_time_limit_still_reports_the_tests_it_finished(tmp_path):
    gpu_check = load_gpu_check()
    run = gpu_check.Run(gpu_check.parse_args(["--dry-run", "--out", str(tmp_path / "out"), "--work-dir",
                                              str(tmp_path / "work")]))
    tests = tmp_path / "test_timed.py"
    tests.write_text("import time\n\ndef test_quick():\n    pass\n\ndef test_long():\n    time.sleep(120)\n")
    report = tmp_path / "report.xml"
    status, seconds, _ = run.run("timed", [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                                           f"--junitxml={report}", tests], timeout=20)
    assert status is None and seconds < 35
    assert [(case["test"].split("::")[-1], case["outcome"]) for case in gpu_check.read_junit(report)] == \
        [("test_quick", "passed")]


SETUP_PY = '''cc_flag = []
if not SKIP_CUDA_BUILD:
    cc_flag.append("-gencode")
    cc_flag.append("arch=compute_75,code=sm_75")
    if bare_metal_version >= Version("11.8"):
        cc_flag.append("-gencode")
        cc_flag.append("arch=compute_90,code=sm_90")
print(cc_flag)
'''


def write_sdist(folder: Path, name: str, setup: str) -> None:
    folder.mkdir(exist_ok=True)
    with tarfile.open(folder / f"{name}.tar.gz", "w:gz") as archive:
        data = setup.encode()
        member = tarfile.TarInfo(f"{name}/setup.py")
        member.size = len(data)
        archive.addfile(member, io.BytesIO(data))


def test_the_sdist_setup_is_restricted_to_the_present_gpu(tmp_path):
    gpu_check = load_gpu_check()
    run = gpu_check.Run(gpu_check.parse_args(["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "w")]))
    write_sdist(tmp_path / "wheels", "mamba_ssm-2.3.2", SETUP_PY)
    write_sdist(tmp_path / "wheels", "mamba_ssm-2.10.0", SETUP_PY)              # the newest version is built
    source = gpu_check.prepare_source(run, tmp_path / "wheels", "mamba_ssm")
    assert source.name == "mamba_ssm-2.10.0"
    patched = (source / "setup.py").read_text()
    assert "code=sm_" not in patched and "-gencode" not in patched
    namespace = {"SKIP_CUDA_BUILD": False, "bare_metal_version": 12, "Version": lambda text: 11}
    exec(compile(patched, "setup.py", "exec"), namespace)                        # still valid Python: the ifs hold
    assert namespace["cc_flag"] == []

    write_sdist(tmp_path / "wheels", "causal_conv1d-1.7.0", "cc_flag = ['-gencode', 'arch=compute_90,code=sm_90']\n")
    with pytest.raises(gpu_check.BuildError, match="no -gencode flags where expected"):
        gpu_check.prepare_source(run, tmp_path / "wheels", "causal_conv1d")
    with pytest.raises(gpu_check.BuildError, match="no missing_pkg-"):
        gpu_check.prepare_source(run, tmp_path / "wheels", "missing_pkg")


def test_names_from_the_gpu_and_torch():
    gpu_check = load_gpu_check()
    assert gpu_check.gpu_slug("NVIDIA H200") == "h200"
    assert gpu_check.gpu_slug("NVIDIA GeForce RTX 4090") == "geforce-rtx-4090"
    assert gpu_check.local_version({"capability": "9.0", "torch": "2.11.0+cu130"}) == "sm90.torch2.11.0.cu130"


FAKE_KERNEL_SETUP = '''import os
from setuptools import setup
cc_flag = []
cc_flag.append("-gencode")
cc_flag.append("arch=compute_75,code=sm_75")
assert cc_flag == [] and os.environ["TORCH_CUDA_ARCH_LIST"] == "9.0" and os.environ["MAX_JOBS"]
assert os.environ["NVCC_APPEND_FLAGS"] == "--split-compile=0" and "%e" in os.environ["NINJA_STATUS"]
prefix = "PREFIX"
assert os.environ[prefix + "_FORCE_BUILD"] == "TRUE"
open("NAME.py", "w").write(f"BUILT_FOR, NICENESS, SESSION = {os.environ[prefix + '_LOCAL_VERSION']!r}, "
                           f"{os.nice(0)}, {os.getsid(0)}\\n")
setup(name="NAME", version="1.0+" + os.environ[prefix + "_LOCAL_VERSION"], py_modules=["NAME"])
'''


@pytest.mark.slow
def test_build_stage_builds_installs_and_reuses_wheels(tmp_path):
    """The build's plumbing, with stand-in sdists whose setup.py checks what it is given (the real ones need nvcc
    and a CUDA torch): built in parallel, the long pole at full priority and the other niced, tagged with the GPU
    and torch, installed, copied in parts to --out under names $OUT brings back, and found again by a later run
    from those parts, or from the work folder; without the parts and without `build`, the packages fail."""
    gpu_check = load_gpu_check()
    wheels = tmp_path / "wheels"
    for name, prefix in gpu_check.KERNEL_PACKAGES.values():
        write_sdist(wheels, f"{name}-1.0", FAKE_KERNEL_SETUP.replace("NAME", name).replace("PREFIX", prefix))
    options = ["--out", str(tmp_path / "out"), "--work-dir", str(tmp_path / "work"), "--wheels", str(wheels),
               "--stages", "build", "--out-file-mib", str(1024 / gpu_check.MiB)]
    run = gpu_check.Run(gpu_check.parse_args(options))
    assert gpu_check.make_environment(run)
    host = {"capability": "9.0", "torch": "2.11.0+cu130"}
    gpu_check.finish_builds(run, host, gpu_check.start_builds(run, host))
    build = run.results["stages"]["build"]
    assert build["status"] == "passed", build
    niceness = {}
    for distribution, (name, _) in gpu_check.KERNEL_PACKAGES.items():
        result = build["packages"][distribution]
        assert result["status"] == "built" and result["wheel"].startswith(f"{name}-1.0+sm90.torch2.11.0.cu130-")
        size = (run.work / "wheels" / result["wheel"]).stat().st_size
        assert len(result["out"]) == math.ceil(size / 1024) >= 2                    # a wheel larger than a part
        assert all((tmp_path / "out" / part).stat().st_size <= 1024 for part in result["out"])
        module = f"import {name}; print({name}.BUILT_FOR, {name}.NICENESS, {name}.SESSION)"
        built_for, niceness[distribution], session = subprocess.run(
            [str(run.python), "-c", module], capture_output=True, text=True, cwd=tmp_path).stdout.split()
        assert built_for == "sm90.torch2.11.0.cu130" and int(session) == os.getsid(0)
    assert int(niceness["mamba-ssm"]) > int(niceness[gpu_check.LONG_POLE])

    # a later run on a fresh machine: the parts brought back from $OUT, carried in the wheels folder
    for part in (tmp_path / "out").glob("*.part*"):
        part.rename(wheels / part.name)
    options[3], options[7] = str(tmp_path / "fresh-work"), "separate"
    run = gpu_check.Run(gpu_check.parse_args(options))
    assert gpu_check.make_environment(run)
    gpu_check.finish_builds(run, host, gpu_check.start_builds(run, host))
    packages = run.results["stages"]["build"]["packages"]
    assert {result["status"] for result in packages.values()} == {"prebuilt"}

    # the same machine, nothing carried: the wheels in the work folder; another machine: nothing to install
    for part in wheels.glob("*.part*"):
        part.unlink()
    for work, status in (("fresh-work", "prebuilt"), ("bare-work", "failed")):
        options[3] = str(tmp_path / work)
        run = gpu_check.Run(gpu_check.parse_args(options))
        gpu_check.finish_builds(run, host, gpu_check.start_builds(run, host))
        packages = run.results["stages"]["build"]["packages"]
        assert {result["status"] for result in packages.values()} == {status}
    assert "`build` is not among --stages" in packages["mamba-ssm"]["reason"]


def test_wheels_split_into_parts_come_back_whole_and_checked(tmp_path):
    gpu_check = load_gpu_check()
    built, out, target = tmp_path / "built", tmp_path / "out", tmp_path / "target"
    for folder in (built, out, target):
        folder.mkdir()
    large = built / "mamba_ssm-2.3.2+sm90.torch2.11.0.cu130-cp312-cp312-linux_x86_64.whl"
    large.write_bytes(os.urandom(2500))
    small = built / "causal_conv1d-1.7.0+sm90.torch2.11.0.cu130-cp312-cp312-linux_x86_64.whl"
    small.write_bytes(os.urandom(900))
    parts = gpu_check.split_wheel(large, out, part_size=1000)
    assert [part.stat().st_size for part in parts] == [1000, 1000, 500]
    digest = hashlib.sha256(large.read_bytes()).hexdigest()
    assert parts[0].name == f"{large.name.replace('+', '_plus_')}.sha256-{digest}.part1of3"
    whole = gpu_check.split_wheel(small, out, part_size=1000)
    assert [path.name for path in whole] == [small.name.replace("+", "_plus_")]
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", path.name) for path in out.iterdir())   # what $OUT brings back

    assert gpu_check.gather_wheels(out, target) == []
    assert sorted(path.name for path in target.iterdir()) == sorted([large.name, small.name])
    assert (target / large.name).read_bytes() == large.read_bytes()

    for path in target.iterdir():
        path.unlink()
    parts[1].write_bytes(b"x" + parts[1].read_bytes()[1:])              # a part altered on the way
    assert gpu_check.gather_wheels(out, target) == [
        f"{parts[0].name.split('.sha256-')[0]}: its 3 parts joined do not have the sha256 their names give"]
    parts[2].unlink()                                                   # a part that did not come back
    assert gpu_check.gather_wheels(out, target) == [f"{parts[0].name.split('.sha256-')[0]}: part 3 of 3 missing"]
    assert [path.name for path in target.iterdir()] == [small.name]

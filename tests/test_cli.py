"""The `bsmamba2` command's front door: help answers without loading torch, and no command module needs the CLI."""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import bsmamba2
from bsmamba2.cli import COMMANDS, main


@pytest.mark.parametrize("command", [[], *([name] for name in COMMANDS)])
def test_help_does_not_import_torch(command):
    code = ("import sys\n"
            "from bsmamba2.cli import main\n"
            "try:\n"
            f"    main({command + ['--help']!r})\n"
            "except SystemExit as done:\n"
            "    assert done.code == 0, done.code\n"
            "loaded = sorted(name for name in sys.modules if name == 'torch' or name.startswith('torch.'))\n"
            "assert not loaded, loaded[:5]\n"
            "print('ok')\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rstrip().endswith("ok") and "usage: bsmamba2" in done.stdout


def test_version():
    done = subprocess.run([sys.executable, "-m", "bsmamba2", "--version"], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, f"bsmamba2 {bsmamba2.__version__}\n")


def test_openmp_threads_sleep_unless_told_otherwise():
    """Set by the command before torch loads; a value the user set is kept."""
    code = "import os, bsmamba2.cli; print(os.environ['OMP_WAIT_POLICY'])"
    for environment, expected in (({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")):
        env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env={**env, **environment})
        assert done.stdout.strip() == expected, done.stderr


def test_no_module_imports_the_cli():
    """No cycle: the CLI imports the command modules, never the other way round (not even inside a function)."""
    package = Path(bsmamba2.__file__).parent
    for path in package.rglob("*.py"):
        module = ".".join(("bsmamba2", *path.relative_to(package).with_suffix("").parts))
        if module in ("bsmamba2.cli", "bsmamba2.__main__"):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                base = module.split(".")[:len(module.split(".")) - node.level] if node.level else []
                names = [".".join(base + ([node.module] if node.module else []) + [alias.name])
                         for alias in node.names] + [".".join(base + [node.module or ""])]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            else:
                continue
            assert "bsmamba2.cli" not in names, f"{module} imports bsmamba2.cli"


@pytest.mark.parametrize("command", ["separate", "evaluate"])
def test_model_and_checkpoint_exclude_each_other(command, capsys):
    with pytest.raises(SystemExit) as done:
        main([command, "--model", "a", "--checkpoint", "b.ckpt"])
    assert done.value.code == 2 and "not allowed with argument" in capsys.readouterr().err

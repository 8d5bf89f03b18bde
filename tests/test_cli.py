"""The `bsmamba2` command's front door: help answers without loading torch, and no command module needs the CLI."""
import os
import subprocess
import sys

import pytest

from bsmamba2.cli import COMMANDS


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


def test_openmp_threads_sleep_unless_told_otherwise():
    """Set by the command before torch loads; a value the user set is kept."""
    code = "import os, bsmamba2.cli; print(os.environ['OMP_WAIT_POLICY'])"
    for environment, expected in (({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "ACTIVE"}, "ACTIVE")):
        env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                              env={**env, **environment})
        assert done.stdout.strip() == expected, done.stderr


def test_command_modules_do_not_import_the_cli():
    """No cycle: the CLI imports the command modules, never the other way round."""
    code = ("import importlib, sys\n"
            f"for module in {[module for module, _ in COMMANDS.values()]!r}:\n"
            "    importlib.import_module(module)\n"
            "assert 'bsmamba2.cli' not in sys.modules\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr

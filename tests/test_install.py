"""make install: which Python builds the venv (scripts/find-python.sh) and which torch build it gets.

Fake interpreters stand in for python3.11/3.12/3 so that every case (3.13 on PATH, a broken pyenv shim,
a Python without ensurepip) runs here, offline, in milliseconds; the Makefile is driven for real with a
fake Python whose venv records each pip command instead of running it.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "find-python.sh"
BASH = shutil.which("bash") or "/bin/bash"
# Variables an outer `make test TORCH=cpu` or a developer's shell would pass down to the make under test.
MAKE_ENV_NOISE = ("MAKEFLAGS", "MFLAGS", "MAKELEVEL", "MAKEOVERRIDES", "PYTHON", "TORCH", "VENV", "TORCH_CPU_INDEX")


def _fake_python(bindir: Path, name: str, answer: str | None, log: Path | None = None) -> Path:
    """A `name` on PATH that answers the version probe with `answer` ("3.13 venv"); None = exits 127
    like a pyenv shim of an unselected version. With `log`, `-m venv DIR` makes DIR/bin/python, a fake
    that appends each command line it gets to `log` (so the Makefile's pip commands can be read back)."""
    bindir.mkdir(parents=True, exist_ok=True)
    path = bindir / name
    if answer is None:
        body = "exit 127\n"
    else:
        venv = ""
        if log is not None:
            venv = (
                'if [ "$1" = -m ] && [ "$2" = venv ]; then\n'
                '  mkdir -p "$3/bin"\n'
                f"  printf '#!/bin/sh\\necho \"$*\" >> {log}\\n' > \"$3/bin/python\"\n"
                '  chmod +x "$3/bin/python"\n'
                f'  echo "venv $3" >> {log}\n'
                "  exit 0\n"
                "fi\n"
            )
        body = venv + f'[ "$1" = -c ] && echo "{answer}" && exit 0\nexit 2\n'
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _find_python(path: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BASH, str(SCRIPT), *args], env={"PATH": path}, capture_output=True, text=True,
                          timeout=30)


def test_python_3_13_as_python3_is_refused_with_what_to_install_and_how_to_pass_it(tmp_path: Path) -> None:
    fake = _fake_python(tmp_path, "python3", "3.13 venv")
    _fake_python(tmp_path, "python3.12", None)  # a pyenv shim for a version that is not selected
    proc = _find_python(str(tmp_path))
    assert proc.returncode == 1 and proc.stdout == ""
    assert "needs Python 3.11 or 3.12" in proc.stderr
    assert "python3.11: not found" in proc.stderr
    assert f"python3.12 ({tmp_path / 'python3.12'}) did not run (exit 127)" in proc.stderr
    assert f"python3 ({fake}) is Python 3.13" in proc.stderr
    assert "make PYTHON=/path/to/python3.11 install" in proc.stderr


def test_the_first_supported_python_on_path_is_picked(tmp_path: Path) -> None:
    _fake_python(tmp_path, "python3.12", None)
    good = _fake_python(tmp_path, "python3", "3.12 venv")
    assert _find_python(str(tmp_path)).stdout == f"{good}\n"
    first = _fake_python(tmp_path, "python3.11", "3.11 venv")  # python3.11 comes before python3
    assert _find_python(str(tmp_path)).stdout == f"{first}\n"


def test_an_explicit_python_is_checked_and_never_silently_replaced(tmp_path: Path) -> None:
    _fake_python(tmp_path, "python3.11", "3.11 venv")
    wrong = _fake_python(tmp_path / "other", "python3.13", "3.13 venv")
    proc = _find_python(str(tmp_path), str(wrong))
    assert proc.returncode == 1
    assert f"PYTHON={wrong} cannot build the venv" in proc.stderr and "is Python 3.13" in proc.stderr
    good = _find_python(str(tmp_path), str(tmp_path / "python3.11"))
    assert good.returncode == 0 and good.stdout == f"{tmp_path / 'python3.11'}\n"


def test_a_python_without_ensurepip_names_the_debian_package(tmp_path: Path) -> None:
    _fake_python(tmp_path, "python3.11", "3.11 noensurepip")
    proc = _find_python(str(tmp_path))
    assert proc.returncode == 1
    assert "cannot create a venv" in proc.stderr and "apt install python3.11-venv" in proc.stderr


def test_the_probe_works_on_a_real_interpreter() -> None:
    # The fakes answer the probe blindly; this one runs the probe's Python code for real.
    proc = _find_python(os.environ.get("PATH", ""), sys.executable)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == f"{sys.executable}\n"


def test_the_supported_versions_are_those_pyproject_requires() -> None:
    supported = re.search(r'^SUPPORTED="([^"]*)"', SCRIPT.read_text(), re.M).group(1).split()
    requires = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["requires-python"]
    spec = SpecifierSet(requires)
    assert supported == [f"3.{m}" for m in range(8, 20) if f"3.{m}" in spec]
    assert requires in SCRIPT.read_text()  # the message quotes it


def _make(tmp_path: Path, bindir: Path, *args: str, **exported: str) -> subprocess.CompletedProcess[str]:
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    env = {k: v for k, v in os.environ.items() if k not in MAKE_ENV_NOISE}
    env["PATH"] = f"{bindir}{os.pathsep}{env.get('PATH', '')}"  # the fakes shadow the real pythons
    env.update(exported)
    return subprocess.run(["make", "-C", str(REPO), "--no-print-directory", *args], env=env,
                          capture_output=True, text=True, timeout=60)


def test_make_install_stops_before_creating_anything_when_python3_is_3_13(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    for name in ("python3.11", "python3.12"):
        _fake_python(bindir, name, None)
    _fake_python(bindir, "python3", "3.13 venv")
    venv = tmp_path / "venv"
    proc = _make(tmp_path, bindir, "install", f"VENV={venv}")
    assert proc.returncode != 0
    assert "is Python 3.13" in proc.stderr
    assert "make PYTHON=/path/to/python3.11 install" in proc.stderr
    assert not venv.exists()


def _pip_commands(log: Path) -> list[str]:
    return [line for line in log.read_text().splitlines() if not line.startswith("venv ")]


def _torch_pin() -> str:
    return re.search(r"^torch==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)


def test_make_install_torch_cpu_takes_torch_alone_from_pytorchs_cpu_index(tmp_path: Path) -> None:
    bindir, log, venv = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "venv"
    _fake_python(bindir, "python3.11", "3.11 venv", log)
    proc = _make(tmp_path, bindir, "install", f"VENV={venv}", "TORCH=cpu")
    assert proc.returncode == 0, proc.stderr
    assert log.read_text().splitlines()[0] == f"venv {venv}"  # the venv is made by the Python found
    upgrade, torch, rest = _pip_commands(log)
    assert "--upgrade pip==" in upgrade
    assert torch.split() == ["-m", "pip", "install", "-q", "--disable-pip-version-check", "--no-deps",
                             "--index-url", "https://download.pytorch.org/whl/cpu", f"torch=={_torch_pin()}+cpu"]
    assert "-c constraints.txt -e .[dev]" in rest and "--index-url" not in rest  # the rest: PyPI only
    assert "CPU-only" in proc.stdout


def test_make_install_default_takes_pypis_torch_and_says_what_that_is(tmp_path: Path) -> None:
    bindir, log, venv = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "venv"
    _fake_python(bindir, "python3.11", "3.11 venv", log)
    proc = _make(tmp_path, bindir, "install", f"VENV={venv}")
    assert proc.returncode == 0, proc.stderr
    commands = _pip_commands(log)
    assert len(commands) == 2 and not any("torch==" in c or "--index-url" in c for c in commands)
    if sys.platform.startswith("linux"):
        assert "CUDA 13 build" in proc.stdout and "make install TORCH=cpu" in proc.stdout


def _built_venv(venv: Path, torch_dist: str) -> None:
    """A venv as a previous make install left it: a torch dist-info and an up-to-date stamp."""
    (venv / "lib" / "python3.11" / "site-packages" / torch_dist).mkdir(parents=True)
    (venv / "keep-me").write_text("")
    (venv / ".installed").write_text("")


def test_torch_cpu_rebuilds_a_venv_that_holds_the_cuda_build(tmp_path: Path) -> None:
    bindir, log, venv = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "venv"
    _fake_python(bindir, "python3.11", "3.11 venv", log)
    _built_venv(venv, f"torch-{_torch_pin()}.dist-info")
    proc = _make(tmp_path, bindir, "install", f"VENV={venv}", "TORCH=cpu")
    assert proc.returncode == 0, proc.stderr
    assert not (venv / "keep-me").exists()  # rebuilt from scratch: no CUDA packages left behind
    assert any("--index-url https://download.pytorch.org/whl/cpu" in c for c in _pip_commands(log))


def test_a_cpu_venv_is_kept_by_torch_cpu_and_by_a_later_plain_make(tmp_path: Path) -> None:
    bindir, log, venv = tmp_path / "bin", tmp_path / "calls.log", tmp_path / "venv"
    _fake_python(bindir, "python3.11", "3.11 venv", log)
    _built_venv(venv, f"torch-{_torch_pin()}+cpu.dist-info")
    up_to_date = _make(tmp_path, bindir, "install", f"VENV={venv}", "TORCH=cpu")
    assert up_to_date.returncode == 0 and not log.exists()  # nothing to do
    # pyproject.toml changed since: the default recipe runs, in place, and keeps the +cpu torch
    os.utime(venv / ".installed", (0, 0))
    proc = _make(tmp_path, bindir, "install", f"VENV={venv}")
    assert proc.returncode == 0, proc.stderr
    assert (venv / "keep-me").exists()
    assert f"keeping the torch {_torch_pin()}+cpu" in proc.stdout


def test_an_unknown_torch_choice_is_refused_naming_the_choices(tmp_path: Path) -> None:
    proc = _make(tmp_path, tmp_path, "install", f"VENV={tmp_path / 'venv'}", "TORCH=cuda")
    assert proc.returncode != 0
    assert "TORCH=cuda: use TORCH=cpu" in proc.stderr


def test_an_exported_python_is_named_as_coming_from_the_environment(tmp_path: Path) -> None:
    # A PYTHON exported for some other tool is easy to forget: the refusal says where it came from.
    bindir = tmp_path / "bin"
    wrong = _fake_python(bindir, "python3.13", "3.13 venv")
    proc = _make(tmp_path, bindir, "install", f"VENV={tmp_path / 'venv'}", PYTHON=str(wrong))
    assert proc.returncode != 0
    assert f"PYTHON={wrong} (exported in your environment) cannot build the venv" in proc.stderr

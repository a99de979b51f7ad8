"""Pins stay in one agreement: pyproject.toml, constraints.txt and the Azure training conda.yml."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

import yaml
from packaging.specifiers import SpecifierSet
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        m = re.fullmatch(r"\s*([A-Za-z0-9_.\-]+)==([^\s;#]+)\s*", line)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    return pins


def _pyproject_pins() -> dict[str, str]:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = data["project"]["dependencies"] + data["project"]["optional-dependencies"]["dev"]
    return _pins(deps)


def test_every_direct_dependency_is_pinned() -> None:
    data = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = data["project"]["dependencies"] + data["project"]["optional-dependencies"]["dev"]
    unpinned = [d for d in deps if "==" not in d]
    assert unpinned == [], f"pin these in pyproject.toml: {unpinned}"


def test_the_torch_pin_admits_the_cpu_only_build_and_constraints_hold_no_cuda_packages() -> None:
    # What this shows: `make install TORCH=cpu` (torch==X+cpu from PyTorch's CPU index) and the
    # default PyPI build (CUDA on Linux) both satisfy every torch pin, and the pinned set is the CPU
    # one. What it cannot show: which build a venv got; a plain PyPI install still brings CUDA.
    conda = yaml.safe_load((REPO / "conda.yml").read_text())
    conda_pip = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d)
    constraints = (REPO / "constraints.txt").read_text().splitlines()
    pins = {
        "pyproject.toml": _pyproject_pins()["torch"],
        "constraints.txt": _pins(constraints)["torch"],
        "conda.yml": _pins(conda_pip)["torch"],
    }
    for where, pin in pins.items():
        version = Version(pin)
        # A local label (+cpu, +cu130) in a pin would refuse every other build of the same release.
        assert version.local is None, f"{where} pins torch=={pin}: drop the +{version.local}"
        spec = SpecifierSet(f"=={pin}")
        assert spec.contains(f"{version.public}+cpu") and spec.contains(f"{version.public}+cu130")
    assert len(set(pins.values())) == 1, pins
    # constraints.txt is meant to be `make constraints` run in a TORCH=cpu venv. Constraints never add
    # packages, so CUDA wheels here would not install anything: they would show the file was frozen
    # from a CUDA venv instead, whose transitive set is not the one CPU installs resolve.
    cuda = sorted(n for n in _pins(constraints) if re.match(r"(nvidia-|cuda-|triton$|pytorch-triton)", n))
    assert cuda == [], f"constraints.txt pins CUDA-only packages: {cuda} (rerun `make constraints` from a TORCH=cpu venv)"


def test_conda_yml_mirrors_pyproject_pins() -> None:
    conda = yaml.safe_load((REPO / "conda.yml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict) and "pip" in d)
    assert "python=3.11" in conda["dependencies"]
    conda_pins = _pins(pip_section)
    assert len(conda_pins) == len(pip_section), "every pip package in conda.yml must be pinned with =="
    ours = _pyproject_pins()
    drift = {n: (v, ours.get(n)) for n, v in conda_pins.items() if ours.get(n) != v}
    assert drift == {}, f"conda.yml disagrees with pyproject.toml (conda, pyproject): {drift}"
    for needed in ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "mlflow", "azureml-mlflow"):
        assert needed in conda_pins, f"conda.yml lacks {needed}"


def test_constraints_agree_with_pyproject() -> None:
    constraints = _pins((REPO / "constraints.txt").read_text().splitlines())
    drift = {n: (v, constraints.get(n)) for n, v in _pyproject_pins().items() if constraints.get(n) != v}
    assert drift == {}, f"constraints.txt disagrees with pyproject.toml (pyproject, constraints): {drift}"
    # promptflow 1.18.x needs opentelemetry-sdk < 1.39 (LogData); see known traps in the README.
    major, minor = map(int, constraints["opentelemetry-sdk"].split(".")[:2])
    assert (major, minor) < (1, 39)

"""The Modal image's lock (infra/modal/): it resolves for the container, and the image installs exactly it."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

import httpx
import pytest
from packaging.requirements import Requirement
from packaging.utils import NormalizedName, canonicalize_name
from packaging.version import Version
from uv import find_uv_bin

from tests.modal_image import image_context_files, image_env, image_layers

ROOT = Path(__file__).resolve().parent.parent
LOCK = ROOT / "infra" / "modal" / "requirements.txt"
TOP_LEVEL = ROOT / "infra" / "modal" / "requirements.in"
INDEX = "https://pypi.org/simple"
# The container: Modal's debian_slim(python_version="3.11"), CPython 3.11 on glibc >= 2.28, x86_64.
CONTAINER = ["--python-version", "3.11", "--python-platform", "x86_64-manylinux_2_28"]

UvRunner = Callable[..., subprocess.CompletedProcess[str]]


@dataclass(frozen=True)
class Locked:
    version: Version
    hashes: frozenset[str]


def read_lock(text: str) -> dict[NormalizedName, Locked]:
    """Package -> locked version and hashes, from a ``uv pip compile --generate-hashes`` file."""
    entries = {}
    for line in text.replace("\\\n", " ").splitlines():
        line = line.split("#", 1)[0].strip()  # comments start with "#"; hashes are written "sha256:..."
        if not line or line.startswith("-"):  # blank, or an option such as --index-url
            continue
        spec, *options = line.split()
        requirement = Requirement(spec)
        (pin,) = requirement.specifier
        assert pin.operator == "==", f"not an exact pin: {line}"
        entries[canonicalize_name(requirement.name)] = Locked(Version(pin.version), frozenset(options))
    return entries


def top_level() -> list[Requirement]:
    """The requirements of requirements.in."""
    lines = (line.split("#", 1)[0].strip() for line in TOP_LEVEL.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


@pytest.fixture(scope="module")
def uv() -> UvRunner:
    """``uv pip <args>`` for the container against PyPI, blind to this machine's pip and uv settings."""
    try:
        httpx.head(f"{INDEX}/pip/", timeout=10).raise_for_status()
    except httpx.HTTPError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{INDEX} cannot be reached ({exc!r}); set CI=1 to make this a failure")
    env = {key: value for key, value in os.environ.items() if not key.startswith(("PIP_", "UV_"))}
    if "UV_CACHE_DIR" in os.environ:
        env["UV_CACHE_DIR"] = os.environ["UV_CACHE_DIR"]

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        command = [find_uv_bin(), "pip", *args, "--no-config", "--index-url", INDEX, *CONTAINER]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)

    return run


def test_lock_resolves_for_the_container(uv: UvRunner, tmp_path: Path) -> None:
    # A dry run reads only the wheels' metadata (PEP 658 files or HTTP range requests): no multi-GB CUDA wheels
    # are downloaded. --require-hashes fails on any package, direct or not, that the lock does not pin with hashes.
    result = uv(
        "install",
        "--dry-run",
        "--require-hashes",
        "--only-binary",
        ":all:",  # wheels only: building the image compiles nothing
        "--python",
        sys.executable,  # any interpreter: --python-version and --python-platform say what to resolve for
        "--target",
        str(tmp_path / "site-packages"),
        "--requirements",
        str(LOCK),
    )
    assert result.returncode == 0, result.stderr
    would_install = re.findall(r"^ \+ (\S+)==(\S+)$", result.stderr, re.MULTILINE)  # uv reports on stderr
    locked = read_lock(LOCK.read_text())
    assert {canonicalize_name(n): Version(v) for n, v in would_install} == {n: e.version for n, e in locked.items()}


def test_lock_is_compiled_from_requirements_in(uv: UvRunner, tmp_path: Path) -> None:
    """Recompiling requirements.in within the locked versions gives the same packages, and the index's hashes."""
    locked = read_lock(LOCK.read_text())
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("".join(f"{name}=={entry.version}\n" for name, entry in locked.items()))
    recompiled_path = tmp_path / "requirements.txt"
    result = uv("compile", str(TOP_LEVEL), "--generate-hashes", "-c", str(constraints), "-o", str(recompiled_path))
    assert result.returncode == 0, result.stderr
    recompiled = read_lock(recompiled_path.read_text())
    assert {name: entry.version for name, entry in recompiled.items()} == {n: e.version for n, e in locked.items()}
    for name, entry in locked.items():
        # A subset, not equality: a wheel uploaded later for the same version adds a hash without breaking ours.
        assert entry.hashes <= recompiled[name].hashes, f"{name}: a hash the index does not list"


def test_lock_agrees_with_the_project_pins() -> None:
    locked = read_lock(LOCK.read_text())
    assert all(entry.hashes and all(h.startswith("--hash=sha256:") for h in entry.hashes) for entry in locked.values())

    for requirement in top_level():
        assert len(requirement.specifier) == 1 and next(iter(requirement.specifier)).operator == "=="
        assert requirement.specifier.contains(locked[canonicalize_name(requirement.name)].version)

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    declared = [Requirement(r) for r in [*project["dependencies"], *extras["inference"], *extras["modal"]]]
    shared = [r for r in declared if canonicalize_name(r.name) in locked]
    assert {canonicalize_name(r.name) for r in shared} >= {"torch", "diffusers", "transformers", "huggingface-hub"}
    for requirement in shared:
        version = locked[canonicalize_name(requirement.name)].version
        assert requirement.specifier.contains(version, prereleases=True), f"{requirement} does not allow {version}"

    # The README's set-up commands install the torch the CPU tests run; the image must deploy that same torch.
    readme_torch = set(re.findall(r"pip install[^\n]*?\btorch==(\S+)", (ROOT / "README.md").read_text()))
    assert len(readme_torch) == 1, readme_torch
    assert locked[canonicalize_name("torch")].version == Version(readme_torch.pop())

    # hf_transfer is gone from huggingface-hub 1.x (hf-xet took over): nothing may still ask for it.
    assert not any(re.fullmatch(r"hf[-_.]transfer", name) for name in locked)
    assert not any(re.fullmatch(r"hf[-_.]transfer", extra) for r in top_level() for extra in r.extras)


@pytest.fixture
def modal_app() -> Iterator[ModuleType]:
    sys.modules.pop("modal_app", None)
    yield importlib.import_module("modal_app")
    sys.modules.pop("modal_app", None)


def test_image_installs_the_lock(modal_app: ModuleType) -> None:
    (lock_in_context,) = [c for c, local in image_context_files(modal_app.image).items() if Path(local) == LOCK]
    commands = [command for layer in image_layers(modal_app.image)[1:] for command in layer]  # above the base
    (copy,) = [command for command in commands if command.startswith(f"COPY {lock_in_context} ")]
    in_container = copy.split()[-1]
    installs = [command for command in commands if re.search(r"\bpip install\b", command)]
    assert installs, commands
    for command in installs:  # nothing is installed from outside the lock, and nothing without its hash
        assert f"--requirements {in_container}" in command and "--require-hashes" in command, command

    env = image_env(modal_app.image)
    assert env["HF_XET_HIGH_PERFORMANCE"] == "1"
    assert "HF_HUB_ENABLE_HF_TRANSFER" not in env  # deprecated: the hub only warns about it


def test_the_locked_hub_reads_the_fast_download_setting() -> None:
    locked = read_lock(LOCK.read_text())[canonicalize_name("huggingface-hub")].version
    installed = Version(importlib.metadata.version("huggingface-hub"))
    if installed != locked:
        pytest.skip(f"huggingface-hub {installed} is installed here, the image locks {locked}")
    code = "from huggingface_hub import constants; print(constants.HF_XET_HIGH_PERFORMANCE)"
    env = {**os.environ, "HF_XET_HIGH_PERFORMANCE": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "True"

"""The lock (requirements/constraints.txt) agrees with pyproject.toml, requirements/*.txt and this venv.

`make setup` installs from the lock; `make lock` (scripts/lock.py) rewrites it. These tests fail when a
dependency is added to one side and not the other, when a locked version falls outside the range
pyproject.toml promises users, or when the environment running the tests was not built from the lock.
"""

from __future__ import annotations

import re
import tomllib
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
REQUIREMENTS = ROOT / "requirements"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
# Not in the lock: the Makefile's TORCH_SPEC picks torch, and longvila is this project.
UNLOCKED = {"torch", "longvila"}
# In the lock without anything requiring them: the installers themselves (`make setup` pins them first).
TOOLS = {"pip", "setuptools"}


def read_requirements(path: Path) -> list[Requirement]:
    lines = (line.split("#", 1)[0].strip() for line in path.read_text().splitlines())
    return [Requirement(line) for line in lines if line]


def lock_pins() -> dict[str, Version]:
    pins = {}
    for req in read_requirements(REQUIREMENTS / "constraints.txt"):
        (spec,) = req.specifier
        assert spec.operator == "==", f"constraints.txt: {req} is not an exact pin"
        pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def makefile_variable(name: str) -> str:
    match = re.search(rf"^{name} \?= ?(.*)$", (ROOT / "Makefile").read_text(), re.MULTILINE)
    assert match, f"Makefile: no `{name} ?=` line"
    return match.group(1).strip()


def extras() -> dict[str, list[Requirement]]:
    table = PYPROJECT["project"]["optional-dependencies"]
    return {name: [Requirement(r) for r in reqs] for name, reqs in table.items()}


def direct_requirements() -> list[Requirement]:
    """Everything `make setup` asks for by name, with the range it asks for."""
    reqs = [Requirement(r) for r in PYPROJECT["project"]["dependencies"]]
    for extra_reqs in extras().values():
        reqs += extra_reqs
    return reqs + read_requirements(REQUIREMENTS / "lmms-eval.txt") + no_deps()


def no_deps() -> list[Requirement]:
    return read_requirements(REQUIREMENTS / "no-deps.txt")


def applies(req: Requirement, extra: str = "") -> bool:
    return req.marker is None or req.marker.evaluate({"extra": extra})


def test_makefile_installs_every_extra():
    assert set(makefile_variable("EXTRAS").split(",")) == set(extras()), (
        "Makefile EXTRAS must name every [project.optional-dependencies] extra of pyproject.toml"
    )


def test_direct_requirements_are_locked_inside_their_ranges():
    pins = lock_pins()
    problems = []
    for req in direct_requirements():
        name = canonicalize_name(req.name)
        if name == "torch":
            pinned = Requirement(makefile_variable("TORCH_SPEC"))
            (spec,) = pinned.specifier
            if not req.specifier.contains(spec.version, prereleases=True):
                problems.append(f"Makefile TORCH_SPEC {pinned} is outside pyproject's {req}")
        elif name not in pins:
            problems.append(f"{req} is required but not in the lock (run `make lock`)")
        elif not req.specifier.contains(pins[name], prereleases=True):
            problems.append(f"the lock pins {name}=={pins[name]}, outside the required {req}")
    for hold in read_requirements(REQUIREMENTS / "holds.txt"):
        name = canonicalize_name(hold.name)
        if name in pins and not hold.specifier.contains(pins[name], prereleases=True):
            problems.append(f"the lock pins {name}=={pins[name]}, against the hold {hold} (holds.txt)")
    assert not problems, "\n".join(problems)


def closure() -> tuple[set[str], set[str], list[str]]:
    """Names of every distribution the direct requirements pull in, read from the installed metadata.

    Packages of requirements/no-deps.txt count, but not what their own metadata requires (they are
    installed without it). Returns (names, platform-conditional names, requirements not installed):
    the second set holds dependencies whose marker names another platform (pandas' `tzdata;
    sys_platform == "win32"`), which pip 26 installs all the same, so the lock may hold them.
    """
    skip_deps = {canonicalize_name(r.name) for r in no_deps()}
    seen: set[str] = set()
    conditional: set[str] = set()
    missing: list[str] = []
    todo = [(r, "") for r in direct_requirements()]
    while todo:
        req, extra = todo.pop()
        if not applies(req, extra):
            continue
        name = canonicalize_name(req.name)
        key = f"{name}[{','.join(sorted(req.extras))}]"
        if key in seen:
            continue
        seen.add(key)
        if name in skip_deps:
            continue
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            missing.append(str(req))
            continue
        for line in requires:
            dep = Requirement(line)
            if any(applies(dep, wanted) for wanted in ("", *req.extras)):
                todo.append((dep, ""))
            elif "extra" not in str(dep.marker):
                conditional.add(canonicalize_name(dep.name))
    return {k.split("[")[0] for k in seen}, conditional, missing


def test_lock_is_exactly_what_the_requirements_pull_in():
    names, conditional, missing = closure()
    assert not missing, (
        f"not installed, so the venv was not built from the lock (run `make setup`): {missing}"
    )
    needed = names - UNLOCKED
    locked = set(lock_pins())
    not_locked = sorted(n for n in needed - locked if not n.startswith(("nvidia-", "triton", "cuda-")))
    not_needed = sorted(locked - needed - TOOLS - conditional)
    assert not not_locked, (
        f"required (directly or transitively) but not in the lock: {not_locked}; run `make lock`"
    )
    assert not not_needed, f"in the lock but nothing requires them: {not_needed}; run `make lock`"
    assert TOOLS <= set(lock_pins()), "the lock must pin pip and setuptools (make setup installs them first)"


def test_installed_versions_are_the_locked_ones():
    _, conditional, _ = closure()
    wrong = []
    for name, version in lock_pins().items():
        try:
            installed = Version(metadata.version(name))
        except metadata.PackageNotFoundError:
            # A dependency for another platform: an unconstrained resolve (make lock) installed it, an
            # install under the lock's constraints may not. Where it is installed, its version must match.
            if name not in conditional:
                wrong.append(f"{name}=={version} is locked but not installed")
            continue
        if installed != version:
            wrong.append(f"{name}: installed {installed}, locked {version}")
    assert not wrong, "this venv was not built from the lock (`make clean setup`):\n" + "\n".join(wrong)


@pytest.mark.parametrize("path", ["constraints.txt", "holds.txt", "lmms-eval.txt", "no-deps.txt"])
def test_requirement_files_parse(path):
    assert read_requirements(REQUIREMENTS / path)

"""The Python package (issue 12): sdist and wheel, and what installing the wheel gives.

``python -m build`` makes an sdist and, from it, a wheel, out of a copy of the working
tree (so nothing is written into the repository); ``twine check --strict`` accepts both.
The wheel goes into a fresh virtualenv with its dependencies from the package index
(what ``pipx install dist/*.whl`` does), and ``corsproxy --version``, ``python -m
corsproxy --version`` and ``corsproxy check`` run from an unrelated directory and from
one holding a folder named ``corsproxy``.

The same copy, in a directory named ``corsproxy``, is installed editable into a second
virtualenv and ``python -m corsproxy`` runs from its parent: there the clone shadows the
package as a namespace package (setuptools' editable finder comes after the path-based
one, pypa/setuptools#3557), which ``corsproxy/__main__.py`` repairs.

The version is written once, in ``corsproxy/__init__.py``; pyproject.toml reads it.
Without ``build`` or ``twine`` these tests skip, and fail in CI. About 40 s with a warm
pip cache (two virtualenvs, dependencies from the index).
"""

from __future__ import annotations

import ast
import email.parser
import os
import shutil
import subprocess
import sys
import tarfile
import tomllib
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BUILD_TIMEOUT = 300.0  # seconds: the isolated build environment comes from the index
INSTALL_TIMEOUT = 300.0
RUN_TIMEOUT = 60.0
#: Not copied into the build tree: VCS data, caches, local environments, build output.
IGNORED = (".git", ".venv", "venv", "build", "dist", "*.egg-info", "__pycache__", "*.pyc",
           ".pytest_cache", ".hypothesis", ".ruff_cache", ".benchmarks", ".mypy_cache")
LICENSE_PATTERNS = ("LICEN[CS]E*", "COPYING*", "NOTICE*", "AUTHORS*")  # setuptools' default


def source_version() -> str:
    tree = ast.parse((REPO / "corsproxy" / "__init__.py").read_text(encoding="utf-8"))
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(
            isinstance(t, ast.Name) and t.id == "__version__" for t in node.targets
        ):
            value = ast.literal_eval(node.value)
            assert isinstance(value, str)
            return value
    raise AssertionError("corsproxy/__init__.py has no __version__ = '...' line")


VERSION = source_version()


def require_module(name: str, pip_name: str) -> None:
    try:
        __import__(name)
    except ImportError:
        message = f"{pip_name} is not installed: pip install {pip_name} (in the test extras)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def tool_env(**extra: str) -> dict[str, str]:
    """The environment without anything that would point Python or corsproxy elsewhere
    (pip's own settings, e.g. an index, stay)."""
    env = {
        k: v for k, v in os.environ.items()
        if not k.startswith(("CORSPROXY_", "PYTHON", "VIRTUAL_ENV"))
    }
    env.update(extra)
    return env


def run(args: list[str], cwd: Path, timeout: float = RUN_TIMEOUT,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env=env or tool_env(), capture_output=True,
        text=True, timeout=timeout, stdin=subprocess.DEVNULL,
    )


def check(result: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert result.returncode == 0, (
        f"{' '.join(result.args)} exited {result.returncode}\n{result.stdout}\n{result.stderr}"
    )
    return result


def copy_tree(destination: Path) -> Path:
    """The working tree as a clone would hold it (plus uncommitted files), without
    writing anything into the repository."""
    shutil.copytree(REPO, destination, ignore=shutil.ignore_patterns(*IGNORED))
    return destination


def new_venv(path: Path) -> Path:
    """A fresh virtualenv (with pip) at ``path``; its python."""
    result = run([sys.executable, "-m", "venv", path], cwd=path.parent, timeout=INSTALL_TIMEOUT)
    if result.returncode != 0:
        message = f"cannot create a virtualenv: {result.stderr.strip()} (python3-venv?)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    return path / "bin" / "python"


@dataclass
class Dist:
    sdist: Path
    wheel: Path
    tree: Path  # the copy they were built from


@pytest.fixture(scope="module")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    require_module("build", "build")
    base = tmp_path_factory.mktemp("package")
    tree = copy_tree(base / "tree")
    out = base / "dist"
    # Default `build`: the sdist first, then the wheel from the unpacked sdist, so a file
    # missing from the sdist breaks the wheel too.
    check(run([sys.executable, "-m", "build", "--outdir", out, tree], cwd=base,
              timeout=BUILD_TIMEOUT))
    return Dist(
        sdist=out / f"corsproxy-{VERSION}.tar.gz",
        wheel=out / f"corsproxy-{VERSION}-py3-none-any.whl",
        tree=tree,
    )


@pytest.fixture(scope="module")
def installed(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The bin directory of a fresh virtualenv holding the wheel and its dependencies."""
    base = tmp_path_factory.mktemp("wheel-venv")
    python = new_venv(base / "venv")
    check(run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               dist.wheel], cwd=base, timeout=INSTALL_TIMEOUT))
    return python.parent


@pytest.fixture(params=["unrelated", "beside-a-corsproxy-folder"])
def somewhere(request: pytest.FixtureRequest, tmp_path: Path) -> Path:
    """A working directory outside the repository; the second one holds a folder named
    corsproxy that looks like a clone (no __init__.py, a config/ directory)."""
    if request.param == "beside-a-corsproxy-folder":
        (tmp_path / "corsproxy" / "config").mkdir(parents=True)
        (tmp_path / "corsproxy" / "README.md").write_text("not the package\n")
    return tmp_path


# ---------------------------------------------------------------------------
# Building
# ---------------------------------------------------------------------------


def test_pyproject_reads_the_version_from_the_package():
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "version" not in project["project"], "the version is written in one place only"
    assert project["project"]["dynamic"] == ["version"]
    assert project["tool"]["setuptools"]["dynamic"]["version"] == {
        "attr": "corsproxy.__version__"
    }
    # PEP 639: an SPDX expression, not the deprecated table.
    assert project["project"]["license"] == "MIT"
    assert any(r.replace(" ", "").startswith("setuptools>=77")
               for r in project["build-system"]["requires"])


def test_build_makes_an_sdist_and_a_wheel_that_twine_accepts(dist: Dist):
    require_module("twine", "twine")
    assert sorted(p.name for p in dist.sdist.parent.iterdir()) == sorted(
        [dist.sdist.name, dist.wheel.name]
    )
    result = check(run([sys.executable, "-m", "twine", "check", "--strict", dist.sdist,
                        dist.wheel], cwd=dist.sdist.parent))
    assert result.stdout.count("PASSED") == 2, result.stdout


def wheel_metadata(wheel: Path) -> tuple[email.message.Message, list[str]]:
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        text = z.read(f"corsproxy-{VERSION}.dist-info/METADATA").decode()
    return email.parser.Parser().parsestr(text), names


def test_wheel_metadata_and_contents(dist: Dist):
    meta, names = wheel_metadata(dist.wheel)
    assert meta["Name"] == "corsproxy"
    assert meta["Version"] == VERSION
    assert meta["License-Expression"] == "MIT"
    assert meta["License"] is None, "the deprecated License field"
    assert not [c for c in meta.get_all("Classifier") or [] if c.startswith("License ::")]
    assert tuple(map(int, meta["Metadata-Version"].split("."))) >= (2, 4)
    assert meta["Requires-Python"] == ">=3.11"
    assert meta["Description-Content-Type"] == "text/markdown"
    for data in ("config.schema.json", "demo.yaml", "__main__.py", "cli.py"):
        assert f"corsproxy/{data}" in names
    assert not [n for n in names if n.startswith(("tests/", "benchmarks/", "config/"))]
    with zipfile.ZipFile(dist.wheel) as z:
        entry_points = z.read(f"corsproxy-{VERSION}.dist-info/entry_points.txt").decode()
    assert "corsproxy = corsproxy.cli:main" in entry_points


def repository_license_files() -> list[str]:
    return sorted({p.name for pattern in LICENSE_PATTERNS for p in REPO.glob(pattern)
                   if p.is_file()})


def test_license_files_ship_in_both(dist: Dist):
    """Every license file at the top of the repository is in the wheel's
    .dist-info/licenses and in the sdist, and named in the metadata."""
    meta, names = wheel_metadata(dist.wheel)
    with tarfile.open(dist.sdist) as t:
        sdist_names = t.getnames()
    for name in repository_license_files():
        assert f"corsproxy-{VERSION}.dist-info/licenses/{name}" in names
        assert f"corsproxy-{VERSION}/{name}" in sdist_names
    assert sorted(meta.get_all("License-File") or []) == repository_license_files()


def test_sdist_holds_what_the_wheel_is_built_from(dist: Dist):
    with tarfile.open(dist.sdist) as t:
        names = set(t.getnames())
    root = f"corsproxy-{VERSION}"
    for needed in ("pyproject.toml", "README.md", "PKG-INFO", "corsproxy/__init__.py",
                   "corsproxy/config.schema.json", "corsproxy/demo.yaml"):
        assert f"{root}/{needed}" in names, needed


# ---------------------------------------------------------------------------
# The installed wheel
# ---------------------------------------------------------------------------


def test_installed_command_prints_the_version(installed: Path, somewhere: Path):
    for args in ([installed / "corsproxy", "--version"],
                 [installed / "python", "-m", "corsproxy", "--version"]):
        result = check(run(args, cwd=somewhere))
        assert result.stdout == f"corsproxy {VERSION}\n", result


def test_installed_package_is_the_wheel_not_the_checkout(installed: Path, somewhere: Path):
    result = check(run([installed / "python", "-c",
                        "import corsproxy; print(corsproxy.__file__)"], cwd=somewhere))
    location = Path(result.stdout.strip())
    assert location.is_relative_to(installed.parent), location


def test_installed_command_checks_a_config(installed: Path, somewhere: Path):
    config = somewhere / "production.yaml"
    shutil.copyfile(REPO / "config" / "production.yaml", config)
    for args in ([installed / "corsproxy", "check", "--config", config.name],
                 [installed / "python", "-m", "corsproxy", "check", "--config", config.name]):
        result = check(run(args, cwd=somewhere))
        assert result.stdout.startswith("production.yaml: OK"), result.stdout


# ---------------------------------------------------------------------------
# An editable install of a clone named corsproxy, run from the clone's parent
# ---------------------------------------------------------------------------


def test_python_m_corsproxy_runs_beside_an_editable_clone(
    dist: Dist, tmp_path_factory: pytest.TempPathFactory
):
    base = tmp_path_factory.mktemp("editable")
    clone = base / "corsproxy"
    shutil.copytree(dist.tree, clone)
    python = new_venv(base / "venv")
    check(run([python, "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
               "--editable", clone], cwd=base, timeout=INSTALL_TIMEOUT))
    # From the clone's parent, sys.path[0] makes the clone a namespace package before the
    # editable finder is asked (`import corsproxy` there gives a namespace package).
    result = check(run([python, "-m", "corsproxy", "--version"], cwd=base))
    assert result.stdout == f"corsproxy {VERSION}\n"
    # `.config` is the module, not the clone's config/ directory.
    result = check(run([python, "-m", "corsproxy", "check", "--config",
                        "corsproxy/config/production.yaml"], cwd=base))
    assert result.stdout.startswith("corsproxy/config/production.yaml: OK"), result.stdout
    # And from an unrelated directory the editable install is the clone's package.
    elsewhere = base / "elsewhere"
    elsewhere.mkdir()
    result = check(run([python, "-c", "import corsproxy; print(corsproxy.__file__)"],
                       cwd=elsewhere))
    assert Path(result.stdout.strip()) == clone / "corsproxy" / "__init__.py"

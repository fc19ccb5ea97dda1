"""The package works when installed from a wheel, away from the checkout.

The slow tests build a wheel of the checkout (through an sdist, as ``python -m build`` does), install it into
a fresh virtual environment outside the checkout and run the installed ``tar-lightning`` from a folder outside
the checkout: the demo's default config and the red-team suites must come from inside the installed package
(``tar_lightning.resources``), never from the repository. Installing torch and the other dependencies into the
fresh environment would take many minutes, so a ``.pth`` file in its site-packages lists this environment's
site-packages: a plain path line in a ``.pth`` adds that folder to ``sys.path`` without running the ``.pth``
files inside it, so the editable install of this checkout stays inactive there (checked: ``tar_lightning`` is
imported from the fresh environment). POSIX paths (``venv/bin``).

The fast test checks the build's package list (``pyproject.toml``, ``[tool.setuptools] packages``) against the
packages under ``src/``: the list is explicit because the shipped ``recipes/`` and ``callbacks/`` folders are
mapped into the package from outside ``src/``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: top-level folders shipped inside the package (tar_lightning.resources.SHIPPED_FOLDERS)
SHIPPED = ("recipes", "callbacks")
#: not copied into the build folder: environments, caches, run outputs, earlier build outputs
_NOT_SOURCES = shutil.ignore_patterns(
    ".git", ".venv", "runs", "build", "dist", "*.egg-info", "__pycache__", ".pytest_cache", ".ruff_cache",
    ".hypothesis", "lightning_logs",
)


def _shipped_sources() -> dict[str, bytes]:
    """Every file of the shipped folders in the checkout (repository path -> bytes) but packaging files."""
    files = {}
    for folder in SHIPPED:
        for p in sorted((REPO / folder).rglob("*")):
            rel = p.relative_to(REPO)
            if p.is_file() and p.name != "__init__.py" and not any(
                part.startswith((".", "__")) for part in rel.parts
            ):
                files[rel.as_posix()] = p.read_bytes()
    return files


def _run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited with {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
        f"\n--- stderr\n{proc.stderr[-6000:]}"
    )
    return proc


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """A fresh virtual environment outside the checkout with a wheel of the checkout installed in it."""
    tmp = tmp_path_factory.mktemp("wheel_install")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP")}
    env.update(OMP_NUM_THREADS="1", PIP_DISABLE_PIP_VERSION_CHECK="1", PIP_NO_INPUT="1")

    # Build from a copy of the sources (the checkout's build/ and *.egg-info stay untouched, and no stale
    # build/lib file of an earlier build can slip into the wheel), the way `python -m build` does: an sdist
    # first, the wheel from the sdist, so an sdist that lacks a shipped file fails here too.
    source = tmp / "source"
    shutil.copytree(REPO, source, ignore=_NOT_SOURCES)
    sdist = tmp / "sdist"
    hook = f"from setuptools import build_meta; print(build_meta.build_sdist({str(sdist)!r}))"
    name = _run([sys.executable, "-c", hook], cwd=source, env=env).stdout.strip().splitlines()[-1]
    wheels = tmp / "wheels"
    _run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-w",
          str(wheels), str(sdist / name)], cwd=tmp, env=env)
    (wheel,) = wheels.glob("tar_lightning-*.whl")

    root = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(root)
    python = root / "bin" / "python"
    site = Path(_run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                     cwd=tmp, env=env).stdout.strip())
    ours = sysconfig.get_paths()
    deps = dict.fromkeys([ours["purelib"], ours["platlib"]])  # this environment's site-packages, in order
    (site / "_tar_lightning_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    # --ignore-installed: pip sees this environment's tar_lightning through the .pth and must not touch it
    _run([str(python), "-m", "pip", "install", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
         cwd=tmp, env=env)
    script = root / "bin" / "tar-lightning"
    work = tmp / "work"  # the cwd of every command: outside the checkout, no recipes/ beside it
    work.mkdir()
    return {"root": root, "python": python, "script": script, "site": site, "work": work, "env": env}


@pytest.mark.slow
def test_the_wheel_ships_every_recipe_suite_and_overlay(installed):
    probe = (
        "import json, tar_lightning\n"
        "from tar_lightning.resources import SHIPPED_FOLDERS, shipped\n"
        "from tar_lightning.evaluation.suite import load_suite\n"
        "from tar_lightning.demo import DEFAULT_CONFIG\n"
        "files = {}\n"
        "for folder in SHIPPED_FOLDERS:\n"
        "    top = shipped(folder)\n"
        "    for p in sorted(top.rglob('*')):\n"
        "        rel = p.relative_to(top)\n"
        "        if p.is_file() and not any(s.startswith(('.', '__')) for s in rel.parts):\n"
        "            files[folder + '/' + rel.as_posix()] = p.read_text('utf-8')\n"
        "print(json.dumps({'package': tar_lightning.__file__, 'demo_config': str(DEFAULT_CONFIG),\n"
        "    'weaponization': len(load_suite('weaponization').attacks), 'files': files}))\n"
    )
    proc = _run([str(installed["python"]), "-c", probe], installed["work"], installed["env"])
    out = json.loads(proc.stdout)
    root = installed["root"].resolve()
    for key in ("package", "demo_config"):
        path = Path(out[key]).resolve()
        assert path.is_relative_to(root), f"{key} {path} is not inside the fresh environment {root}"
        assert not path.is_relative_to(REPO), f"{key} {path} comes from the checkout"
    from tar_lightning.evaluation.suite import load_suite

    assert out["weaponization"] == len(load_suite(REPO / "recipes" / "redteam" / "weaponization.yaml").attacks)
    expected = {rel: data.decode("utf-8") for rel, data in _shipped_sources().items()}
    assert sorted(out["files"]) == sorted(expected)
    assert any(rel.endswith(".sbatch") for rel in expected)
    assert any(rel.startswith("callbacks/") for rel in expected)
    assert out["files"] == expected


@pytest.mark.slow
def test_installed_demo_runs_from_outside_the_checkout(installed):
    out = installed["work"] / "demo"
    _run([str(installed["script"]), "demo", "--size", "minimal", "--out", str(out), "--progress", "false"],
         installed["work"], installed["env"])
    results = json.loads((out / "results.json").read_text())
    assert results and (out / "report.md").is_file()


@pytest.mark.slow
def test_installed_redteam_runs_a_shipped_suite_from_outside_the_checkout(installed):
    out = installed["work"] / "redteam"
    args = ["redteam", "--model", "tiny", "--suite", "durability", "--scale", "0.05", "--seeds", "1",
            "--attacks", "d04,d05", "--max_steps", "2", "--out", str(out), "--progress", "false"]
    proc = _run([str(installed["script"]), *args], installed["work"], installed["env"])
    assert "suite mean" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results and (out / "report.md").is_file()


def test_every_package_under_src_is_listed_for_the_build():
    from setuptools.config.pyprojecttoml import read_configuration

    tool = read_configuration(REPO / "pyproject.toml", expand=False)["tool"]["setuptools"]
    listed = set(tool["packages"])
    mapped = {pkg for pkg, folder in tool["package-dir"].items() if pkg and folder in SHIPPED}
    assert mapped == {"tar_lightning.recipes", "tar_lightning.callback_overlays"}
    src = REPO / "src"
    on_disk = {
        ".".join(d.relative_to(src).parts)
        for d in (src / "tar_lightning").rglob("*")
        if d.is_dir() and "__pycache__" not in d.parts and any(d.glob("*.py"))
    } | {"tar_lightning"}
    missing = sorted(on_disk - listed)
    assert not missing, (
        f"pyproject.toml [tool.setuptools] packages lacks {missing}: a wheel would not contain them "
        "(the list is explicit because recipes/ and callbacks/ are mapped into the package)"
    )
    assert listed - on_disk == mapped, f"listed but not under src/: {sorted(listed - on_disk - mapped)}"


def test_shipped_files_by_repository_path_and_clear_errors_for_wrong_names():
    from tar_lightning.demo import DEFAULT_CONFIG
    from tar_lightning.errors import ConfigError
    from tar_lightning.evaluation.suite import load_suite, suite_path
    from tar_lightning.resources import shipped, shipped_names

    for rel in _shipped_sources():
        assert shipped(rel).read_bytes() == (REPO / rel).read_bytes(), rel
    assert DEFAULT_CONFIG.read_bytes() == (REPO / "recipes/demo/default.yaml").read_bytes()
    suites = sorted(p.stem for p in (REPO / "recipes" / "redteam").glob("*.yaml"))
    assert shipped_names("recipes/redteam") == suites and "durability" in suites
    assert suite_path("durability").read_bytes() == (REPO / "recipes/redteam/durability.yaml").read_bytes()

    with pytest.raises(ConfigError) as err:
        shipped("recipes/redteam/durabilty.yaml")
    assert "'recipes/redteam/durabilty.yaml' does not exist" in str(err.value)
    assert "recipes/redteam/durability.yaml" in str(err.value)  # what exists instead
    with pytest.raises(ConfigError, match=r"recipes/ holds: \[.*'recipes/redteam/'"):
        shipped("recipes/red_team/durability.yaml")
    with pytest.raises(ConfigError, match=r"'docs' is not a shipped folder; shipped folders: \['callbacks'"):
        shipped("docs/SCALING.md")
    for outside in ("../pyproject.toml", "recipes/../../pyproject.toml", "/etc/hosts"):
        with pytest.raises(ConfigError, match="relative to the repository root"):
            shipped(outside)
    with pytest.raises(ConfigError, match=r"'durabilty' not found: not a file, nor a shipped suite \(\['dur"):
        load_suite("durabilty")
    with pytest.raises(ConfigError, match="nor a shipped suite"):
        load_suite("../redteam/durability")

"""Import names. The project installs one top-level name, ``dynamax_jax``; the folders
kernels/, convert/, train/ and eval/ are its subpackages. Hugging Face's ``kernels`` (which
transformers imports) coexists with ``dynamax_jax.kernels``, and no file is loaded under two
module names: from the repository root, from another directory and from a built wheel."""

from __future__ import annotations

import ast
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("kernels", "convert", "train", "eval")  # folders at the top, under dynamax_jax
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def top_level_names(dist: metadata.Distribution) -> set[str]:
    """The importable top-level names a distribution installs: its ``top_level.txt`` and the
    first component of every module or package path in its ``RECORD`` (an ``.egg-info``
    lists sources, not installed files, in place of a RECORD)."""
    names = set((dist.read_text("top_level.txt") or "").split())
    for file in (dist.files or ()) if dist.read_text("RECORD") is not None else ():
        parts = file.parts
        if not parts or parts[0] in ("..", "__pycache__") or parts[0].endswith((".dist-info", ".data")):
            continue
        if len(parts) > 1:
            names.add(parts[0])
        elif parts[0].endswith(".py"):
            names.add(parts[0][:-3])
        elif parts[0].endswith((".so", ".pyd")):
            names.add(parts[0].split(".")[0])
    return names


def clashes(ours: set[str], distributions) -> list[str]:
    """``"dist: name"`` for every other distribution that installs one of ``ours``."""
    found = []
    for dist in distributions:
        if dist.metadata["Name"] and dist.metadata["Name"].lower() != "dynamax-jax":
            found += [f"{dist.metadata['Name']}: {name}" for name in sorted(ours & top_level_names(dist))]
    return found


def test_no_other_installed_distribution_shares_a_top_level_name():
    ours = top_level_names(metadata.distribution("dynamax-jax"))
    assert "dynamax_jax" in ours and not ours & set(SUBPACKAGES), ours
    assert clashes(ours, metadata.distributions()) == []


def test_the_guard_catches_a_clashing_distribution(tmp_path):
    info = tmp_path / "clash-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: clash\nVersion: 0.1\n")
    (info / "RECORD").write_text("kernels/__init__.py,,\nclash-0.1.dist-info/METADATA,,\n")
    ours = {"dynamax_jax", "kernels"}
    assert clashes(ours, metadata.distributions(path=[str(tmp_path)])) == ["clash: kernels"]


def _python_files(top: Path, follow_links: bool) -> list[Path]:
    files = []
    for folder, dirs, names in os.walk(top, followlinks=follow_links):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d != "__pycache__"]
        files += [Path(folder) / name for name in names if name.endswith(".py")]
    return files


def test_no_source_imports_a_folder_by_its_bare_name():
    """``import train`` / ``from eval import x`` would load a file under a second name."""
    offenders = []
    for path in _python_files(REPO, follow_links=False):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                modules = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                modules = [node.module or ""]
            else:
                continue
            offenders += [f"{path.relative_to(REPO)}:{node.lineno}: {m}" for m in modules
                          if m.split(".")[0] in SUBPACKAGES]
    assert offenders == []


# Imports every module of the project, runs ``python -m train.distill --help`` the way the
# interpreter does, and prints each file loaded under more than one module name.
_PROBE = r"""
import importlib, importlib.metadata, json, os, runpy, sys
from pathlib import Path
import dynamax_jax
package = Path(dynamax_jax.__file__).parent
for folder, dirs, files in sorted(os.walk(package, followlinks=True)):
    dirs[:] = [d for d in dirs if d != "__pycache__"]
    for file in sorted(f for f in files if f.endswith(".py") and f != "__main__.py"):
        parts = ("dynamax_jax",) + Path(folder).relative_to(package).parts
        importlib.import_module(".".join(parts if file == "__init__.py" else parts + (file[:-3],)))
if sys.argv[1:] == ["--run-cli"]:
    sys.argv = ["train.distill", "--help"]
    try:
        runpy.run_module("train.distill", run_name="__main__", alter_sys=True)
    except SystemExit as exit:
        assert exit.code == 0, exit.code
ours = tuple(os.path.realpath(package.parent / d) + os.sep
             for d in ("dynamax_jax", "kernels", "convert", "train", "eval"))
names = {}
for name, module in list(sys.modules.items()):
    file = getattr(module, "__file__", None)
    if file and name != "__main__" and os.path.realpath(file).startswith(ours):
        names.setdefault(os.path.realpath(file), []).append(name)
try:  # Hugging Face's, a dependency of transformers >= 5.25
    installed = importlib.metadata.distribution("kernels").locate_file("kernels/__init__.py")
    import kernels
    hf_kernels = [kernels.__file__, str(installed)]
except importlib.metadata.PackageNotFoundError:
    hf_kernels = None
print(json.dumps({"twice": {f: n for f, n in names.items() if len(n) > 1}, "kernels": hf_kernels,
                  "ours": dynamax_jax.kernels.ssd.ops.__file__}))
"""


@pytest.mark.parametrize("where", ["repository root", "another directory"])
def test_hf_kernels_and_ours_coexist_and_no_file_has_two_names(where, tmp_path):
    cwd = REPO if where == "repository root" else tmp_path
    args = ["--run-cli"] if cwd == REPO else []
    proc = subprocess.run([sys.executable, "-c", _PROBE, *args], cwd=cwd, env=ENV, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout.splitlines()[-1])
    assert report["twice"] == {}
    assert os.path.realpath(report["ours"]) == str(REPO / "kernels" / "ssd" / "ops.py")
    if report["kernels"] is not None:  # installed with transformers >= 5.25: the import finds it
        imported, installed = report["kernels"]
        assert os.path.realpath(imported) == os.path.realpath(installed)


def test_short_commands_run_from_the_repository_root():
    proc = subprocess.run([sys.executable, "-m", "train.distill", "--help"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "--mesh" in proc.stdout, proc.stderr


@pytest.mark.slow
def test_the_wheel_installs_one_top_level_package_that_works_from_elsewhere(tmp_path):
    source, wheels = tmp_path / "src", tmp_path / "dist"  # built from a copy: setuptools writes build/
    shutil.copytree(REPO, source, symlinks=True, ignore=shutil.ignore_patterns(
        ".*", "build", "dist", "__pycache__", "*.egg-info", "runs"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
                   check=True, capture_output=True, timeout=600)
    (wheel,) = wheels.glob("dynamax_jax-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        files = archive.namelist()
        archive.extractall(tmp_path / "site")
    assert {f.split("/")[0] for f in files if not f.split("/")[0].endswith(".dist-info")} == {"dynamax_jax"}
    for needed in ("dynamax_jax/kernels/ssd/pallas.py", "dynamax_jax/convert/checkpoint.py",
                   "dynamax_jax/train/answers/smollm2-135m-instruct.jsonl",
                   "dynamax_jax/eval/data/real/truthful_qa_generation_validation.jsonl",
                   "dynamax_jax/assets/exits/smollm2-135m-instruct-ffn/exit_params.safetensors"):
        assert needed in files
    site = tmp_path / "site"
    probe = ("import dynamax_jax as dx, dynamax_jax.eval.tasks as tasks, dynamax_jax.kernels.ssd.ops as ops;"
             "import importlib.util, transformers;"
             "spec = importlib.util.find_spec('kernels');"
             f"assert spec is None or not (spec.origin or '').startswith({str(site)!r});"
             f"assert ops.__file__.startswith({str(site)!r}), ops.__file__;"
             "assert len(tasks.get_task('truthful_qa').load()) == 817;"
             "dx.load_exits(dx.__file__.rsplit('/', 1)[0] + '/assets/exits/smollm2-135m-instruct-ffn')")
    proc = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                          env={**ENV, "PYTHONPATH": str(site)}, timeout=600)
    assert proc.returncode == 0, proc.stderr

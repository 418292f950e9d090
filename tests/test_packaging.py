"""The installed distribution and the checkout: `kernels/` ships as `mxfp4_moe.kernels`, never as a
top-level `kernels` (that name is Hugging Face's package, which transformers imports), nothing run
from the repository root can import our folder as `kernels`, and the package imports without a
GPU."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory) -> list[str]:
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools (in the test extra)")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("mxfp4_moe", "kernels"):   # mxfp4_moe/kernels stays a link to ../kernels
        shutil.copytree(ROOT / folder, src / folder, symlinks=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True)
    (wheel,) = out.glob("mxfp4_moe-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_contains_kernels_under_the_package(wheel_names):
    # kernels/tools/ (sm90_report) ships too: a namespace subpackage named in pyproject.toml.
    shipped = {n.removeprefix("mxfp4_moe/kernels/") for n in wheel_names if n.startswith("mxfp4_moe/kernels/")}
    in_repo = {p.relative_to(ROOT / "kernels").as_posix() for p in (ROOT / "kernels").rglob("*.py")}
    assert in_repo <= shipped, f"kernel modules missing from the wheel: {sorted(in_repo - shipped)}"


def test_wheel_has_no_top_level_kernels_package(wheel_names):
    assert not [n for n in wheel_names if n.startswith("kernels/")]


def test_wheel_carries_the_license_and_the_typing_marker(wheel_names):
    assert "mxfp4_moe/py.typed" in wheel_names
    assert [n for n in wheel_names if n.endswith(".dist-info/licenses/LICENSE")], wheel_names


def test_kernels_folder_is_no_regular_package():
    """A kernels/__init__.py would make the folder the package `kernels` for every Python started
    at the repository root (`python -m pytest`, `python -m mxfp4_moe.verify`), hiding Hugging
    Face's."""
    assert not (ROOT / "kernels" / "__init__.py").exists()
    link = ROOT / "mxfp4_moe" / "kernels"
    assert link.is_symlink() and link.resolve() == (ROOT / "kernels").resolve()


def test_repository_root_imports_hugging_faces_kernels():
    """Started at the root, `import kernels` must give the installed package (transformers'
    gpt-oss model imports it), and our kernels must still import as mxfp4_moe.kernels."""
    hf_kernels = pytest.importorskip("kernels", reason="Hugging Face's kernels package is not installed")
    assert Path(hf_kernels.__file__).resolve().parent != (ROOT / "kernels").resolve()
    code = ("import kernels, mxfp4_moe.kernels.moe_matmul as ours, pathlib; "
            "print(pathlib.Path(kernels.__file__).resolve()); print(pathlib.Path(ours.__file__).resolve())")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, check=True, capture_output=True,
                         text=True).stdout.split()
    assert Path(out[0]).parent != (ROOT / "kernels").resolve(), f"our folder was imported as kernels: {out[0]}"
    assert Path(out[1]).parent == (ROOT / "kernels").resolve()
    pytest.importorskip("transformers")
    # transformers' gpt-oss model imports names from Hugging Face's kernels (5.x) at import time.
    subprocess.run([sys.executable, "-c", "import transformers.models.gpt_oss.modeling_gpt_oss"],
                   cwd=ROOT, check=True)


def test_package_imports_without_gpu_in_a_clean_interpreter():
    code = ("import sys, mxfp4_moe, mxfp4_moe.kernels, mxfp4_moe.mxfp4; "
            "assert 'kernels' not in sys.modules, 'a top-level kernels module was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")

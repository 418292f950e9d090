"""The installed distribution: `kernels/` ships as `mxfp4_moe.kernels`, never as a top-level
`kernels` (that name is Hugging Face's package, which transformers probes for), and the package
imports without a GPU."""

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
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for folder in ("mxfp4_moe", "kernels"):
        shutil.copytree(ROOT / folder, src / folder, ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(src)], check=True)
    (wheel,) = out.glob("mxfp4_moe-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        return zf.namelist()


def test_wheel_contains_kernels_under_the_package(wheel_names):
    kernel_files = [n for n in wheel_names if n.startswith("mxfp4_moe/kernels/")]
    assert "mxfp4_moe/kernels/__init__.py" in kernel_files
    shipped = {Path(n).name for n in kernel_files}
    in_repo = {p.name for p in (ROOT / "kernels").glob("*.py")}
    assert in_repo <= shipped, f"kernel modules missing from the wheel: {sorted(in_repo - shipped)}"


def test_wheel_has_no_top_level_kernels_package(wheel_names):
    assert not [n for n in wheel_names if n.startswith("kernels/")]


def test_package_imports_without_gpu_in_a_clean_interpreter():
    code = ("import sys, mxfp4_moe, mxfp4_moe.kernels, mxfp4_moe.mxfp4; "
            "assert 'kernels' not in sys.modules, 'a top-level kernels module was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, cwd="/")

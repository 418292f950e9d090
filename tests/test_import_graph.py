"""The import graph between the package and its kernels, read from the source with `ast`: nothing
in `kernels/` imports `mxfp4_moe` (the kernels carry the format's facts they need,
`kernels/_format.py`, pinned here to `mxfp4_moe.mxfp4`'s), the package reaches the kernels only
through `mxfp4_moe/kernel_api.py`, and the package's torch path loads no kernel module but the
Triton-free device check.
"""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
KERNELS = ROOT / "kernels"
PACKAGE = ROOT / "mxfp4_moe"


def _imports(path: Path) -> list[tuple[int, str, int]]:
    """(level, module, line) of every import in `path`: level 0 for absolute imports, the number of
    leading dots for relative ones; `from . import a` gives module "a"."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(0, alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.module:
                found.append((node.level, node.module, node.lineno))
            else:
                found += [(node.level, alias.name, node.lineno) for alias in node.names]
    return found


def _absolute(path: Path, package: list[str], level: int, module: str) -> str:
    """The absolute name an import in `path` (inside the package `package`) refers to."""
    if level == 0:
        return module
    depth = len(path.relative_to(ROOT).parts) - 1          # folders between the root and the file
    base = package[:max(0, len(package) - (level - 1))] if depth else []
    return ".".join(base + [module])


def _kernel_files() -> list[Path]:
    return sorted(KERNELS.rglob("*.py"))


def test_kernels_import_nothing_from_the_package():
    # kernels/X.py is mxfp4_moe.kernels.X: a relative import that climbs out of kernels/ reaches the package.
    bad = []
    for path in _kernel_files():
        package = ["mxfp4_moe", *path.relative_to(ROOT).parts[:-1]]
        for level, module, line in _imports(path):
            name = _absolute(path, package, level, module)
            if name.split(".")[0] == "mxfp4_moe" and not name.startswith("mxfp4_moe.kernels"):
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert _kernel_files() and not bad, bad


def test_the_package_reaches_the_kernels_only_through_kernel_api():
    bad = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.relative_to(PACKAGE).parts[0] == "kernels":          # the link to kernels/ itself
            continue
        package = list(path.relative_to(ROOT).parts[:-1])
        for level, module, line in _imports(path):
            name = _absolute(path, package, level, module)
            if name.startswith("mxfp4_moe.kernels") and path.name != "kernel_api.py":
                bad.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    assert not bad, bad


def test_the_import_check_sees_relative_and_absolute_imports(tmp_path, monkeypatch):
    # The helper itself: `from .. import mxfp4` in kernels/tools/x.py is mxfp4_moe.mxfp4, and
    # `from .kernels.moe_matmul import y` in mxfp4_moe/moe.py is mxfp4_moe.kernels.moe_matmul.
    tool = KERNELS / "tools" / "x.py"
    assert _absolute(tool, ["mxfp4_moe", "kernels", "tools"], 3, "mxfp4") == "mxfp4_moe.mxfp4"
    assert _absolute(tool, ["mxfp4_moe", "kernels", "tools"], 2, "_device") == "mxfp4_moe.kernels._device"
    assert _absolute(PACKAGE / "moe.py", ["mxfp4_moe"], 1, "kernels.moe_matmul") == "mxfp4_moe.kernels.moe_matmul"
    assert _absolute(PACKAGE / "integrations" / "t.py", ["mxfp4_moe", "integrations"], 2, "kernels") == \
        "mxfp4_moe.kernels"


def test_kernel_format_constants_are_the_package_ones():
    from mxfp4_moe import mxfp4
    from mxfp4_moe.kernels import _format
    names = [name for name in vars(_format) if name.isupper()]
    assert set(names) >= {"BLOCK_SIZE", "E8M0_BIAS", "E8M0_NAN", "NIBBLE_BITS"}
    for name in names:
        assert getattr(_format, name) == getattr(mxfp4, name), name


def test_kernel_activations_are_the_semantics_ones():
    from mxfp4_moe.kernels.moe_matmul import ACTIVATIONS
    from mxfp4_moe.semantics import ACTIVATIONS as SEMANTICS_ACTIVATIONS
    assert ACTIVATIONS == SEMANTICS_ACTIVATIONS


def test_the_routing_metadata_has_one_definition_and_needs_no_triton():
    # moe_matmul reads the routing metadata by the type routing_metadata builds: one dataclass,
    # beside the kernels (kernels/ may not import mxfp4_moe), importable from mxfp4_moe.routing,
    # and loadable where Triton is not.
    from mxfp4_moe import routing
    from mxfp4_moe.kernels import routing_metadata
    assert routing.RoutingMetadata is routing_metadata.RoutingMetadata
    assert routing.max_tiles is routing_metadata.max_tiles
    imported = {module for _, module, _ in _imports(KERNELS / "routing_metadata.py")}
    assert imported <= {"__future__", "dataclasses", "torch"}, imported


def test_torch_path_imports_no_kernel_but_the_device_check():
    # routing asks `interpreting` (kernels/_device.py, no Triton) to choose between the kernels and
    # their torch twins; nothing else of kernels/ loads, and Triton not at all.
    code = ("import sys, torch, mxfp4_moe.moe, mxfp4_moe.routing, mxfp4_moe.verify.checks, mxfp4_moe.verify.common\n"
            "from mxfp4_moe.moe import MXFP4MoE\nfrom mxfp4_moe.synthetic import random_expert_weights\n"
            "w, _ = random_expert_weights(4, 64, 64, top_k=2, seed=1)\n"
            "MXFP4MoE(w, backend='torch')(torch.randn(3, 64))\n"
            "loaded = sorted(m for m in sys.modules if m.startswith('mxfp4_moe.kernels.') or m == 'triton')\n"
            "loaded.remove('mxfp4_moe.kernels._device')\n"
            "assert not loaded, loaded\n")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, env={"TRITON_INTERPRET": "0", "PATH": ""})

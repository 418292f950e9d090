"""README.md's Python example runs as written, and its quickstart commands are the ones CI runs."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_example_runs(tmp_path, monkeypatch):
    (example,) = [b for b in _python_blocks() if "make_synthetic_checkpoint" in b and "load_model" not in b
                  and TORCHRUN_MARKER not in b]
    example = example.replace('"/tmp/ckpt"', repr(str(tmp_path / "ckpt")))
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["y"].shape == (16, namespace["cfg"].hidden_size)
    assert namespace["x"].shape == (64, 128)


def test_ci_runs_the_readme_test_command():
    ci = (ROOT / ".ci" / "run").read_text()
    assert "<!-- ci: test command -->" in README and "<!-- ci: test command -->" in ci
    block = README.split("<!-- ci: test command -->", 1)[1]
    command = re.search(r"```bash\n(.*?)\n```", block, re.S).group(1)
    assert "pytest" in command and "torch==2.13.0" in command


def test_readme_verify_options_exist():
    from mxfp4_moe.verify import build_parser
    known = {opt for action in build_parser()._actions for opt in action.option_strings}
    usage = README.split("python -m mxfp4_moe.verify [CHECKPOINT]", 1)[1].split("```", 1)[0]
    for option in re.findall(r"--[a-z-]+", usage):
        assert option in known, option


def test_load_model_example_runs(tmp_path):
    pytest.importorskip("transformers", reason="the whole-model example needs Hugging Face transformers")
    (example,) = [b for b in _python_blocks() if "load_model(path, device=" in b and TORCHRUN_MARKER not in b]
    example = example.replace('"/tmp/tiny_model"', repr(str(tmp_path / "tiny_model")))
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["tokens"].shape == (1, 12)
    assert namespace["model"].model.layers[0].mlp.__class__.__name__ == "MXFP4GptOssMLP"


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, re.S)


TORCHRUN_MARKER = "torchrun_env()"


@pytest.mark.slow
@pytest.mark.parametrize("name", ["moe_tp2.py", "model_tp2.py", "dispatch_ep2.py"])
def test_torchrun_example_runs_under_torchrun(tmp_path, name):
    """Each torchrun block is a whole script: run it as its comment says, two processes on gloo."""
    (block,) = [b for b in _python_blocks() if TORCHRUN_MARKER in b and name in b]
    if "load_model" in block:
        pytest.importorskip("transformers", reason="the whole-model example needs Hugging Face transformers")
    for folder in re.findall(r'path = "(/tmp/[a-z_]+)"', block):
        block = block.replace(f'"{folder}"', repr(str(tmp_path / Path(folder).name)))
    script = tmp_path / name
    script.write_text(block)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["CUDA_VISIBLE_DEVICES"] = ""
    # Each rank's output in its own file (--redirects 3): ranks printing at once would interleave.
    logs = tmp_path / "logs"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "--redirects", "3", "--log-dir", str(logs), str(script)],
                          capture_output=True, text=True, env=env, cwd=tmp_path, timeout=600)
    rank_out = {int(f.parent.name): f.read_text() for f in logs.rglob("stdout.log")}
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + str(rank_out)
    lines = [rank_out[rank].strip() for rank in sorted(rank_out)]
    assert [line.split()[0] for line in lines] == ["0", "1"], rank_out
    if "load_model" in block:
        assert all("(1, 4, " in line for line in lines), lines
    elif "TokenSharded" in block:                       # 3 + 5 * rank tokens of its own on each rank
        assert [line.split(")")[0] + ")" for line in lines] == ["0 (3, 256)", "1 (8, 256)"], lines
    else:
        assert all("(16, 256)" in line for line in lines), lines


def test_every_python_block_is_run_by_a_test():
    """A README block either runs in this file or is a whole torchrun script run above."""
    for block in _python_blocks():
        runs_here = TORCHRUN_MARKER not in block and (
            ("make_synthetic_checkpoint" in block and "load_model" not in block) or "load_model(path, device=" in block)
        torchrun_script = TORCHRUN_MARKER in block and re.search(r"torchrun --nproc-per-node 2 (\w+\.py)", block)
        assert runs_here or torchrun_script, f"README block no test runs:\n{block[:300]}"

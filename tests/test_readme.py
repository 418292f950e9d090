"""README.md's Python example runs as written, and its quickstart commands are the ones CI runs."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def test_python_example_runs(tmp_path, monkeypatch):
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "make_synthetic_checkpoint" in b
                  and "load_model" not in b]
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
    (example,) = [b for b in re.findall(r"```python\n(.*?)```", README, re.S) if "load_model(path, device=" in b]
    example = example.replace('"/tmp/tiny_model"', repr(str(tmp_path / "tiny_model")))
    namespace: dict = {}
    exec(compile(example, "README.md", "exec"), namespace)
    assert namespace["tokens"].shape == (1, 12)
    assert namespace["model"].model.layers[0].mlp.__class__.__name__ == "MXFP4GptOssMLP"

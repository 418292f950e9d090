"""`load_model(..., fast_generate=True)`: generate() on a static KV cache whose length comes from
a few buckets (`integrations/generation.py`). On a CPU transformers does not compile, so these
tests check what the wrapper decides and that the tokens are those of transformers' default
(dynamic cache); the speed is measured on a GPU (benchmarks/bench_model.py)."""

import pytest
import torch

pytest.importorskip("transformers", reason="generate() needs Hugging Face transformers")

from mxfp4_moe import make_synthetic_checkpoint  # noqa: E402
from mxfp4_moe.integrations.generation import CACHE_BUCKETS, cache_bucket  # noqa: E402
from mxfp4_moe.integrations.transformers import load_model  # noqa: E402


@pytest.fixture(scope="module")
def tiny_model_path(tmp_path_factory):
    return make_synthetic_checkpoint(tmp_path_factory.mktemp("gen") / "model", full_model=True, num_layers=2,
                                     num_experts=4, hidden=64, intermediate=64, top_k=2, seed=5)


@pytest.mark.parametrize("length, limit, expected", [
    (1, None, CACHE_BUCKETS[0]),                         # short calls share the first bucket
    (CACHE_BUCKETS[0], None, CACHE_BUCKETS[0]),          # a bucket's own length fits it
    (CACHE_BUCKETS[0] + 1, None, CACHE_BUCKETS[1]),      # one more position: the next bucket
    (CACHE_BUCKETS[-1] + 5, None, CACHE_BUCKETS[-1] + 5),  # past the last bucket: exactly what is needed
    (300, 512, 512),                                     # never past the model's positions...
    (700, 512, 700),                                     # ...unless the call itself needs more
])
def test_cache_bucket(length, limit, expected):
    assert cache_bucket(length, limit) == expected


def test_fast_generate_gives_the_default_tokens_on_a_bucketed_static_cache(tiny_model_path):
    plain = load_model(tiny_model_path, device="cpu", dtype=torch.float32, progress=False)
    fast = load_model(tiny_model_path, device="cpu", dtype=torch.float32, progress=False, fast_generate=True)
    assert plain.generation_config.cache_implementation != "static"      # a CPU keeps transformers' default
    assert fast.generation_config.cache_implementation == "static"
    ids = torch.randint(0, plain.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(0))
    for new_tokens in (5, 9):       # two lengths, one bucket: the second call reuses the first's cache size
        want = plain.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        got = fast.generate(ids, max_new_tokens=new_tokens, do_sample=False)
        assert torch.equal(got, want)
        assert fast._previous_max_cache_length == cache_bucket(7 + new_tokens, fast.config.max_position_embeddings)


def test_a_call_that_picks_its_cache_is_left_alone(tiny_model_path):
    fast = load_model(tiny_model_path, device="cpu", dtype=torch.float32, progress=False, fast_generate=True)
    ids = torch.randint(0, fast.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(1))
    fast.generate(ids, max_new_tokens=3, do_sample=False, max_cache_len=64)
    assert fast._previous_max_cache_length == 64


def test_bench_generate_pipeline_at_cpu_sizes(tmp_path):
    # The benchmark the GPU numbers will come from, run end to end on a tiny model (it times
    # nothing meaningful on a CPU, where neither mode compiles).
    import json
    import subprocess
    import sys
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_generate", "--tiny", "--out", str(tmp_path / "out"),
                           "--workdir", str(tmp_path / "work"), "--new-tokens", "4", "--batches", "1", "2"],
                          capture_output=True, text=True, cwd=root, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    data = json.loads((tmp_path / "out" / "out_generate.json").read_text())
    assert [row["mode"] for row in data["modes"]] == ["default", "eager"]
    assert all([b["batch"] for b in row["batches"]] == [1, 2] for row in data["modes"])
    assert data["second_process"]["first_call_s"] > 0

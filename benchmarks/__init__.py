"""The benchmarks (runners at the top) and probes (`benchmarks.probes`), run as modules from the
repository root: `python -m benchmarks.bench_moe ...`, `python -m benchmarks.probes.probe_configs
...`, `torchrun ... -m benchmarks.bench_distributed ...`. Shared helpers: `benchmarks.common`.
Not part of the installed package."""

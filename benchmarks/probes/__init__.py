"""Probes that each answered one question (benchmarks/RESULTS.md holds the answers); run as
`python -m benchmarks.probes.<name>` from the repository root."""

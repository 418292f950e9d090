"""Integrations with model libraries: `integrations.transformers` (whole gpt-oss models in
Hugging Face transformers). Each needs its library, an optional dependency."""

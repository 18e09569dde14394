"""Latency studies of RaLMSpec vs the naive iterative RaLM loop (issue 5).

Entry point: ``python -m experiments.run experiments/configs/quick.toml``. See
``experiments/README.md`` for the studies, the presets and the latest results.
"""

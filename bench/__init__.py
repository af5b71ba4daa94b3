"""sage-finetune benchmarks with baselines: `python -m bench` (see bench/README.md)."""

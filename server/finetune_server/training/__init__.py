"""Configs, presets and validation; models and their families; the data pipeline; the LoRA training engine."""

"""The service in the caller's process (LoRATrainer): the same validation, engine and export, without a server."""

"""The `finetune` commands that talk to a server: connection and exit codes, config files, tables, the live display.

Imported lazily by `finetune_server.cli`, so `finetune --help` and `finetune serve` don't pay for grpc and rich
tables; nothing here imports torch.
"""

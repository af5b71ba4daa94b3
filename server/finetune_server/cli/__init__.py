"""The `finetune` command line: `main` declares the commands; the modules beside it hold what they share (connection
and exit codes, config files, tables, the live display). Only `main` and typer load up front, so `finetune --help`
stays fast; nothing here imports torch."""

"""`finetune demo` and the tiny model it trains: the whole service on an embedded default, offline."""

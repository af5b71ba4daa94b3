"""The training engine: the recipe (`recipe.run_training`) and what it is built from.

data_setup (tokenizer, encoded data, eval split, batch plan), batching (plans and collation), model_loading,
optim (optimizer and schedule), distributed (torchrun ranks), checkpoint, events, errors, and the report.
"""

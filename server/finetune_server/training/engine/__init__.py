"""The training engine: batch planning and collation, the training loop, and the report saved with a job's outputs."""

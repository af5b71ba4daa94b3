"""What the service tells people about itself: structured logs, Prometheus metrics, TensorBoard files, the loss plot."""

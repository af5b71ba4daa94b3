"""The gRPC face of the service: transport, the thin servicer, the one error mapping, interceptors and auth."""

"""Jobs and exports as the service runs them: the queue and scheduler, event fan-out, exports and downloads."""

"""What the service keeps: the data dir's layout, the job store (jobs, events, datasets, artifacts), uploads."""

"""What the service keeps: the data dir's layout and id, the job store (jobs, events, datasets, artifacts; SQLite for
one server, PostgreSQL for several, picked by `store_url`), uploads."""

"""Small helpers with no home of their own: path confinement, finite JSON values, file hashes."""

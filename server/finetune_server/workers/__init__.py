"""Work in a child process: the typed message protocol, spawning and supervision, the executor, the worker entries."""

"""The front process's model side (never torch): registry, batcher, worker pool, worker handles, venvs."""

"""What several stages share, below all of them: atomic files and hashing, the shard format and
its manifest, the stage cache, the retry policy, provenance and the per-task specs.

Nothing here imports Prefect, MLflow or torch, so any process (a Dask worker, a torchrun rank,
a serving container) can use it.
"""

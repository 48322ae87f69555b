"""The stage logic of the pipeline: plain typed functions, wrapped thinly by Prefect's `@task`.

Layers, bottom to top; a module imports only from its own layer's package or below
(tests/test_layout.py checks it):

    tasks/core/        files, hashing, shard format, manifest, stage cache, retry policy, task specs
    tasks/modeling/    devices, parallelism, checkpoints, task data, metrics, the model on disk
    tasks/run/         the run itself: plan, tracking, summary, events
    tasks/preprocess/  corpus files -> tokenizer -> Arrow shards + manifest
    tasks/train/       shards -> trained weights (one loop, in process or under torchrun)
    tasks/evaluate/    weights -> metrics on the frozen eval set, and a report
    tasks/registry/    MLflow registry: register, gate, promote, roll back, export
    tasks/gc/          what `tokenmill gc` keeps and removes

The five stage packages sit side by side and never import one another; each one's `__init__`
names the Prefect tasks the flows wire.
"""

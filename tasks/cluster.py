"""A Dask client: an existing scheduler when an address is given, else a LocalCluster.

On a remote cluster the workers must have tokenmill installed and see the state dir
(shared storage), because they read the corpus and write shards themselves.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

import dask


# Dask's statistical profiler samples every worker thread's stack every 10 ms; on CPU-bound
# encoding it cost 20-35% of the throughput (benchmarks/preprocess.py, 2 cores). Nobody reads
# those profiles here, so LocalCluster workers run without it, and sample their system load less often.
QUIET_WORKERS = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
}


@contextmanager
def dask_client(address: str | None, n_workers: int | None = None) -> Iterator:
    from distributed import Client, LocalCluster

    # Prefect's logging setup turns distributed's INFO chatter back on; progress is ours to show.
    for name in ("distributed", "distributed.scheduler", "distributed.nanny", "distributed.worker", "distributed.core", "distributed.http.proxy"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if address:
        with Client(address, timeout="30s") as client:
            yield client
        return
    workers = n_workers or max(1, min(os.cpu_count() or 1, 8))
    with dask.config.set(QUIET_WORKERS), LocalCluster(
        n_workers=workers,
        threads_per_worker=1,
        processes=True,
        dashboard_address=":0",
        silence_logs=logging.ERROR,
    ) as cluster, Client(cluster) as client:
        yield client

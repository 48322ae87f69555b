"""A Dask client: an existing scheduler when an address is given, else a LocalCluster.

`client_in_background` starts it in a thread, so the caller can do its own set-up (train a
tokenizer, look up cached work) while the worker processes start. On a remote cluster the
workers must have tokenmill installed and see the state dir (shared storage), because they
read the corpus and write shards themselves.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor, wait
from contextlib import ExitStack, contextmanager

import dask

from tokenmill.errors import TokenmillError

WORKER_START_TIMEOUT = 120  # seconds for the first local worker to come up


# Dask's statistical profiler samples every worker thread's stack every 10 ms; on CPU-bound
# encoding it cost 20-35% of the throughput (benchmarks/preprocess.py, 2 cores). Nobody reads
# those profiles here, so LocalCluster workers run without it, and sample their system load less
# often. The 20 ms event-loop tick (it only warns about a blocked loop) and the 100 ms memory
# check cost the scheduler, in the client process, about 0.2 CPU-s per 25 MB encoded; 1 s is plenty.
QUIET_WORKERS = {
    "distributed.worker.profile.enabled": False,
    "distributed.admin.system-monitor.interval": "2s",
    "distributed.admin.tick.interval": "1s",
    "distributed.worker.memory.monitor-interval": "1s",
}


# Each spawned worker process (and its nanny) imports distributed, numpy and pyarrow afresh:
# about 0.5 CPU-s per worker here, all competing with the first workers' encoding. From a
# fork server that imported them once, the workers are forks. On 2 cores (spawn vs fork
# server, time until every worker has run a task / CPU-s of all processes): 2 workers 0.6-0.8 s
# / 1.0 s vs 0.9-1.1 s / 1.0 s; 4 workers 1.1 s / 2.0 s vs 1.0-1.2 s / 1.2-1.4 s; 8 workers
# 2.2-2.4 s / 4.2-4.5 s vs 1.4 s / 1.9-2.0 s. So the fork server from 4 workers up, unless the
# Dask config already names a start method other than its default.
FORKSERVER_FROM_WORKERS = 4
# distributed starts each worker with MALLOC_TRIM_THRESHOLD_=65536 so that freed memory goes back
# to the OS at once. Setting any malloc threshold also turns off glibc's adaptive mmap threshold,
# so every numpy temporary over 128 KiB is mapped, page-faulted and unmapped again: with it,
# MinHash signatures took 3x as long in the workers and encoding itself 15-20% more CPU
# (BENCHMARKS.md, "Data quality"). Partitions are bounded, so memory stays bounded without it.
DASK_MALLOC_DEFAULT = ("MALLOC_TRIM_THRESHOLD_", 65536)


def worker_environ_config() -> dict[str, dict]:
    """distributed's pre-spawn environment for local workers without its malloc trim threshold
    (only when that is distributed's own default: a threshold set on purpose is kept)."""
    environ = dict(dask.config.get("distributed.nanny.pre-spawn-environ", {}))
    name, default = DASK_MALLOC_DEFAULT
    if str(environ.get(name)) == str(default):
        del environ[name]
    return {"distributed.nanny.pre-spawn-environ": environ}


def start_method_config(workers: int) -> dict[str, str]:
    default = dask.config.get("distributed.worker.multiprocessing-method", "spawn") == "spawn"
    if workers >= FORKSERVER_FROM_WORKERS and default and "forkserver" in multiprocessing.get_all_start_methods():
        return {"distributed.worker.multiprocessing-method": "forkserver"}
    return {}


def security_for(address: str):
    """The client's TLS settings for a `tls://` (or `wss://`) scheduler, from the certificate
    files TOKENMILL_DASK_TLS_CA_FILE, _CERT and _KEY name; None (Dask's own config) otherwise.
    Plain TCP off this machine is refused unless TOKENMILL_DASK_ALLOW_INSECURE=1."""
    from tokenmill.runtime import DASK_TLS_VARS, check_dask_address

    check_dask_address(address)
    if not address.startswith(("tls://", "wss://")):
        return None
    from distributed import Security

    ca, cert, key = (os.environ[name] for name in DASK_TLS_VARS)
    return Security(tls_ca_file=ca, tls_client_cert=cert, tls_client_key=key, require_encryption=True)


@contextmanager
def dask_client(address: str | None, n_workers: int | None = None) -> Iterator:
    from distributed import Client, LocalCluster

    from tokenmill.console import verbose

    # Prefect's logging setup turns distributed's INFO chatter back on; progress is ours to show,
    # unless `tokenmill --verbose` asked for the frameworks' logs.
    level = logging.INFO if verbose() else logging.ERROR
    for name in (
        "distributed",
        "distributed.scheduler",
        "distributed.nanny",
        "distributed.worker",
        "distributed.core",
        "distributed.http.proxy",
    ):
        logging.getLogger(name).setLevel(level)
    if address:
        with Client(address, timeout="30s", security=security_for(address)) as client:
            yield client
        return
    workers = n_workers or max(1, min(os.cpu_count() or 1, 8))
    # The cluster starts empty and is scaled up without waiting, so the first worker takes
    # work while the others are still starting (16 workers take ~3 s to come up).
    with (
        dask.config.set({**QUIET_WORKERS, **worker_environ_config(), **start_method_config(workers)}),
        LocalCluster(
            n_workers=0,
            threads_per_worker=1,
            processes=True,
            dashboard_address=":0",
            silence_logs=level,
        ) as cluster,
        Client(cluster) as client,
    ):
        cluster.scale(workers)
        try:
            client.wait_for_workers(1, timeout=WORKER_START_TIMEOUT)
        except TimeoutError:
            raise TokenmillError(
                f"no Dask worker started within {WORKER_START_TIMEOUT} s; run `python -c 'import distributed'` "
                f"to check the environment, or give a running scheduler with --dask-address"
            ) from None
        yield client


def local_workers(requested: int | None, n_partitions: int) -> int:
    """LocalCluster workers for a run: `requested` (default: one per core), never more than
    there are partitions, since a worker with nothing to encode only costs its start-up."""
    return max(1, min(requested or os.cpu_count() or 1, n_partitions))


def planned_workers(client) -> int:
    """The workers a local cluster is starting (they join as they come up), else those connected."""
    spec = getattr(getattr(client, "cluster", None), "worker_spec", None)
    return len(spec) if spec else len(client.scheduler_info()["workers"])


@contextmanager
def client_in_background(address: str | None, n_workers: int | None = None) -> Iterator[Callable]:
    """Yields a function that returns the client of `dask_client(address, n_workers)`, waiting
    for it only when first called; the cluster starts meanwhile (about 1 s for a LocalCluster)."""
    stack = ExitStack()
    # one thread enters and leaves the client: distributed keeps the current client in a context variable
    with ThreadPoolExecutor(1, thread_name_prefix="dask-client") as pool:
        starting = pool.submit(stack.enter_context, dask_client(address, n_workers))
        try:
            yield starting.result
        finally:
            wait([starting])
            pool.submit(stack.close).result()

"""A remote Dask scheduler runs whatever its clients send: tokenmill talks to one over TLS, or
over plain TCP only on loopback or when told the network is trusted."""

import pytest

from tokenmill.errors import TokenmillError
from tokenmill.runtime import DASK_TLS_VARS, check_dask_address


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:8786", "localhost:8786", "tcp://[::1]:8786", None, ""])
def test_loopback_and_no_address_are_fine(address):
    check_dask_address(address)


@pytest.mark.parametrize("address", ["tcp://10.0.0.5:8786", "dask-scheduler:8786", "ws://sched.internal:8786"])
def test_plain_tcp_off_this_machine_is_refused_unless_opted_in(address, monkeypatch):
    monkeypatch.delenv("TOKENMILL_DASK_ALLOW_INSECURE", raising=False)
    refused = "refusing the unencrypted Dask scheduler .*TOKENMILL_DASK_ALLOW_INSECURE=1"
    with pytest.raises(TokenmillError, match=refused):
        check_dask_address(address)
    monkeypatch.setenv("TOKENMILL_DASK_ALLOW_INSECURE", "1")
    check_dask_address(address)


def test_tls_needs_the_three_certificate_files(monkeypatch):
    for name in DASK_TLS_VARS:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("TOKENMILL_DASK_TLS_CA_FILE", "/etc/ca.pem")
    with pytest.raises(TokenmillError, match="TOKENMILL_DASK_TLS_CERT, TOKENMILL_DASK_TLS_KEY is not set"):
        check_dask_address("tls://sched.internal:8786")


@pytest.mark.e2e  # starts a scheduler and a worker
def test_preprocessing_work_runs_on_a_tls_scheduler_with_the_configured_certificates(tmp_path, monkeypatch):
    from distributed import Client, LocalCluster, Security

    from tasks.preprocess.cluster import dask_client

    certs = Security.temporary()  # a CA and a certificate it signed, held in memory
    for name, pem in zip(DASK_TLS_VARS, (certs.tls_ca_file, certs.tls_client_cert, certs.tls_client_key)):
        path = tmp_path / f"{name.lower()}.pem"
        path.write_text(pem)
        monkeypatch.setenv(name, str(path))
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False, protocol="tls://", security=certs,
                      dashboard_address=":0") as cluster:  # fmt: skip
        address = cluster.scheduler_address
        assert address.startswith("tls://")
        with dask_client(address) as client:
            assert client.submit(sum, [1, 2, 3]).result(timeout=30) == 6
        with pytest.raises((OSError, TimeoutError)):  # a client without the certificates gets nowhere
            Client(address.replace("tls://", "tcp://"), timeout="3s")


def test_local_workers_start_without_distributeds_malloc_trim_threshold():
    import dask

    from tasks.preprocess.cluster import worker_environ_config

    environ = worker_environ_config()["distributed.nanny.pre-spawn-environ"]
    assert "MALLOC_TRIM_THRESHOLD_" not in environ and environ["OMP_NUM_THREADS"] == 1
    with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": 1 << 20}):
        kept = worker_environ_config()["distributed.nanny.pre-spawn-environ"]
    assert kept["MALLOC_TRIM_THRESHOLD_"] == 1 << 20  # set on purpose: left alone

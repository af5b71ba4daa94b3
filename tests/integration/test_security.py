"""Authentication, per-token visibility, TLS and mutual TLS, and the queue limit, against real servers."""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from finetune_client import FinetuneServiceError, GrpcFineTuneService, from_rpc_error
from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.storage.layout import DataDir
from finetune_server.util.paths import folder_bytes

from .conftest import ADMIN, ALICE, BOB, RunningServer, start_server, stop_server
from .test_jobs import job_config, upload


def stub_for(server: RunningServer) -> tuple[grpc.Channel, pb_grpc.FineTuneServiceStub]:
    return server.stub()


def as_token(token: str) -> tuple[tuple[str, str], ...]:
    return (("authorization", f"Bearer {token}"),)


def test_calls_without_or_with_a_wrong_token_are_unauthenticated(auth_server: RunningServer) -> None:
    channel, stub = stub_for(auth_server)
    with channel:
        for metadata in ((), as_token("not-a-real-token-at-all"), (("authorization", ALICE),)):
            with pytest.raises(grpc.RpcError) as caught:
                stub.ListPresets(pb.ListPresetsRequest(), metadata=metadata, timeout=10)
            assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING, "health needs no token"
        assert stub.ListPresets(pb.ListPresetsRequest(), metadata=as_token(ALICE), timeout=10).presets


@pytest.mark.slow
def test_a_token_sees_and_deletes_only_its_own_jobs_and_artifacts_and_an_admin_sees_all(
    auth_server: RunningServer, tiny_model_dir: Path
) -> None:
    channel, stub = stub_for(auth_server)
    with channel:
        stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name)), metadata=as_token(ALICE))
        job = next(stream).job
        assert job.owner == "alice"
        events = [m.event for m in stream]
        assert events[-1].state_change.current == pb.JOB_STATE_SUCCEEDED

        hello = pb.ChatMessage(role="user", content="hello")
        denied = [
            lambda: stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=as_token(BOB), timeout=10),
            lambda: list(stub.WatchJob(pb.WatchJobRequest(job_id=job.id), metadata=as_token(BOB), timeout=10)),
            lambda: stub.CancelJob(pb.CancelJobRequest(job_id=job.id), metadata=as_token(BOB), timeout=10),
            lambda: list(stub.Export(pb.ExportRequest(job_id=job.id, format=1), metadata=as_token(BOB), timeout=60)),
            lambda: list(
                stub.Generate(pb.GenerateRequest(messages=[hello], job_id=job.id), metadata=as_token(BOB), timeout=10)
            ),
        ]
        for call in denied:
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.PERMISSION_DENIED

        bobs = stub.ListJobs(pb.ListJobsRequest(), metadata=as_token(BOB), timeout=10).jobs
        assert job.id not in {j.id for j in bobs}
        admins = stub.ListJobs(pb.ListJobsRequest(), metadata=as_token(ADMIN), timeout=10).jobs
        assert job.id in {j.id for j in admins}
        assert stub.GetJob(pb.GetJobRequest(job_id=job.id), metadata=as_token(ADMIN), timeout=10).job.owner == "alice"

        # Continuing another token's job: as unknown as a job that does not exist; the owner and an admin may.
        continued = job_config(tiny_model_dir.name, init_from_job=job.id)
        with pytest.raises(grpc.RpcError) as unknown:
            stub.ValidateConfig(pb.ValidateConfigRequest(config=continued), metadata=as_token(BOB), timeout=60)
        assert unknown.value.code() == grpc.StatusCode.NOT_FOUND
        assert [(v.field, v.reason) for v in from_rpc_error(unknown.value).violations] == [
            ("init_from_job", "JOB_NOT_FOUND")
        ]
        for token in (ALICE, ADMIN):
            request = pb.ValidateConfigRequest(config=continued)
            assert stub.ValidateConfig(request, metadata=as_token(token), timeout=60).valid

        artifact = list(stub.Export(pb.ExportRequest(job_id=job.id, format=1), metadata=as_token(ALICE)))[-1].artifact
        with pytest.raises(grpc.RpcError) as download:
            list(stub.DownloadArtifact(pb.DownloadArtifactRequest(artifact_id=artifact.id), metadata=as_token(BOB)))
        assert download.value.code() == grpc.StatusCode.PERMISSION_DENIED
        with pytest.raises(grpc.RpcError) as generate:
            list(
                stub.Generate(
                    pb.GenerateRequest(messages=[hello], artifact_id=artifact.id), metadata=as_token(BOB), timeout=10
                )
            )
        assert generate.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert artifact.owner == "alice"
        assert_only_alice_reaches(stub, artifact.id)

        # Alice deletes her job: the artifact stays hers (it holds its owner), downloadable, and only hers.
        with pytest.raises(grpc.RpcError) as bobs_delete:
            stub.DeleteJob(pb.DeleteJobRequest(job_id=job.id), metadata=as_token(BOB), timeout=10)
        assert bobs_delete.value.code() == grpc.StatusCode.PERMISSION_DENIED
        data = DataDir(auth_server.data_dir)
        assert data.job(job.id).root.is_dir(), "a refused delete removes nothing"
        deleted = stub.DeleteJob(pb.DeleteJobRequest(job_id=job.id), metadata=as_token(ALICE), timeout=10)
        assert list(deleted.deleted_artifact_ids) == [] and not data.job(job.id).root.exists()
        assert_only_alice_reaches(stub, artifact.id)
        download_all = pb.DownloadArtifactRequest(artifact_id=artifact.id)
        chunks = list(stub.DownloadArtifact(download_all, metadata=as_token(ALICE), timeout=60))
        assert {c.path for c in chunks} == {f.path for f in artifact.files}
        request = pb.GenerateRequest(messages=[hello], artifact_id=artifact.id, max_new_tokens=2)
        answer = list(stub.Generate(request, metadata=as_token(ALICE), timeout=120))
        assert answer[-1].finish.step == artifact.step, "it still answers: the artifact names its base model"

        held = folder_bytes(data.artifact(artifact.id)) + data.artifact_log(artifact.id).stat().st_size
        removed = stub.DeleteArtifact(pb.DeleteArtifactRequest(artifact_id=artifact.id), metadata=as_token(ALICE))
        assert removed.artifact == artifact and removed.freed_bytes == held
        assert not data.artifact(artifact.id).exists() and not data.artifact_log(artifact.id).exists()


def assert_only_alice_reaches(stub: pb_grpc.FineTuneServiceStub, artifact_id: str) -> None:
    """Bob neither lists, gets nor deletes Alice's artifact; Alice and the admin list and get it."""
    for token in (ALICE, ADMIN):
        listed = stub.ListArtifacts(pb.ListArtifactsRequest(), metadata=as_token(token), timeout=10).artifacts
        assert artifact_id in {a.id for a in listed}
        got = stub.GetArtifact(pb.GetArtifactRequest(artifact_id=artifact_id), metadata=as_token(token), timeout=10)
        assert got.artifact.owner == "alice"
    bobs = stub.ListArtifacts(pb.ListArtifactsRequest(), metadata=as_token(BOB), timeout=10).artifacts
    assert artifact_id not in {a.id for a in bobs}
    for call in (
        lambda: stub.GetArtifact(pb.GetArtifactRequest(artifact_id=artifact_id), metadata=as_token(BOB), timeout=10),
        lambda: stub.DeleteArtifact(
            pb.DeleteArtifactRequest(artifact_id=artifact_id), metadata=as_token(BOB), timeout=10
        ),
        lambda: list(
            stub.DownloadArtifact(pb.DownloadArtifactRequest(artifact_id=artifact_id), metadata=as_token(BOB))
        ),
    ):
        with pytest.raises(grpc.RpcError) as denied:
            call()
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED


def test_the_client_sends_its_token(auth_server: RunningServer, tiny_model_dir: Path) -> None:
    with GrpcFineTuneService(auth_server.address, token=ALICE) as client:
        assert client.validate_config({"model_name": tiny_model_dir.name, "dataset": "facts.jsonl"})["valid"]


@dataclass(frozen=True)
class Certificates:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def certificates(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    """A throwaway CA, a server certificate for 127.0.0.1/localhost and a client certificate, made by openssl."""
    d = tmp_path_factory.mktemp("pki")
    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes")
    _openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=test-ca", cwd=d)
    (d / "server.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    for name, ext in (("server", ["-extfile", "server.ext"]), ("client", [])):
        _openssl("req", *ec, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}", cwd=d)
        _openssl(
            "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", f"{name}.pem", "-days", "2", *ext, cwd=d,
        )  # fmt: skip
    return Certificates(d / "ca.pem", d / "server.pem", d / "server.key", d / "client.pem", d / "client.key")


def test_tls_server_refuses_plaintext_and_serves_tls_clients(
    tmp_path: Path, server_roots: tuple[Path, Path], certificates: Certificates
) -> None:
    tls = ("--tls-cert", str(certificates.server_cert), "--tls-key", str(certificates.server_key))
    server = start_server(tmp_path, *server_roots, *tls)
    try:
        with GrpcFineTuneService(server.address, timeout=5, retries=0) as plain:
            with pytest.raises(FinetuneServiceError) as caught:
                plain.list_presets()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        with GrpcFineTuneService(server.address, root_certificates=certificates.ca.read_bytes()) as secure:
            assert secure.list_presets().presets
    finally:
        stop_server(server)


def test_mutual_tls_requires_a_client_certificate(
    tmp_path: Path, server_roots: tuple[Path, Path], certificates: Certificates
) -> None:
    tls = (
        "--tls-cert", str(certificates.server_cert), "--tls-key", str(certificates.server_key),
        "--tls-client-ca", str(certificates.ca),
    )  # fmt: skip
    server = start_server(tmp_path, *server_roots, *tls)
    ca = certificates.ca.read_bytes()
    try:
        with GrpcFineTuneService(server.address, root_certificates=ca, timeout=5, retries=0) as anonymous:
            with pytest.raises(FinetuneServiceError) as caught:
                anonymous.list_presets()
            assert caught.value.code == grpc.StatusCode.UNAVAILABLE
        with GrpcFineTuneService(
            server.address,
            root_certificates=ca,
            client_certificate=certificates.client_cert.read_bytes(),
            client_key=certificates.client_key.read_bytes(),
        ) as identified:
            assert identified.list_presets().presets
    finally:
        stop_server(server)


@pytest.mark.slow
def test_a_full_queue_is_resource_exhausted(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    server = start_server(tmp_path, *server_roots, "--max-queued-jobs", "1")
    channel, stub = server.stub()
    long_run = job_config(tiny_model_dir.name, max_steps=100000, save_steps=0)
    try:
        running = stub.Train(pb.TrainRequest(config=long_run))
        first = next(running).job
        for message in running:  # the first job leaves the queue once it runs
            if message.event.state_change.current == pb.JOB_STATE_RUNNING:
                break
        queued = next(stub.Train(pb.TrainRequest(config=long_run))).job
        with pytest.raises(grpc.RpcError) as caught:
            next(stub.Train(pb.TrainRequest(config=long_run)))
        assert caught.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        refused = from_rpc_error(caught.value)
        assert refused.reason == "QUEUE_FULL" and refused.retry_delay == 30.0, "RetryInfo: the queue empties slowly"
        (quota,) = refused.quota_violations
        assert (quota.subject, quota.quota_id) == ("server", "max_queued_jobs") and "limit is 1" in quota.description
        for job in (queued, first):
            stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
    finally:
        channel.close()
        stop_server(server)


@pytest.mark.slow
def test_disk_space_is_checked_before_jobs_and_exports(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    server = start_server(tmp_path, *server_roots)
    channel, stub = server.stub()
    try:
        stream = stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=2)))
        job = next(stream).job
        assert [m.event for m in stream][-1].state_change.current == pb.JOB_STATE_SUCCEEDED
    finally:
        channel.close()
        stop_server(server)

    # The same data dir, now with more space asked to be kept free than any disk has.
    hungry = start_server(tmp_path, *server_roots, "--disk-reserve-bytes", str(10**18))
    channel, stub = hungry.stub()
    try:
        for call in (
            lambda: next(stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name)))),
            lambda: list(stub.Export(pb.ExportRequest(job_id=job.id, format=pb.EXPORT_FORMAT_MERGED))),
        ):
            with pytest.raises(grpc.RpcError) as caught:
                call()
            assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
            assert "GiB" in (caught.value.details() or ""), "the refusal says how much is needed"
    finally:
        channel.close()
        stop_server(hungry)


@pytest.mark.slow
def test_one_connection_gets_at_most_its_streams_and_others_are_unaffected(
    tmp_path: Path, server_roots: tuple[Path, Path], tiny_model_dir: Path
) -> None:
    server = start_server(tmp_path, *server_roots, "--max-streams-per-connection", "4")
    # Channels to one address share a TCP connection unless each has its own subchannel pool.
    own_connection = [("grpc.use_local_subchannel_pool", 1)]
    greedy = grpc.insecure_channel(server.address, options=own_connection)
    other = grpc.insecure_channel(server.address, options=own_connection)
    greedy_stub, other_stub = pb_grpc.FineTuneServiceStub(greedy), pb_grpc.FineTuneServiceStub(other)
    try:
        training = other_stub.Train(pb.TrainRequest(config=job_config(tiny_model_dir.name, max_steps=100000)))
        job = next(training).job
        watches = [greedy_stub.WatchJob(pb.WatchJobRequest(job_id=job.id), timeout=120) for _ in range(4)]
        for watch in watches:
            assert next(watch).event.sequence == 1  # each of the 4 streams is open on the server
        fifth = pb.GetJobRequest(job_id=job.id)
        with pytest.raises(grpc.RpcError) as caught:
            greedy_stub.GetJob(fifth, timeout=2)  # waits for a free stream of this connection until its deadline
        assert caught.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        assert other_stub.GetJob(fifth, timeout=30).job.id == job.id  # another connection is not held up
        watches[0].cancel()
        assert greedy_stub.GetJob(fifth, timeout=30).job.id == job.id  # a freed stream serves the waiting call
        other_stub.CancelJob(pb.CancelJobRequest(job_id=job.id), timeout=10)
        training.cancel()
        for watch in watches[1:]:
            watch.cancel()
    finally:
        greedy.close()
        other.close()
        stop_server(server)


def test_a_token_sees_and_deletes_only_its_own_datasets(auth_server: RunningServer) -> None:
    data = b'{"instruction": "Shared?", "output": "Yes."}\n' * 3
    channel, stub = auth_server.stub()
    with channel:
        alices = upload(stub, data, metadata=as_token(ALICE)).dataset
        bobs = upload(stub, data, metadata=as_token(BOB)).dataset
        assert alices.id != bobs.id, "the same content is two datasets: neither learns of the other's"
        listed = stub.ListDatasets(pb.ListDatasetsRequest(), metadata=as_token(BOB), timeout=10).datasets
        assert [d.id for d in listed] == [bobs.id]
        everyone = stub.ListDatasets(pb.ListDatasetsRequest(), metadata=as_token(ADMIN), timeout=10).datasets
        assert {alices.id, bobs.id} <= {d.id for d in everyone}
        for call in (
            lambda: stub.GetDataset(pb.GetDatasetRequest(dataset_id=alices.id), metadata=as_token(BOB), timeout=10),
            lambda: stub.DeleteDataset(
                pb.DeleteDatasetRequest(dataset_id=alices.id), metadata=as_token(BOB), timeout=10
            ),
        ):
            with pytest.raises(grpc.RpcError) as denied:
                call()
            assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        deleted = stub.DeleteDataset(pb.DeleteDatasetRequest(dataset_id=bobs.id), metadata=as_token(BOB), timeout=10)
        assert deleted.dataset.id == bobs.id and deleted.freed_bytes == len(data)
        kept = stub.GetDataset(pb.GetDatasetRequest(dataset_id=alices.id), metadata=as_token(ALICE), timeout=10)
        assert kept.dataset.sha256 == alices.sha256

"""GrpcFineTuneService: the typed client of a sage-finetune server, usable wherever an IFineTuneService is.

Network failures are handled here so callers don't have to: the unary calls that only read or check are retried on
UNAVAILABLE by gRPC itself, from the published service config (`finetune_client.channel`); a dropped Train or WatchJob
stream is resumed with WatchJob from the last event seen (each event is delivered once), a dropped download resumes
from its offset, both with exponential backoff and jitter; keepalive pings notice a connection that died silently, so
a stream waiting on a queued job fails UNAVAILABLE and resumes instead of hanging. Everything else surfaces as a
FinetuneServiceError carrying the server's reason, hint and field violations.
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from os import PathLike
from pathlib import Path, PurePosixPath
from types import TracebackType
from typing import Any, Self

import grpc
from google.protobuf.message import Message

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_client.channel import KEEPALIVE_TIME_S, KEEPALIVE_TIMEOUT_S, channel_options
from finetune_client.convert import (
    ConfigConversionError,
    config_from_dict,
    dict_to_message,
    export_result_from_artifact,
    message_to_dict,
    progress_from_proto,
    train_result_from_job,
    validation_result_from_report,
)
from finetune_client.errors import FinetuneServiceError, from_rpc_error
from finetune_client.interface import (
    ExportResult,
    IFineTuneService,
    ProgressCallback,
    TrainResult,
    ValidationResult,
)

__all__ = ["CHUNK_SIZE", "GrpcFineTuneService", "TextStream"]

logger = logging.getLogger(__name__)

CHUNK_SIZE = 1024 * 1024  # upload chunk: well under gRPC's default 4 MiB message limit
_FINAL_STATES = frozenset({pb.JOB_STATE_SUCCEEDED, pb.JOB_STATE_FAILED, pb.JOB_STATE_CANCELLED})
_REJECTED_CONFIG_CODES = frozenset(
    {grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND, grpc.StatusCode.PERMISSION_DENIED}
)


class GrpcFineTuneService(IFineTuneService):
    """Talks to a FineTuneService at `target` ("host:port") or over an existing channel (which stays the caller's).

    `timeout` is the deadline of unary calls in seconds (streams have none: jobs run for hours). `retries` is how many
    times a stream reconnect or a download resume is retried after UNAVAILABLE, and the retries (at most 4) of the
    service config's retry policy for the unary calls that have one. `keepalive_time` is the silence in seconds after
    which the channel pings the server (None: never; the server must permit it: its default minimum is 10 s), and
    `keepalive_timeout` how long an unanswered ping takes to fail the connection. `token` is sent
    as `authorization: Bearer <token>`. TLS is used when `tls` is true or `root_certificates` (PEM bytes) are given;
    `client_certificate` and `client_key` (PEM bytes) identify this client to a server that requires mutual TLS.
    `options` are extra channel options; they win over ours. An existing channel keeps its own options: build it with
    `finetune_client.channel.channel_options()` for the same retries and keepalive.
    """

    def __init__(
        self,
        target: str | grpc.Channel,
        *,
        token: str | None = None,
        timeout: float | None = 30.0,
        retries: int = 3,
        initial_backoff: float = 0.25,
        max_backoff: float = 10.0,
        root_certificates: bytes | None = None,
        tls: bool = False,
        client_certificate: bytes | None = None,
        client_key: bytes | None = None,
        options: Sequence[tuple[str, Any]] = (),
        keepalive_time: float | None = KEEPALIVE_TIME_S,
        keepalive_timeout: float = KEEPALIVE_TIMEOUT_S,
    ) -> None:
        if isinstance(target, str):
            self._address = target
            ours = channel_options(
                keepalive_time=keepalive_time,
                keepalive_timeout=keepalive_timeout,
                retries=retries,
                initial_backoff=initial_backoff,
                max_backoff=max_backoff,
            )
            merged = list({**dict(ours), **dict(options)}.items())
            if tls or root_certificates is not None or client_certificate is not None:
                credentials = grpc.ssl_channel_credentials(
                    root_certificates=root_certificates, private_key=client_key, certificate_chain=client_certificate
                )
                self._channel = grpc.secure_channel(target, credentials, options=merged)
            else:
                self._channel = grpc.insecure_channel(target, options=merged)
            self._owns_channel = True
        else:
            self._address = "the given channel"
            self._channel = target
            self._owns_channel = False
        self._stub = pb_grpc.FineTuneServiceStub(self._channel)
        self._metadata: tuple[tuple[str, str], ...] = (("authorization", f"Bearer {token}"),) if token else ()
        self._timeout = timeout
        self._retries = max(0, retries)
        self._initial_backoff = initial_backoff
        self._max_backoff = max_backoff
        self._lock = threading.Lock()
        self._last_job_id: str | None = None

    # ----------------------------------------------------------------------------------------------------------
    # lifecycle
    # ----------------------------------------------------------------------------------------------------------

    def close(self) -> None:
        """Close the channel if this client created it."""
        if self._owns_channel:
            self._channel.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"GrpcFineTuneService({self._address!r})"

    @property
    def last_job_id(self) -> str | None:
        """The job the last train()/iter_train() of this client created (export_model's default)."""
        with self._lock:
            return self._last_job_id

    # ----------------------------------------------------------------------------------------------------------
    # IFineTuneService
    # ----------------------------------------------------------------------------------------------------------

    def validate_config(
        self,
        config: Mapping[str, Any] | pb.TrainingConfig,
        *,
        target_device: str = "",
        on_progress: Callable[[pb.ValidationProgress], None] | None = None,
    ) -> ValidationResult:
        """The server's report; a rejected config is a result with `valid=False`, not an exception.

        A dict that cannot even be converted (unknown keys, wrong types) is reported the same way, without a call.
        With `on_progress`, the validation streams (StreamValidateConfig): the callback hears how far the dataset
        checks are, and the call has no deadline, so a big dataset can take as long as its check needs.
        """
        try:
            message = _to_config(config)
        except ConfigConversionError as exc:
            return ValidationResult(valid=False, errors=list(exc.problems), violations=list(exc.violations))
        try:
            if on_progress is None:
                request = pb.ValidateConfigRequest(config=message, target_device=target_device)
                return validation_result_from_report(self._unary("ValidateConfig", request))
            return validation_result_from_report(self._streamed_validation(message, target_device, on_progress))
        except FinetuneServiceError as exc:
            if exc.code not in _REJECTED_CONFIG_CODES:
                raise
            if exc.report is not None:
                return validation_result_from_report(exc.report)
            if exc.violations:
                return ValidationResult(
                    valid=False, errors=[str(v) for v in exc.violations], violations=list(exc.violations)
                )
            raise

    def train(
        self,
        config: Mapping[str, Any] | pb.TrainingConfig,
        progress_callback: ProgressCallback | None = None,
        *,
        display_name: str = "",
        request_id: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> TrainResult:
        """Start a job and follow it to its end; returns its result (success=False for a failed or cancelled job).

        Raises ConfigConversionError for a dict that cannot be converted and FinetuneServiceError when the server
        rejects the config or cannot be reached. A callback that raises is logged and does not stop the watch.
        """
        job = pb.Job()
        for response in self.iter_train(config, display_name=display_name, request_id=request_id, labels=labels):
            if response.WhichOneof("kind") == "job":
                job.CopyFrom(response.job)
                continue
            event = response.event
            _apply_event(job, event)
            if progress_callback is not None and event.WhichOneof("kind") == "progress":
                try:
                    progress_callback(progress_from_proto(event.progress, job.id))
                except Exception:
                    logger.exception("progress callback failed for job %s", job.id)
        if job.state not in _FINAL_STATES:
            # The stream ended without a final state (e.g. the server shut down gracefully): ask for the truth.
            job = self.get_job(job.id)
        return train_result_from_job(job)

    def export_model(
        self,
        output_path: str | PathLike[str],
        *,
        format: str = "adapter",  # noqa: A002 - the keyword callers already pass
        job_id: str | None = None,
        overwrite: bool = False,
        checkpoint_step: int | None = None,
        progress_callback: Callable[[pb.ExportProgress], None] | None = None,
        best_checkpoint_by: str = "",
    ) -> ExportResult:
        """Export on the server, download every file, verify each SHA-256, then move the folder into place at once.

        `checkpoint_step` exports that checkpoint, `best_checkpoint_by` (e.g. "eval_loss") the best evaluated one,
        neither the final adapter. `output_path` must not exist or be an empty folder unless `overwrite`. On any
        failure (a checksum mismatch raises FinetuneServiceError with DATA_LOSS) nothing is left at `output_path`
        and no partial folder remains.
        """
        job_id = job_id or self.last_job_id
        if not job_id:
            raise ValueError("no job to export: pass job_id, or train with this client first")
        target = Path(output_path)
        _check_target(target, overwrite)
        request = dict_to_message(
            {
                "job_id": job_id,
                "format": format,
                "checkpoint_step": checkpoint_step,
                "best_checkpoint_by": best_checkpoint_by,
            },
            pb.ExportRequest,
        )
        artifact = self._run_export(request, progress_callback)
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
        try:
            for file in artifact.files:
                destination = staging / _safe_relative_path(file.path)
                destination.parent.mkdir(parents=True, exist_ok=True)
                self._download_file(artifact.id, file, destination)
            _install(staging, target, overwrite)
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return export_result_from_artifact(artifact, str(target))

    # ----------------------------------------------------------------------------------------------------------
    # streaming
    # ----------------------------------------------------------------------------------------------------------

    def iter_train(
        self,
        config: Mapping[str, Any] | pb.TrainingConfig,
        *,
        display_name: str = "",
        request_id: str | None = None,
        labels: Mapping[str, str] | None = None,
    ) -> Iterator[pb.TrainResponse]:
        """The Train stream: first the job, then each event once, reconnecting through WatchJob when it drops.

        `request_id` None generates one, which makes retrying the Train call itself safe; "" sends none, and then
        Train is not retried (a retry could create a second job). `labels` are the job's, to find it by in list_jobs.
        """
        request = pb.TrainRequest(  # converted now, so a bad dict raises here and not at the first next()
            config=_to_config(config),
            request_id=uuid.uuid4().hex if request_id is None else request_id,
            display_name=display_name,
            labels=dict(labels or {}),
        )
        return self._train_stream(request)

    def _train_stream(self, request: pb.TrainRequest) -> Iterator[pb.TrainResponse]:
        call, first = self._open_train(request)
        with self._lock:
            self._last_job_id = first.job.id
        yield first
        for event in self._follow(first.job.id, 0, call):
            yield pb.TrainResponse(event=event)

    def watch(self, job_id: str, after_sequence: int = 0) -> Iterator[pb.JobEvent]:
        """A job's events after `after_sequence` until it ends, each once, reconnecting when the stream drops."""
        return self._follow(job_id, after_sequence, None)

    def _open_train(self, request: pb.TrainRequest) -> tuple[Any, pb.TrainResponse]:
        attempt = 0
        while True:
            call: Any = self._stub.Train(request, metadata=self._metadata)
            try:
                first = next(call)
            except StopIteration:
                raise FinetuneServiceError(grpc.StatusCode.INTERNAL, "the Train stream ended before the job") from None
            except grpc.RpcError as exc:
                if request.request_id and self._should_retry(exc, attempt):
                    attempt += 1
                    self._backoff("Train", attempt)
                    continue
                raise from_rpc_error(exc, address=self._address) from exc
            if first.WhichOneof("kind") != "job":
                call.cancel()
                raise FinetuneServiceError(grpc.StatusCode.INTERNAL, "the first Train message carries no job")
            return call, first

    def _follow(self, job_id: str, after_sequence: int, call: Any) -> Iterator[pb.JobEvent]:
        last = after_sequence
        attempt = 0
        try:
            while True:
                if call is None:
                    call = self._stub.WatchJob(
                        pb.WatchJobRequest(job_id=job_id, after_sequence=last), metadata=self._metadata
                    )
                try:
                    for response in call:
                        if isinstance(response, pb.TrainResponse) and response.WhichOneof("kind") != "event":
                            continue
                        event = response.event
                        attempt = 0
                        if event.sequence <= last:
                            continue  # already delivered (a replay after a reconnect)
                        last = event.sequence
                        yield event
                    return
                except grpc.RpcError as exc:
                    if not self._should_retry(exc, attempt):
                        raise from_rpc_error(exc, address=self._address) from exc
                    attempt += 1
                    call = None
                    self._backoff(f"WatchJob {job_id} after {last}", attempt)
        finally:
            if call is not None:
                call.cancel()  # the consumer stopped early: don't leave the stream open (the job goes on)

    # ----------------------------------------------------------------------------------------------------------
    # jobs, presets, server
    # ----------------------------------------------------------------------------------------------------------

    def get_job(self, job_id: str) -> pb.Job:
        response: pb.GetJobResponse = self._unary("GetJob", pb.GetJobRequest(job_id=job_id))
        return response.job

    def list_jobs(
        self, states: Iterable[str | int] = (), page_size: int = 0, *, labels: Mapping[str, str] | None = None
    ) -> Iterator[pb.Job]:
        """Every job in `states` (names like "running" or JobState values; empty: all) that has all of `labels`,
        newest first, all pages."""
        request = dict_to_message({"states": list(states), "page_size": page_size}, pb.ListJobsRequest)
        request.labels.update(labels or {})
        return self._pages("ListJobs", request, "jobs")

    def delete_job(self, job_id: str, *, delete_artifacts: bool = False) -> pb.DeleteJobResponse:
        """Delete a job that has ended: its folder, checkpoints, events and record (FAILED_PRECONDITION for a queued
        or running one). Its artifacts stay unless `delete_artifacts`. The answer says how many bytes were freed."""
        request = pb.DeleteJobRequest(job_id=job_id, delete_artifacts=delete_artifacts)
        response: pb.DeleteJobResponse = self._unary("DeleteJob", request)
        return response

    def _pages(self, method_name: str, request: Any, items: str) -> Iterator[Any]:
        """Every item of a paged list call (AIP-158): the pages one after another until the last."""
        while True:
            response = self._unary(method_name, request)
            yield from getattr(response, items)
            if not response.next_page_token:
                return
            request.page_token = response.next_page_token

    def list_checkpoints(self, job_id: str) -> list[pb.Checkpoint]:
        """A job's complete checkpoints, oldest first, each with its size and the evaluation at its step."""
        request = pb.ListCheckpointsRequest(job_id=job_id)
        response: pb.ListCheckpointsResponse = self._unary("ListCheckpoints", request)
        return list(response.checkpoints)

    def list_datasets(self, page_size: int = 0) -> Iterator[pb.Dataset]:
        """The caller's uploaded datasets, newest first, all pages."""
        return self._pages("ListDatasets", pb.ListDatasetsRequest(page_size=page_size), "datasets")

    def get_dataset(self, dataset_id: str) -> pb.Dataset:
        response: pb.GetDatasetResponse = self._unary("GetDataset", pb.GetDatasetRequest(dataset_id=dataset_id))
        return response.dataset

    def delete_dataset(self, dataset_id: str) -> pb.DeleteDatasetResponse:
        """Delete an uploaded dataset and its token cache entries; FAILED_PRECONDITION while a job trains on it."""
        response: pb.DeleteDatasetResponse = self._unary(
            "DeleteDataset", pb.DeleteDatasetRequest(dataset_id=dataset_id)
        )
        return response

    def list_artifacts(self, page_size: int = 0, *, job_id: str = "") -> Iterator[pb.Artifact]:
        """The caller's artifacts (of one job, with `job_id`), newest first, all pages."""
        return self._pages("ListArtifacts", pb.ListArtifactsRequest(page_size=page_size, job_id=job_id), "artifacts")

    def get_artifact(self, artifact_id: str) -> pb.Artifact:
        response: pb.GetArtifactResponse = self._unary("GetArtifact", pb.GetArtifactRequest(artifact_id=artifact_id))
        return response.artifact

    def delete_artifact(self, artifact_id: str) -> pb.DeleteArtifactResponse:
        """Delete an artifact's files and record; FAILED_PRECONDITION while it is being exported or downloaded."""
        response: pb.DeleteArtifactResponse = self._unary(
            "DeleteArtifact", pb.DeleteArtifactRequest(artifact_id=artifact_id)
        )
        return response

    def cancel_job(self, job_id: str) -> pb.Job:
        """Cancel a job (queued: at once; running: its worker stops). A finished job raises FAILED_PRECONDITION."""
        response: pb.CancelJobResponse = self._unary("CancelJob", pb.CancelJobRequest(job_id=job_id))
        return response.job

    def list_presets(self) -> pb.ListPresetsResponse:
        response: pb.ListPresetsResponse = self._unary("ListPresets", pb.ListPresetsRequest())
        return response

    def server_info(self) -> pb.GetServerInfoResponse:
        response: pb.GetServerInfoResponse = self._unary("GetServerInfo", pb.GetServerInfoRequest())
        return response

    # ----------------------------------------------------------------------------------------------------------
    # generation
    # ----------------------------------------------------------------------------------------------------------

    def generate(
        self,
        messages: Sequence[Mapping[str, str]],
        *,
        job_id: str | None = None,
        model_name: str | None = None,
        checkpoint_step: int | None = None,
        artifact_id: str | None = None,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int | None = None,
        stop: Sequence[str] | None = None,
        seed: int | None = None,
    ) -> TextStream:
        """The next assistant turn of `messages` ({"role", "content"} dicts), as text pieces while they are made.

        Name one of `job_id` (its final adapter, or `checkpoint_step`'s checkpoint), `model_name` (a base model) or
        `artifact_id` (an export). temperature 0 is greedy; `max_new_tokens` None takes the server's default (256).
        The returned iterator's `finish` holds the GenerateFinish (reason, token counts) once it is exhausted;
        closing it (or leaving a `with` block) early cancels the call, which stops the generation on the server.
        A dropped stream is not resumed (an answer cannot be continued): it raises FinetuneServiceError.
        """
        request = pb.GenerateRequest(
            messages=[pb.ChatMessage(role=m["role"], content=m["content"]) for m in messages],
            model_name=model_name or "",
            job_id=job_id or "",
            artifact_id=artifact_id or "",
            temperature=temperature,
            top_p=top_p,
            stop=list(stop or []),
        )
        if checkpoint_step is not None:
            request.checkpoint_step = checkpoint_step
        if max_new_tokens is not None:
            request.max_new_tokens = max_new_tokens
        if seed is not None:
            request.seed = seed
        return TextStream(self._stub.Generate(request, metadata=self._metadata), self._address)

    # ----------------------------------------------------------------------------------------------------------
    # datasets
    # ----------------------------------------------------------------------------------------------------------

    def upload_dataset(self, path: str | PathLike[str], data_format: str = "auto") -> dict[str, Any]:
        """Upload a JSON/JSONL file; returns the stored Dataset as a dict (its `id` can be a config's `dataset`)
        plus `already_existed`. The SHA-256 is sent first so the server rejects a corrupted upload."""
        source = Path(path)
        digest = hashlib.sha256()
        with source.open("rb") as handle:
            for block in iter(lambda: handle.read(CHUNK_SIZE), b""):
                digest.update(block)
        metadata = pb.UploadDatasetMetadata(filename=source.name, data_format=data_format, sha256=digest.hexdigest())

        def requests() -> Iterator[pb.UploadDatasetRequest]:
            yield pb.UploadDatasetRequest(metadata=metadata)
            with source.open("rb") as handle:
                for block in iter(lambda: handle.read(CHUNK_SIZE), b""):
                    yield pb.UploadDatasetRequest(chunk=block)

        try:
            response: pb.UploadDatasetResponse = self._stub.UploadDataset(requests(), metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, address=self._address) from exc
        result = message_to_dict(response.dataset)
        result["already_existed"] = response.already_existed
        return result

    # ----------------------------------------------------------------------------------------------------------
    # plumbing
    # ----------------------------------------------------------------------------------------------------------

    def _streamed_validation(
        self, config: pb.TrainingConfig, target_device: str, on_progress: Callable[[pb.ValidationProgress], None]
    ) -> pb.ValidateConfigResponse:
        request = pb.StreamValidateConfigRequest(config=config, target_device=target_device)
        try:
            for response in self._stub.StreamValidateConfig(request, metadata=self._metadata):
                if response.WhichOneof("kind") == "report":
                    return response.report
                on_progress(response.progress)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, address=self._address) from exc
        raise FinetuneServiceError(grpc.StatusCode.UNKNOWN, "the validation stream ended without a report")

    def _unary(self, method_name: str, request: Message) -> Any:
        """One call: the channel's service config retries the methods that may be repeated, and only those."""
        method = getattr(self._stub, method_name)
        try:
            return method(request, timeout=self._timeout, metadata=self._metadata)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, address=self._address) from exc

    def _should_retry(self, exc: grpc.RpcError, attempt: int) -> bool:
        code = exc.code() if isinstance(exc, grpc.Call) else None
        return code == grpc.StatusCode.UNAVAILABLE and attempt < self._retries

    def _backoff(self, what: str, attempt: int) -> None:
        """Exponential backoff with jitter (half fixed, half random) so many clients don't retry in lockstep."""
        ceiling = min(self._max_backoff, self._initial_backoff * 2 ** (attempt - 1))
        delay = random.uniform(ceiling / 2, ceiling)
        logger.info(
            "%s: server at %s unavailable, retry %d/%d in %.2fs", what, self._address, attempt, self._retries, delay
        )
        time.sleep(delay)

    def _run_export(
        self, request: pb.ExportRequest, progress_callback: Callable[[pb.ExportProgress], None] | None
    ) -> pb.Artifact:
        artifact: pb.Artifact | None = None
        try:
            for response in self._stub.Export(request, metadata=self._metadata):
                if response.WhichOneof("kind") == "artifact":
                    artifact = response.artifact
                elif progress_callback is not None:
                    progress_callback(response.progress)
        except grpc.RpcError as exc:
            raise from_rpc_error(exc, address=self._address) from exc
        if artifact is None:
            raise FinetuneServiceError(grpc.StatusCode.INTERNAL, "the Export stream ended without an artifact")
        return artifact

    def _download_file(self, artifact_id: str, file: pb.ArtifactFile, destination: Path) -> None:
        """Download one file, resuming from the bytes already written when the stream drops; verify its SHA-256."""
        digest = hashlib.sha256()
        offset = 0
        attempt = 0
        with destination.open("wb") as out:
            while True:
                request = pb.DownloadArtifactRequest(artifact_id=artifact_id, path=file.path, offset=offset)
                call = self._stub.DownloadArtifact(request, metadata=self._metadata)
                try:
                    for chunk in call:
                        if chunk.path != file.path or chunk.offset != offset:
                            raise FinetuneServiceError(
                                grpc.StatusCode.DATA_LOSS,
                                f"unexpected chunk {chunk.path}@{chunk.offset} while downloading {file.path}@{offset}",
                                reason="UNEXPECTED_CHUNK",
                            )
                        out.write(chunk.data)
                        digest.update(chunk.data)
                        offset += len(chunk.data)
                        attempt = 0
                    break
                except grpc.RpcError as exc:
                    if not self._should_retry(exc, attempt):
                        raise from_rpc_error(exc, address=self._address) from exc
                    attempt += 1
                    self._backoff(f"DownloadArtifact {file.path} from {offset}", attempt)
                finally:
                    call.cancel()
        actual = digest.hexdigest()
        if actual != file.sha256.lower() or offset != file.size_bytes:
            raise FinetuneServiceError(
                grpc.StatusCode.DATA_LOSS,
                f"{file.path}: expected {file.size_bytes} bytes with sha256 {file.sha256}, "
                f"received {offset} bytes with sha256 {actual}",
                reason="CHECKSUM_MISMATCH",
                hint="the download was corrupted or the artifact changed on the server; export again",
            )


class TextStream(Iterator[str]):
    """The text pieces of one Generate call; `finish` is its GenerateFinish once the last piece was read."""

    def __init__(self, call: Any, address: str) -> None:
        self._call = call
        self._address = address
        self._done = False
        self.finish: pb.GenerateFinish | None = None

    def __next__(self) -> str:
        if self._done:
            raise StopIteration
        try:
            response: pb.GenerateResponse = next(self._call)
        except StopIteration:
            self._done = True
            raise FinetuneServiceError(grpc.StatusCode.INTERNAL, "the Generate stream ended without a finish") from None
        except grpc.RpcError as exc:
            self._done = True
            raise from_rpc_error(exc, address=self._address) from exc
        if response.WhichOneof("kind") == "finish":
            self.finish = response.finish
            self._done = True
            raise StopIteration
        return response.text

    def close(self) -> None:
        """Cancel the call if it is still open: the server stops generating at its next token."""
        if not self._done:
            self._done = True
            self._call.cancel()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        self.close()


def _to_config(config: Mapping[str, Any] | pb.TrainingConfig) -> pb.TrainingConfig:
    return config if isinstance(config, pb.TrainingConfig) else config_from_dict(config)


def _apply_event(job: pb.Job, event: pb.JobEvent) -> None:
    """Keep a local copy of the job current from its events, so the final result needs no extra call."""
    job.last_sequence = event.sequence
    kind = event.WhichOneof("kind")
    if kind == "state_change":
        job.state = event.state_change.current
        if event.state_change.HasField("error"):
            job.error.CopyFrom(event.state_change.error)
    elif kind == "progress":
        job.progress.CopyFrom(event.progress)
    elif kind == "result":
        job.result.CopyFrom(event.result)


def _check_target(target: Path, overwrite: bool) -> None:
    if overwrite or not (target.exists() or target.is_symlink()):
        return
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        return
    raise FileExistsError(f"{target} exists and is not an empty folder; pass overwrite=True to replace it")


def _install(staging: Path, target: Path, overwrite: bool) -> None:
    """Move the verified folder into place with renames, so readers see the old content or the new, never a mix."""
    _check_target(target, overwrite)
    if target.is_dir() and not target.is_symlink() and not any(target.iterdir()):
        target.rmdir()
    if target.exists() or target.is_symlink():
        old = target.with_name(f".{target.name}.old-{uuid.uuid4().hex[:8]}")
        os.replace(target, old)
        os.replace(staging, target)
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old, ignore_errors=True)
        else:
            old.unlink(missing_ok=True)
        return
    os.replace(staging, target)


def _safe_relative_path(path: str) -> Path:
    """An artifact path as a relative path that cannot leave the output folder (the server is not trusted with it)."""
    parts = PurePosixPath(path).parts
    if not parts or PurePosixPath(path).is_absolute() or any(p in ("..", "") or "\\" in p for p in parts):
        raise FinetuneServiceError(
            grpc.StatusCode.DATA_LOSS, f"refusing artifact file path {path!r}", reason="UNSAFE_ARTIFACT_PATH"
        )
    return Path(*parts)

"""The FineTuneService servicer: translate messages, delegate to the domain, nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import grpc

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.api.auth import caller_name, check_access, visible_owner
from finetune_server.api.convert import (
    config_from_proto,
    export_format_from_proto,
    fill,
    job_to_proto,
    preset_config_to_proto,
    report_to_proto,
)
from finetune_server.api.errors import map_errors
from finetune_server.api.wire import EventWire
from finetune_server.errors import ErrorKind, FinetuneError, field_error
from finetune_server.host.server_info import ServerInfoProvider
from finetune_server.jobs import idempotency
from finetune_server.jobs.checkpoints import best_checkpoint, job_checkpoints
from finetune_server.jobs.datasets import DatasetService
from finetune_server.jobs.deletion import delete_job
from finetune_server.jobs.exports import ExportService
from finetune_server.jobs.generation import ChatRequest, GenerateService, GenerationFinish, check_request
from finetune_server.jobs.service import JobService
from finetune_server.settings import ServerSettings
from finetune_server.storage.dataset_uploads import store_upload
from finetune_server.storage.job_store import JobStore
from finetune_server.storage.records import ArtifactRecord, DatasetRecord, JobRecord, JobState
from finetune_server.training import presets
from finetune_server.training.data.checks import CheckStopped
from finetune_server.util.aio import get_unless_done

PROGRESS_INTERVAL_S = 1.0  # StreamValidateConfig's pace: often enough for a bar, rarely enough to cost nothing


class FineTuneServicer(pb_grpc.FineTuneServiceServicer):
    def __init__(
        self,
        settings: ServerSettings,
        info: ServerInfoProvider,
        jobs: JobService,
        store: JobStore,
        exports: ExportService,
        datasets: DatasetService,
        generation: GenerateService,
    ) -> None:
        self._settings = settings
        self._info = info
        self._jobs = jobs
        self._store = store
        self._exports = exports
        self._datasets = datasets
        self._generation = generation
        self._wire = EventWire()

    async def _job_of_caller(self, job_id: str) -> JobRecord:
        job = await self._jobs.get(job_id)
        check_access(job.owner, f"job {job_id}")
        return job

    async def _validated(
        self,
        config_message: pb.TrainingConfig,
        target_device: str,
        context: grpc.aio.ServicerContext,
        on_progress: Callable[[str, int, int | None], None] | None = None,
    ) -> pb.ValidateConfigResponse:
        """The report of ValidateConfig and StreamValidateConfig; a rejection raises with the report as detail."""
        config = config_from_proto(config_message)
        try:  # off the event loop, and stopped when the caller goes
            report = await self._jobs.validate(
                config,
                target_device,
                on_progress=on_progress,
                timeout_s=context.time_remaining(),
                visible_owner=visible_owner(),
            )
        except CheckStopped:
            raise FinetuneError(
                ErrorKind.DEADLINE_EXCEEDED,
                "DEADLINE_EXCEEDED",
                "the deadline passed while the dataset was being checked; the check was stopped",
                hint="Give the call a longer deadline, or use StreamValidateConfig (the CLI does) for a big dataset.",
            ) from None
        response = report_to_proto(report)
        if not report.valid:
            error = report.rejection()
            error.detail = response  # the whole report travels in the error details
            raise error
        return response

    @map_errors
    async def ValidateConfig(  # noqa: N802 - gRPC method name
        self, request: pb.ValidateConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ValidateConfigResponse:
        return await self._validated(request.config, request.target_device, context)

    @map_errors
    async def StreamValidateConfig(  # noqa: N802 - gRPC method name
        self, request: pb.StreamValidateConfigRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamValidateConfigResponse]:
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[pb.ValidationProgress] = asyncio.Queue()
        last_sent = [0.0]

        def on_progress(field: str, checked: int, estimated: int | None) -> None:  # in the checking thread
            now = time.monotonic()
            if now - last_sent[0] < PROGRESS_INTERVAL_S:
                return
            last_sent[0] = now
            update = pb.ValidationProgress(field=field, records_checked=checked, records_estimated=estimated or 0)
            loop.call_soon_threadsafe(updates.put_nowait, update)

        work = asyncio.ensure_future(self._validated(request.config, request.target_device, context, on_progress))
        try:
            while not work.done():
                update = await get_unless_done(updates, work)
                if update is not None:
                    yield pb.StreamValidateConfigResponse(progress=update)
            yield pb.StreamValidateConfigResponse(report=work.result())
        finally:
            work.cancel()  # the caller went: run_stoppable tells the checking thread to stop

    async def _dataset_of_caller(self, dataset_id: str) -> DatasetRecord:
        record = await self._datasets.get(dataset_id)
        check_access(record.owner, f"dataset {dataset_id}")
        return record

    @map_errors
    async def ListDatasets(  # noqa: N802 - gRPC method name
        self, request: pb.ListDatasetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListDatasetsResponse:
        records, next_token = await self._datasets.list(
            page_size=request.page_size, page_token=request.page_token, owner=visible_owner()
        )
        response = pb.ListDatasetsResponse(next_page_token=next_token)
        for record in records:
            fill(response.datasets.add(), record)
        return response

    @map_errors
    async def GetDataset(  # noqa: N802 - gRPC method name
        self, request: pb.GetDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetDatasetResponse:
        response = pb.GetDatasetResponse()
        fill(response.dataset, await self._dataset_of_caller(request.dataset_id))
        return response

    @map_errors
    async def DeleteDataset(  # noqa: N802 - gRPC method name
        self, request: pb.DeleteDatasetRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteDatasetResponse:
        record = await self._dataset_of_caller(request.dataset_id)
        freed, entries = await self._datasets.delete(record)
        response = pb.DeleteDatasetResponse(freed_bytes=freed, token_cache_entries_removed=entries)
        fill(response.dataset, record)
        return response

    @map_errors
    async def ListPresets(  # noqa: N802 - gRPC method name
        self, request: pb.ListPresetsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListPresetsResponse:
        response = pb.ListPresetsResponse()
        for preset in presets.PRESETS.values():
            message = response.presets.add(
                name=preset.name, description=preset.description, device_memory_bytes=preset.device_memory_bytes
            )
            message.config.CopyFrom(preset_config_to_proto(preset.config))
        fill(response, {"recommendations": presets.RECOMMENDATIONS})
        return response

    @map_errors
    async def GetServerInfo(  # noqa: N802 - gRPC method name
        self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetServerInfoResponse:
        return fill(pb.GetServerInfoResponse(), await self._info.describe())

    @map_errors
    async def Train(  # noqa: N802 - gRPC method name
        self, request: pb.TrainRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.TrainResponse]:
        job, _ = await self._jobs.submit(
            config_from_proto(request.config),
            request_id=request.request_id,
            display_name=request.display_name,
            owner=caller_name(),
            labels=dict(request.labels),
            visible_owner=visible_owner(),
        )
        yield pb.TrainResponse(job=job_to_proto(job))
        async for event in self._jobs.watch(job.id, 0):
            yield self._wire.train_response(event)  # type: ignore[misc]  # prebuilt bytes (api/wire.py)

    @map_errors
    async def WatchJob(  # noqa: N802 - gRPC method name
        self, request: pb.WatchJobRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchJobResponse]:
        await self._job_of_caller(request.job_id)
        async for event in self._jobs.watch(request.job_id, request.after_sequence):
            yield self._wire.watch_response(event)  # type: ignore[misc]  # prebuilt bytes (api/wire.py)

    @map_errors
    async def GetJob(  # noqa: N802 - gRPC method name
        self, request: pb.GetJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetJobResponse:
        return pb.GetJobResponse(job=job_to_proto(await self._job_of_caller(request.job_id)))

    @map_errors
    async def ListJobs(  # noqa: N802 - gRPC method name
        self, request: pb.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListJobsResponse:
        states = []
        for number in request.states:
            name = pb.JobState.Name(number) if number in pb.JobState.values() else ""
            if not name or number == pb.JOB_STATE_UNSPECIFIED:
                raise FinetuneError(ErrorKind.INVALID_ARGUMENT, "INVALID_STATE", f"states: {number} is not a state")
            states.append(JobState(name.removeprefix("JOB_STATE_")))
        jobs, token = await self._jobs.list(
            states=states,
            page_size=request.page_size,
            page_token=request.page_token,
            owner=visible_owner(),
            labels=dict(request.labels),
        )
        return pb.ListJobsResponse(jobs=[job_to_proto(j) for j in jobs], next_page_token=token)

    @map_errors
    async def CancelJob(  # noqa: N802 - gRPC method name
        self, request: pb.CancelJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.CancelJobResponse:
        await self._job_of_caller(request.job_id)
        return pb.CancelJobResponse(job=job_to_proto(await self._jobs.cancel(request.job_id)))

    @map_errors
    async def DeleteJob(  # noqa: N802 - gRPC method name
        self, request: pb.DeleteJobRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteJobResponse:
        job = await self._job_of_caller(request.job_id)
        deleted = await delete_job(self._jobs, self._exports, job, with_artifacts=request.delete_artifacts)
        return pb.DeleteJobResponse(
            job=job_to_proto(job), freed_bytes=deleted.freed_bytes, deleted_artifact_ids=deleted.artifact_ids
        )

    @map_errors
    async def UploadDataset(  # noqa: N802 - gRPC method name
        self, request_iterator: AsyncIterator[pb.UploadDatasetRequest], context: grpc.aio.ServicerContext
    ) -> pb.UploadDatasetResponse:
        first = await anext(aiter(request_iterator), None)
        if first is None or not first.HasField("metadata"):
            raise FinetuneError(
                ErrorKind.INVALID_ARGUMENT, "METADATA_FIRST", "the first message of an upload must carry metadata"
            )

        async def chunks() -> AsyncIterator[bytes]:
            async for message in request_iterator:
                if not message.HasField("chunk"):
                    raise FinetuneError(
                        ErrorKind.INVALID_ARGUMENT, "CHUNK_EXPECTED", "only the first message may carry metadata"
                    )
                yield message.chunk

        metadata = first.metadata
        record, created = await store_upload(
            self._settings,
            self._store,
            filename=metadata.filename,
            data_format=metadata.data_format,
            expected_sha256=metadata.sha256,
            chunks=chunks(),
            owner=caller_name(),
        )
        await idempotency.claim(
            self._store,
            owner=caller_name(),
            method="UploadDataset",
            request_id=metadata.request_id,
            request={"sha256": record.sha256, "filename": metadata.filename, "data_format": metadata.data_format},
            resource_field="dataset_id",
            resource_id=record.id,
        )
        response = pb.UploadDatasetResponse(already_existed=not created)
        fill(response.dataset, record)
        return response

    @map_errors
    async def Export(  # noqa: N802 - gRPC method name
        self, request: pb.ExportRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ExportResponse]:
        fmt = export_format_from_proto(request.format)
        step = request.checkpoint_step if request.HasField("checkpoint_step") else None
        job = await self._job_of_caller(request.job_id)
        if request.best_checkpoint_by:
            if step is not None:
                raise field_error(
                    ErrorKind.INVALID_ARGUMENT,
                    "CONFLICTING_FIELDS",
                    "best_checkpoint_by",
                    "give checkpoint_step or best_checkpoint_by, not both",
                )
            checkpoints = await job_checkpoints(self._store, job.id, self._jobs.job_dir(job.id))
            step = best_checkpoint(checkpoints, request.best_checkpoint_by, job.id).step
        async for item in self._exports.export(job.id, fmt, step, owner=caller_name(), request_id=request.request_id):
            if isinstance(item, ArtifactRecord):
                yield pb.ExportResponse(artifact=fill(pb.Artifact(), item))
            else:
                yield pb.ExportResponse(progress=fill(pb.ExportProgress(), item))

    @map_errors
    async def ListCheckpoints(  # noqa: N802 - gRPC method name
        self, request: pb.ListCheckpointsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListCheckpointsResponse:
        job = await self._job_of_caller(request.job_id)
        response = pb.ListCheckpointsResponse()
        for checkpoint in await job_checkpoints(self._store, job.id, self._jobs.job_dir(job.id)):
            fill(response.checkpoints.add(), checkpoint)
        return response

    async def _artifact_of_caller(self, art_id: str) -> ArtifactRecord:
        record = await self._exports.get(art_id)
        check_access(record.owner, f"artifact {art_id}")
        return record

    @map_errors
    async def ListArtifacts(  # noqa: N802 - gRPC method name
        self, request: pb.ListArtifactsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListArtifactsResponse:
        records, next_token = await self._exports.list_artifacts(
            page_size=request.page_size, page_token=request.page_token, owner=visible_owner(), job_id=request.job_id
        )
        response = pb.ListArtifactsResponse(next_page_token=next_token)
        for record in records:
            fill(response.artifacts.add(), record)
        return response

    @map_errors
    async def GetArtifact(  # noqa: N802 - gRPC method name
        self, request: pb.GetArtifactRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetArtifactResponse:
        response = pb.GetArtifactResponse()
        fill(response.artifact, await self._artifact_of_caller(request.artifact_id))
        return response

    @map_errors
    async def DeleteArtifact(  # noqa: N802 - gRPC method name
        self, request: pb.DeleteArtifactRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteArtifactResponse:
        record = await self._artifact_of_caller(request.artifact_id)
        response = pb.DeleteArtifactResponse(freed_bytes=await self._exports.delete(record))
        fill(response.artifact, record)
        return response

    @map_errors
    async def DownloadArtifact(  # noqa: N802 - gRPC method name
        self, request: pb.DownloadArtifactRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.DownloadArtifactResponse]:
        await self._artifact_of_caller(request.artifact_id)
        async for chunk in self._exports.download(request.artifact_id, request.path, request.offset):
            yield pb.DownloadArtifactResponse(**chunk)

    @map_errors
    async def Generate(  # noqa: N802 - gRPC method name
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        chat = ChatRequest(
            messages=[(m.role, m.content) for m in request.messages],
            model_name=request.model_name,
            job_id=request.job_id,
            checkpoint_step=request.checkpoint_step if request.HasField("checkpoint_step") else None,
            artifact_id=request.artifact_id,
            temperature=request.temperature if request.HasField("temperature") else None,
            top_p=request.top_p if request.HasField("top_p") else None,
            seed=request.seed if request.HasField("seed") else None,
            max_new_tokens=request.max_new_tokens if request.HasField("max_new_tokens") else None,
            stop=tuple(request.stop),
        )
        command = check_request(chat, self._settings)
        if chat.job_id:
            job = await self._job_of_caller(chat.job_id)
            target = await self._generation.job_target(job, chat.checkpoint_step)
        elif chat.artifact_id:
            target = await self._generation.artifact_target(await self._artifact_of_caller(chat.artifact_id))
        else:
            target = await self._generation.base_target(chat.model_name)
        # aclosing: a caller that goes while this stream waits to send still stops the generation at once.
        async with contextlib.aclosing(self._generation.generate(target, command)) as answer:
            async for item in answer:
                if isinstance(item, GenerationFinish):
                    finish = pb.GenerateFinish(
                        reason=pb.FinishReason.Value(f"FINISH_REASON_{item.reason.upper()}"),
                        prompt_tokens=item.prompt_tokens,
                        completion_tokens=item.completion_tokens,
                        base_model=item.base_model,
                        step=item.step,
                    )
                    yield pb.GenerateResponse(finish=finish)
                else:
                    yield pb.GenerateResponse(text=item)

"""The FineTuneService servicer: translate messages, delegate to the domain, nothing else.

Methods that later issues implement (jobs, export, upload) answer UNIMPLEMENTED through the generated base class.
"""

from __future__ import annotations

import asyncio

import grpc

from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
from finetune_client._generated.sage.finetune.v1 import finetune_pb2_grpc as pb_grpc
from finetune_server.api.convert import config_from_proto, config_to_proto, fill, preset_config_to_proto
from finetune_server.api.errors import map_errors
from finetune_server.server_info import ServerInfoProvider
from finetune_server.settings import ServerSettings
from finetune_server.training import presets
from finetune_server.training.validation import ValidationReport, validate


def report_to_proto(report: ValidationReport) -> pb.ValidateConfigResponse:
    response = pb.ValidateConfigResponse(
        valid=report.valid,
        resolved_config=config_to_proto(report.resolved_config),
        preset_filled_fields=report.preset_filled_fields,
    )
    fill(response, {"violations": report.violations, "warnings": report.warnings})
    for name in ("model", "dataset", "eval_dataset", "memory_estimate"):
        value = getattr(report, name)
        if value is not None:
            fill(getattr(response, name), value)
    return response


class FineTuneServicer(pb_grpc.FineTuneServiceServicer):
    def __init__(self, settings: ServerSettings, info: ServerInfoProvider) -> None:
        self._settings = settings
        self._info = info

    @map_errors
    async def ValidateConfig(  # noqa: N802 - gRPC method name
        self, request: pb.ValidateConfigRequest, context: grpc.aio.ServicerContext
    ) -> pb.ValidateConfigResponse:
        config = config_from_proto(request.config)
        # Reading the dataset and tokenizing it is CPU work: keep it off the event loop.
        report = await asyncio.to_thread(validate, config, self._settings, target_device=request.target_device)
        response = report_to_proto(report)
        if not report.valid:
            error = report.rejection()
            error.detail = response  # the whole report travels in the error details
            raise error
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

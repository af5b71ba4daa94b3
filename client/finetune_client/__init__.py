"""sage-finetune's light client: the IFineTuneService interface, its gRPC implementation and Studio's manager.

Depends only on grpcio, grpcio-status, protobuf and googleapis-common-protos; never on torch or the server.
"""

from finetune_client.channel import channel_options, service_config
from finetune_client.convert import ConfigConversionError, config_from_dict, config_to_dict, message_to_dict
from finetune_client.errors import (
    FinetuneServiceError,
    MissingResource,
    QuotaViolation,
    ServerUnavailableError,
    from_rpc_error,
)
from finetune_client.interface import (
    ExportResult,
    FieldViolation,
    IFineTuneService,
    ProbeComparison,
    ProgressCallback,
    ProgressUpdate,
    TrainResult,
    ValidationResult,
)
from finetune_client.remote import GrpcFineTuneService, TextStream
from finetune_client.studio import FinetuneManager, TaskInfo, TaskNotFoundError, TaskStateError, TaskStatus

__all__ = [
    "ConfigConversionError",
    "ExportResult",
    "FieldViolation",
    "FinetuneManager",
    "FinetuneServiceError",
    "GrpcFineTuneService",
    "IFineTuneService",
    "MissingResource",
    "ProbeComparison",
    "ProgressCallback",
    "ProgressUpdate",
    "QuotaViolation",
    "ServerUnavailableError",
    "TaskInfo",
    "TaskNotFoundError",
    "TaskStateError",
    "TaskStatus",
    "TextStream",
    "TrainResult",
    "ValidationResult",
    "channel_options",
    "config_from_dict",
    "config_to_dict",
    "from_rpc_error",
    "message_to_dict",
    "service_config",
]

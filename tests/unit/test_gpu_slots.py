"""Job slots map onto the server's own GPUs (its CUDA_VISIBLE_DEVICES list), and a slot without a GPU is an error."""

from __future__ import annotations

import pytest
import torch

from finetune_server.errors import FinetuneError
from finetune_server.training.engine.distributed import DistInfo, pick_device
from finetune_server.workers.gpu_slots import server_gpu_ids, slot_visible_devices, worker_visible_devices


def test_server_gpu_ids_follow_the_parents_list_as_cuda_reads_it() -> None:
    assert server_gpu_ids(None, 2) == ["0", "1"]
    assert server_gpu_ids("3", 1) == ["3"]
    assert server_gpu_ids(" 2, 5 ", 2) == ["2", "5"]
    assert server_gpu_ids("GPU-aaaa,GPU-bbbb", 4) == ["GPU-aaaa", "GPU-bbbb"]  # UUIDs pass through
    assert server_gpu_ids("1,-1,2", 3) == ["1"]  # CUDA stops at the first invalid entry
    assert server_gpu_ids("", 0) == []
    assert server_gpu_ids("3,7", 1) == ["3"]  # nvidia-smi found only GPU 3


def test_each_slot_gets_its_own_gpu_of_the_servers_list() -> None:
    assert [slot_visible_devices(k, ["2", "5"]) for k in (0, 1)] == ["2", "5"]
    assert worker_visible_devices(0, {"CUDA_VISIBLE_DEVICES": "3"}, 1) == "3"
    assert worker_visible_devices(0, {}, 0) is None  # a CPU-only host: the slot counts jobs, it names no device


def test_a_slot_beyond_the_servers_gpus_is_refused() -> None:
    with pytest.raises(FinetuneError) as caught:
        worker_visible_devices(1, {"CUDA_VISIBLE_DEVICES": "3"}, 1)
    assert caught.value.reason == "NO_GPU_FOR_SLOT"
    assert "slot 1" in caught.value.message and "--slots 1" in caught.value.hint


def test_a_cuda_device_without_cuda_is_an_error_not_the_cpu() -> None:
    if torch.cuda.is_available():  # the same test on a GPU host: the device is used as asked
        assert pick_device("cuda:0", DistInfo()) == torch.device("cuda", 0)
    else:
        with pytest.raises(FinetuneError) as caught:
            pick_device("cuda:0", DistInfo())
        assert caught.value.reason == "CUDA_UNAVAILABLE"
    assert pick_device("cpu", DistInfo()).type == "cpu"


def test_an_export_merges_without_the_gpus_unless_it_names_one() -> None:
    """A merge on cuda:0 outside any slot could push a running job out of memory."""
    from finetune_server.workers.export import ExportSpec
    from finetune_server.workers.supervisor import export_env

    spec = ExportSpec(job_dir="j", config={}, model_ref="m", fmt="merged", target_dir="t")
    assert export_env(spec, {"CUDA_VISIBLE_DEVICES": "0,1"}, host_has_gpus=True)["CUDA_VISIBLE_DEVICES"] == ""
    on_gpu = ExportSpec(job_dir="j", config={}, model_ref="m", fmt="merged", target_dir="t", device="cuda:0")
    assert export_env(on_gpu, {"CUDA_VISIBLE_DEVICES": "1"}, host_has_gpus=True)["CUDA_VISIBLE_DEVICES"] == "1"


def test_without_gpus_an_export_has_the_training_workers_environment() -> None:
    """Nothing to hide on a host without GPUs: the same environment, so the same warm fork server serves both."""
    from finetune_server.workers.export import ExportSpec
    from finetune_server.workers.supervisor import export_env, training_env

    spec = ExportSpec(job_dir="j", config={}, model_ref="m", fmt="merged", target_dir="t")
    assert export_env(spec, {"HF_HOME": "h"}, host_has_gpus=False) == training_env(None, {"HF_HOME": "h"})

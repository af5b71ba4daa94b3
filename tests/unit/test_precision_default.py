"""The default precision: bf16 on a server whose GPUs all have it, fp32 otherwise or when the caller says so."""

from __future__ import annotations

from finetune_server.host.devices import Device
from finetune_server.training.config import TrainingConfig
from finetune_server.training.validation import bf16_by_default

AMPERE = Device(name="cuda:0", bf16_supported=True, compute_capability="8.0")
TURING = Device(name="cuda:1", bf16_supported=False, compute_capability="7.5")
CPU = Device(name="cpu")


def test_unset_precision_is_bf16_where_every_gpu_has_it() -> None:
    assert bf16_by_default(TrainingConfig(), {}, [AMPERE, CPU])
    assert not bf16_by_default(TrainingConfig(), {}, [CPU])  # the CPU trains in fp32 (bf16 is ~58x slower there)
    assert not bf16_by_default(TrainingConfig(), {}, [TURING, CPU])  # emulated bf16: slower than fp32
    assert not bf16_by_default(TrainingConfig(), {}, [AMPERE, TURING, CPU])  # a job may land on either


def test_an_explicit_choice_or_the_presets_wins() -> None:
    assert not bf16_by_default(TrainingConfig(bf16=False), {}, [AMPERE])  # fp32 asked for
    assert not bf16_by_default(TrainingConfig(fp16=True), {}, [AMPERE])
    assert not bf16_by_default(TrainingConfig(), {"fp16": True}, [AMPERE])

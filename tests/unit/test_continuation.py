"""What a continued job inherits from its source job's config, what must match, and the client's view of it."""

from __future__ import annotations

from pathlib import Path

from finetune_client import config_from_dict, config_to_dict
from finetune_server.settings import ServerSettings
from finetune_server.training.config import LoraSettings, TrainingConfig, resolve
from finetune_server.training.continuation import SourceAdapter, inherit, mismatches, request_problems
from finetune_server.training.validation import validate


def source_adapter(**lora: object) -> SourceAdapter:
    settings = LoraSettings(r=8, alpha=32, target_modules=["q_proj", "v_proj"], **lora)  # type: ignore[arg-type]
    config, _ = resolve(TrainingConfig(model_name="base", dataset="a.jsonl", chat_template="{{ x }}", lora=settings))
    return SourceAdapter("job-a", None, config, Path("/jobs/job-a/adapter"), None)


def test_unset_lora_shape_and_template_come_from_the_source_and_set_ones_stay() -> None:
    source = source_adapter()
    mine = inherit(TrainingConfig(model_name="base", dataset="b.jsonl", lora=LoraSettings(dropout=0.2)), source)
    assert (mine.lora.r, mine.lora.alpha, mine.lora.target_modules, mine.lora.dropout) == (
        8,
        32,
        ["q_proj", "v_proj"],
        0.2,
    )
    assert mine.chat_template == "{{ x }}" and mine.dataset == "b.jsonl"
    resolved, _ = resolve(mine)
    assert mismatches(resolved, source) == ([], [])
    own = inherit(TrainingConfig(model_name="base", dataset="b.jsonl", lora=LoraSettings(r=4)), source)
    assert own.lora.r == 4, "an explicit value is never replaced"


def test_what_must_match_is_an_error_and_alpha_a_warning() -> None:
    source = source_adapter()
    lora = LoraSettings(r=16, alpha=8, target_modules=["v_proj", "o_proj"], use_dora=True)
    resolved, _ = resolve(TrainingConfig(model_name="other", dataset="b", lora=lora, resume_optimizer=True,
                                         optim="paged_adamw_8bit"))  # fmt: skip
    problems, warnings = mismatches(resolved, source)
    assert [(p.field, p.reason) for p in problems] == [
        ("model_name", "INIT_MODEL_MISMATCH"),
        ("lora.r", "INIT_ADAPTER_MISMATCH"),
        ("lora.target_modules", "INIT_ADAPTER_MISMATCH"),
        ("lora.use_dora", "INIT_ADAPTER_MISMATCH"),
        ("resume_optimizer", "INIT_OPTIMIZER_MISMATCH"),
    ]
    assert [(w.field, w.reason) for w in warnings] == [
        ("lora.alpha", "INIT_ALPHA_DIFFERS"),
        ("resume_optimizer", "NO_OPTIMIZER_STATE"),
    ]
    same_order, _ = resolve(TrainingConfig(model_name="base", dataset="b", lora=LoraSettings(
        r=8, alpha=32, target_modules=["v_proj", "q_proj"])))  # fmt: skip
    assert mismatches(same_order, source) == ([], []), "target modules are a set"


def test_checkpoint_and_optimizer_need_a_job_and_a_trainer_without_a_store_refuses_one(tmp_path: Path) -> None:
    orphan = TrainingConfig(init_from_checkpoint=0, resume_optimizer=True)
    assert [(p.field, p.reason) for p in request_problems(orphan)] == [
        ("init_from_checkpoint", "NEEDS_JOB"),
        ("resume_optimizer", "NEEDS_JOB"),
    ]
    assert [p.reason for p in request_problems(TrainingConfig(init_from_job="j", init_from_checkpoint=0))] == [
        "OUT_OF_RANGE"
    ]
    settings = ServerSettings(data_dir=tmp_path, model_roots=[tmp_path], dataset_roots=[tmp_path])
    report = validate(TrainingConfig(model_name="m", dataset="d", init_from_job="job-a"), settings)
    assert ("init_from_job", "UNSUPPORTED") in [(v.field, v.reason) for v in report.violations]


def test_the_client_carries_the_fields_and_their_presence() -> None:
    message = config_from_dict({"model_name": "m", "init_from_job": "job-a", "init_from_checkpoint": 4,
                                "resume_optimizer": False})  # fmt: skip
    assert message.HasField("resume_optimizer") and not message.resume_optimizer
    assert config_to_dict(message) == {
        "model_name": "m",
        "init_from_job": "job-a",
        "init_from_checkpoint": 4,
        "resume_optimizer": False,
    }
    assert not config_from_dict({"model_name": "m"}).HasField("init_from_checkpoint"), "unset: the final adapter"


def test_jobs_show_prints_where_a_job_continues_from() -> None:
    from rich.console import Console

    from finetune_client._generated.sage.finetune.v1 import finetune_pb2 as pb
    from finetune_server.cli.render import render_job

    job = pb.Job(id="job-b", state=pb.JOB_STATE_QUEUED)
    job.lineage.source_job_id = "job-a"
    job.lineage.source_checkpoint_step = 4
    job.lineage.optimizer_resumed = True
    console = Console(record=True, width=200)
    render_job(console, job)
    assert "continues  job-a's checkpoint at step 4, with its optimizer state" in console.export_text()
    job.lineage.ClearField("source_checkpoint_step")
    job.lineage.optimizer_resumed = False
    render_job(console, job)
    assert "continues  job-a's final adapter\n" in console.export_text()

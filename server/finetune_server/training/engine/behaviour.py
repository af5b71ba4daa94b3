"""Behaviour evaluation: what the model being trained answers, greedily, at each evaluation.

Two kinds of question. Probes (`eval_probes`) are user messages rendered with the job's chat template, answered
before training, at each evaluation and at the end, so drift on things the job does not train shows beside learning
on what it does. Held-out examples (`eval_generate_examples`) are the first examples of the eval set: the prompt is
an example's tokens before its first trained token and the expected answer its first trained span (the answer and
its end of turn), exactly the tokens the loss scores, so `exact_match` and `token_accuracy` measure what training
aims at without re-reading the dataset.

Generation is the argmax with the stop ids an export writes into its generation_config.json (tokenizer eos, the
template's end of turn, the base's eos), as the Generate RPC serves; nothing of the base's own generation config
(penalties, top-k, sampling) slips in. The model is switched to eval mode for it and back to train mode after.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from finetune_server.training.config import EvalProbe
from finetune_server.training.data import IGNORE_INDEX, Message, TextTokenizer, encode_prompt
from finetune_server.training.data.token_table import TokenTable


@dataclass(frozen=True)
class StopTokens:
    """The ids that end an answer, and the pad id generation needs."""

    eos_ids: list[int]
    pad_id: int | None


@dataclass(frozen=True)
class ProbeAnswer:
    """One probe's answer at one evaluation (the contract's ProbeAnswer)."""

    index: int
    prompt: str
    answer: str
    expected: str
    exact_match: bool


@dataclass(frozen=True)
class HeldOutExample:
    """A held-out example as generation sees it: the prompt ids and the answer ids the loss scores."""

    prompt_ids: list[int]
    answer_ids: list[int]


def stop_tokens(model_dir: Path, template: str) -> StopTokens:
    """The stop ids of the job's template and tokenizer, as an export's generation_config.json holds them."""
    from finetune_server.export.package import stop_ids

    return StopTokens(*stop_ids(model_dir, model_dir, template))


@contextlib.contextmanager
def _plain_generation_config(model: Any, stop: StopTokens) -> Iterator[None]:
    """Only what stops generation, for the duration: the base's generation_config.json (repetition penalty, top-k,
    do_sample) would otherwise fill every field a GenerationConfig passed to generate() leaves at its default."""
    from transformers import GenerationConfig

    hf_model = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = hf_model.generation_config
    hf_model.generation_config = GenerationConfig(eos_token_id=stop.eos_ids, pad_token_id=stop.pad_id)
    try:
        yield
    finally:
        hf_model.generation_config = saved


def greedy_ids(model: Any, prompt_ids: Sequence[int], *, max_new_tokens: int, stop: StopTokens) -> list[int]:
    """The argmax continuation of `prompt_ids`: at most `max_new_tokens` ids, up to and including a stop id."""
    device = next(model.parameters()).device
    inputs = torch.tensor([list(prompt_ids)], device=device)
    with _plain_generation_config(model, stop), torch.no_grad():
        output = model.generate(
            input_ids=inputs,
            attention_mask=torch.ones_like(inputs),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,  # training turns the model config's cache off
        )
    produced = [int(i) for i in output[0, inputs.shape[1] :].tolist()]
    end = next((k + 1 for k, token in enumerate(produced) if token in stop.eos_ids), len(produced))
    return produced[:end]


def held_out_examples(table: TokenTable, limit: int) -> list[HeldOutExample]:
    """Up to `limit` of the eval set's first examples that have a prompt before their first trained token."""
    examples: list[HeldOutExample] = []
    for i in range(len(table)):
        if len(examples) >= limit:
            break
        row = table.row(i)
        trained = np.flatnonzero(row.labels != IGNORE_INDEX)
        if not len(trained) or trained[0] == 0:  # plain text: no prompt to answer
            continue
        first = int(trained[0])
        masked_after = np.flatnonzero(row.labels[first:] == IGNORE_INDEX)
        end = first + int(masked_after[0]) if len(masked_after) else len(row.labels)
        examples.append(HeldOutExample(row.input_ids[:first].tolist(), row.input_ids[first:end].tolist()))
    return examples


def answer_probes(
    model: Any,
    probes: Sequence[EvalProbe],
    tokenizer: TextTokenizer,
    template: str,
    *,
    max_new_tokens: int,
    stop: StopTokens,
) -> list[ProbeAnswer]:
    """Each probe's greedy answer (decoded without special tokens) and whether it is the expected one."""
    answers = []
    for index, probe in enumerate(probes):
        ids = encode_prompt([Message("user", probe.prompt)], tokenizer, template)
        answer = tokenizer.decode(greedy_ids(model, ids, max_new_tokens=max_new_tokens, stop=stop), True)
        exact = bool(probe.expected.strip()) and answer.strip() == probe.expected.strip()
        answers.append(ProbeAnswer(index, probe.prompt, answer, probe.expected, exact))
    return answers


def score_held_out(
    model: Any, examples: Sequence[HeldOutExample], *, max_new_tokens: int, stop: StopTokens
) -> dict[str, float]:
    """`exact_match`: the fraction of examples whose answer (its first max_new_tokens tokens) was generated token
    for token; `token_accuracy`: the fraction of answer tokens generated right at their position."""
    exact = right = total = 0
    for example in examples:
        expected = example.answer_ids[:max_new_tokens]
        produced = greedy_ids(model, example.prompt_ids, max_new_tokens=len(expected), stop=stop)
        exact += produced == expected
        right += sum(a == b for a, b in zip(produced, expected, strict=False))
        total += len(expected)
    return {
        "exact_match": exact / max(1, len(examples)),
        "token_accuracy": right / max(1, total),
    }


@dataclass(frozen=True)
class BehaviourCheck:
    """What one evaluation generates for: the probes, the held-out examples, and how."""

    probes: list[EvalProbe]
    held_out: list[HeldOutExample]
    tokenizer: TextTokenizer
    template: str
    stop: StopTokens
    max_new_tokens: int

    @property
    def enabled(self) -> bool:
        return bool(self.probes or self.held_out)

    def run(self, model: Any) -> tuple[dict[str, float], list[ProbeAnswer]]:
        """The held-out metrics (empty without held-out examples) and the probe answers; the caller sets eval mode."""
        metrics: dict[str, float] = {}
        if self.held_out:
            metrics = score_held_out(model, self.held_out, max_new_tokens=self.max_new_tokens, stop=self.stop)
        answers = answer_probes(
            model, self.probes, self.tokenizer, self.template, max_new_tokens=self.max_new_tokens, stop=self.stop
        )
        return metrics, answers


@dataclass(frozen=True)
class ProbeComparison:
    """One probe before training and after it (the contract's ProbeComparison)."""

    index: int
    prompt: str
    expected: str
    before: str
    after: str
    before_exact_match: bool
    after_exact_match: bool


def compare_probes(before: Sequence[dict[str, Any]], after: Sequence[dict[str, Any]]) -> list[ProbeComparison]:
    """The probe table of a job's report from the first and the last answers (ProbeAnswer dicts, by index)."""
    first = {int(a["index"]): a for a in before}
    table = []
    for last in after:
        start = first.get(int(last["index"]), {})
        table.append(
            ProbeComparison(
                index=int(last["index"]),
                prompt=str(last["prompt"]),
                expected=str(last["expected"]),
                before=str(start.get("answer", "")),
                after=str(last["answer"]),
                before_exact_match=bool(start.get("exact_match", False)),
                after_exact_match=bool(last["exact_match"]),
            )
        )
    return table

"""The markdown table of a results.json: one section per benchmark, targets first."""

from __future__ import annotations

import math
from typing import Any

MIB = 1 << 20


def _f(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            return "n/a"
        return f"{value:,.{digits}f}" if isinstance(value, float) else f"{value:,}"
    return str(value)


def _mib(value: Any) -> str:
    return "-" if value is None else f"{float(value) / MIB:,.0f}"


def _met(met: bool | None) -> str:
    return {True: "met", False: "NOT met", None: "not measured"}[met]


def _reruns(results: dict[str, Any]) -> list[str]:
    """For results merged from several runs (`--merge`): the sections run after the first."""
    later = {k: v for k, v in results.get("section_started_at", {}).items() if v != results["started_at"]}
    if not later:
        return []
    return ["Sections rerun later (`--merge`): " + ", ".join(f"{k} at {v}" for k, v in later.items()) + "."]


def render(results: dict[str, Any]) -> str:
    lines = [
        "# sage-finetune benchmarks",
        "",
        f"Run {results['started_at']} on {results['machine']['processor']} ({results['machine']['cpu_count']} cores, "
        f"load average at start {', '.join(f'{x:.1f}' for x in results['machine']['load_average_at_start'])}); "
        f"{'quick (smoke) sizes' if results['quick'] else 'default sizes'}; total {results['wall_s']:.0f} s.",
        "Versions: " + ", ".join(f"{k} {v}" for k, v in results["versions"].items()) + ".",
        "Times on a shared machine are noisy: compare the ratios (medians of per-repetition ratios), not the seconds.",
        *_reruns(results),
        "",
        "## Targets",
        "",
        "| claim | measured | target | result |",
        "|---|---|---|---|",
    ]
    for section in results["sections"].values():
        for t in section.get("targets", []):
            value, unit = t["value"], t.get("unit", "x")
            if value is None or (isinstance(value, float) and not math.isfinite(value)):
                shown = "n/a"
            elif unit == "%":
                shown = f"{value * 100:.1f}%"
            else:
                shown = _f(value) + (f" {unit}" if unit == "ms" else unit)
            lines.append(f"| {t['name']} | {shown} | {t['target']} | {_met(t['met'])} |")
    for name, section in results["sections"].items():
        if section.get("error"):
            lines += ["", f"## {name}: FAILED", "", "```", section["error"][-2000:], "```"]
            continue
        renderer = {
            "engine": _engine,
            "startup": _startup,
            "service": _service,
            "rpc": _rpc,
            "memory": _memory,
            "data": _data,
        }.get(name)
        if renderer is not None:
            lines += ["", *renderer(section["data"]), "", f"({name}: {section['wall_s']:.0f} s)"]
    return "\n".join(lines) + "\n"


def _engine(data: dict[str, Any]) -> list[str]:
    out = ["## Engine throughput", ""]
    out += [f"- `{m}`: {d}" for m, d in data["descriptions"].items()]
    out += [f"- {k}: {v}" for k, v in data["settings"].items()]
    for size, s in data["sizes"].items():
        lengths = s["lengths"]
        out += [
            "",
            f"### {size} ({s.get('model', 'random Qwen2')}): {s['parameters']:,} parameters; "
            f"{s['examples']} examples, {lengths['tokens']:,} tokens "
            f"(length {lengths['min']}-{lengths['max']}, median {lengths['median']}, "
            f"{lengths['padding_fraction_at_max_length']:.0%} padding at max_length {s['max_length']}); "
            f"batch {s['batch_size']}; {s['torch_threads']} torch threads; {s.get('repetitions', '?')} repetition(s)",
            "",
            "| method | tokens/s | tokens/CPU-s | train s | loop s | wall s | steps | peak RSS MiB | RSS delta MiB "
            "| final loss |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for method, m in s["methods"].items():
            out.append(
                f"| {method} | {_f(m['tokens_per_s'], 0)} | {_f(m.get('tokens_per_cpu_s'), 0)} | {_f(m['train_s'])} "
                f"| {_f(m.get('loop_s'))} | {_f(m['wall_s'])} | {m['steps']} "
                f"| {_mib(m['peak_rss_bytes'])} | {_mib(m['rss_delta_bytes'])} | {_f(m['final_loss'], 3)} |"
            )
        cpu = s.get("cpu_ratios", {})
        out += [
            "",
            "| ours / baseline (median of per-repetition ratios) | tokens/s | tokens/CPU-s |",
            "|---|---|---|",
        ]
        out += [f"| {label} | {_f(value)}x | {_f(cpu.get(label))}x |" for label, value in s["ratios"].items()]
    return out


def _startup(data: dict[str, Any]) -> list[str]:
    out = [
        "## Start-up: Train -> first step, warm pool and fresh workers",
        "",
        f"Model {data['model']}, {data['samples']} examples, {data['repetitions']} jobs per server after an untimed "
        "one, alternating: `pool` is a server with its default warm pool (each worker forked from a fork server that "
        "imported torch, transformers and peft), `fresh` one with `--warm-workers 0` (each worker a fresh process).",
        "",
        "| server | Train -> first step s | Train -> job done s |",
        "|---|---|---|",
    ]
    for mode, m in data["medians"].items():
        out.append(f"| {mode} | {_f(m['first_progress_s'])} | {_f(m['wall_s'])} |")
    out += ["", "| ratio (medians) | value |", "|---|---|"]
    out += [f"| {label} | {_f(value, 3)} |" for label, value in data["ratios"].items()]
    return out


def _service(data: dict[str, Any]) -> list[str]:
    out = [
        "## Service overhead",
        "",
        f"Model {data['model']}, {data['samples']} examples, batch {data['batch_size']}, max_length "
        f"{data['max_length']}, {data['repetitions']} repetitions; the worker's import of torch + transformers + peft "
        f"+ the engine: {data['worker_import_s']:.1f} s (median, fresh process). {data.get('threads', '?')} torch "
        "thread(s) in the worker and in-process alike (the server's default for a worker on this machine).",
        "",
        "| mode | wall s | training loop s | events |",
        "|---|---|---|---|",
    ]
    for mode, m in data["medians"].items():
        out.append(f"| {mode} | {_f(m.get('wall_s'))} | {_f(m.get('train_runtime_s'))} | {_f(m.get('events'), 0)} |")
    out += ["", "| ratio (median of per-repetition ratios) | value |", "|---|---|"]
    out += [f"| {label} | {_f(value, 3)} |" for label, value in data["ratios"].items()]
    return out


def _rpc(data: dict[str, Any]) -> list[str]:
    out = [
        "## RPC latency",
        "",
        f"Model {data['model']} (local), dataset of {data['dataset_rows']} rows checked on every ValidateConfig; each "
        f"level stops at {data['max_requests_per_level']} answers or {data['max_seconds_per_level']} s. Client and "
        "server share the machine's cores.",
        "",
        "| rpc | clients | requests | errors | req/s | p50 ms | p90 ms | p99 ms | max ms | server CPU ms/answer "
        "| client CPU ms/answer |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for rpc_name, rows in data["table"].items():
        for r in rows:
            out.append(
                f"| {rpc_name} | {r['clients']} | {_f(r['requests'], 0)} | {_f(r['errors'], 0)} "
                f"| {_f(r['requests_per_s'], 0)} | {_f(r['p50_ms'])} | {_f(r['p90_ms'])} | {_f(r['p99_ms'])} "
                f"| {_f(r['max_ms'])} | {_f(r.get('server_cpu_ms'))} | {_f(r.get('client_cpu_ms'))} |"
            )
    limit = data.get("limit")
    if limit:
        validate, get_job = limit["ValidateConfig"], limit["GetJob"]
        out += [
            "",
            f"What limits it: {limit['clients']} clients that each send their next request when the previous one "
            f"answers wait, on average, clients / throughput (Little's law), so a p99 of {_f(limit['target_ms'], 0)} "
            f"ms needs over {_f(limit['answers_per_s_needed'], 0)} answers/s. Here one ValidateConfig costs "
            f"{_f(validate['server_cpu_ms'])} ms of server CPU and {_f(validate['client_cpu_ms'])} ms of the load "
            f"generator's, so {limit['cores']} cores and one server process (one interpreter lock) give at most "
            f"{_f(validate['answers_per_s_possible'], 0)} answers/s (measured: a mean of "
            f"{_f(validate['mean_ms'], 0)} ms); GetJob, which only reads the store, costs "
            f"{_f(get_job['server_cpu_ms'])} + {_f(get_job['client_cpu_ms'])} ms "
            f"(at most {_f(get_job['answers_per_s_possible'], 0)}/s). What would close it: more cores for the "
            "server than one process uses (several servers on one store, see the README), and clients on other "
            "machines; the server's own work per answer is the part this code controls.",
        ]
    return out


def _memory(data: dict[str, Any]) -> list[str]:
    out = [
        "## Memory estimate accuracy",
        "",
        data["comparison"] + ".",
        "",
        "| config | steps | measured delta MiB | estimated MiB | measured / estimated | peak RSS MiB "
        "| estimate incl. imports MiB | heap threshold fixed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in data["cases"]:
        fixed = r.get("heap_threshold_fixed")
        out.append(
            f"| {r['case']} | {r['steps']} | {_mib(r['measured_delta_bytes'])} | {_mib(r['estimated_delta_bytes'])} "
            f"| {_f(r['measured_over_estimated'])} | {_mib(r['peak_rss_bytes'])} | {_mib(r['estimated_total_bytes'])} "
            f"| {'-' if fixed is None else 'yes' if fixed else 'no'} |"
        )
    out += [
        "",
        "A checkpointed job's worker fixes glibc's mmap threshold (server/finetune_server/host/allocator.py), so "
        "freed activations leave the resident set at once; the others keep glibc's default, whose retention the "
        "estimate's 30% CPU allowance stands for.",
    ]
    return out


def _data(data: dict[str, Any]) -> list[str]:
    rows, encode, jobs = data["rows"], data["encode"], data["jobs"]
    out = [
        "## Datasets of any size (token cache)",
        "",
        f"Encoding {rows['encode']:,} rows with {data['cores']} cores: `ours` builds a token cache entry from the "
        "parsed rows (render the chat template, tokenize, label, write Arrow; encoding processes when there are "
        "several cores), `ours_from_file` the same timing the JSONL reading and parsing too, "
        "`bare` is `tokenizer(batch_of_rendered_texts)` on the same rows rendered beforehand (untimed) with as many "
        "tokenizer threads, `datasets_map` is `Dataset.from_generator(...).map(batched=True, num_proc=P)` with our "
        "encoder.",
        "",
        "| way (median of the repetitions) | rows | tokens | s | tokens/s |",
        "|---|---|---|---|---|",
    ]
    for mode, r in encode["medians"].items():
        out.append(
            f"| {mode} | {_f(r['rows'])} | {_f(r['tokens'])} | {_f(r['seconds'])} | {_f(r['tokens_per_s'], 0)} |"
        )
    out += [
        "",
        f"Jobs of 3 steps (a fresh process each, imports done first, {data['worker_threads']} thread(s) as the server "
        f"gives a worker here) on {rows['small']:,} and {rows['big']:,} rows: cold (an empty token cache) then warm.",
        "",
        "| job | to first step s | peak RSS MiB | encoding processes' peak MiB | cache |",
        "|---|---|---|---|---|",
    ]
    for name, r in jobs.items():
        cache = "; ".join(r["cache"]).replace("|", "/")
        out.append(
            f"| {name} | {_f(r['to_first_step_s'])} | {_mib(r['peak_rss_bytes'])} "
            f"| {_mib(r['encoding_processes_peak_rss_bytes'])} | {cache} |"
        )
    out += ["", "| ratio | value |", "|---|---|"]
    out += [f"| {label} | {_f(value, 3)} |" for label, value in data["ratios"].items()]
    return out

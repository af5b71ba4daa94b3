"""The worker CPU policy: CPU lists as taskset writes them, threads per worker, and what a worker applies."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from finetune_server.host.cpu_policy import (
    available_cpus,
    check_cpus,
    format_cpu_list,
    parse_cpu_list,
    usable_cpus,
    worker_threads,
)
from finetune_server.settings import ServerSettings


@pytest.mark.parametrize(
    ("text", "cpus"), [("0", [0]), ("0-3,6", [0, 1, 2, 3, 6]), (" 2 , 0-1 ,", [0, 1, 2]), ("3-3,1", [1, 3])]
)
def test_cpu_lists_parse_and_format_round_trip(text: str, cpus: list[int]) -> None:
    assert parse_cpu_list(text) == cpus
    assert parse_cpu_list(format_cpu_list(cpus)) == cpus


@pytest.mark.parametrize("text", ["", ",", "a", "1-a", "3-1", "-1"])
def test_bad_cpu_lists_are_refused(text: str) -> None:
    with pytest.raises(ValueError):
        parse_cpu_list(text)


def test_threads_leave_a_core_to_the_server_and_split_among_slots() -> None:
    cores = len(available_cpus())
    assert worker_threads(3, [], slots=1) == 3  # explicit wins
    assert worker_threads(0, [0, 1, 2, 3], slots=2) == 2  # pinned: those CPUs, shared by the slots
    assert worker_threads(0, [0], slots=4) == 1  # never zero
    assert worker_threads(0, [], slots=1) == max(1, cores - 1)
    assert worker_threads(0, [], slots=cores + 1) == 1


def test_settings_refuse_cpus_this_machine_does_not_have(tmp_path: os.PathLike[str]) -> None:
    missing = max(usable_cpus()) + 1
    with pytest.raises(ValueError, match=str(missing)):
        ServerSettings(data_dir=tmp_path, worker_cpus=[missing])
    check_cpus(usable_cpus())


def test_a_server_pinned_to_one_cpu_may_still_pin_its_workers_to_the_others() -> None:
    cpus = usable_cpus()
    probe = (
        "import os; from finetune_server.host.cpu_policy import check_cpus, usable_cpus; "
        f"os.sched_setaffinity(0, [{cpus[0]}]); check_cpus({cpus}); print(usable_cpus())"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert out.strip() == str(cpus)


def test_a_worker_pins_itself_and_sizes_torchs_pool_before_importing_it() -> None:
    cpu = available_cpus()[-1]
    probe = (
        "import os; from finetune_server.host.cpu_policy import apply_in_worker; "
        f"apply_in_worker(1, [{cpu}]); import torch; "
        "print(torch.get_num_threads(), sorted(os.sched_getaffinity(0)))"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split(maxsplit=1) == ["1", f"[{cpu}]\n"]

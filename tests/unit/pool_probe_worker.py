"""A worker module for the warm pool's tests: it reports the state it was started with, then dirties that state.

Run through a fork server like a real worker (`main(args)` with `--spec`/`--events-fd`); the spec is a JSON object:
{"crash": true} raises before reporting; {"wait_for_stdin": true} sends `started`, then waits for its stdin's
EOF. Its last message is a protocol `result` whose data is what it saw.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from finetune_server.workers.protocol import Result, Started

STATE = {"dirtied": 0}  # module state each run changes: a worker forked later must still see 0


def main(argv: Sequence[str] | None = None) -> int:
    args = list(argv or [])
    spec = json.loads(Path(args[args.index("--spec") + 1]).read_text())
    events_fd = int(args[args.index("--events-fd") + 1])
    if spec.get("crash"):
        raise RuntimeError("probe crash on purpose")
    if spec.get("wait_for_stdin"):  # says it started, then runs until its stdin closes
        with os.fdopen(os.dup(events_fd), "w") as started:
            started.write(Started(resumed_from_step=None, pid=os.getpid()).encode())
        sys.stdin.read()
    torch = sys.modules.get("torch")
    seen = {
        "pid": os.getpid(),
        "ppid": os.getppid(),
        "pgid": os.getpgid(0),
        "dirtied": STATE["dirtied"],
        "marker": os.environ.get("PROBE_MARKER"),
        "torch_preloaded": torch is not None,
        "threads": torch.get_num_threads() if torch is not None else None,
        "cuda_initialized": bool(torch is not None and torch.cuda.is_initialized()),
        "stdin_is_devnull": Path("/proc/self/fd/0").samefile(os.devnull),
    }
    if torch is not None:  # real work with the inherited libraries: a matmul over the thread pool
        x = torch.ones(64, 64)
        seen["matmul"] = float((x @ x)[0, 0])
    STATE["dirtied"] += 1
    os.environ["PROBE_MARKER"] = "dirty"
    with os.fdopen(events_fd, "w") as events:
        events.write(Result(data=seen).encode())
    sys.stdout.write("probe done\n")  # stdout goes to the worker's log
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

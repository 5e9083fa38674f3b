"""The detached supervisor of background mode: ``python -m pipeline.serve.daemon DIR SESSION``.

Started by ``doit serve`` in its own session with the plan (secrets included) on stdin, it
takes the supervisor lock, runs the plan until every instance is terminal, and exits. Its
output goes to ``<state dir>/supervisor.log``.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from pipeline.serve.plan import Plan
from pipeline.serve.state import StateStore, held_lock
from pipeline.serve.supervisor import Supervisor
from pipeline.settings import process_environ


def _say(line: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {line}", flush=True)


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: python -m pipeline.serve.daemon STATE_DIR SESSION", file=sys.stderr)
        return 2
    root, session = Path(argv[0]), argv[1]
    plan = Plan.model_validate_json(sys.stdin.read())
    sys.stdin.close()
    store = StateStore(root)
    store.ensure()
    with held_lock(store.lock_file, wait=5.0) as ok:
        if not ok:
            _say(f"another supervisor holds {store.lock_file}; exiting")
            return 3
        supervisor = Supervisor(
            plan,
            store,
            base_env=process_environ(),
            mode="background",
            session=session,
            reap_all=True,
            say=_say,
        )
        supervisor.install_signal_handlers()
        _say(f"supervising {len(plan.instances)} instance(s) from {plan.source}")
        code = supervisor.run()
        _say(f"all instances ended; exit code {code}")
        return code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

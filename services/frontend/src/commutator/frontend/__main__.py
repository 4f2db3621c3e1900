"""``python -m commutator.frontend``: run the OpenAI-compatible frontend (``--processes N``: N of them on one port)."""

import os
import sys

from commutator.common import config as cfg
from commutator.common.logging import setup_logging
from commutator.common.runtime import run_role
from commutator.frontend.config import FrontendConfig
from commutator.frontend.processes import CHILD_ENV, PARENT_ENV, ProcessGroup, die_with_parent
from commutator.frontend.server import Frontend

PROG = "python -m commutator.frontend"


def main() -> int:
    argv = sys.argv[1:]
    setup_logging()
    config = cfg.load(FrontendConfig, argv, prog=PROG)
    if config.processes < 1:
        print(f"{PROG}: --processes must be at least 1", file=sys.stderr)
        return 2
    if os.environ.get(CHILD_ENV):  # one of the processes of a --processes N group
        die_with_parent(int(os.environ[PARENT_ENV]))
        return run_role(FrontendConfig, PROG, lambda c: Frontend(c, reuse_port=True), config=config)
    if config.processes > 1:
        return ProcessGroup(config, argv).run()
    return run_role(FrontendConfig, PROG, Frontend, config=config)


if __name__ == "__main__":
    raise SystemExit(main())

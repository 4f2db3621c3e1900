"""``python -m commutator.frontend``: run the OpenAI-compatible frontend (``--processes N``: N of them on one port)."""

import os
import signal
import sys

from commutator.common import config as cfg
from commutator.common.logging import setup_logging
from commutator.common.runtime import run_role
from commutator.frontend.auth import ApiKeysError, load_api_keys
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
    if config.api_keys_file:  # one clear line before anything starts (with --processes N: before any child)
        try:
            load_api_keys(config.api_keys_file)
        except ApiKeysError as exc:
            print(f"{PROG}: --api-keys-file: {exc}", file=sys.stderr)
            return 2
        # Until the frontend's own handler is in place, a SIGHUP (a reload asked early) must not kill it.
        signal.signal(signal.SIGHUP, signal.SIG_IGN)
    if os.environ.get(CHILD_ENV):  # one of the processes of a --processes N group
        die_with_parent(int(os.environ[PARENT_ENV]))
        return run_role(FrontendConfig, PROG, lambda c: Frontend(c, reuse_port=True), config=config)
    if config.processes > 1:
        return ProcessGroup(config, argv).run()
    return run_role(FrontendConfig, PROG, Frontend, config=config)


if __name__ == "__main__":
    raise SystemExit(main())

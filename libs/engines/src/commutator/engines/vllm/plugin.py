"""A vLLM general plugin: vLLM's engine core exits when the Commutator worker that started it is gone.

vLLM runs its engine core (and, under it, its model workers) in child processes.
When the worker process is killed outright (SIGKILL, an OOM kill), nothing tells
the engine core, which would keep its memory and cores forever. vLLM loads every
``vllm.general_plugins`` entry point in each of its processes at start;
:func:`register` does nothing except in an engine core whose parent is the
worker named by ``COMMUTATOR_VLLM_PARENT`` (set by the adapter just before it
starts vLLM), where it starts a thread that watches the parent and, once the
parent is gone, stops the engine core (SIGTERM, then SIGKILL after 10 s).
vLLM's model workers follow their engine core through their own death pipe.
"""

from __future__ import annotations

import os
import signal
import threading
import time

__all__ = ["PARENT_ENV", "register"]

PARENT_ENV = "COMMUTATOR_VLLM_PARENT"


def register() -> None:
    wanted = os.environ.get(PARENT_ENV, "")
    if not wanted.isdigit() or int(wanted) != os.getppid():
        return  # not an engine core started by a Commutator worker (or the worker itself)
    parent = int(wanted)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(10.0)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="commutator-parent-watch", daemon=True).start()

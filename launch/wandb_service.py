"""W&B's service process (wandb-core) for a training job: started where the job's stop signals do not
reach it, and waited for until it has written a finished run.

:class:`launch.wandb_logger.RunLogger` calls :func:`start_service_outside_process_tree` before
``wandb.init`` and :func:`wait_until_complete` after ``run.finish()``, so an offline run's
``.wandb`` file is complete when the job exits, however the job was stopped.
"""

from __future__ import annotations

import logging
import os
import re
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

log = logging.getLogger(__name__)


def wait_until_complete(sync_file: Path, timeout_s: float = 60.0) -> None:
    """Wait until the service has written the run's exit record to ``sync_file``.

    ``run.finish()`` returns once the service has the run's last records, not once it has written
    them; a service this process owns is also waited for at exit, a shared one is not. Reading the
    file right away (or exiting, and being killed) could then see a run cut short.
    """
    from launch.compare import iter_wandb_records

    deadline = time.monotonic() + timeout_s
    while True:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a tail still being written reads as "damaged"
            try:
                if any(r.WhichOneof("record_type") == "exit" for r in iter_wandb_records(sync_file)):
                    return
            except OSError:
                pass
        if time.monotonic() > deadline:
            log.warning("W&B has not written the end of %s after %.0f s", sync_file, timeout_s)
            return
        time.sleep(0.2)


# Run by `python -c`: start wandb-core detached (it outlives this helper and ignores its exit) and
# print the token that connects to it.
_SERVICE_HELPER = """
import sys
from wandb.sdk.lib.service import service_process
from wandb.sdk.wandb_settings import Settings
print(service_process.start_detached(Settings(), idle_timeout=sys.argv[1]).token.env_value, flush=True)
"""


def start_service_outside_process_tree(idle_timeout: str = "2m", timeout_s: float = 60.0) -> bool:
    """Start W&B's service process where the signals that stop the job do not reach it.

    wandb starts its service (wandb-core) as a child of the training process. Launchers stop a job
    by signalling the whole process tree (DeepSpeed's launcher terminates every descendant of each
    worker); a service killed that way dies before ``finish()`` has written the run, which leaves
    the offline run a few bytes long. Started through a short-lived helper in its own session, the
    service is re-parented away from the job and from the terminal's process group (Ctrl-C), so the
    trainer's own signal handling decides when the run finishes. It exits ``idle_timeout`` after its
    last client disconnects. ``WANDB_SERVICE`` in the environment (set here, or by the user) makes
    ``wandb.init`` connect to it. Returns whether it started one; on any failure wandb starts its
    own service as usual (with a warning).
    """
    token = os.environ.get("WANDB_SERVICE")
    if token and _service_reachable(token):
        return False
    os.environ.pop("WANDB_SERVICE", None)  # inherited from a process whose service has exited
    try:
        out = subprocess.run(
            [sys.executable, "-c", _SERVICE_HELPER, idle_timeout],
            capture_output=True,
            text=True,
            timeout=timeout_s,
            start_new_session=True,
            check=True,
        )
        os.environ["WANDB_SERVICE"] = out.stdout.strip().splitlines()[-1]
        return True
    except Exception as exc:
        detail = getattr(exc, "stderr", "") or ""
        log.warning(
            "W&B service not started outside the process tree (%s: %s %s); a signal to the whole job may cut "
            "the W&B run short (the JSONL mirror is complete)",
            type(exc).__name__,
            exc,
            detail[-500:],
        )
        return False


def _service_reachable(token: str, timeout_s: float = 2.0) -> bool:
    """Whether the W&B service a ``WANDB_SERVICE`` token names accepts connections (unix or tcp)."""
    if unix := re.fullmatch(r"\d+-\d+-unix-(.+)", token):
        family, address = socket.AF_UNIX, unix.group(1)
    elif tcp := re.fullmatch(r"\d+-\d+-tcp-localhost-(\d+)", token):
        family, address = socket.AF_INET, ("127.0.0.1", int(tcp.group(1)))
    else:
        return True  # a format this code does not know: leave it to wandb
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout_s)
            sock.connect(address)
        return True
    except OSError:
        return False

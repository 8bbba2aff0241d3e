"""One writer per output: a lock file beside it that the ranks of one job share and a dead holder does not keep."""

from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from atlantis.log import get_logger, world_size

log = get_logger(__name__)


def _job_key() -> str:
    """What the ranks of one job share and another job does not: under a launcher, its rendezvous (two jobs on a
    host cannot share a MASTER_PORT) and SLURM job; a single process is a job of its own."""
    if world_size() == 1:
        return f"{socket.gethostname()}:{os.getpid()}:{time.time_ns()}"
    env = os.environ
    keys = ("SLURM_ARRAY_JOB_ID", "SLURM_JOB_ID", "TORCHELASTIC_RUN_ID", "MASTER_ADDR", "MASTER_PORT")
    return ",".join([f"WORLD_SIZE={world_size()}"] + [f"{k}={env[k]}" for k in keys if env.get(k)])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


class OutputLock:
    """`<out>.lock`: one invocation (of `atlantis score`, `atlantis train`) writes an output at a time.

    Without it two invocations on one output both do all the work, and the later one either replaces the
    earlier's files or trips over its temporary files. The lock holds the holder's pid, host, start time and job
    key (`_job_key`): the ranks of one multi-rank job share it (they split the shards on purpose), anyone else is
    refused while its holder lives. A holder proves it lives by touching the lock every `HEARTBEAT_S`: a lock
    whose pid is dead on this host (a killed run), or that nobody touched for `STALE_AFTER_S` (a run killed on
    another node, say by a SLURM time limit, whose pid cannot be checked from here) is taken over with a warning.
    """

    HEARTBEAT_S = 60.0
    STALE_AFTER_S = 600.0  # ten missed heartbeats; leaves room for clock skew between the nodes of a cluster

    def __init__(self, out: Path, error: type[Exception] = RuntimeError, writer: str = "atlantis"):
        self.out, self.error, self.writer = Path(out), error, writer
        out = self.out
        self.path = out.with_name(out.name + ".lock")
        self.key = _job_key()
        self._stop = threading.Event()

    def acquire(self) -> None:
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "job": self.key,
        }
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create(json.dumps(me)):
                return self._beat()
            holder, age = self._read(), self._age()
            if holder is None or age is None:  # released between our attempt and the read: try again
                continue
            if holder.get("job") == self.key:
                return self._beat()  # another rank of this job took it
            pid, host = holder.get("pid"), holder.get("host")
            if host == me["host"] and isinstance(pid, int) and not _pid_alive(pid):
                why = "which is gone"
            elif age > self.STALE_AFTER_S:
                why = f"which has not touched it for {age:.0f} s"
            else:
                raise self.error(
                    f"another process (pid {pid} on host {host}, started {holder.get('started')}) is writing "
                    f"{self.out}; wait or remove the lock {self.path} if that process is gone"
                )
            log.warning(
                "%s: taking over the lock of pid %s on %s (started %s), %s",
                self.path,
                pid,
                host,
                holder.get("started"),
                why,
            )
            self.path.unlink(missing_ok=True)
        raise self.error(
            f"{self.path}: could not take the lock, it keeps changing hands; is a loop rerunning {self.writer}?"
        )

    def release(self) -> None:
        """Remove the lock if it is this job's (and stop touching it)."""
        self.stop()
        holder = self._read()
        if holder is not None and holder.get("job") == self.key:
            self.path.unlink(missing_ok=True)

    def stop(self) -> None:
        """Stop touching the lock, leaving it in place (for the rank that will merge)."""
        self._stop.set()

    def _beat(self) -> None:
        def touch() -> None:
            while not self._stop.wait(self.HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except FileNotFoundError:  # released by the rank that merged
                    return

        threading.Thread(target=touch, name=f"lock {self.path.name}", daemon=True).start()

    def _age(self) -> float | None:
        try:
            return time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _create(self, text: str) -> bool:
        """Create the lock with its content in one step (a hard link of a complete file), False if it exists."""
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(text)
        try:
            os.link(tmp, self.path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    def _read(self) -> dict | None:
        try:
            holder = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise self.error(
                f"{self.path} is not a lock written by {self.writer} ({err}); remove it if no run is writing {self.out}"
            ) from err
        return holder if isinstance(holder, dict) else {}

"""A real two-node Slurm cluster on this machine, for the tests of ``slurm/*.sbatch``.

Debian's ``slurmctld``/``slurmd`` (22.05) run as root from a ``slurm.conf`` written into a temporary
directory: one controller and two ``slurmd -N n1|n2`` whose NodeAddr are 127.0.0.2 and 127.0.0.3
(loopback, no set-up), each on a free port. Authentication is ``auth/none`` where the installed
Slurm still ships that plugin (no extra daemon, nothing to get wrong), else munge with a key made
in the temporary directory and ``munged`` on its own socket (``MOE_SLURM_TEST_AUTH=munge`` forces
it). Daemons run in the foreground as our children, so they are stopped by their own PIDs.

Every Slurm command must see ``SLURM_CONF``: without it the client looks for its configuration in
DNS SRV records, which leaves this machine. :attr:`SlurmCluster.env` has it.

Used as a pytest plugin (``pytest_plugins = ["tests.slurm_cluster"]``): it registers the ``slurm``
marker and the session fixture ``slurm_cluster``, which installs the packages through
``slurm/install_test_cluster.sh`` when they are missing and skips (with that script's output)
only where they cannot be installed.
"""

from __future__ import annotations

import glob
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INSTALL_SCRIPT = REPO / "slurm" / "install_test_cluster.sh"
NODES = {"n1": "127.0.0.2", "n2": "127.0.0.3"}
CPUS_PER_NODE = 2
SBIN = ("/usr/sbin", "/sbin")
# Variables of an enclosing job or launcher that must not leak into the test cluster's jobs.
_LEAKY = re.compile(
    r"^(SLURM_|SBATCH_|SRUN_|SALLOC_)|^(RANK|WORLD_SIZE|LOCAL_RANK|LOCAL_WORLD_SIZE|"
    r"MASTER_ADDR|MASTER_PORT|MOE_MASTER_ADDR|MOE_MASTER_PORT)$"
)


class SlurmClusterError(RuntimeError):
    """A daemon did not start or the cluster did not come up; the message holds the daemons' logs."""


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slurm: runs jobs on a throw-away two-node Slurm cluster (deselect with -m 'not slurm')"
    )


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test that uses the cluster is marked ``slurm``, so ``-m "not slurm"`` deselects it."""
    for item in items:
        if "slurm_cluster" in getattr(item, "fixturenames", ()):
            item.add_marker("slurm")


def _free_ports(n: int) -> list[int]:
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _which(cmd: str) -> str | None:
    return shutil.which(cmd) or shutil.which(cmd, path=os.pathsep.join(SBIN))


def _plugin_available(name: str) -> bool:
    """Whether Slurm's plugin directory holds ``name`` (e.g. ``auth_none``)."""
    patterns = [f"/usr/lib/*/slurm-wlm/{name}.so", f"/usr/lib*/slurm/{name}.so", f"/usr/local/lib*/slurm/{name}.so"]
    return any(glob.glob(p) for p in patterns)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path.name})"
    return "\n".join(text[-lines:]) or f"({path.name} is empty)"


@dataclass
class Daemon:
    name: str
    proc: subprocess.Popen
    logs: list[Path]

    def describe(self) -> str:
        state = "running" if self.proc.poll() is None else f"exited with status {self.proc.returncode}"
        parts = [f"--- {self.name} (pid {self.proc.pid}, {state})"]
        parts += [f"{log}:\n{_tail(log)}" for log in self.logs]
        return "\n".join(parts)


@dataclass
class SlurmCluster:
    """A running cluster: its files under ``root``, the environment for its commands, its daemons."""

    root: Path
    conf: Path
    auth: str
    env: dict[str, str]
    daemons: list[Daemon] = field(default_factory=list)
    scratch: list[Path] = field(default_factory=list)  # removed by stop()

    # ------------------------------------------------------------------ commands

    def command(self, *args: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
        """Run a Slurm client command against this cluster."""
        proc = subprocess.run(
            list(args), env=kw.pop("env", self.env), capture_output=True, text=True, timeout=timeout, **kw
        )
        if check and proc.returncode != 0:
            raise SlurmClusterError(f"{' '.join(args)} failed ({proc.returncode}):\n{proc.stdout}{proc.stderr}")
        return proc

    def job_env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        """The environment a job submitted with sbatch's default ``--export=ALL`` gets: ours, cleaned."""
        env = dict(self.env)
        env.update(extra or {})
        return env

    def sbatch(
        self,
        script: Path | str,
        *args: str,
        sbatch_args: Iterable[str] = (),
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
    ) -> int:
        """Submit ``script`` with ``sbatch_args`` before it and ``args`` after it; returns the job id."""
        out = self.command(
            "sbatch", "--parsable", *sbatch_args, str(script), *args, env=self.job_env(env), cwd=cwd
        ).stdout.strip()
        return int(out.split(";")[0])

    def job(self, job_id: int | str) -> dict[str, str]:
        """``scontrol show job`` as a dict (accounting is off, so sacct has nothing)."""
        out = self.command("scontrol", "show", "job", "-o", str(job_id)).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out.splitlines()[0])) if out.strip() else {}

    def wait_job(
        self,
        job_id: int | str,
        until,
        timeout: float,
        what: str = "",
        poll: float = 0.2,
    ) -> dict[str, str]:
        """Poll the job until ``until(info)`` is true; a clear failure (with the job and logs) on timeout."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if until(info):
                return info
            time.sleep(poll)
        raise SlurmClusterError(
            f"job {job_id}: not {what or 'done'} within {timeout:.0f} s; last state "
            f"{info.get('JobState')} reason {info.get('Reason')}\n{self.describe()}"
        )

    def wait_finished(self, job_id: int | str, timeout: float, restarts: int = 0) -> dict[str, str]:
        """Wait for the job's run number ``restarts`` to end; returns its ``scontrol show job`` fields."""
        final = {
            "COMPLETED",
            "FAILED",
            "CANCELLED",
            "TIMEOUT",
            "NODE_FAIL",
            "OUT_OF_MEMORY",
            "BOOT_FAIL",
            "DEADLINE",
            "PREEMPTED",
        }
        return self.wait_job(
            job_id,
            lambda i: i.get("JobState") in final and int(i.get("Restarts", 0)) >= restarts,
            timeout,
            what="finished",
        )

    def release_requeued(self, job_id: int | str, restarts: int = 1, timeout: float = 120) -> dict[str, str]:
        """Wait for the job to be requeued (pending again) and lift Slurm's hold on it.

        Slurm holds a requeued job for about 2 minutes (BeginTime) so the nodes can clean up. Starting
        it within the second of the requeue fails ("Job credential revoked": slurmd compares credential
        times in whole seconds), so we wait a few seconds, not two minutes.
        """
        info = self.wait_job(
            job_id,
            lambda i: int(i.get("Restarts", 0)) >= restarts and i.get("JobState") == "PENDING",
            timeout,
            what="requeued",
        )
        time.sleep(3)
        self.command("scontrol", "update", f"JobId={job_id}", "StartTime=now")
        return info

    def describe(self) -> str:
        """Queue, nodes and daemon logs: what a failing test shows."""
        parts = []
        for args in (("squeue",), ("sinfo", "-N", "-l")):
            try:
                proc = self.command(*args, check=False, timeout=10)
                parts.append(f"$ {' '.join(args)}\n{proc.stdout}{proc.stderr}")
            except subprocess.TimeoutExpired:
                parts.append(f"$ {' '.join(args)}: timed out")
        parts += [d.describe() for d in self.daemons]
        return "\n".join(parts)

    # ------------------------------------------------------------------ life cycle

    def stop(self) -> None:
        """Cancel leftover jobs, then stop every daemon by its PID (SIGTERM, then SIGKILL)."""
        if any(d.proc.poll() is None for d in self.daemons if d.name == "slurmctld"):
            try:
                self.command("scancel", "--user", str(os.getuid()), check=False, timeout=10)
                deadline = time.monotonic() + 15
                while time.monotonic() < deadline:
                    queue = self.command("squeue", "-h", check=False, timeout=10).stdout.strip()
                    if not queue:
                        break
                    time.sleep(0.3)
            except subprocess.TimeoutExpired:
                pass
        for daemon in reversed(self.daemons):  # slurmd before slurmctld before munged
            if daemon.proc.poll() is None:
                daemon.proc.send_signal(signal.SIGTERM)
        for daemon in reversed(self.daemons):
            try:
                daemon.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                daemon.proc.kill()
                daemon.proc.wait(timeout=10)
        for path in self.scratch:
            shutil.rmtree(path, ignore_errors=True)


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("", port))
        except OSError:
            return False
    return True


def _first_job_id(jobs: int = 32) -> int:
    """A random first job id whose jobs' rendezvous ports (15000 + id % 20000, see slurm/lib.sh) are free
    now: two test sessions on one machine (each with its own cluster) then do not collide on them."""
    rng = random.Random()
    for _ in range(100):
        first = rng.randrange(1000, 19000)
        if all(_port_free(15000 + (first + i) % 20000) for i in range(jobs)):
            return first
    return rng.randrange(1000, 19000)


def _slurm_conf(root: Path, auth: str, munge_socket: Path | None) -> str:
    ctld_port, *node_ports = _free_ports(1 + len(NODES))
    auth_lines = (
        ["AuthType=auth/none", "CredType=cred/none"]
        if auth == "none"
        else [
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={munge_socket}",
        ]
    )
    lines = [
        f"ClusterName=moetest{ctld_port}",
        "SlurmctldHost=localhost(127.0.0.1)",
        f"SlurmctldPort={ctld_port}",
        "SlurmUser=root",
        f"FirstJobId={_first_job_id()}",
        "SlurmdUser=root",
        *auth_lines,
        f"StateSaveLocation={root / 'state'}",
        f"SlurmdSpoolDir={root / 'spool'}/%n",
        f"SlurmctldPidFile={root / 'slurmctld.pid'}",
        f"SlurmdPidFile={root / 'slurmd-%n.pid'}",
        f"SlurmctldLogFile={root / 'log' / 'slurmctld.log'}",
        f"SlurmdLogFile={root / 'log' / 'slurmd-%n.log'}",
        "SlurmctldDebug=info",
        "SlurmdDebug=info",
        # No cgroups in a container: track processes by parentage, no task binding.
        "ProctrackType=proctrack/linuxproc",
        "TaskPlugin=task/none",
        "SelectType=select/cons_tres",
        "SelectTypeParameters=CR_Core",
        "MpiDefault=none",
        # Start a submitted batch job at once instead of after the default 3 s.
        "SchedulerParameters=batch_sched_delay=0",
        "AccountingStorageType=accounting_storage/none",
        "JobAcctGatherType=jobacct_gather/none",
        "JobCompType=jobcomp/none",
        "ReturnToService=2",
        # Nodes are what this file says, whatever the machine has (2 CPUs each, also on a 1-core machine).
        "SlurmdParameters=config_overrides",
        "KillWait=5",
        "MinJobAge=600",
        "InactiveLimit=0",
    ]
    for (name, addr), port in zip(NODES.items(), node_ports):
        lines.append(f"NodeName={name} NodeAddr={addr} Port={port} CPUs={CPUS_PER_NODE} RealMemory=1000 State=UNKNOWN")
    lines.append(f"PartitionName=debug Nodes={','.join(NODES)} Default=YES MaxTime=INFINITE State=UP")
    return "\n".join(lines) + "\n"


def _clean_env(conf: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not _LEAKY.match(k)}
    env["SLURM_CONF"] = str(conf)
    path = env.get("PATH", "").split(os.pathsep)
    env["PATH"] = os.pathsep.join(path + [p for p in SBIN if p not in path])
    return env


def _start(name: str, cmd: list[str], root: Path, env: dict[str, str], logs: list[Path]) -> Daemon:
    out = root / "log" / f"{name}.stdout"
    with out.open("w") as fh:
        # Own session: a Ctrl-C at the terminal reaches pytest (which stops us) rather than the daemons.
        proc = subprocess.Popen(cmd, env=env, stdout=fh, stderr=subprocess.STDOUT, start_new_session=True)
    return Daemon(name, proc, [out, *logs])


def start_cluster(root: Path, auth: str | None = None, timeout: float = 30) -> SlurmCluster:
    """Write the configuration under ``root``, start the daemons, wait until both nodes are idle."""
    missing = [cmd for cmd in ("slurmctld", "slurmd", "sbatch", "scontrol", "sinfo") if not _which(cmd)]
    if missing:
        raise SlurmClusterError(f"not installed: {', '.join(missing)} (run slurm/install_test_cluster.sh)")
    auth = auth or os.environ.get("MOE_SLURM_TEST_AUTH") or ("none" if _plugin_available("auth_none") else "munge")
    for sub in ("state", "log", *(f"spool/{n}" for n in NODES)):
        (root / sub).mkdir(parents=True, exist_ok=True)
    munge_socket = None
    daemons: list[Daemon] = []
    conf = root / "slurm.conf"
    env = _clean_env(conf)
    cluster = SlurmCluster(root, conf, auth, env, daemons)
    try:
        if auth == "munge":
            # munged insists that everyone may traverse its socket's directory: pytest's tmp dirs are 0700.
            munge_dir = Path(tempfile.mkdtemp(prefix="moe-munge-"))
            munge_dir.chmod(0o755)
            cluster.scratch.append(munge_dir)
            munge_socket = munge_dir / "munge.socket"
            key = munge_dir / "munge.key"
            subprocess.run(
                [_which("mungekey") or "mungekey", "--create", f"--keyfile={key}"],
                check=True,
                capture_output=True,
                timeout=30,
            )
            munge_log = munge_dir / "munged.log"
            daemons.append(
                _start(
                    "munged",
                    [
                        _which("munged") or "munged",
                        "--foreground",
                        f"--socket={munge_socket}",
                        f"--key-file={key}",
                        f"--pid-file={munge_dir / 'munged.pid'}",
                        f"--log-file={munge_log}",
                        f"--seed-file={munge_dir / 'munged.seed'}",
                    ],
                    root,
                    env,
                    [munge_log],
                )
            )
            _wait_for(lambda: munge_socket.exists(), 10, "munged socket", cluster)
        conf.write_text(_slurm_conf(root, auth, munge_socket))
        daemons.append(
            _start(
                "slurmctld",
                [_which("slurmctld"), "-D", "-i", "-f", str(conf)],
                root,
                env,
                [root / "log" / "slurmctld.log"],
            )
        )
        for name in NODES:
            daemons.append(
                _start(
                    f"slurmd-{name}",
                    [_which("slurmd"), "-D", "-N", name, "-f", str(conf)],
                    root,
                    env,
                    [root / "log" / f"slurmd-{name}.log"],
                )
            )

        def idle() -> bool:
            proc = cluster.command("sinfo", "-h", "-N", "-o", "%N %t", check=False, timeout=10)
            states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
            return all(states.get(n) == "idle" for n in NODES)

        _wait_for(idle, timeout, "both nodes idle in sinfo", cluster)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _wait_for(ready, timeout: float, what: str, cluster: SlurmCluster) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        dead = [d for d in cluster.daemons if d.proc.poll() is not None]
        if dead:
            raise SlurmClusterError(f"{dead[0].name} exited while waiting for {what}:\n{cluster.describe()}")
        if ready():
            return
        time.sleep(0.1)
    raise SlurmClusterError(f"timed out after {timeout:.0f} s waiting for {what}:\n{cluster.describe()}")


def install_packages() -> str | None:
    """Install the packages when missing; returns why the cluster cannot run here, or None."""
    if _which("slurmctld") and _which("slurmd") and _which("sbatch"):
        return None
    try:
        proc = subprocess.run(["bash", str(INSTALL_SCRIPT)], capture_output=True, text=True, timeout=900)
    except subprocess.TimeoutExpired:
        return f"{INSTALL_SCRIPT.name} did not finish within 900 s"
    if proc.returncode != 0:
        return (
            f"Slurm packages cannot be installed here ({INSTALL_SCRIPT.name} exit {proc.returncode}): "
            f"{(proc.stdout + proc.stderr).strip()[-1500:]}"
        )
    return None


@pytest.fixture(scope="session")
def slurm_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SlurmCluster]:
    """A two-node cluster for the whole test session, stopped (by PID) at its end."""
    if os.geteuid() != 0:
        pytest.skip("the Slurm test cluster runs slurmd as root (jobs run as their submitting user)")
    reason = install_packages()
    if reason:
        pytest.skip(reason)
    cluster = start_cluster(tmp_path_factory.mktemp("slurm"))
    try:
        yield cluster
    finally:
        cluster.stop()

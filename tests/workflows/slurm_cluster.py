"""A throwaway single-node SLURM cluster for the tests (issue 30): munged, slurmctld and slurmd
started as root on 127.0.0.1 with every file in one folder, stopped by their process ids.

``start`` returns the cluster or the reason it cannot run here (not root, Debian's slurm-wlm
and munge not installed: ``make test`` installs them, or a daemon that does not come up).
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "sinfo", "squeue", "scontrol")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    folder: Path
    env: dict
    procs: list = field(default_factory=list)

    def run(self, *args: str, timeout: int = 60) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), env=self.env, capture_output=True, text=True,
                              timeout=timeout)

    def stop(self) -> None:
        for p in reversed(self.procs):  # only the daemons this cluster started, by their pid
            p.terminate()
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()

    def batch(self, *args: str, timeout: int = 900) -> tuple[bool, str]:
        """``sbatch`` a job (an array too) and wait for it: (every task completed with exit code
        0, what scontrol says of them). Polled twice a second: ``sbatch --wait`` polls less
        often the longer a job runs and returned up to 31 s after the last task had ended
        (issue 32: the suite's time)."""
        r = self.run("sbatch", "--parsable", *args)
        if r.returncode != 0:
            return False, r.stderr
        job = r.stdout.strip().split(";")[0]
        deadline = time.monotonic() + timeout
        while self.run("squeue", "-h", "-j", job).stdout.strip():
            if time.monotonic() > deadline:
                return False, f"job {job} still running after {timeout} s"
            time.sleep(0.5)
        said = self.run("scontrol", "show", "job", job).stdout
        states = [w for w in said.split() if w.startswith(("JobState=", "ExitCode="))]
        done = bool(states) and all(w in ("JobState=COMPLETED", "ExitCode=0:0") for w in states)
        return done, said

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2000:]}"
                         for p in sorted(self.folder.glob("*.log")))


def _conf(folder: Path, host: str, socket_path: Path) -> str:
    cpus = os.cpu_count() or 1
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2**20
    return f"""ClusterName=thumbclftest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
AuthType=auth/munge
AuthInfo=socket={socket_path}
CredType=cred/munge
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
ReturnToService=2
SlurmdTimeout=30
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory={memory} State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def start(folder: Path) -> tuple[Cluster | None, str]:
    """A running cluster, or (None, why not)."""
    if os.geteuid() != 0:
        return None, "a test SLURM cluster is started as root; run the tests as root (CI does)"
    missing = [d for d in DAEMONS if shutil.which(d) is None
               and not Path("/usr/sbin", d).exists()]
    if missing:
        return None, (f"{', '.join(missing)} not installed; apt-get install slurmctld slurmd "
                      "slurm-client munge (make test does)")
    folder.mkdir(parents=True, exist_ok=True)
    for sub in ("state", "spool"):
        (folder / sub).mkdir(exist_ok=True)
    key, sock = folder / "munge.key", folder / "munge.socket"
    key.write_bytes(os.urandom(1024))
    key.chmod(0o400)
    host = socket.gethostname().split(".")[0]
    conf = folder / "slurm.conf"
    conf.write_text(_conf(folder, host, sock))
    env = dict(os.environ, SLURM_CONF=str(conf))
    for name in list(env):
        if name.startswith("SLURM_") and name != "SLURM_CONF":
            env.pop(name)
    cluster = Cluster(folder, env)
    sbin = lambda d: shutil.which(d) or str(Path("/usr/sbin", d))  # noqa: E731
    daemons = [[sbin("munged"), "-F", "--force", f"--key-file={key}", f"--socket={sock}",
                f"--pid-file={folder}/munged.pid", f"--log-file={folder}/munged.log",
                f"--seed-file={folder}/munge.seed"],
               [sbin("slurmctld"), "-D", "-i", "-f", str(conf)],
               [sbin("slurmd"), "-D", "-f", str(conf), "-N", host]]
    for argv in daemons:
        cluster.procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL,
                                              stderr=open(folder / f"{Path(argv[0]).name}"
                                                          ".stderr.log", "w")))
        time.sleep(1.0)
    for _ in range(60):
        r = cluster.run("sinfo", "-h", "-o", "%T")
        if r.returncode == 0 and r.stdout.strip().rstrip("*") in ("idle", "mixed"):
            return cluster, ""
        if any(p.poll() is not None for p in cluster.procs):
            break
        time.sleep(1.0)
    why = cluster.logs()[-1500:]
    cluster.stop()
    return None, f"the test SLURM cluster did not come up: {why}"

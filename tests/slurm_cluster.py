"""A real one-node Slurm cluster (munged + slurmctld + slurmd from Debian's packages) for tests,
started as root in a temporary directory and stopped afterwards."""
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import time

SLURM_CONF = """ClusterName=fsamtest
SlurmctldHost={host}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/slurmd.pid
SlurmctldLogFile={root}/slurmctld.log
SlurmdLogFile={root}/slurmd.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus} RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


def why_unavailable():
    if os.geteuid() != 0:
        return "starting slurmctld/slurmd needs root"
    missing = [b for b in ("slurmctld", "slurmd", "munged", "sbatch") if not shutil.which(b)]
    if missing:
        return f"Slurm/munge not installed ({missing}); tests/run.sh installs them as root"
    return None


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _kill_pidfile(path):
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, ValueError):
        os.kill(int(open(path).read().strip()), signal.SIGTERM)


@contextlib.contextmanager
def slurm_cluster(root):
    """Yields the environment (with SLURM_CONF) under which sbatch/srun reach the cluster."""
    root = str(root)
    os.makedirs(f"{root}/state", exist_ok=True)
    os.makedirs(f"{root}/spool", exist_ok=True)
    conf = f"{root}/slurm.conf"
    with open(conf, "w") as f:
        f.write(SLURM_CONF.format(host=socket.gethostname().split(".")[0], root=root,
                                  ctld_port=_free_port(), slurmd_port=_free_port(),
                                  cpus=os.cpu_count()))
    env = dict(os.environ, SLURM_CONF=conf)
    started_munged = None
    if subprocess.run(["pgrep", "-x", "munged"], capture_output=True).returncode != 0:
        os.makedirs("/run/munge", exist_ok=True)
        shutil.chown("/run/munge", "munge", "munge")
        subprocess.run(["runuser", "-u", "munge", "--", "munged"], check=True)
        started_munged = True
    try:
        subprocess.run(["slurmctld"], env=env, check=True)
        subprocess.run(["slurmd"], env=env, check=True)
        deadline = time.time() + 60
        while time.time() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            if out.stdout.strip() == "idle":
                break
            time.sleep(1)
        else:
            raise RuntimeError(f"Slurm node never became idle; see {root}/slurmctld.log and slurmd.log")
        yield env
    finally:
        subprocess.run(["scancel", "--full", "-u", "root"], env=env, capture_output=True)
        _kill_pidfile(f"{root}/slurmd.pid")
        _kill_pidfile(f"{root}/slurmctld.pid")
        if started_munged:
            subprocess.run(["pkill", "-x", "munged"], capture_output=True)

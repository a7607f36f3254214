"""A real one-node Slurm cluster (munged + slurmctld + slurmd from Debian's packages) for tests,
started as root in a temporary directory and stopped afterwards."""
import atexit
import contextlib
import fcntl
import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
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


def _keep_repo_visible(root, node):
    """Shell commands that keep a repository checked out under /tmp (a CI clone, say) at its path
    on a node whose /tmp is private: bind it into the node's /tmp before that covers /tmp."""
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    if not repo.startswith("/tmp/"):
        return ""
    inside = f"{root}/tmp/{node}/{repo[len('/tmp/'):]}"
    return f"mkdir -p {inside} && mount --bind {repo} {inside} && "


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SYSTEM_MUNGED_PID = "/run/munge/munged.pid"


def _pidfile_alive(path):
    try:
        os.kill(int(open(path).read().strip()), 0)
    except (OSError, ValueError):
        return False
    return True


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
    # the system munged, by its pid file (other munged instances, e.g. TwoNodeCluster's, are not it)
    if not _pidfile_alive(SYSTEM_MUNGED_PID):
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
            _kill_pidfile(SYSTEM_MUNGED_PID)


# ---- a real two-node cluster on one machine --------------------------------------------------
# Each node is a network namespace (own address on a bridge) plus a UTS and a mount namespace (own
# hostname, private /etc/hosts and /tmp) kept alive by a "holder" process; slurmctld and munged run in the
# root namespace, one slurmd per node inside it. See ../shared/MULTINODE_NOTES.md for the facts.

PREFIX = "fsmn"                       # every namespace, link and file this fixture creates
SUBNET = "10.78.15"                   # .254 = the bridge (slurmctld), .N = nodeN; no default route
BRIDGE = f"{PREFIX}-br0"
STATE_DIR = f"/run/{PREFIX}_cluster"  # pids and temp dir of the running cluster, for stale clean-up
LOCK = f"/run/{PREFIX}_cluster.lock"

MULTI_SLURM_CONF = """ClusterName=fsammn
SlurmctldHost={ctl_host}({subnet}.254)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={root}/munge/munge.socket
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SchedulerType=sched/builtin
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
MpiDefault=none
MailProg=/bin/true
ReturnToService=2
# a node that stops answering is declared DOWN (and its jobs killed) after SlurmdTimeout seconds
SlurmdTimeout={slurmd_timeout}
MessageTimeout=5
KillWait=3
InactiveLimit=0
MinJobAge=600
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/slurmctld.pid
SlurmdPidFile={root}/spool/%n/slurmd.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd.%n.log
SlurmctldPort={ctld_port}
SlurmdPort={slurmd_port}
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
GresTypes=gpu
"""


def why_no_multinode():
    """None when a two-node cluster can be built here, else the reason to skip."""
    reason = why_unavailable()
    if reason:
        return reason
    missing = [b for b in ("ip", "nsenter", "unshare", "mungekey", "scontrol") if not shutil.which(b)]
    if missing:
        return f"{missing} not installed"
    probe = f"{PREFIX}-probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"network namespaces are not available here (ip netns add: {made.stderr.strip()})"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def _sh(*cmd, check=True):
    out = subprocess.run(cmd, capture_output=True, text=True)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {out.returncode}: {out.stderr.strip()}")
    return out


def _kill(pid, sig=signal.SIGKILL):
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def netns_pids(name):
    """Every process whose network namespace is `name` ("on" that node)."""
    out = _sh("ip", "netns", "pids", name, check=False)
    return [int(p) for p in out.stdout.split()] if out.returncode == 0 else []


def clean_stale():
    """Remove what an earlier, crashed run left: its daemons (by the pids it recorded, and every
    process inside our namespaces), the namespaces, links and its temp dir. Call holding LOCK."""
    state_file = f"{STATE_DIR}/state.json"
    state = {}
    with contextlib.suppress(OSError, ValueError):
        state = json.load(open(state_file))
    root = state.get("root")
    for pid in state.get("pids", []):   # only if it is still ours: its command line or SLURM_CONF names root
        with contextlib.suppress(OSError):
            seen = open(f"/proc/{pid}/cmdline", "rb").read() + open(f"/proc/{pid}/environ", "rb").read()
            if root and root.encode() in seen:
                _kill(pid)
    names = _sh("ip", "netns", "list", check=False).stdout.split("\n")
    for name in [n.split()[0] for n in names if n.startswith(f"{PREFIX}-")]:
        for pid in netns_pids(name):
            _kill(pid)
        _sh("ip", "netns", "del", name, check=False)
    links = _sh("ip", "-o", "link", "show", check=False).stdout.splitlines()
    for link in links:
        name = link.split(":")[1].strip().split("@")[0]
        if name.startswith(f"{PREFIX}-"):
            _sh("ip", "link", "del", name, check=False)
    if state.get("root", "").startswith(tempfile_prefix()):
        shutil.rmtree(state["root"], ignore_errors=True)
    with contextlib.suppress(FileNotFoundError):
        os.remove(state_file)


def tempfile_prefix():
    # not under /tmp: each node mounts its own /tmp, and everything here is the nodes' shared disk
    return f"/var/tmp/{PREFIX}_cluster_"


def _exit_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


class TwoNodeCluster:
    """node1 and node2 (SUBNET.1, SUBNET.2) with slurmctld at SUBNET.254. start() / stop(); stop()
    is idempotent and also registered with atexit, and start() first removes a crashed run's
    leftovers. `env` carries SLURM_CONF for sbatch/srun/scontrol; `on(node, cmd)` prefixes a
    command so that it runs on that node."""

    def __init__(self, num_nodes=2, cpus_per_node=2, gpus_per_node=2, slurmd_timeout=10):
        self.names = [f"node{i}" for i in range(1, num_nodes + 1)]
        self.cpus, self.gpus = cpus_per_node, gpus_per_node
        self.slurmd_timeout = slurmd_timeout
        self.root = self.shared = None   # shared: a directory every node sees (job outputs)
        self.env = None
        self.holders = {}     # node -> holder pid (its UTS+mount namespaces)
        self.daemons = {}     # "munged", "slurmctld", "slurmd.nodeN" -> Popen
        self._lock_fd = None
        self.start_seconds = self.stop_seconds = None

    # -- naming
    def addr(self, node):
        return f"{SUBNET}.{self.names.index(node) + 1}"

    def netns(self, node):
        return f"{PREFIX}-{node}"

    def veth(self, node):
        return f"{PREFIX}-h{self.names.index(node) + 1}"   # the bridge's end of node's cable

    def on(self, node, *cmd):
        return ["nsenter", "-t", str(self.holders[node]), "--net", "--uts", "--mount", "--", *cmd]

    # -- life cycle
    def start(self):
        t0 = time.time()
        os.makedirs(STATE_DIR, exist_ok=True)
        self._lock_fd = os.open(LOCK, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(self._lock_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._lock_fd)
            self._lock_fd = None
            raise RuntimeError(f"another test run holds the two-node cluster ({LOCK})") from None
        atexit.register(self.stop)
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            with contextlib.suppress(ValueError):   # not the main thread: atexit/next start clean up
                signal.signal(signal.SIGTERM, _exit_on_sigterm)   # a CI timeout's SIGTERM runs atexit
        clean_stale()
        os.makedirs(os.path.dirname(tempfile_prefix()), exist_ok=True)
        self.root = tempfile.mkdtemp(prefix=os.path.basename(tempfile_prefix()), dir=os.path.dirname(tempfile_prefix()))
        self.shared = os.path.join(self.root, "shared")
        os.chmod(self.root, 0o755)
        try:
            self._network()
            self._record()
            self._munge()
            self._slurm()
            self._record()
            self.wait_idle()
        except BaseException:
            self.stop()
            raise
        self.start_seconds = time.time() - t0
        return self

    def _network(self):
        _sh("ip", "link", "add", BRIDGE, "type", "bridge")
        _sh("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        _sh("ip", "link", "set", BRIDGE, "up")
        for node in self.names:   # each node its own /tmp (Slurm's PMIx, torch and DeepSpeed use it)
            os.makedirs(f"{self.root}/tmp/{node}")
            os.chmod(f"{self.root}/tmp/{node}", 0o1777)
        os.makedirs(self.shared)
        hosts = os.path.join(self.root, "hosts")
        with open(hosts, "w") as f:
            f.write(f"127.0.0.1 localhost\n{SUBNET}.254 {self.ctl_host()}\n")
            f.writelines(f"{self.addr(n)} {n}\n" for n in self.names)
        os.chmod(hosts, 0o644)
        for node in self.names:
            ns, host_end, node_end = self.netns(node), self.veth(node), f"{PREFIX}-n{self.addr(node).rsplit('.', 1)[1]}"
            _sh("ip", "netns", "add", ns)
            _sh("ip", "link", "add", host_end, "type", "veth", "peer", "name", node_end)
            _sh("ip", "link", "set", node_end, "netns", ns)
            _sh("ip", "link", "set", host_end, "master", BRIDGE, "up")
            for cmd in (["link", "set", node_end, "name", "eth0"], ["addr", "add", f"{self.addr(node)}/24", "dev", "eth0"],
                        ["link", "set", "eth0", "up"], ["link", "set", "lo", "up"]):
                _sh("ip", "-n", ns, *cmd)
            holder = subprocess.Popen(
                ["nsenter", f"--net=/run/netns/{ns}", "unshare", "--uts", "--mount", "--propagation", "private",
                 "sh", "-c", f"hostname {node} && mount --bind {hosts} /etc/hosts && "
                             f"{_keep_repo_visible(self.root, node)}"
                             f"mount --rbind {self.root}/tmp/{node} /tmp && exec sleep infinity"],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.holders[node] = holder.pid
            self.daemons[f"holder.{node}"] = holder
        for node, pid in self.holders.items():
            deadline = time.time() + 10
            while open(f"/proc/{pid}/comm").read().strip() != "sleep":
                if time.time() > deadline or self.daemons[f"holder.{node}"].poll() is not None:
                    raise RuntimeError(f"the namespace holder of {node} did not start")
                time.sleep(0.02)

    def ctl_host(self):
        return socket.gethostname().split(".")[0]

    def _munge(self):
        mdir = os.path.join(self.root, "munge")
        os.makedirs(mdir)
        os.chmod(mdir, 0o755)
        key = os.path.join(mdir, "munge.key")
        _sh("mungekey", "--create", f"--keyfile={key}")
        os.chmod(key, 0o600)
        self.daemons["munged"] = subprocess.Popen(
            ["munged", "-F", "-f", f"--socket={mdir}/munge.socket", f"--key-file={key}",
             f"--pid-file={mdir}/munged.pid", f"--log-file={mdir}/munged.log", f"--seed-file={mdir}/munged.seed"],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 10
        while not os.path.exists(f"{mdir}/munge.socket"):
            if time.time() > deadline or self.daemons["munged"].poll() is not None:
                raise RuntimeError(f"munged did not start; see {mdir}/munged.log")
            time.sleep(0.02)

    def _slurm(self):
        for d in ("state", "log", *(f"spool/{n}" for n in self.names)):
            os.makedirs(os.path.join(self.root, d), exist_ok=True)
        # stand-in GPUs (empty files) so that --gpus-per-node and CUDA_VISIBLE_DEVICES work as on
        # a GPU cluster; the ranks still compute on the CPU
        os.makedirs(os.path.join(self.root, "dev"))
        for i in range(self.gpus):
            open(os.path.join(self.root, "dev", f"fakegpu{i}"), "w").close()
        with open(os.path.join(self.root, "gres.conf"), "w") as f:
            if self.gpus:
                f.write(f"Name=gpu File={self.root}/dev/fakegpu[0-{self.gpus - 1}]\n")
        gres = f" Gres=gpu:{self.gpus}" if self.gpus else ""
        nodes = "\n".join(f"NodeName={n} NodeAddr={self.addr(n)} NodeHostname={n} CPUs={self.cpus} "
                          f"RealMemory=2000{gres} State=UNKNOWN" for n in self.names)
        conf = os.path.join(self.root, "slurm.conf")
        with open(conf, "w") as f:
            f.write(MULTI_SLURM_CONF.format(ctl_host=self.ctl_host(), subnet=SUBNET, root=self.root,
                                            ctld_port=_free_port(), slurmd_port=_free_port(), nodes=nodes,
                                            slurmd_timeout=self.slurmd_timeout))
        os.chmod(conf, 0o644)
        self.env = dict(os.environ, SLURM_CONF=conf)
        self.daemons["slurmctld"] = subprocess.Popen(
            ["slurmctld", "-D", "-i"], env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for node in self.names:
            self.start_slurmd(node)

    def start_slurmd(self, node):
        self.daemons[f"slurmd.{node}"] = subprocess.Popen(
            self.on(node, "slurmd", "-D"), env=self.env, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._record()

    def _record(self):
        os.makedirs(STATE_DIR, exist_ok=True)
        with open(f"{STATE_DIR}/state.json", "w") as f:
            json.dump({"root": self.root, "holders": list(self.holders.values()),
                       "pids": [p.pid for p in self.daemons.values()]}, f)

    def node_states(self):
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %t"], env=self.env, capture_output=True, text=True)
        return dict(line.split() for line in out.stdout.splitlines() if line.strip())

    def wait_idle(self, nodes=None, timeout=60):
        nodes = nodes or self.names
        deadline = time.time() + timeout
        states = {}
        while time.time() < deadline:
            states = self.node_states()
            if all(states.get(n) == "idle" for n in nodes):
                return
            for name in ("munged", "slurmctld", *(f"slurmd.{n}" for n in nodes)):
                if self.daemons[name].poll() is not None:
                    raise RuntimeError(f"{name} exited ({self.daemons[name].returncode}); see {self.root}/log")
            time.sleep(0.2)
        raise RuntimeError(f"nodes not idle after {timeout}s: {states}; see {self.root}/log")

    # -- faults
    def kill_node(self, node, sig=signal.SIGKILL):
        """SIGKILL every process on `node` (slurmd, slurmstepd, the ranks), as a crash would; the
        namespaces stay (the holder is the node's "hardware"). Returns [(pid, comm)] killed."""
        killed = []
        for pid in netns_pids(self.netns(node)):
            if pid == self.holders[node]:
                continue
            with contextlib.suppress(OSError):
                killed.append((pid, open(f"/proc/{pid}/comm").read().strip()))
            _kill(pid, sig)
        return killed

    def set_link(self, node, up):
        _sh("ip", "link", "set", self.veth(node), "up" if up else "down")

    def revive(self, node, timeout=60):
        """Bring a killed or cut-off node back: link up, leftovers killed, slurmd restarted, idle."""
        self.set_link(node, True)
        self.kill_node(node)
        proc = self.daemons.get(f"slurmd.{node}")
        if proc is not None:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        self.start_slurmd(node)
        subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], env=self.env,
                       capture_output=True)
        self.wait_idle([node], timeout)

    def stop(self):
        """Stop everything this cluster started, whatever state it is in; idempotent."""
        if self._lock_fd is None:
            return
        t0 = time.time()
        if self.env is not None:
            subprocess.run(["scancel", "--full", "--quiet", "-u", "root"], env=self.env,
                           capture_output=True, timeout=30)
        for node in self.names:         # job processes, slurmstepd and slurmd on each node
            if node in self.holders:
                with contextlib.suppress(RuntimeError):
                    self.set_link(node, True)
                self.kill_node(node)
        for name in ("slurmctld", "munged"):
            proc = self.daemons.get(name)
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(5)
                except subprocess.TimeoutExpired:
                    proc.kill()
        for proc in self.daemons.values():
            if proc.poll() is None:
                proc.kill()
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
        for node in self.names:
            _sh("ip", "netns", "del", self.netns(node), check=False)
            _sh("ip", "link", "del", self.veth(node), check=False)
        _sh("ip", "link", "del", BRIDGE, check=False)
        if self.root:
            shutil.rmtree(self.root, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            os.remove(f"{STATE_DIR}/state.json")
        fcntl.flock(self._lock_fd, fcntl.LOCK_UN)
        os.close(self._lock_fd)
        self._lock_fd = None
        self.stop_seconds = time.time() - t0

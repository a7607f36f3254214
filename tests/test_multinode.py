"""Multi-node for real: a two-node Slurm cluster on this machine (tests/slurm_cluster.py: a network,
UTS and mount namespace per node on a bridge, munged, slurmctld, one slurmd per node), the launch
scripts across it, and node failures.

Every job runs tests/multinode_job.py (FSAM + AdamW on PaddedNet, the same global batches at every
world size). A single-node run of the same world size (torchrun on localhost) is the reference:
where the ranks live and which launcher started them must not change the weights (<= 1e-6, fp32).
  1. sbatch launch/slurm_cpu.sbatch --nodes=2, one and two ranks per node, ZeRO-2 and ZeRO-3;
  2. launch/slurm_gpu.sbatch (one task per GPU; stand-in GPUs), launch/slurm_torchrun.sbatch
     (torchrun per node, c10d) and launch/multinode_deepspeed.sh LAUNCHER=slurm (the deepspeed
     launcher's multi-node path with a hostfile);
  3. SIGKILL of every process on node2, and node2's link cut, mid-training: the job ends in bounded
     time naming the lost node; the last checkpoint is intact; resubmitted on node1 alone (another
     world size, through a universal checkpoint) it resumes with the exact weights and AdamW state
     and a recomputed mask.
Needs root (namespaces, daemons); one cluster serves the whole module. Timings are printed
(pytest -s) and, with FSAM_MULTINODE_REPORT=path, written there as JSON.
"""
import json
import os
import re
import subprocess
import sys
import time

import pytest
import torch

from launch_helpers import ENV, REPO
from slurm_cluster import TwoNodeCluster, why_no_multinode

_WHY = why_no_multinode()
needs_cluster = pytest.mark.skipif(_WHY is not None, reason=f"two-node cluster unavailable: {_WHY}")

JOB = "tests/multinode_job.py"
STEPS = 4
TOL = 1e-6
TIMES = {}          # what the closing report needs: cluster start/stop, job walls, time to failure
_PORTS = iter(range(29620, 29700))


def record(key, value):
    TIMES[key] = round(value, 2)
    print(f"[multinode] {key}: {value:.2f}")


@pytest.fixture(scope="module")
def cluster():
    if _WHY is not None:
        pytest.skip(f"two-node cluster unavailable: {_WHY}")
    c = TwoNodeCluster()
    try:
        c.start()
    except RuntimeError as err:
        if "another test run" in str(err):
            pytest.skip(str(err))
        raise
    record("cluster_start_s", c.start_seconds)
    try:
        yield c
    finally:
        c.stop()
        record("cluster_stop_s", c.stop_seconds)
        path = os.environ.get("FSAM_MULTINODE_REPORT")
        if path:
            with open(path, "w") as f:
                json.dump(TIMES, f, indent=1)


def job_env(cluster, **extra):
    env = dict(cluster.env, **{k: ENV[k] for k in ("DS_ACCELERATOR", "HF_HUB_OFFLINE", "PYTHONUNBUFFERED")},
               FSAM_VENV=os.path.dirname(os.path.dirname(sys.executable)),
               MASTER_PORT=str(next(_PORTS)),
               # DeepSpeed JIT-builds its CPU comm op into TORCH_EXTENSIONS_DIR (default ~/.cache,
               # shared by every venv on the machine: each venv's build replaces the others')
               TORCH_EXTENSIONS_DIR=os.path.join(os.path.dirname(os.path.dirname(sys.executable)), "torch_extensions"),
               # Open MPI (the deepspeed launcher's MPI discovery): TCP over the nodes' one interface
               OMPI_MCA_btl="self,tcp", OMPI_MCA_btl_tcp_if_include="eth0", OMPI_MCA_oob_tcp_if_include="eth0")
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "LOCAL_SIZE"):
        env.pop(key, None)
    env.update(extra)
    return env


FINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "NODE_FAIL", "TIMEOUT", "OUT_OF_MEMORY", "BOOT_FAIL",
                "DEADLINE", "PREEMPTED"}


class Job:
    """An sbatch submission, polled with scontrol (sbatch --wait polls every few seconds, which
    would hide the times measured here). .wait() returns (exit code, wall seconds, log text)."""

    def __init__(self, cluster, name, sbatch_args, program, env=None):
        self.cluster, self.name = cluster, name
        self.log = os.path.join(cluster.shared, f"{name}.out")
        cmd = ["sbatch", "--parsable", "-J", name, "-o", self.log, *sbatch_args, *program]
        self.started = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=env or job_env(cluster), capture_output=True, text=True,
                              timeout=60)
        assert proc.returncode == 0, f"sbatch: {proc.stderr}"
        self.id = proc.stdout.strip().split(";")[0]
        self.final = None

    def poll(self):
        """None while the job runs, else its final scontrol record."""
        if self.final is None:
            state = self.state()
            if state.get("JobState") in FINAL_STATES:
                self.final, self.wall = state, time.time() - self.started
        return self.final

    def wait(self, timeout=240):
        deadline = time.time() + timeout
        while self.poll() is None:
            if time.time() > deadline:
                subprocess.run(["scancel", self.id], env=self.cluster.env)
                raise AssertionError(f"job {self.name} still running after {timeout}s:\n{self.text()[-4000:]}")
            time.sleep(0.1)
        code, sig = (int(x) for x in self.final.get("ExitCode", "1:0").split(":"))
        rc = 0 if self.final["JobState"] == "COMPLETED" else (code or 128 + sig or 1)
        return rc, self.wall, f"{self.final}\n{self.text()}"

    def text(self):
        return open(self.log).read() if os.path.exists(self.log) else ""

    def state(self):
        out = subprocess.run(["scontrol", "show", "job", "-o", self.id], env=self.cluster.env,
                             capture_output=True, text=True).stdout
        return dict(re.findall(r"(\w+)=(\S+)", out))


def run_job(cluster, name, sbatch_args, program, env=None, timeout=240):
    job = Job(cluster, name, sbatch_args, program, env)
    rc, wall, text = job.wait(timeout)
    record(f"job_{name}_wall_s", wall)
    assert rc == 0, f"{name}: sbatch exit {rc}\n{text[-6000:]}"
    return text


def job_args(out, stages="2,3", steps=STEPS, extra=()):
    return [JOB, "--out", str(out), "--stages", stages, "--steps", str(steps), *extra]


@pytest.fixture(scope="module")
def reference(cluster):
    """Single-node runs (torchrun, loopback) at world sizes 2 and 4: {(world size, stage): final}."""
    results = {}
    for world_size in (2, 4):
        out = os.path.join(cluster.shared, f"reference_ws{world_size}")
        env = dict(job_env(cluster), MASTER_ADDR="127.0.0.1", FSAM_JOB_TRACE="1")
        t0 = time.time()
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(world_size),
                               "--master_addr", "127.0.0.1", "--master_port", env["MASTER_PORT"],
                               *job_args(out)], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        record(f"reference_ws{world_size}_wall_s", time.time() - t0)
        assert proc.returncode == 0, proc.stderr[-5000:]
        for stage in (2, 3):
            results[world_size, stage] = torch.load(os.path.join(out, f"z{stage}", "final.pt"))
    return results


def assert_matches(result, ref, what):
    assert result["world_size"] == ref["world_size"]
    diffs = {k: (result["weights"][k] - ref["weights"][k]).abs().max().item() for k in ref["weights"]}
    assert max(diffs.values()) <= TOL, f"{what}: weights differ from the single-node run: {diffs}"
    assert max(abs(a - b) for a, b in zip(result["losses"], ref["losses"])) <= TOL, what
    for got, want in zip(result["stats"], ref["stats"]):   # the same masks: same threshold and kept count
        assert got["num_kept"] == want["num_kept"], what
        assert abs(got["threshold"] - want["threshold"]) <= TOL * max(1.0, abs(want["threshold"])), what
    assert result["global_steps"] == ref["global_steps"] == STEPS
    print(f"[multinode] {what}: max |w - w_single_node| = {max(diffs.values()):.3g}")


def ranks_seen(out):
    return json.load(open(os.path.join(out, "ranks.json")))


def hosts_of(seen):
    return [r["host"] for r in seen]


# ---- the cluster itself ------------------------------------------------------------------------

def _leftovers():
    from slurm_cluster import PREFIX
    netns = [n.split()[0] for n in subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.splitlines()
             if n.startswith(f"{PREFIX}-")]
    links = [n for n in subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout.split("\n")
             if f" {PREFIX}-" in n]
    return netns, links


def test_multinode_deepspeed_pdsh_dry_run_takes_the_head_node_from_the_hostfile(tmp_path):
    """The ssh (pdsh) path needs sshd on every node, which the test cluster lacks: its command only."""
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("# comment\nnode-a slots=2\nnode-b slots=2\n")
    proc = subprocess.run(["bash", "launch/multinode_deepspeed.sh", JOB, "--out", "x"], cwd=REPO,
                          env=dict(ENV, HOSTFILE=str(hostfile), DRY_RUN="1", MASTER_PORT="29777"),
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert (f"+ deepspeed --hostfile {hostfile} --launcher pdsh --master_addr node-a --master_port 29777 "
            f"{JOB} --out x") in proc.stdout
    bad = subprocess.run(["bash", "launch/multinode_deepspeed.sh"], cwd=REPO, capture_output=True, text=True,
                         env=dict(ENV, HOSTFILE=str(hostfile), LAUNCHER="ssh"), timeout=30)
    assert bad.returncode == 2 and "LAUNCHER=ssh; use pdsh or slurm" in bad.stderr


@needs_cluster
def test_a_crashed_run_is_cleaned_up_by_the_next_and_stop_leaves_nothing(tmp_path):
    """Runs before the module's cluster starts: a process that started a cluster is SIGKILLed (no
    finally, no atexit); the next start() removes its daemons, namespaces, links and temp dir."""
    script = ("import sys, json; sys.path.insert(0, 'tests'); from slurm_cluster import TwoNodeCluster\n"
              "c = TwoNodeCluster().start()\n"
              "print(json.dumps({'root': c.root, 'pids': [p.pid for p in c.daemons.values()]}), flush=True)\n"
              "import time; time.sleep(600)\n")
    crashed = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        left = json.loads(crashed.stdout.readline())
    finally:
        crashed.kill()
        crashed.wait()
    netns, links = _leftovers()
    assert len(netns) == 2 and links and os.path.isdir(left["root"])
    assert all(os.path.exists(f"/proc/{pid}") for pid in left["pids"])   # munged, slurmctld, slurmd x2, holders
    fresh = TwoNodeCluster()
    try:
        fresh.start()
        assert not os.path.isdir(left["root"])
        assert not [pid for pid in left["pids"] if os.path.exists(f"/proc/{pid}")
                    and open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[0] != "Z"]
        assert fresh.node_states() == {"node1": "idle", "node2": "idle"}
    finally:
        fresh.stop()
    assert _leftovers() == ([], []) and not os.path.isdir(fresh.root)
    assert not [p for p in fresh.daemons.values() if p.poll() is None]


def test_the_cluster_is_two_nodes_with_their_own_names_addresses_and_slurmd(cluster):
    assert cluster.node_states() == {"node1": "idle", "node2": "idle"}
    proc = subprocess.run(["srun", "-N2", "-n2", "-l", "bash", "-c",
                           "echo $(hostname) $(getent hosts node1 | cut -d' ' -f1) "
                           "$(ip -4 -o addr show eth0 | awk '{print $4}')"],
                          env=cluster.env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = sorted(proc.stdout.split("\n"))[-2:]
    assert [line.split()[1:] for line in lines] == [["node1", cluster.addr("node1"), f"{cluster.addr('node1')}/24"],
                                                    ["node2", cluster.addr("node1"), f"{cluster.addr('node2')}/24"]]


# ---- 1. sbatch launch/slurm_cpu.sbatch across two nodes ------------------------------------------

@pytest.mark.parametrize("per_node", [1, 2])
def test_slurm_cpu_sbatch_two_nodes_matches_a_single_node_run(cluster, reference, per_node):
    world_size = 2 * per_node
    out = os.path.join(cluster.shared, f"slurm_cpu_{per_node}pn")
    env = job_env(cluster)
    text = run_job(cluster, f"slurm_cpu_{per_node}pn", ["--nodes=2", f"--ntasks-per-node={per_node}"],
                   ["launch/slurm_cpu.sbatch", *job_args(out)], env=env)
    seen = ranks_seen(out)
    # srun's block distribution: ranks 0..per_node-1 on node1; local ranks restart on each node
    assert hosts_of(seen) == ["node1"] * per_node + ["node2"] * per_node
    assert [r["local_rank"] for r in seen] == list(range(per_node)) * 2
    assert [r["SLURM_NODEID"] for r in seen] == ["0"] * per_node + ["1"] * per_node
    # head node = the first node of SLURM_JOB_NODELIST, by name; every rank got the same address/port
    assert {r["MASTER_ADDR"] for r in seen} == {"node1"} and {r["MASTER_PORT"] for r in seen} == {env["MASTER_PORT"]}
    assert f"head node node1 (node1:{env['MASTER_PORT']}), {world_size} tasks on 2 node(s): node[1-2]" in text
    for stage in (2, 3):
        result = torch.load(os.path.join(out, f"z{stage}", "final.pt"))
        assert_matches(result, reference[world_size, stage], f"slurm_cpu {per_node}/node ZeRO-{stage}")


# ---- 2. the other launchers a cluster user has --------------------------------------------------

def test_slurm_gpu_sbatch_one_task_per_gpu(cluster, reference):
    """launch/slurm_gpu.sbatch on stand-in GPUs (Gres=gpu:2 per node; computing on the CPU)."""
    out = os.path.join(cluster.shared, "slurm_gpu")
    env = job_env(cluster)
    run_job(cluster, "slurm_gpu", ["--nodes=2", "--ntasks-per-node=2", "--gpus-per-node=2", "--cpus-per-task=1"],
            ["launch/slurm_gpu.sbatch", *job_args(out, stages="3")], env=env)
    seen = ranks_seen(out)
    assert hosts_of(seen) == ["node1", "node1", "node2", "node2"]
    for node in ("node1", "node2"):   # one task per GPU: local ranks 0..gpus-1 on each node
        on_node = [r for r in seen if r["host"] == node]
        assert sorted(r["local_rank"] for r in on_node) == list(range(int(on_node[0]["SLURM_GPUS_ON_NODE"]))) == [0, 1]
    assert {r["MASTER_ADDR"] for r in seen} == {"node1"} and {r["MASTER_PORT"] for r in seen} == {env["MASTER_PORT"]}
    assert_matches(torch.load(os.path.join(out, "z3", "final.pt")), reference[4, 3], "slurm_gpu 2/node ZeRO-3")


def test_torchrun_per_node_with_c10d_rendezvous_under_srun(cluster, reference):
    out = os.path.join(cluster.shared, "torchrun")
    env = job_env(cluster, NPROC_PER_NODE="2")
    text = run_job(cluster, "torchrun", ["--nodes=2", "--cpus-per-task=2"],
                   ["launch/slurm_torchrun.sbatch", *job_args(out)], env=env)
    assert f"rendezvous node1:{env['MASTER_PORT']} (c10d" in text
    seen = ranks_seen(out)
    assert sorted(hosts_of(seen)) == ["node1", "node1", "node2", "node2"]
    for r in seen:    # torchrun's node rank and local rank are consistent with where the rank runs
        assert r["rank"] == 2 * int(r["GROUP_RANK"]) + r["local_rank"]
    assert len({r["GROUP_RANK"] for r in seen if r["host"] == "node1"}) == 1
    for stage in (2, 3):
        assert_matches(torch.load(os.path.join(out, f"z{stage}", "final.pt")), reference[4, stage],
                       f"torchrun per node ZeRO-{stage}")


def test_deepspeed_launcher_multinode_with_a_hostfile_through_slurm(cluster, reference):
    out = os.path.join(cluster.shared, "deepspeed")
    env = job_env(cluster, LAUNCHER="slurm")
    program = " ".join(job_args(out))
    text = run_job(cluster, "deepspeed", ["--nodes=2", "--ntasks-per-node=1", "--wrap",
                                          f"bash launch/multinode_deepspeed.sh {program}"], [], env=env)
    assert "deepspeed --hostfile" in text and "--launcher slurm" in text
    # DeepSpeed read the hostfile written from the allocation (2 hosts x 1 slot) and ran srun itself
    assert re.search(r"cmd = srun -n 2 --mpi=pmix --export=ALL\S* \S*python -u tests/multinode_job.py", text), text[-3000:]
    seen = ranks_seen(out)
    assert hosts_of(seen) == ["node1", "node2"]
    # DeepSpeed's MPI discovery: rank 0's address (node1's), MASTER_PORT from the launcher's environment
    assert {r["MASTER_ADDR"] for r in seen} == {cluster.addr("node1")}
    assert {r["MASTER_PORT"] for r in seen} == {env["MASTER_PORT"]}
    for stage in (2, 3):
        assert_matches(torch.load(os.path.join(out, f"z{stage}", "final.pt")), reference[2, stage],
                       f"deepspeed --launcher slurm ZeRO-{stage}")


# ---- 3. node failures ---------------------------------------------------------------------------

def wait_for_file(path, job, timeout=120):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if os.path.exists(path):
            return
        assert job.poll() is None, f"{job.name} ended early:\n{job.text()[-4000:]}"
        time.sleep(0.05)
    raise AssertionError(f"{path} not written after {timeout}s:\n{job.text()[-4000:]}")


def checkpoint_is_complete(ckpt, tag, world_size):
    files = sorted(os.listdir(os.path.join(ckpt, tag)))
    assert "mp_rank_00_model_states.pt" in files or any(f.startswith("zero_pp_rank_0") and "model" in f for f in files), files
    optim = [f for f in files if f.endswith("optim_states.pt")]
    assert len(optim) == world_size, files
    for f in files:
        if f.endswith(".pt"):
            torch.load(os.path.join(ckpt, tag, f), weights_only=False)   # not torn


def resume_on_node1(cluster, out, stage, tag, per_node, steps):
    """Convert `tag` to a universal checkpoint, resubmit on node1 alone; returns what it resumed."""
    ckpt = os.path.join(out, f"z{stage}", "checkpoints")
    t0 = time.time()
    conv = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal",
                           "--input_folder", os.path.join(ckpt, tag),
                           "--output_folder", os.path.join(ckpt, f"{tag}_universal")],
                          cwd=REPO, env=job_env(cluster), capture_output=True, text=True, timeout=180)
    record(f"universal_conversion_z{stage}_s", time.time() - t0)
    assert conv.returncode == 0, conv.stderr[-4000:]
    name = f"resume_z{stage}"
    text = run_job(cluster, name, ["--nodes=1", "-w", "node1", f"--ntasks-per-node={per_node}"],
                   ["launch/slurm_cpu.sbatch", *job_args(out, stages=str(stage), steps=steps,
                                                         extra=["--resume", "--load_tag", f"{tag}_universal",
                                                                "--save_every", "2"])])
    assert f"resumed from {ckpt}/{tag}_universal" in text
    assert "the mask is recomputed at the next step" in text
    return (torch.load(os.path.join(out, f"z{stage}", f"state_step{tag[4:]}.pt")),
            torch.load(os.path.join(out, f"z{stage}", f"state_resumed_{tag}_universal.pt")),
            torch.load(os.path.join(out, f"z{stage}", "final.pt")))


def assert_exact_resume(saved, resumed, final, step, steps, world_size, stage):
    """Weights and AdamW moments bit-identical; step counters kept; the mask recomputed at once."""
    for name, w in saved["weights"].items():
        assert torch.equal(resumed["weights"][name], w), f"ZeRO-{stage} weight {name}"
        for key in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(resumed["optim"][name][key], saved["optim"][name][key]), f"{name} {key}"
    assert resumed["global_steps"] == saved["global_steps"] == step
    assert resumed["fsam_num_steps"] == saved["fsam_num_steps"] == step
    assert resumed["lr"] == saved["lr"]
    assert final["world_size"] == world_size and final["start"] == step
    # the first resumed step (step + 1) is not a scheduled refresh (mask_interval 4) but refreshes
    assert step % 4 != 0 and final["refreshed"][0], final["refreshed"]
    assert final["stats"][0]["threshold"] is not None and final["stats"][0]["num_kept"] > 0
    assert final["global_steps"] == final["fsam_num_steps"] == steps
    assert all(torch.isfinite(w).all() for w in final["weights"].values())


FAULT_STEPS = 12        # long enough that a fault always lands mid-training
FAULT_BOUND_S = 60      # every failure below must end the job well inside this (collective timeout: 600 s)


def start_fault_job(cluster, name, stage, per_node):
    out = os.path.join(cluster.shared, name)
    # --no-requeue: else Slurm requeues a batch job whose node failed (JobRequeue=1), to wait for it
    job = Job(cluster, name, ["--nodes=2", f"--ntasks-per-node={per_node}", "--no-requeue"],
              ["launch/slurm_cpu.sbatch", *job_args(out, stages=str(stage), steps=FAULT_STEPS,
                                                    extra=["--save_every", "2", "--step_sleep", "0.5",
                                                           "--timeout_s", "600"])])
    return out, job


def after_fault(cluster, job, t_fault, name):
    """Wait for the job to end; record when a rank first reported the failure and when the job ended."""
    first_error = None
    while job.poll() is None and time.time() - t_fault < FAULT_BOUND_S + 60:
        if first_error is None and "FAILED: rank" in job.text():
            first_error = time.time() - t_fault
        time.sleep(0.1)
    rc, _, text = job.wait(timeout=5)
    elapsed = job.started + job.wall - t_fault
    if first_error is not None:
        record(f"fault_{name}_first_rank_error_s", first_error)
    done = [int(n) for n in re.findall(r"z\d step (\d+)/", job.text())]
    record(f"fault_{name}_steps_done_before_failure", max(done, default=0))
    record(f"fault_{name}_time_to_failure_s", elapsed)
    record(f"job_{name}_wall_s", job.wall)
    state = job.final
    assert rc != 0, f"the job survived the fault:\n{text[-4000:]}"
    assert elapsed < FAULT_BOUND_S, f"{elapsed:.1f}s to fail:\n{text[-4000:]}"
    return text, state


def test_sigkill_of_every_process_on_node2_then_resume_on_node1(cluster):
    """ZeRO-2, one rank per node. node2's slurmd, slurmstepd and rank die at once (a node crash):
    rank 0's next collective gets a closed connection at once; srun --kill-on-bad-exit ends the job."""
    out, job = start_fault_job(cluster, "kill_node2", stage=2, per_node=1)
    try:
        wait_for_file(os.path.join(out, "z2", "state_step2.pt"), job)
        wait_for_file(os.path.join(out, "z2", "checkpoints", "latest"), job)
        t_fault = time.time()
        killed = cluster.kill_node("node2")
        assert {"slurmd", "python"} <= {comm for _, comm in killed}, killed
        text, state = after_fault(cluster, job, t_fault, "sigkill_node2")
        # the surviving rank names the lost peer: node2's address, resolved to its name
        assert re.search(rf"FAILED: rank 0 on node1: .*{re.escape(cluster.addr('node2'))} is node2", text), text[-4000:]
        assert "Node failure on node2" in text, text[-4000:]   # and so does srun
        assert state["JobState"] in ("NODE_FAIL", "FAILED"), state
        ckpt = os.path.join(out, "z2", "checkpoints")
        tag = open(os.path.join(ckpt, "latest")).read().strip()
        record("fault_sigkill_node2_last_checkpoint_step", int(tag[4:]))
        checkpoint_is_complete(ckpt, tag, world_size=2)
        saved, resumed, final = resume_on_node1(cluster, out, 2, tag, per_node=1, steps=int(tag[4:]) + 3)
        assert_exact_resume(saved, resumed, final, int(tag[4:]), int(tag[4:]) + 3, world_size=1, stage=2)
    finally:
        if job.poll() is None:
            subprocess.run(["scancel", job.id], env=cluster.env)
        t0 = time.time()
        cluster.revive("node2")
        record(f"revive_node2_after_{job.name}_s", time.time() - t0)


def test_cutting_node2s_link_then_resume_on_node1(cluster):
    """ZeRO-3, two ranks per node. With the link down no packet says anything is wrong: the
    ranks would block until the collective timeout (600 s). What ends the job is Slurm: slurmctld
    stops hearing from node2's slurmd, marks node2 DOWN after SlurmdTimeout (10 s here) and kills the
    job with NODE_FAIL."""
    out, job = start_fault_job(cluster, "cut_node2", stage=3, per_node=2)
    try:
        wait_for_file(os.path.join(out, "z3", "state_step2.pt"), job)
        wait_for_file(os.path.join(out, "z3", "checkpoints", "latest"), job)
        t_fault = time.time()
        cluster.set_link("node2", up=False)
        text, state = after_fault(cluster, job, t_fault, "link_cut_node2")
        assert state.get("JobState") == "NODE_FAIL", state
        assert cluster.node_states().get("node2", "").startswith("down"), cluster.node_states()
        assert "Node failure on node2" in text, text[-4000:]   # srun names the lost node
        ckpt = os.path.join(out, "z3", "checkpoints")
        tag = open(os.path.join(ckpt, "latest")).read().strip()
        record("fault_link_cut_node2_last_checkpoint_step", int(tag[4:]))
        checkpoint_is_complete(ckpt, tag, world_size=4)
        saved, resumed, final = resume_on_node1(cluster, out, 3, tag, per_node=2, steps=int(tag[4:]) + 3)
        assert_exact_resume(saved, resumed, final, int(tag[4:]), int(tag[4:]) + 3, world_size=2, stage=3)
    finally:
        if job.poll() is None:
            subprocess.run(["scancel", job.id], env=cluster.env)
        t0 = time.time()
        cluster.revive("node2")
        record(f"revive_node2_after_{job.name}_s", time.time() - t0)

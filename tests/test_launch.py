"""Launch scripts (dry runs parsed with shlex) and the distributed start-up decision.

Nothing here reaches a cloud or a cluster: the TPU launcher and the SLURM script are run with
their dry-run switch; the worker-side run/stop shell text is executed locally with ``pkill``,
``sudo`` and ``sleep`` replaced by recorders; the GPU single-node script really starts two
CPU processes that join through ``jax.distributed``.
"""
from __future__ import annotations

import os
import shlex
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from irg_jax import runtime

REPO = Path(__file__).resolve().parents[1]
TPU = REPO / "launch" / "tpu" / "tpu.py"
SBATCH = REPO / "launch" / "gpu" / "slurm_multinode.sbatch"
SINGLE_NODE = REPO / "launch" / "gpu" / "single_node.sh"

TRAIN = ["python", "-m", "irg_jax.train", "--config", "configs/bagel_7b_mot.py:stage=1,name=a b",
         "--workdir", "gs://bucket/runs/it's"]
TPU_ENV = {"PROJECT": "irg-proj", "ZONE": "us-east5-a", "TPU_NAME": "irg-v5p", "ACCELERATOR": "v5p-64"}


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("SLURM_", "IRG_", "TPU_", "MEGASCALE_"))
           and k not in ("PROJECT", "ZONE", "ACCELERATOR", "RUNTIME_VERSION", "NUM_SLICES")}
    env.update(extra)
    return env


def tpu_dry_run(subcommand: str, *args: str, env: dict[str, str] | None = None) -> list[list[str]]:
    """The commands ``tpu.py SUBCOMMAND --dry-run ARGS`` prints, each split as the shell would."""
    out = subprocess.run([sys.executable, str(TPU), subcommand, "--dry-run", *args],
                         env=_clean_env(**(TPU_ENV if env is None else env)),
                         capture_output=True, text=True, check=True).stdout
    return [shlex.split(line) for line in out.splitlines() if line.strip()]


def flag(argv: list[str], name: str) -> str:
    values = [a.split("=", 1)[1] for a in argv if a.startswith(name + "=")]
    assert len(values) == 1, (name, argv)
    return values[0]


# ---------------------------------------------------------------------------------- TPU ---

def test_tpu_create_single_slice():
    [cmd] = tpu_dry_run("create", "--spot")
    assert cmd[:5] == ["gcloud", "compute", "tpus", "queued-resources", "create"]
    assert cmd[5] == "irg-v5p"
    assert flag(cmd, "--zone") == "us-east5-a" and flag(cmd, "--project") == "irg-proj"
    assert flag(cmd, "--accelerator-type") == "v5p-64"
    assert flag(cmd, "--runtime-version") == "v2-alpha-tpuv5"
    assert flag(cmd, "--node-id") == "irg-v5p"
    assert "--spot" in cmd and not any(a.startswith("--node-count") for a in cmd)


def test_tpu_create_multislice_and_flags_override_env():
    [cmd] = tpu_dry_run("create", "--num-slices", "4", "--accelerator", "v6e-16", "--name", "ms")
    assert cmd[5] == "ms"
    assert flag(cmd, "--node-count") == "4" and flag(cmd, "--node-prefix") == "ms"
    assert flag(cmd, "--accelerator-type") == "v6e-16"
    assert flag(cmd, "--runtime-version") == "v2-alpha-tpuv6e"
    assert not any(a.startswith("--node-id") for a in cmd)


def test_tpu_up_creates_waits_ships_and_installs_on_all_workers():
    cmds = tpu_dry_run("up", "--runtime-version", "tpu-ubuntu2204-base")
    verbs = [c[3:5] if c[0] == "gcloud" else c[:1] for c in cmds]
    assert verbs == [["queued-resources", "create"], ["queued-resources", "describe"], ["git"],
                     ["tpu-vm", "scp"], ["tpu-vm", "ssh"], ["tpu-vm", "ssh"]]
    assert flag(cmds[0], "--runtime-version") == "tpu-ubuntu2204-base"
    archive = cmds[2]
    assert archive[:3] == ["git", "-C", str(REPO)] and archive[3] == "archive"
    local_tar = flag(archive, "--output")
    scp = cmds[3]
    assert scp[5] == local_tar and scp[6].startswith("irg-v5p:")
    for c in cmds[3:]:
        assert flag(c, "--worker") == "all" and flag(c, "--zone") == "us-east5-a"
    assert "tar -xzf" in flag(cmds[4], "--command")
    assert "launch/tpu/worker_setup.sh" in flag(cmds[5], "--command")


def test_tpu_run_forwards_command_intact_with_environment():
    [cmd] = tpu_dry_run("run", "--run-name", "r1", "--env", "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2", "--",
                        *TRAIN)
    assert cmd[3:6] == ["tpu-vm", "ssh", "irg-v5p"] and flag(cmd, "--worker") == "all"
    remote = flag(cmd, "--command")
    assert shlex.join(TRAIN) in remote
    words = shlex.split(remote)
    start = words.index("nohup") + 1
    assert words[start:start + len(TRAIN)] == TRAIN
    assert words[start + len(TRAIN)] == ">"
    assert "IRG_DISTRIBUTED=1" in words and "LIBTPU_INIT_ARGS=--xla_a=1 --xla_b=2" in words
    assert "$HOME/irg_logs/r1.log" in words
    assert remote.index("libtpu_lockfile") < remote.index("nohup")  # stale processes stopped first


def test_tpu_multislice_reaches_every_node_and_worker():
    env = dict(TPU_ENV, NUM_SLICES="2")
    cmds = tpu_dry_run("run", "--run-name", "r2", "--", *TRAIN, env=env)
    cmds += tpu_dry_run("stop", env=env) + tpu_dry_run("ship", env=env)
    for c in cmds:
        if c[0] != "gcloud":
            continue
        assert c[3] == "queued-resources"
        assert c[5] == "irg-v5p" if c[4] == "ssh" else c[6].startswith("irg-v5p:")
        assert flag(c, "--node") == "all" and flag(c, "--worker") == "all"
    [logs] = tpu_dry_run("logs", env=env)
    assert flag(logs, "--node") == "0" and flag(logs, "--worker") == "0"
    assert "tail -n 100 -F" in flag(logs, "--command")


def test_tpu_logs_stop_delete():
    [follow] = tpu_dry_run("logs", "--run-name", "r1")
    assert flag(follow, "--worker") == "0" and "$HOME/irg_logs/r1.log" in flag(follow, "--command")
    [every] = tpu_dry_run("logs", "--run-name", "r1", "--all", "--lines", "5")
    assert flag(every, "--worker") == "all" and "tail -n 5 " in flag(every, "--command")
    [stop] = tpu_dry_run("stop")
    assert "/dev/vfio/*" in flag(stop, "--command") and "pkill -f" in flag(stop, "--command")
    [delete] = tpu_dry_run("delete")
    assert delete[3:6] == ["queued-resources", "delete", "irg-v5p"] and "--force" in delete


def test_tpu_rejects_missing_settings():
    proc = subprocess.run([sys.executable, str(TPU), "create", "--dry-run"], env=_clean_env(),
                          capture_output=True, text=True)
    assert proc.returncode != 0 and "TPU_NAME" in proc.stderr
    proc = subprocess.run([sys.executable, str(TPU), "create", "--dry-run", "--accelerator", "h100"],
                          env=_clean_env(ZONE="z", TPU_NAME="n"), capture_output=True, text=True)
    assert proc.returncode != 0 and "ACCELERATOR" in proc.stderr


def _load_tpu_module():
    import importlib.util
    spec = importlib.util.spec_from_file_location("irg_tpu_launcher", TPU)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state not in ("Z", "X")  # a killed orphan may linger as a zombie


def test_tpu_worker_run_and_stop_scripts_execute(tmp_path):
    """Run the worker-side shell text locally: detached start, pid file, env, log; stop by pid.

    pkill/sudo/sleep are recorders on PATH, so nothing outside the started process is touched.
    """
    tpu = _load_tpu_module()
    home = tmp_path / "home"
    (home / "irg_jax" / "irg_jax").mkdir(parents=True)
    (home / "irg_jax" / "irg_jax" / "__init__.py").write_text("")
    (home / "irg_jax" / "irg_jax" / "probe.py").write_text(textwrap.dedent("""\
        import os, sys, time
        print("argv", sys.argv[1:], "dist", os.environ["IRG_DISTRIBUTED"],
              "cache", os.environ["JAX_COMPILATION_CACHE_DIR"], "extra", os.environ["EXTRA"], flush=True)
        time.sleep(60)
    """))
    venv_bin = home / "irg_venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "python").symlink_to(sys.executable)
    (venv_bin / "activate").write_text(f'export PATH="{venv_bin}:$PATH"\n')
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    for tool in ("pkill", "sudo", "sleep"):
        (fake_bin / tool).write_text(f'#!/bin/sh\necho "{tool} $*" >> "{tmp_path}/calls"\n')
        (fake_bin / tool).chmod(0o755)
    env = {"HOME": str(home), "PATH": f"{fake_bin}:/usr/bin:/bin"}

    args = tpu.parse_args(["run", "--name", "n", "--zone", "z", "--env", "EXTRA=a b",
                           "--run-name", "r1", "--", "python", "-m", "irg_jax.probe", "x y"])
    script = tpu.run_script(args.run_name, args.command, tpu.run_env(args))
    subprocess.run(["bash", "-c", script], env=env, check=True, capture_output=True, timeout=20)
    pid_file = home / "irg_logs" / "r1.pid"
    pid = int(pid_file.read_text())
    log = home / "irg_logs" / "r1.log"
    try:
        for _ in range(100):
            if "argv" in log.read_text():
                break
            time.sleep(0.1)
        assert f"argv ['x y'] dist 1 cache {home}/jax_cache extra a b" in log.read_text()
        assert os.getpgid(pid) == pid  # its own process group, so stop can kill the whole run
    finally:
        subprocess.run(["bash", "-c", tpu._STOP_SCRIPT], env=env, check=True, capture_output=True)
    for _ in range(50):
        if not _alive(pid):
            break
        time.sleep(0.1)
    else:
        os.kill(pid, 9)
        pytest.fail("stop script left the run alive")
    assert not pid_file.exists()
    calls = (tmp_path / "calls").read_text()
    assert "sudo rm -f /tmp/libtpu_lockfile" in calls and "pkill -f" in calls


# ---------------------------------------------------------------------------------- GPU ---

def _fake_scontrol(tmp_path: Path, hosts: list[str]) -> str:
    (tmp_path / "scontrol").write_text(
        "#!/bin/sh\n[ \"$1 $2\" = 'show hostnames' ] || exit 1\n" + "".join(f"echo {h}\n" for h in hosts))
    (tmp_path / "scontrol").chmod(0o755)
    return f"{tmp_path}:{os.environ['PATH']}"


@pytest.mark.parametrize("ntasks,gpus", [(2, 8), (8, 4)])
def test_slurm_dry_run_coordinator_and_process_ids(tmp_path, ntasks, gpus):
    env = _clean_env(PATH=_fake_scontrol(tmp_path, ["gpu017", "gpu018"]), IRG_DRY_RUN="1",
                     SLURM_JOB_ID="4242", SLURM_JOB_NODELIST="gpu[017-018]", SLURM_NTASKS=str(ntasks),
                     SLURM_GPUS_ON_NODE=str(gpus), SLURM_SUBMIT_DIR=str(REPO))
    out = subprocess.run(["bash", str(SBATCH), *TRAIN], env=env, capture_output=True, text=True,
                         check=True).stdout.splitlines()
    per_node = ntasks // 2
    srun = shlex.split(next(line for line in out if line.startswith("srun ")))
    assert f"--ntasks={ntasks}" in srun and f"--ntasks-per-node={per_node}" in srun
    assert srun[-len(TRAIN):] == TRAIN
    tasks = [line for line in out if line.startswith("task ")]
    assert len(tasks) == ntasks
    for rank, line in enumerate(tasks):
        head, _, command = line.partition(": ")
        words = shlex.split(command)
        settings = dict(w.split("=", 1) for w in words[:4])
        assert head == f"task {rank} on {'gpu017' if rank < per_node else 'gpu018'}"
        assert settings["IRG_COORDINATOR_ADDRESS"] == "gpu017:24242"  # 20000 + 4242 % 20000
        assert settings["IRG_NUM_PROCESSES"] == str(ntasks)
        assert settings["IRG_PROCESS_ID"] == str(rank)
        expected_ids = ",".join(map(str, range(gpus))) if per_node == 1 else str(rank % per_node)
        assert settings["IRG_LOCAL_DEVICE_IDS"] == expected_ids
        assert words[4:] == TRAIN


def test_single_node_dry_run():
    out = subprocess.run(["bash", str(SINGLE_NODE), *TRAIN], env=_clean_env(IRG_DRY_RUN="1", IRG_NPROC="3"),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert len(out) == 3
    for rank, line in enumerate(out):
        words = shlex.split(line)
        assert words[:4] == ["IRG_COORDINATOR_ADDRESS=localhost:23456", "IRG_NUM_PROCESSES=3",
                             f"IRG_PROCESS_ID={rank}", f"IRG_LOCAL_DEVICE_IDS={rank}"]
        assert words[4:] == TRAIN
    out = subprocess.run(["bash", str(SINGLE_NODE), *TRAIN], env=_clean_env(IRG_DRY_RUN="1"),
                         capture_output=True, text=True, check=True).stdout.splitlines()
    assert [shlex.split(line) for line in out] == [TRAIN]


def test_single_node_two_cpu_processes_join_through_jax_distributed(tmp_path):
    """Real multi-controller start-up on CPU: 2 processes x 2 devices, one cross-process sum."""
    probe = tmp_path / "probe.py"
    probe.write_text(textwrap.dedent("""\
        import jax, jax.numpy as jnp, numpy as np
        from irg_jax import runtime
        assert runtime.maybe_initialize_distributed()
        from jax.sharding import NamedSharding, PartitionSpec as P
        mesh = jax.make_mesh((jax.device_count(),), ("data",),
                             axis_types=(jax.sharding.AxisType.Auto,))
        local = np.full((jax.local_device_count(),), jax.process_index() + 1.0, np.float32)
        x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("data")), local)
        total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
        print(f"RESULT {jax.process_index()} {jax.process_count()} {jax.device_count()} "
              f"{float(total)} {runtime.is_primary()}", flush=True)
    """))
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = _clean_env(IRG_NPROC="2", IRG_COORDINATOR_PORT=str(port), IRG_LOG_DIR=str(tmp_path / "logs"),
                     JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=2",
                     PYTHONPATH=str(REPO))
    proc = subprocess.run(["bash", str(SINGLE_NODE), sys.executable, str(probe)], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    other = (tmp_path / "logs" / "process_1.log").read_text()
    assert proc.returncode == 0, proc.stderr + other
    assert "RESULT 0 2 4 6.0 True" in proc.stdout  # 2 devices x 1.0 + 2 devices x 2.0
    assert "RESULT 1 2 4 6.0 False" in other


# ------------------------------------------------------------------------------ runtime ---

@pytest.mark.parametrize("environ,expected", [
    ({}, None),
    ({"IRG_DISTRIBUTED": "0", "IRG_COORDINATOR_ADDRESS": "h:1", "SLURM_STEP_NUM_TASKS": "4"}, None),
    ({"IRG_DISTRIBUTED": "1"}, {}),
    ({"IRG_COORDINATOR_ADDRESS": "node1:1234", "IRG_NUM_PROCESSES": "16", "IRG_PROCESS_ID": "3",
      "IRG_LOCAL_DEVICE_IDS": "3"},
     {"coordinator_address": "node1:1234", "num_processes": 16, "process_id": 3, "local_device_ids": [3]}),
    ({"IRG_COORDINATOR_ADDRESS": "node1:1234", "IRG_NUM_PROCESSES": "2", "IRG_PROCESS_ID": "1",
      "IRG_LOCAL_DEVICE_IDS": "0,1,2,3"},
     {"coordinator_address": "node1:1234", "num_processes": 2, "process_id": 1,
      "local_device_ids": [0, 1, 2, 3]}),
    # srun, one task per node: JAX detects SLURM, every GPU of the node stays visible
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "2", "SLURM_STEP_NUM_NODES": "2",
      "SLURM_PROCID": "1", "SLURM_GPUS_ON_NODE": "8"}, {"local_device_ids": list(range(8))}),
    # srun, one task per GPU: JAX's own choice (GPU = SLURM_LOCALID)
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "16", "SLURM_STEP_NUM_NODES": "2",
      "SLURM_PROCID": "9", "SLURM_GPUS_ON_NODE": "8"}, {}),
    # a batch script or a single-task step stays single-process
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16", "SLURM_PROCID": "0"}, None),
    ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "1", "SLURM_STEP_NUM_NODES": "1"}, None),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1,10.0.0.2"}, {}),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.1"}, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.1:8080"}, {}),
])
def test_distributed_init_kwargs(environ, expected):
    assert runtime.distributed_init_kwargs(environ) == expected


@pytest.mark.parametrize("environ,message", [
    ({"IRG_DISTRIBUTED": "maybe"}, "IRG_DISTRIBUTED"),
    ({"IRG_COORDINATOR_ADDRESS": "h:1", "IRG_NUM_PROCESSES": "two"}, "IRG_NUM_PROCESSES"),
    ({"IRG_COORDINATOR_ADDRESS": "h:1", "IRG_NUM_PROCESSES": "2", "IRG_PROCESS_ID": "2"}, "IRG_PROCESS_ID"),
    ({"IRG_DISTRIBUTED": "1", "IRG_LOCAL_DEVICE_IDS": "0;1"}, "IRG_LOCAL_DEVICE_IDS"),
])
def test_distributed_init_kwargs_errors_name_the_variable(environ, message):
    with pytest.raises(ValueError, match=message):
        runtime.distributed_init_kwargs(environ)


def test_maybe_initialize_distributed_calls_jax_only_when_asked(monkeypatch):
    calls = []
    monkeypatch.setattr(runtime.jax.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(runtime.jax.distributed, "initialize", lambda **kw: calls.append(kw))
    assert runtime.maybe_initialize_distributed({}) is False
    assert calls == []
    env = {"IRG_COORDINATOR_ADDRESS": "h:9", "IRG_NUM_PROCESSES": "1", "IRG_PROCESS_ID": "0"}
    assert runtime.maybe_initialize_distributed(env) is True
    assert calls == [{"coordinator_address": "h:9", "num_processes": 1, "process_id": 0}]
    assert runtime.is_primary()

#!/usr/bin/env python3
"""Cloud TPU launcher: one slice (or several, multislice) from a queued resource, driven by gcloud.

    python launch/tpu/tpu.py up                      # create, wait for ACTIVE, ship code, install env
    python launch/tpu/tpu.py run --run-name r1 -- python -m irg_jax.train \\
        --config configs/irgl_stage1.py:bagel_7b_mot,data_root=gs://my-bucket/irg_data,init_from=gs://my-bucket/bagel_orbax --workdir gs://bucket/runs/r1
    python launch/tpu/tpu.py logs --run-name r1      # follow worker 0; --all: tail every worker
    python launch/tpu/tpu.py stop                    # kill the run, free the TPU on every worker
    python launch/tpu/tpu.py delete                  # delete the queued resource and its slices

Subcommands: create, wait, status, ship, setup, up, run, logs, stop, delete. Every one takes
``--dry-run`` (or ``IRG_DRY_RUN=1``): print the exact commands, one per line, and run nothing.
Settings come from flags, defaulting to the environment variables PROJECT, ZONE, TPU_NAME,
ACCELERATOR, RUNTIME_VERSION and NUM_SLICES.

On the workers: code in ~/irg_jax (a ``git archive`` of HEAD), venv in ~/irg_venv (see
worker_setup.sh), logs in ~/irg_logs/<run>.log. With ``--num-slices N > 1`` the queued resource
holds N slices named <name>-0 .. <name>-<N-1>, and commands reach every worker of every slice
through ``gcloud compute tpus queued-resources ssh/scp --node=all --worker=all``; the TPU
runtime sets the MEGASCALE_* variables itself. Standard library only.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CODE_DIR = "$HOME/irg_jax"
VENV = "$HOME/irg_venv"
LOG_DIR = "$HOME/irg_logs"
_NAME_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
_RUN_RE = re.compile(r"^[A-Za-z0-9._-]+$")
_ACCELERATOR_RE = re.compile(r"^v[0-9][a-z0-9]*-[0-9]+$")

# Default TPU VM runtime (software) version per TPU generation.
_RUNTIME_BY_PREFIX = (("v5litepod", "v2-alpha-tpuv5-lite"), ("v5e", "v2-alpha-tpuv5-lite"),
                      ("v5p", "v2-alpha-tpuv5"), ("v6e", "v2-alpha-tpuv6e"))
_DEFAULT_RUNTIME = "tpu-ubuntu2204-base"

# Kills what a previous run left behind on a worker: the process groups recorded in
# ~/irg_logs/*.pid, any other `python ... -m irg_jax.*` (the ^ anchor keeps the remote shell
# running this very command, whose text contains the pattern, out of the match), then every
# process still holding a TPU device, and the libtpu lock file.
_STOP_SCRIPT = "; ".join([
    f'for f in {LOG_DIR}/*.pid; do [ -e "$f" ] && kill -- -"$(cat "$f")" 2>/dev/null; rm -f "$f"; done',
    "pkill -f '^[^ ]*python[^ ]* (.* )?-m irg_jax[.]'",
    "sleep 2",
    "sudo lsof -t /dev/accel* /dev/vfio/* 2>/dev/null | sort -u | xargs -r sudo kill -9",
    "sudo rm -f /tmp/libtpu_lockfile",
    'echo "$(hostname): stopped"',
])


def default_runtime_version(accelerator: str) -> str:
    for prefix, runtime in _RUNTIME_BY_PREFIX:
        if accelerator.startswith(prefix + "-"):
            return runtime
    return _DEFAULT_RUNTIME


def remote_value(value: str) -> str:
    """Quote for the worker's shell, keeping a leading ``~/`` or ``$HOME/`` as the worker's home."""
    for home in ("~/", "$HOME/"):
        if value.startswith(home):
            return '"$HOME"/' + shlex.quote(value[len(home):])
    return shlex.quote(value)


class Slice:
    """Names, location and the gcloud argv builders for one queued resource."""

    def __init__(self, args: argparse.Namespace):
        for flag, value in (("--name/TPU_NAME", args.name), ("--zone/ZONE", args.zone)):
            if not value:
                raise SystemExit(f"tpu.py: {flag} is required")
        if not _NAME_RE.match(args.name):
            raise SystemExit(f"tpu.py: TPU name {args.name!r} must be lowercase letters, digits and '-'")
        if args.num_slices < 1:
            raise SystemExit(f"tpu.py: --num-slices must be >= 1, got {args.num_slices}")
        self.name, self.zone, self.project = args.name, args.zone, args.project
        self.qr = args.qr_name or args.name
        self.num_slices = args.num_slices
        self.accelerator = args.accelerator
        self.runtime_version = args.runtime_version or (
            default_runtime_version(args.accelerator) if args.accelerator else None)

    @property
    def multislice(self) -> bool:
        return self.num_slices > 1

    def _where(self) -> list[str]:
        return [f"--zone={self.zone}"] + ([f"--project={self.project}"] if self.project else [])

    def queued_resource(self, verb: str, *extra: str) -> list[str]:
        return ["gcloud", "compute", "tpus", "queued-resources", verb, self.qr, *self._where(), *extra]

    def create(self, provisioning: str | None, extra_flags: list[str]) -> list[str]:
        if not self.accelerator or not _ACCELERATOR_RE.match(self.accelerator):
            raise SystemExit(f"tpu.py: --accelerator/ACCELERATOR must look like v5p-8 or v6e-16, "
                             f"got {self.accelerator!r}")
        nodes = ([f"--node-count={self.num_slices}", f"--node-prefix={self.name}"] if self.multislice
                 else [f"--node-id={self.name}"])
        flags = [f"--accelerator-type={self.accelerator}", f"--runtime-version={self.runtime_version}",
                 *nodes] + ([f"--{provisioning}"] if provisioning else [])
        return self.queued_resource("create", *flags, *extra_flags)

    def ssh(self, command: str, worker: str = "all", node: str = "all") -> list[str]:
        """Run ``command`` with the worker's shell on ``worker`` of every slice (of ``node``)."""
        if self.multislice:
            return self.queued_resource("ssh", f"--node={node}", f"--worker={worker}", f"--command={command}")
        return ["gcloud", "compute", "tpus", "tpu-vm", "ssh", self.name, *self._where(),
                f"--worker={worker}", f"--command={command}"]

    def scp_to_all(self, local: str, remote: str) -> list[str]:
        if self.multislice:
            return ["gcloud", "compute", "tpus", "queued-resources", "scp", local, f"{self.qr}:{remote}",
                    *self._where(), "--node=all", "--worker=all"]
        return ["gcloud", "compute", "tpus", "tpu-vm", "scp", local, f"{self.name}:{remote}",
                *self._where(), "--worker=all"]


# ----------------------------------------------------------------------------------------------
# Plans: each subcommand is a list of argv lists, run in order (or printed by --dry-run).

def git_revision() -> tuple[str, bool]:
    """(HEAD commit, whether the working tree has uncommitted changes)."""
    def git(*a):
        return subprocess.run(["git", "-C", str(REPO), *a], check=True, capture_output=True,
                              text=True).stdout.strip()
    try:
        return git("rev-parse", "--short=12", "HEAD"), bool(git("status", "--porcelain"))
    except (OSError, subprocess.CalledProcessError) as e:
        raise SystemExit(f"tpu.py ship: cannot read the git revision of {REPO}: {e}") from None


def plan_ship(tpu: Slice, revision: str) -> list[list[str]]:
    archive_name = f"irg_jax-{revision}.tar.gz"
    local = f"/tmp/{archive_name}"
    unpack = " && ".join([
        f"rm -rf {CODE_DIR}", f"mkdir -p {CODE_DIR}",
        f"tar -xzf $HOME/{archive_name} -C {CODE_DIR}", f"rm -f $HOME/{archive_name}",
        f"echo {revision} > {CODE_DIR}/REVISION", f'echo "$(hostname): code at {revision}"'])
    return [["git", "-C", str(REPO), "archive", "--format=tar.gz", f"--output={local}", revision],
            tpu.scp_to_all(local, archive_name),
            tpu.ssh(unpack)]


def plan_setup(tpu: Slice, python_version: str) -> list[list[str]]:
    return [tpu.ssh(f"IRG_VENV={VENV} IRG_CODE_DIR={CODE_DIR} IRG_PYTHON_VERSION={shlex.quote(python_version)} "
                    f"bash {CODE_DIR}/launch/tpu/worker_setup.sh")]


def run_env(args: argparse.Namespace) -> list[tuple[str, str]]:
    env = [("IRG_DISTRIBUTED", "1"), ("PYTHONUNBUFFERED", "1"),
           ("JAX_COMPILATION_CACHE_DIR", args.compile_cache)]
    for item in args.env:
        key, sep, value = item.partition("=")
        if not sep or not re.match(r"^[A-Za-z_][A-Za-z0-9_]*$", key):
            raise SystemExit(f"tpu.py run: --env expects KEY=VALUE, got {item!r}")
        env.append((key, value))
    return env


def run_script(run_name: str, command: list[str], env: list[tuple[str, str]]) -> str:
    """The worker-side shell command: stop stale processes, then start ``command`` detached."""
    exports = " ".join(f"{k}={remote_value(v)}" for k, v in env)
    log, pid = f"{LOG_DIR}/{run_name}.log", f"{LOG_DIR}/{run_name}.pid"
    return "; ".join([
        _STOP_SCRIPT,
        f"mkdir -p {LOG_DIR} && cd {CODE_DIR} && source {VENV}/bin/activate && export {exports} || exit 1",
        f"setsid nohup {shlex.join(command)} > {log} 2>&1 < /dev/null & echo $! > {pid}",
        f'echo "$(hostname): started {run_name}, log {log}"',
    ])


def plan_run(tpu: Slice, args: argparse.Namespace) -> list[list[str]]:
    if not args.command:
        raise SystemExit("tpu.py run: give the command after '--', e.g. "
                         "-- python -m irg_jax.train --config configs/x.py --workdir gs://...")
    return [tpu.ssh(run_script(args.run_name, args.command, run_env(args)))]


def plan_logs(tpu: Slice, args: argparse.Namespace) -> list[list[str]]:
    log = f"{LOG_DIR}/{args.run_name}.log" if args.run_name else f"$(ls -t {LOG_DIR}/*.log | head -n 1)"
    if args.all:
        return [tpu.ssh(f'tail -n {args.lines} {log} 2>&1 | sed "s/^/[$(hostname)] /"')]
    return [tpu.ssh(f"tail -n {args.lines} -F {log}", worker="0", node="0")]


def wait_active(tpu: Slice, timeout_s: float, poll_s: float) -> None:
    describe = tpu.queued_resource("describe", "--format=value(state.state)")
    deadline = time.monotonic() + timeout_s
    while True:
        state = subprocess.run(describe, check=True, capture_output=True, text=True).stdout.strip()
        print(f"tpu.py: queued resource {tpu.qr}: {state}", file=sys.stderr)
        if state == "ACTIVE":
            return
        if state in ("FAILED", "SUSPENDED", "SUSPENDING"):
            raise SystemExit(f"tpu.py: queued resource {tpu.qr} is {state}; see `tpu.py status`")
        if time.monotonic() > deadline:
            raise SystemExit(f"tpu.py: queued resource {tpu.qr} not ACTIVE after {timeout_s:.0f} s")
        time.sleep(poll_s)


# ----------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> argparse.Namespace:
    env = os.environ
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--project", default=env.get("PROJECT"), help="GCP project [PROJECT]")
    common.add_argument("--zone", default=env.get("ZONE"), help="zone, e.g. us-east5-a [ZONE]")
    common.add_argument("--name", default=env.get("TPU_NAME"),
                        help="TPU node name; multislice node prefix [TPU_NAME]")
    common.add_argument("--qr-name", default=None, help="queued resource id (default: --name)")
    common.add_argument("--accelerator", default=env.get("ACCELERATOR"),
                        help="accelerator type, e.g. v5p-64, v6e-16 [ACCELERATOR]")
    common.add_argument("--runtime-version", default=env.get("RUNTIME_VERSION"),
                        help="TPU software version (default: by generation) [RUNTIME_VERSION]")
    common.add_argument("--num-slices", type=int, default=int(env.get("NUM_SLICES", "1")),
                        help="slices in the queued resource; > 1 is multislice [NUM_SLICES]")
    common.add_argument("--dry-run", action="store_true", default=env.get("IRG_DRY_RUN") == "1",
                        help="print the commands, one per line, without running them [IRG_DRY_RUN=1]")

    parser = argparse.ArgumentParser(prog="tpu.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="subcommand", required=True)

    def add(name, help_, *flag_groups):
        p = sub.add_parser(name, parents=[common], help=help_)
        for add_flags in flag_groups:
            add_flags(p)
        return p

    def create_flags(p):
        group = p.add_mutually_exclusive_group()
        group.add_argument("--spot", dest="provisioning", action="store_const", const="spot")
        group.add_argument("--reserved", dest="provisioning", action="store_const", const="reserved")
        p.add_argument("--create-flag", action="append", default=[],
                       help="extra flag for `queued-resources create`, e.g. --create-flag=--network=n")

    def wait_flags(p):
        p.add_argument("--timeout", type=float, default=6 * 3600, help="seconds (default 6 h)")
        p.add_argument("--poll", type=float, default=30.0, help="seconds between polls")

    def setup_flags(p):
        p.add_argument("--python-version", default="3.11", help="Python of the workers' venv")

    add("create", "request the slice(s) as a queued resource", create_flags)
    add("wait", "poll until the queued resource is ACTIVE", wait_flags)
    add("status", "describe the queued resource")
    add("ship", "copy a git archive of HEAD to every worker")
    add("setup", "install the pinned venv on every worker", setup_flags)
    add("up", "create, wait, ship, setup", create_flags, wait_flags, setup_flags)
    p = add("run", "start a command on every worker (after stopping stale runs)")
    p.add_argument("--run-name", default=time.strftime("run-%Y%m%d-%H%M%S"), help="names the log file")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="extra environment for the command, e.g. LIBTPU_INIT_ARGS=...")
    p.add_argument("--compile-cache", default="~/jax_cache",
                   help="JAX_COMPILATION_CACHE_DIR on the workers (a gs:// path shares it)")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the command to run")
    p = add("logs", "follow worker 0's log, or --all: the tail of every worker's log")
    p.add_argument("--run-name", default=None, help="default: the newest log")
    p.add_argument("--all", action="store_true")
    p.add_argument("--lines", type=int, default=100)
    add("stop", "kill the run and free the TPU on every worker")
    add("delete", "delete the queued resource and its slices")

    args = parser.parse_args(argv)
    if getattr(args, "command", None) and args.command[0] == "--":
        args.command = args.command[1:]
    run_name = getattr(args, "run_name", None)
    if run_name is not None and not _RUN_RE.match(run_name):
        raise SystemExit(f"tpu.py: --run-name {run_name!r} may hold only letters, digits, '.', '_', '-'")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    tpu = Slice(args)
    cmd = args.subcommand
    steps: list = []  # argv lists, or callables for steps that need output (polling)
    if cmd in ("create", "up"):
        steps.append(tpu.create(args.provisioning, args.create_flag))
    if cmd in ("wait", "up"):
        steps.append(tpu.queued_resource("describe", "--format=value(state.state)") if args.dry_run
                     else (lambda: wait_active(tpu, args.timeout, args.poll)))
    if cmd in ("ship", "up"):
        revision, dirty = git_revision()
        if dirty:
            print("tpu.py: warning: uncommitted changes are NOT shipped, only HEAD", file=sys.stderr)
        steps += plan_ship(tpu, revision)
    if cmd in ("setup", "up"):
        steps += plan_setup(tpu, args.python_version)
    if cmd == "status":
        steps.append(tpu.queued_resource("describe"))
    if cmd == "run":
        steps += plan_run(tpu, args)
    if cmd == "logs":
        steps += plan_logs(tpu, args)
    if cmd == "stop":
        steps.append(tpu.ssh(_STOP_SCRIPT))
    if cmd == "delete":
        steps.append(tpu.queued_resource("delete", "--force", "--quiet"))

    for step in steps:
        if args.dry_run:
            print(shlex.join(step))
        elif callable(step):
            step()
        else:
            print("+ " + shlex.join(step), file=sys.stderr)
            result = subprocess.run(step)
            if result.returncode:
                raise SystemExit(f"tpu.py: command failed with exit code {result.returncode}: "
                                 f"{shlex.join(step)}")


if __name__ == "__main__":
    main()

"""Starting the processes of one multi-process run on this machine, as the hosts of a
real job would run them, and stopping, killing and waiting for them.

- JAX: `tests/helpers/multihost_worker.py` (`jax.distributed` on a localhost port, one
  CPU device a process), then `bin/run.py ARGS` in each.
- TensorFlow: `bin/run.py ARGS --strategy=multi_worker` with a `TF_CONFIG` naming
  two localhost workers (worker 0 is the chief).

Each process writes its output to a file (no pipe can fill up and block it). Every
wait has a hard timeout, after which the processes still running are killed and the
test fails with their outputs.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WORKER = os.path.join(ROOT, "tests", "helpers", "multihost_worker.py")
RUN = os.path.join(ROOT, "bin", "run.py")


def free_ports(count: int) -> list:
    """`count` distinct free localhost ports (held open together while chosen)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


class Cluster:
    """`n` processes of one run, started now.

    Args:
        backend: "jax" or "tensorflow".
        args: `bin/run.py` arguments, the same for every process (the strategy flag is
            added here).
        logdir: where `process<i>.log` go.
        n: number of processes.
        extra: per-process extra arguments, `{index: [args]}`.
        prefix: per-process arguments between the interpreter and the script,
            `{index: [script, args]}` (e.g. `audit_writes.py DIR`, which runs the rest).
    """

    def __init__(self, backend: str, args: list, logdir: str, n: int = 2,
                 extra: dict | None = None, prefix: dict | None = None):
        os.makedirs(logdir, exist_ok=True)
        self.backend = backend
        self.logs = [os.path.join(logdir, f"process{i}.log") for i in range(n)]
        env = {**os.environ, "KERAS_BACKEND": backend, "TF_CPP_MIN_LOG_LEVEL": "3",
               "PYTHONUNBUFFERED": "1"}
        extra, prefix = extra or {}, prefix or {}
        self.processes = []
        if backend == "jax":
            port = str(free_ports(1)[0])
            commands = [[sys.executable, *prefix.get(i, []), WORKER, str(i), str(n), port,
                         *args,
                         "--strategy=data_parallel", *extra.get(i, [])] for i in range(n)]
            envs = [env] * n
        else:
            workers = [f"localhost:{p}" for p in free_ports(n)]
            commands = [[sys.executable, *prefix.get(i, []), RUN, *args,
                         "--strategy=multi_worker",
                         *extra.get(i, [])] for i in range(n)]
            envs = [{**env, "TF_CONFIG": json.dumps({
                "cluster": {"worker": workers}, "task": {"type": "worker", "index": i}})}
                for i in range(n)]
        for command, process_env, log in zip(commands, envs, self.logs):
            with open(log, "w") as out:
                self.processes.append(subprocess.Popen(
                    command, stdout=out, stderr=subprocess.STDOUT, text=True,
                    env=process_env, cwd=ROOT))
        self.started = time.time()

    def output(self, i: int) -> str:
        with open(self.logs[i]) as f:
            return f.read()

    def outputs(self) -> str:
        return "\n".join(f"--- process {i} ---\n{self.output(i)[-6000:]}"
                         for i in range(len(self.processes)))

    def wait_for_line(self, i: int, start: str, timeout: float) -> None:
        """Waits until a line of process `i`'s output starts with `start`."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if any(line.startswith(start) for line in self.output(i).splitlines()):
                return
            if all(p.poll() is not None for p in self.processes):
                break
            time.sleep(0.2)
        self.kill()
        raise AssertionError(f"no line starting {start!r} from process {i} in "
                             f"{timeout:.0f} s\n{self.outputs()}")

    def signal(self, i: int, signum=signal.SIGTERM) -> float:
        """Sends `signum` to process `i`; returns when (`time.time()`)."""
        self.processes[i].send_signal(signum)
        return time.time()

    def wait(self, timeout: float) -> list:
        """Every process's exit code; kills them all and fails after `timeout` s."""
        deadline = time.time() + timeout
        for process in self.processes:
            try:
                process.wait(timeout=max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                self.kill()
                raise AssertionError(f"processes still running after {timeout:.0f} s "
                                     f"(a hang): {self.outputs()}") from None
        return [p.returncode for p in self.processes]

    def kill(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait()


def run(backend: str, args: list, logdir: str, timeout: float, n: int = 2,
        extra: dict | None = None, expect: int = 0, prefix: dict | None = None) -> Cluster:
    """Runs a multi-process job to its end; asserts every process exits `expect`."""
    os.makedirs(logdir, exist_ok=True)
    cluster = Cluster(backend, args, logdir, n, extra, prefix)
    codes = cluster.wait(timeout)
    assert codes == [expect] * n, f"exit codes {codes}, expected {expect}\n" \
        f"{cluster.outputs()}"
    return cluster


def run_one(command: list, logdir: str, timeout: float) -> str:
    """Runs `python COMMAND` (one process, TensorFlow) to its end; asserts exit 0 and
    returns its output."""
    os.makedirs(logdir, exist_ok=True)
    env = {**os.environ, "KERAS_BACKEND": "tensorflow", "TF_CPP_MIN_LOG_LEVEL": "3"}
    env.pop("TF_CONFIG", None)
    try:
        result = subprocess.run([sys.executable, *command], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"{command} still running after {timeout:.0f} s") from e
    assert result.returncode == 0, f"{command}: exit {result.returncode}\n" \
        f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result.stdout

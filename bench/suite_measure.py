"""Run one command in its own process and measure it: wall time, and its own peak RSS."""
from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

@dataclasses.dataclass
class Proc:
    status: str  # ok, failed, timeout, killed
    seconds: float
    peak_rss: int
    stdout: str
    stderr: str

    def json(self) -> dict:
        lines = self.stdout.strip().splitlines()
        try:
            return json.loads(lines[-1]) if lines else {}
        except json.JSONDecodeError:
            return {}

    def why(self) -> str:
        lines = [ln for ln in self.stderr.strip().splitlines() if ln.strip()]
        return lines[-1][:200] if lines else f"exit status {self.status}"


def _rss(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


# Forks the measured command and reports its exit code and ru_maxrss. Linux carries the RSS high-water
# mark of the forking process into the child's ru_maxrss, so the child is forked from this small
# process (python -S), never from the benchmark's own, larger one.
LAUNCHER = """
import os, sys
pid = os.fork()
if pid == 0:
    try:
        os.execvp(sys.argv[2], sys.argv[2:])
    finally:
        os._exit(127)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(f"{os.waitstatus_to_exitcode(status)} {usage.ru_maxrss}")
"""


def _child(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            kids = f.read().split()
        return int(kids[0]) if kids else None
    except OSError:
        return None


def measure(cmd: list[str], timeout: float, mem_limit: int) -> Proc:
    """Run ``cmd``; wall time from start to its end, peak RSS from that process's own rusage. A watchdog
    kills it past ``timeout`` seconds or ``mem_limit`` bytes of RSS (the machine is shared)."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r", suffix=".rusage") as usage:
        start = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, usage.name, *cmd], stdout=out, stderr=err,
                                env={**os.environ, "PYTHONWARNINGS": "ignore"}, start_new_session=True)
        verdict, done = [], threading.Event()

        def watchdog():
            while not done.wait(0.1):
                if time.perf_counter() - start > timeout:
                    verdict.append("timeout")
                elif _rss(_child(proc.pid) or proc.pid) > mem_limit:
                    verdict.append("killed")
                else:
                    continue
                os.killpg(proc.pid, 9)
                return

        thread = threading.Thread(target=watchdog, daemon=True)
        thread.start()
        try:
            proc.wait()
        except BaseException:  # Ctrl-C: the child is in its own session and would not see it
            os.killpg(proc.pid, 9)
            raise
        seconds = time.perf_counter() - start
        done.set()
        thread.join()
        fields = usage.read().split()
        code, peak = (int(fields[0]), int(fields[1]) * 1024) if len(fields) == 2 else (proc.returncode, 0)
        out.seek(0)
        err.seek(0)
        state = verdict[0] if verdict else ("ok" if code == 0 else "failed")
        return Proc(state, seconds, peak, out.read(), err.read())

"""Drive load-generator processes (bench.loadgen) through their line-of-JSON pipes."""
import queue
import subprocess
import sys
import threading

import orjson

from . import servers


class GeneratorError(RuntimeError):
    pass


class Gen:
    """One `python -m bench.loadgen` process, recorded for stopping like the servers."""

    def __init__(self, index, log_path):
        self.index = index
        log = open(log_path, "ab")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "bench.loadgen"], cwd=servers.ROOT,
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                start_new_session=True)
        finally:
            log.close()
        servers._started[self.proc.pid] = self.proc
        self.lines = queue.Queue()
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    @property
    def pid(self):
        return self.proc.pid

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def send(self, cmd):
        try:
            self.proc.stdin.write(orjson.dumps(cmd) + b"\n")
            self.proc.stdin.flush()
        except (BrokenPipeError, ValueError) as exc:
            raise GeneratorError(f"generator {self.index} is gone: {exc}") from None

    def recv(self, timeout):
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            raise GeneratorError(f"generator {self.index} did not answer in {timeout:.0f}s") from None
        if line is None:
            raise GeneratorError(f"generator {self.index} exited ({self.proc.poll()})")
        answer = orjson.loads(line)
        if not answer.get("ok"):
            raise GeneratorError(f"generator {self.index}: {answer.get('error')}")
        return answer

    def kill(self):
        """Stop the process now, without asking it to close its clients."""
        servers.stop(self.proc, timeout=3)

    def close(self):
        if self.proc.poll() is None:
            try:
                self.send({"op": "close"})
                self.recv(15)
            except GeneratorError:
                pass
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        servers.stop(self.proc, timeout=5)


def ask_all(gens, cmds, timeout):
    """Send each generator its command (a dict, or None to skip it), then collect the answers."""
    for gen, cmd in zip(gens, cmds):
        if cmd is not None:
            gen.send(cmd)
    return [gen.recv(timeout) if cmd is not None else None for gen, cmd in zip(gens, cmds)]

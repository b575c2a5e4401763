"""A real `memslot serve` subprocess on a free loopback port, for end-to-end tests."""

from __future__ import annotations

import queue
import subprocess
import threading
import time
from pathlib import Path


class ServerProcess:
    """`memslot serve` in a subprocess; start() waits for its "serving" line.

    ``command`` is how to invoke memslot (the console script, or the interpreter with the CLI).
    """

    def __init__(
        self,
        command: list[str],
        model_dir: Path,
        store_dir: Path,
        log_path: Path,
        *extra: str,
        startup_seconds: float = 90,
    ) -> None:
        self.args = [*command, "serve", "--model", str(model_dir), "--store", str(store_dir)]
        self.args += ["--port", "0", "--device", "cpu", *extra]
        self.log_path = log_path
        self.startup_seconds = startup_seconds
        self.process: subprocess.Popen | None = None
        self.address = ""
        self.ready_line = ""

    def start(self) -> ServerProcess:
        self._log = open(self.log_path, "a")  # noqa: SIM115 - closed in stop()
        self.process = subprocess.Popen(
            self.args, stdout=subprocess.PIPE, stderr=self._log, text=True
        )
        lines: queue.Queue = queue.Queue()
        threading.Thread(
            target=lambda: [lines.put(line) for line in self.process.stdout], daemon=True
        ).start()
        deadline = time.monotonic() + self.startup_seconds
        while time.monotonic() < deadline:
            try:
                line = lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if "memslot serving" in line:
                self.ready_line = line.strip()
                self.address = "127.0.0.1:" + line.split(" on 127.0.0.1:")[1].split()[0]
                return self
        self.stop()
        raise AssertionError(f"server did not start; its log:\n{self.log_path.read_text()}")

    def signal_and_wait(self, kill: bool, timeout: float = 60) -> int:
        if kill:
            self.process.kill()
        else:
            self.process.terminate()
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(30)
        self._log.close()

"""A GCS emulator for the tests: `gcp-storage-emulator` (PyPI) on 127.0.0.1, in memory, one bucket.
pyarrow's GcsFileSystem reaches it through STORAGE_EMULATOR_HOST (medi_dist/storage.py), the
variable Google's client libraries read. The emulator checks no credentials."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from objstore import free_port

BUCKET = "medi-gcs"


@dataclass
class GcsEmulator:
    endpoint: str
    bucket: str
    proc: subprocess.Popen

    def uri(self, *parts: str) -> str:
        return "/".join([f"gs://{self.bucket}", *parts])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def start(log_dir: Path, bucket: str = BUCKET) -> GcsEmulator:
    exe = shutil.which("gcp-storage-emulator", path=str(Path(sys.executable).parent)) or "gcp-storage-emulator"
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log = open(log_dir / "gcs_emulator.log", "wb")
    proc = subprocess.Popen(
        [exe, "start", "--host", "127.0.0.1", "--port", str(port), "--in-memory", "--default-bucket", bucket],
        stdout=log,
        stderr=subprocess.STDOUT,
        cwd=log_dir,  # where it would keep files if it were not in memory
    )
    deadline = time.time() + 300  # a busy shared machine can take minutes to start Python
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/storage/v1/b/{bucket}", timeout=10)
            return GcsEmulator(endpoint, bucket, proc)
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"gcp-storage-emulator did not start; see {log_dir / 'gcs_emulator.log'}") from None
            time.sleep(0.2)

"""Object-storage servers for the tests, started by the test session on 127.0.0.1 and reached
through the environment variables a user sets:

- S3: moto's `moto_server`, with IAM authentication switched on once a user, its access key and
  the test bucket exist, so wrong credentials are refused like on AWS (AWS_ACCESS_KEY_ID,
  AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION).
- GCS: `gcp-storage-emulator` (PyPI), in memory, one bucket, reached through STORAGE_EMULATOR_HOST
  (medi_dist/storage.py), the variable Google's client libraries read. It checks no credentials:
  bad gs:// credentials are tested against the real-GCS code path (tests/test_objstore.py)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

REGION = "us-east-1"


@dataclass
class Server:
    endpoint: str
    bucket: str
    proc: subprocess.Popen
    scheme: ClassVar[str]
    endpoint_var: ClassVar[str]  # the variable that points medi-dist at this server

    def env(self) -> dict[str, str]:
        return {self.endpoint_var: self.endpoint}

    def uri(self, *parts: str) -> str:
        return "/".join([f"{self.scheme}://{self.bucket}", *parts])

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


@dataclass
class ObjectStore(Server):
    access_key: str = ""
    secret_key: str = ""
    scheme: ClassVar[str] = "s3"
    endpoint_var: ClassVar[str] = "AWS_ENDPOINT_URL"

    def env(self) -> dict[str, str]:
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_REGION": REGION,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_EC2_METADATA_DISABLED": "true",
        }


@dataclass
class GcsEmulator(Server):
    scheme: ClassVar[str] = "gs"
    endpoint_var: ClassVar[str] = "STORAGE_EMULATOR_HOST"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(exe: str, args: list[str], log_dir: Path, ready_path: str) -> tuple[str, subprocess.Popen]:
    """Start the venv's `exe` on a free loopback port (`args` formatted with it), wait until
    `ready_path` answers; (endpoint, process)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    path = shutil.which(exe, path=str(Path(sys.executable).parent)) or exe
    log_file = log_dir / f"{exe}.log"
    proc = subprocess.Popen(
        [path, *(a.format(port=port) for a in args)],
        stdout=open(log_file, "wb"),
        stderr=subprocess.STDOUT,
        cwd=log_dir,  # where a server keeps files, if any
    )
    deadline = time.time() + 300  # a busy shared machine can take minutes to start Python
    while True:
        try:
            urllib.request.urlopen(endpoint + ready_path, timeout=10)
            return endpoint, proc
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                raise RuntimeError(f"{exe} did not start; see {log_file}") from None
            time.sleep(0.2)


def start(log_dir: Path, bucket: str = "medi-test") -> ObjectStore:
    endpoint, proc = _launch("moto_server", ["-H", "127.0.0.1", "-p", "{port}"], log_dir, "/moto-api/")
    import boto3

    anon = dict(endpoint_url=endpoint, region_name=REGION, aws_access_key_id="setup", aws_secret_access_key="setup")
    iam = boto3.client("iam", **anon)
    iam.create_user(UserName="medi")
    iam.put_user_policy(
        UserName="medi",
        PolicyName="all",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        ),
    )
    key = iam.create_access_key(UserName="medi")["AccessKey"]
    boto3.client("s3", **anon).create_bucket(Bucket=bucket)
    # From here on every request must be signed by a known key.
    req = urllib.request.Request(
        f"{endpoint}/moto-api/reset-auth", data=b"0", method="POST", headers={"Content-Type": "text/plain"}
    )
    urllib.request.urlopen(req, timeout=10)
    return ObjectStore(endpoint, bucket, proc, access_key=key["AccessKeyId"], secret_key=key["SecretAccessKey"])


def start_gcs(log_dir: Path, bucket: str = "medi-gcs") -> GcsEmulator:
    args = ["start", "--host", "127.0.0.1", "--port", "{port}", "--in-memory", "--default-bucket", bucket]
    endpoint, proc = _launch("gcp-storage-emulator", args, log_dir, f"/storage/v1/b/{bucket}")
    return GcsEmulator(endpoint, bucket, proc)


@contextmanager
def environment(env: dict[str, str]):
    """`env` set in os.environ (for this process and the Ray nodes it starts), restored afterwards."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def one_line_error(capsys, *argv: str) -> str:
    """`medi-dist argv` fails with exit status 2 and exactly one line on stderr; that line."""
    from medi_dist import cli

    rc = cli.main(list(argv))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    return err

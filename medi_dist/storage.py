"""Folders on a local disk or on object storage (s3://, gs://, file://), through pyarrow filesystems
as Ray Data and Ray Train use them. Credentials and endpoints come from the usual environment
(AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL, AWS_REGION; GOOGLE_APPLICATION_CREDENTIALS),
or the node's role. STORAGE_EMULATOR_HOST (as Google's client libraries read it) points gs:// at a
GCS emulator, without credentials.

Commands that read whole folders (evaluation, generation's model and dataset) read a local copy:
`local_copy` downloads a remote folder once into the cache (MEDI_DIST_CACHE, default
~/.cache/medi-dist), checking every shard against the sha256 its dataset.json records. Outputs are
built in a local folder and uploaded with `upload_folder`: every other file first, the file that
marks the folder complete (dataset.json) last, so nothing partial looks complete. Training streams
remote shards directly (data/stream.py), so every node reads them itself.

Object-store failures become one StorageError line naming the URI and what to do.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import uuid
from pathlib import Path

COMPLETE_MARKER = "dataset.json"


class StorageError(OSError):
    pass


def is_remote(location: str | Path) -> bool:
    s = str(location)
    return "://" in s and not s.startswith("file://")


def local_path(location: str | Path) -> Path:
    s = str(location)
    return Path(s[len("file://") :]) if s.startswith("file://") else Path(s)


def _endpoint(default: str | None = "the default endpoint", uri: str = "") -> str | None:
    if str(uri).startswith("gs://"):
        return os.environ.get("STORAGE_EMULATOR_HOST") or default
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or default


def _gcs(pafs):
    """gs:// as `FileSystem.from_uri` opens it, with a bounded retry time (its default is 15
    minutes); STORAGE_EMULATOR_HOST=http://host:port: that emulator, anonymously."""
    from datetime import timedelta

    emulator = os.environ.get("STORAGE_EMULATOR_HOST")
    if not emulator:
        return pafs.GcsFileSystem(retry_time_limit=timedelta(seconds=60))
    scheme, _, host = emulator.rpartition("://")
    return pafs.GcsFileSystem(
        anonymous=True,
        scheme=scheme or "http",
        endpoint_override=host.rstrip("/"),
        retry_time_limit=timedelta(seconds=20),
    )


def explain(e: Exception, uri: str) -> StorageError:
    """A pyarrow/cloud error as one line that says what to do."""
    msg = str(e)
    if "OAuth2 access token" in msg or "UNAUTHENTICATED" in msg:  # gs://: google-cloud-cpp's credential errors
        reason = msg.split("The underlying error message was: ", 1)[-1].split(" error_info=")[0]
        reason = reason.split(". ")[0].split("\n")[0][:300]
        where = os.environ.get("GOOGLE_APPLICATION_CREDENTIALS")
        fix = (
            f"point GOOGLE_APPLICATION_CREDENTIALS (now {where}) at a valid service-account key file, "
            "or unset it to use the node's workload identity"
            if where
            else "set GOOGLE_APPLICATION_CREDENTIALS to a service-account key file, or give the node workload identity"
        )
        what = f"cannot authenticate ({reason}); {fix}, then re-run"
    elif "NETWORK_CONNECTION" in msg or "Could not connect" in msg or "Couldn't resolve host" in msg:
        var = "STORAGE_EMULATOR_HOST" if uri.startswith("gs://") else "AWS_ENDPOINT_URL"
        what = (
            f"cannot reach the object store at {_endpoint(uri=uri)}; check {var} (or the network, "
            "or that the storage server runs), then re-run"
        )
    elif any(
        k in msg
        for k in (
            "ACCESS_DENIED",
            "SIGNATURE_DOES_NOT_MATCH",
            "INVALID_ACCESS_KEY",
            "AccessDenied",
            "InvalidAccessKeyId",
            "Forbidden",
            "403",
        )
    ):
        creds = (
            "GOOGLE_APPLICATION_CREDENTIALS (or the node's workload identity)"
            if uri.startswith("gs://")
            else "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the node's role)"
        )
        what = f"access denied; check {creds} and that they may read and write this bucket"
    elif "NO_SUCH_BUCKET" in msg or "NoSuchBucket" in msg:
        what = "the bucket does not exist; create it or fix the URI"
    else:
        what = f"object storage error ({msg.splitlines()[0][:300]})"
    return StorageError(f"{uri}: {what}")


def filesystem(uri: str | Path):
    """(pyarrow filesystem, path in it) of a local path or an object-storage URI, as every reader and
    writer here opens it (Ray Train's checkpoints too: trainer.py passes it as storage_filesystem, since
    pyarrow's own `from_uri` ignores STORAGE_EMULATOR_HOST); StorageError for a bad URI or credentials."""
    import pyarrow.fs as pafs

    if not is_remote(uri):
        return pafs.LocalFileSystem(), str(local_path(uri).resolve())
    uri = str(uri).rstrip("/")
    try:
        if uri.startswith("gs://") and "?" not in uri:
            return _gcs(pafs), uri[len("gs://") :]
        fs, root = pafs.FileSystem.from_uri(uri)
        if isinstance(fs, pafs.S3FileSystem) and "?" not in uri:
            # the same bucket region and endpoint, with more patience for busy servers
            fs = pafs.S3FileSystem(
                region=fs.region,
                endpoint_override=_endpoint(None),
                connect_timeout=10,
                request_timeout=60,
                retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=4),
            )
        return fs, root
    except Exception as e:  # unknown scheme, bad URI, unreadable credentials
        raise explain(e, uri) from None


class Folder:
    """A folder `uri` on some filesystem; names below it are '/'-separated relative paths."""

    def __init__(self, uri: str | Path):
        import pyarrow.fs as pafs

        self._pafs = pafs
        self.uri = str(uri).rstrip("/") or "/"
        self.fs, self.root = filesystem(uri)
        self.remote = is_remote(uri)

    def path(self, rel: str = "") -> str:
        return f"{self.root.rstrip('/')}/{rel}" if rel else self.root

    def uri_of(self, rel: str) -> str:
        return f"{self.uri}/{rel}"

    def _call(self, rel: str, fn, *args):
        if not self.remote:  # local errors keep their type and errno (disk full, permissions)
            return fn(*args)
        from pyarrow import ArrowException

        try:
            return fn(*args)
        except FileNotFoundError:
            raise
        except (OSError, ArrowException) as e:  # GCS credential errors are ArrowInvalid
            raise explain(e, self.uri_of(rel) if rel else self.uri) from None

    def check_bucket(self) -> None:
        """For object storage: the bucket exists and the credentials work (raises StorageError)."""
        if not self.remote:
            return
        bucket = self.root.split("/", 1)[0]
        info = self._call("", self.fs.get_file_info, bucket)
        if info.type == self._pafs.FileType.NotFound:
            raise StorageError(
                f"{self.uri}: bucket {bucket!r} does not exist at {_endpoint(uri=self.uri)}; create it or fix the URI"
            )

    def size(self, rel: str) -> int | None:
        """Bytes of a file, None when missing."""
        info = self._call(rel, self.fs.get_file_info, self.path(rel))
        return None if info.type == self._pafs.FileType.NotFound else info.size

    def exists(self, rel: str) -> bool:
        return self.size(rel) is not None

    def is_empty(self) -> bool:
        sel = self._pafs.FileSelector(self.root, allow_not_found=True)
        return not self._call("", self.fs.get_file_info, sel)

    def read_bytes(self, rel: str) -> bytes:
        def read():
            with self.fs.open_input_stream(self.path(rel)) as f:
                return f.read()

        return self._call(rel, read)

    def open_input(self, rel: str):
        return self._call(rel, self.fs.open_input_file, self.path(rel))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Whole or not at all: an object appears complete; a local file is renamed into place."""
        if not self.remote:
            path = Path(self.path(rel))
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
            try:
                tmp.write_bytes(data)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
            return

        def write():
            with self.fs.open_output_stream(self.path(rel)) as f:
                f.write(data)

        self._call(rel, write)

    def delete(self, rel: str) -> None:
        self._call(rel, self.fs.delete_file, self.path(rel))

    def delete_all(self) -> None:
        self._call("", lambda: self.fs.delete_dir_contents(self.root, missing_dir_ok=True))

    def files(self) -> dict[str, tuple[int, float | None]]:
        """Relative name -> (bytes, modification time) of every file below the folder."""
        sel = self._pafs.FileSelector(self.root, recursive=True, allow_not_found=True)
        infos = self._call("", self.fs.get_file_info, sel)
        n = len(self.root.rstrip("/")) + 1
        return {
            i.path[n:]: (i.size, i.mtime_ns)
            for i in sorted(infos, key=lambda i: i.path)
            if i.type == self._pafs.FileType.File
        }


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("MEDI_DIST_CACHE") or Path.home() / ".cache" / "medi-dist")


def upload_names(local: Path, leave_out: tuple[str, ...] = ()) -> list[str]:
    """The files `upload_folder` copies: all but dot-names (temp files) and the top-level
    entries in `leave_out`."""
    return sorted(
        rel
        for p in local.rglob("*")
        if p.is_file()
        and not p.name.startswith(".")
        and (rel := str(p.relative_to(local))).split("/", 1)[0] not in leave_out
    )


def upload_folder(
    local: Path,
    uri: str,
    last: tuple[str, ...] = (COMPLETE_MARKER,),
    skip_present: bool = False,
    leave_out: tuple[str, ...] = (),
) -> None:
    """Copy a local folder to `uri`, the names in `last` after everything else (in that order), so a
    reader never sees a marker whose files are not all there. Files are uploaded whole (object
    stores have no partial objects); temp files (`.name.tmp-*`) and the top-level entries in
    `leave_out` are not copied. `skip_present`: files other than `last` already there with the
    same size were uploaded by workers (shards)."""
    dest = Folder(uri)
    dest.check_bucket()
    names = upload_names(local, leave_out)
    there = dest.files() if skip_present else {}
    for rel in [n for n in names if n not in last] + [n for n in last if n in names]:
        if rel not in last and rel in there and there[rel][0] == (local / rel).stat().st_size:
            continue
        dest.write_bytes(rel, (local / rel).read_bytes())


def local_copy(uri: str | Path, shards: list[dict] | None = None) -> Path:
    """A local folder with the contents of `uri` (itself when local). A remote folder is downloaded
    once per content into the cache; `shards` (dataset.json's list: path, bytes, sha256) are checked
    as they arrive, and a missing or altered one stops the copy, naming it."""
    if not is_remote(uri):
        return local_path(uri)
    src = Folder(uri)
    src.check_bucket()
    names = src.files()
    if not names:
        raise StorageError(
            f"{src.uri} is empty or does not exist; check the URI (or create it with `medi-dist "
            "ingest` / `generate` / `train`)"
        )
    # A dataset is named by its manifest (written last); any other folder by its listing.
    marker = src.read_bytes(COMPLETE_MARKER) if COMPLETE_MARKER in names else repr(sorted(names.items())).encode()
    key = hashlib.sha256(src.uri.encode() + b"\0" + marker).hexdigest()[:20]
    dest = cache_dir() / "remote" / key
    if (dest / ".complete").exists():
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{key}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        expected = {s["path"]: s for s in shards or []}
        for rel in expected:
            if rel not in names:
                raise StorageError(
                    f"shard {src.uri_of(rel)} is missing from the bucket; copy it again or re-run "
                    f"the command that wrote {src.uri}"
                )
        for rel in names:
            if rel.rsplit("/", 1)[-1].startswith("."):
                continue
            p = tmp / rel
            p.parent.mkdir(parents=True, exist_ok=True)
            with src.open_input(rel) as f, open(p, "wb") as g:
                shutil.copyfileobj(f, g, 1 << 20)
            s = expected.get(rel)
            if s and (p.stat().st_size != s["bytes"] or file_sha256(p) != s["sha256"]):
                raise StorageError(
                    f"shard {src.uri_of(rel)} fails its size/sha256 check (truncated or altered "
                    f"copy); copy it again or re-run the command that wrote {src.uri}"
                )
        (tmp / ".complete").write_text(src.uri)
        try:
            os.replace(tmp, dest)
        except OSError:  # another process finished the same copy first
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dest


def temp_dir(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))

"""Where a study keeps its files: a local folder (NFS on a cluster) or a URI that
pyarrow understands (s3://bucket/results?endpoint_override=..., gs://...).

Ray Tune writes the trials there from every node; the study's own files
(spec.yaml, trials.*, history.csv, best.yaml, best/, report/) go to the same place.
"""
from __future__ import annotations

import io
import os
import re
from dataclasses import dataclass
from pathlib import Path

import pyarrow
import pyarrow.fs as pafs


class StorageError(ValueError):
    pass


def disk_full(e: BaseException) -> bool:
    """Whether `e` says the disk (or the user's quota) is full: Python's OSError, or pyarrow's, which
    carries the system's message but not always its errno."""
    import errno

    return isinstance(e, OSError) and (e.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left on device" in str(e)
                                       or "Disk quota exceeded" in str(e))


def bounded(fn, what: str):
    """fn() in a thread of its own, waited for at most $CSNN_STORAGE_ANSWER_S (30 s): an object store
    that cannot be reached (no network, no credentials) makes pyarrow retry for minutes, deaf to
    Ctrl-C; from here a Ctrl-C meanwhile reaches this process."""
    import threading

    limit = float(os.environ.get("CSNN_STORAGE_ANSWER_S", 30))
    out = {}

    def call():
        try:
            out["value"] = fn()
        except BaseException as e:  # re-raised here, in the caller's thread
            out["error"] = e

    t = threading.Thread(target=call, daemon=True)
    t.start()
    t.join(limit)
    if t.is_alive():
        raise StorageError(f"{what}: no answer in {limit:g} s; is it reachable from this machine, with "
                           "credentials (CSNN_STORAGE_ANSWER_S sets the wait)?")
    if "error" in out:
        raise out["error"]
    return out["value"]


@dataclass(frozen=True)
class Location:
    """A folder in a pyarrow filesystem. `shown` is how a person would write it."""

    fs: pafs.FileSystem
    path: str
    shown: str

    @classmethod
    def parse(cls, where: str | os.PathLike) -> "Location":
        where = str(where)
        if not where.strip():
            raise StorageError("--storage '': empty; name a folder (default: results) or a URI")
        if where != where.strip():  # ' results' is a folder named with a space, never what was meant
            raise StorageError(f"--storage {where!r}: starts or ends with white space; write it without")
        if re.match(r"[A-Za-z][A-Za-z0-9+.-]+:/(?!/)", where):  # file:/x, s3:/bucket: a URI missing a slash
            scheme, rest = where.split(":/", 1)
            raise StorageError(f"--storage {where}: a URI with one slash, which would be a local folder named "
                               f"'{scheme}:'; write {scheme}://{'/' if scheme == 'file' else ''}{rest}")
        if "://" not in where:
            if "?" in where or "#" in where:  # the Optuna database's SQLite URL would end there
                raise StorageError(f"--storage {where}: a local folder with '?' or '#' in its name is read otherwise "
                                   "in the Optuna database's URL; rename it")
            p = Path(where).expanduser().resolve()
            return cls(pafs.LocalFileSystem(), p.as_posix(), str(p))
        if where.split("://")[0].lower() == "mock":  # pyarrow's in-memory test filesystem: Ray cannot pickle it
            raise StorageError(f"--storage {where}: mock:// is pyarrow's in-memory test filesystem, gone with the "
                               "process; name a folder or a URI (s3://, gs://, hdfs://, abfs://, file://)")
        if where.startswith("file://") and "?" in where:  # pyarrow ignores a local URI's query: say so
            raise StorageError(f"--storage {where}: a file:// URI takes no options (?...); give the folder alone")
        try:
            fs, path = pafs.FileSystem.from_uri(where)
        except (pyarrow.ArrowInvalid, pyarrow.ArrowNotImplementedError, OSError, ValueError) as e:
            raise StorageError(f"--storage {where}: not a folder or a URI pyarrow can open ({e})") from None
        return cls(fs, path.rstrip("/"), where)

    def check_writable(self) -> None:
        """That a study could be written here, without writing: a local folder's nearest
        existing ancestor is a folder we may write on a real file system (not below a
        file, not /proc); an object store's bucket exists (or may be created)."""
        if self.local is not None:
            up = self.local
            while not up.exists():
                up = up.parent
            if not up.is_dir():
                raise StorageError(f"--storage {self.shown}: {up} is a file, so no folder can be made below it")
            fstype = mount_type(up)
            if fstype in ("proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs") or not os.access(up, os.W_OK):
                raise StorageError(f"--storage {self.shown}: {up} cannot be written ({fstype or 'no write access'}); "
                                   "name a folder of your own")
            return
        bucket = self.path.split("/", 1)[0]
        info = bounded(lambda: self.fs.get_file_info(bucket), f"--storage {self.shown}") if bucket else None
        if info is not None and info.type == pafs.FileType.NotFound \
                and "allow_bucket_creation=true" not in self.shown.lower():
            raise StorageError(f"--storage {self.shown}: the bucket {bucket!r} does not exist; make it first, or add "
                               "allow_bucket_creation=true to the URI's options")

    @property
    def local(self) -> Path | None:
        """The folder as a local Path, or None behind a URI."""
        return Path(self.path) if isinstance(self.fs, pafs.LocalFileSystem) else None

    @property
    def name(self) -> str:
        return self.path.rsplit("/", 1)[-1]

    def __truediv__(self, name: str) -> "Location":
        base, q, query = self.shown.partition("?")
        return Location(self.fs, f"{self.path}/{name}", f"{base.rstrip('/')}/{name}{q}{query}")

    def __str__(self) -> str:
        return self.shown

    def kind(self) -> pafs.FileType:
        return self.fs.get_file_info(self.path).type

    def exists(self) -> bool:
        return self.kind() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        return self.kind() == pafs.FileType.File

    def is_empty_dir(self) -> bool:
        if self.kind() == pafs.FileType.NotFound:
            return True
        return not self.fs.get_file_info(pafs.FileSelector(self.path, allow_not_found=True))

    def read_bytes(self) -> bytes:
        with self.fs.open_input_stream(self.path) as f:
            return f.readall()

    def read_text(self) -> str:
        return self.read_bytes().decode()

    def write_bytes(self, data: bytes) -> None:
        """Local: under a temporary name, then renamed (a killed run never leaves
        half a file under the real name). An object store writes an object whole."""
        self.fs.create_dir(self.path.rsplit("/", 1)[0], recursive=True)
        if self.local is not None:
            tmp = f"{self.path}.tmp"
            with self.fs.open_output_stream(tmp) as f:
                f.write(data)
            os.replace(tmp, self.path)
        else:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)

    def write_text(self, text: str) -> None:
        self.write_bytes(text.encode())

    def upload(self, local_dir: Path) -> None:
        """Copy a local folder's files here."""
        self.fs.create_dir(self.path, recursive=True)
        pafs.copy_files(str(local_dir), self.path, source_filesystem=pafs.LocalFileSystem(),
                        destination_filesystem=self.fs)

    def download(self, local_dir: Path) -> Path:
        pafs.copy_files(self.path, str(local_dir), source_filesystem=self.fs,
                        destination_filesystem=pafs.LocalFileSystem())
        return local_dir

    def move_to(self, dest: "Location") -> None:
        """Rename a folder (same file system); an object store has no rename: copy, then delete."""
        if self.local is not None:
            self.fs.move(self.path, dest.path)
        else:
            pafs.copy_files(self.path, dest.path, source_filesystem=self.fs, destination_filesystem=dest.fs)
            self.fs.delete_dir(self.path)

    def delete(self) -> None:
        kind = self.kind()
        if kind == pafs.FileType.Directory:
            self.fs.delete_dir(self.path)
        elif kind == pafs.FileType.File:
            self.fs.delete_file(self.path)


def read_table(loc: Location, **kw):
    import pandas as pd

    data = loc.read_bytes()
    return pd.read_parquet(io.BytesIO(data)) if loc.path.endswith(".parquet") else pd.read_csv(io.BytesIO(data), **kw)


def write_table(loc: Location, frame) -> None:
    buf = io.BytesIO()
    if loc.path.endswith(".parquet"):
        frame.to_parquet(buf, index=False)
    else:
        frame.to_csv(buf, index=False)
    loc.write_bytes(buf.getvalue())


class GPUError(StorageError):
    """A node whose NVIDIA GPUs torch cannot use (csnn.gpus); a StorageError, so that study.run
    refuses it as it refuses a storage some node cannot read: before any trial, exit 2."""


def check_nodes_see(loc: Location, timeout_s: float = 120, gpus: bool = False) -> list[str]:
    """On a cluster of several nodes, check that each node reads a marker the
    driver wrote into the storage; raise StorageError naming those that cannot.
    With `gpus` (the study's trials take GPUs), also check, here and in the same visit
    to each node that has GPUs, that torch sees CUDA wherever the machine has NVIDIA
    GPUs (csnn.gpus); raise GPUError naming those where it does not.
    Returns the nodes checked (their IPs)."""
    import uuid

    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from csnn.gpus import torch_cannot_see_gpus

    here = torch_cannot_see_gpus() if gpus else None
    if here:
        raise GPUError(f"the driver's machine: {here}")
    nodes = [n for n in ray.nodes() if n["Alive"]]
    shared = len(nodes) >= 2
    visit = [n for n in nodes if shared or (gpus and n["Resources"].get("GPU"))]
    if not visit:
        return [n["NodeManagerAddress"] for n in nodes]
    marker = loc / f".storage-check-{uuid.uuid4().hex[:8]}"
    token = uuid.uuid4().hex
    if shared:
        marker.write_text(token)
    try:
        read = ray.remote(num_cpus=0, max_retries=0)(_visit)
        refs = [read.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                .remote(marker.fs, marker.path if shared else None, gpus and bool(n["Resources"].get("GPU")))
                for n in visit]
        seen = ray.get(refs, timeout=timeout_s)
    finally:
        if shared:
            marker.delete()
    no_cuda = [f"{n['NodeManagerAddress']}: {why}" for n, (_, why) in zip(visit, seen) if why]
    if no_cuda:
        raise GPUError(f"{len(no_cuda)} of {len(visit)} Ray nodes cannot train on their GPUs: " + "; ".join(no_cuda))
    bad = [f"{n['NodeManagerAddress']} ({got})" for n, (got, _) in zip(visit, seen) if shared and got != token]
    if bad:
        raise StorageError(
            f"--storage {loc.shown}: {len(bad)} of {len(nodes)} Ray nodes cannot read what the driver wrote there: "
            + "; ".join(bad) + ". Every trial writes its checkpoints to the storage from the node it runs on: "
            "give --storage a folder every node mounts at the same path (NFS), or a URI (s3://..., gs://...)")
    return [n["NodeManagerAddress"] for n in nodes]


def _visit(fs, path: str | None, gpus: bool) -> tuple[str | None, str | None]:
    """On one node: (the marker at `path` as read there, or why not; with `gpus`, csnn.gpus's refusal or None)."""
    from csnn.gpus import torch_cannot_see_gpus

    return (_read_marker(fs, path) if path else None), (torch_cannot_see_gpus() if gpus else None)


def _read_marker(fs, path: str) -> str:
    try:
        with fs.open_input_stream(path) as f:
            return f.readall().decode()
    except (OSError, pyarrow.ArrowException) as e:
        return f"{type(e).__name__}: {e}"


def mount_type(path: Path) -> str:
    """The file system type of the mount that holds `path` (from /proc/mounts; '' if unknown)."""
    try:
        mounts = [line.split()[1:3] for line in Path("/proc/mounts").read_text().splitlines()]
    except OSError:
        return ""
    path = str(Path(path).resolve())
    best = max((m for m in mounts if path == m[0] or path.startswith(m[0].rstrip("/") + "/")),
               key=lambda m: len(m[0]), default=[None, ""])
    return best[1]

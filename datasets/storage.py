"""Reading and writing files at a local path or an object-store URI (s3://, gs://, ...).

Everything the jobs keep between processes (generated demo logs, prepared data, cached encoder
features) goes through pyarrow's filesystems, so on a cluster it lives in storage that every node
reaches. Credentials and endpoints come from each process's environment (AWS_* variables, IAM
roles), never from a config file.
"""

import atexit
import functools
import hashlib
import json
import os
import shutil
import tempfile

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import ray.data


def read_parquet(paths, **kwargs) -> ray.data.Dataset:
    """ray.data.read_parquet with two of Ray 2.60's defaults changed for the dataset it returns
    (and every dataset derived from it, which inherits its DataContext):
    - the first (V1) Parquet reader. The default reader (DataSourceV2: a ListFiles task, then
      ReadFiles) took 13 s to read the demo's 1,365 sequences here, 8 s of it listing 8 local
      files, where V1 took 2 s; every epoch and every evaluation reads anew, so that start-up was
      most of a demo epoch.
    - sort-based shuffles for groupby (prepare's users and duplicated items). The default
      (SHUFFLE_V2) starts hash-shuffle aggregator actors for each one: preparing the demo took
      22-23 s with it and 17-18 s with a sort in most runs (ML-1M: 73-87 s against 52-57 s)."""
    context = ray.data.DataContext.get_current()
    defaults = context.use_datasource_v2, context.shuffle_strategy
    context.use_datasource_v2, context.shuffle_strategy = False, ray.data.context.ShuffleStrategy.SORT_SHUFFLE_PULL_BASED
    try:
        return ray.data.read_parquet(paths, **kwargs)
    finally:
        context.use_datasource_v2, context.shuffle_strategy = defaults


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *parts])


def absolute(path: str) -> str:
    """URIs stay as they are; local paths become absolute, so every Ray worker finds them."""
    return path if "://" in path else os.path.abspath(path)


def filesystem(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) of a local path or URI."""
    return pafs.FileSystem.from_uri(absolute(uri))


def read_table(uri: str, columns: list[str] | None = None) -> pa.Table:
    """A Parquet file or folder, local or in object storage, read whole in this process (columns:
    only these): for small tables, where a Ray Data job would take longer to start than to read."""
    fs, path = filesystem(uri)
    return pq.read_table(path, filesystem=fs, columns=columns)


def read_bytes(uri: str) -> bytes | None:
    """A local file's or object's bytes; None when there is none."""
    fs, path = filesystem(uri)
    if fs.get_file_info(path).type == pafs.FileType.NotFound:
        return None
    with fs.open_input_stream(path) as f:
        return f.read()


def write_bytes(uri: str, payload: bytes):
    fs, path = filesystem(uri)
    fs.create_dir(os.path.dirname(path), recursive=True)
    with fs.open_output_stream(path) as f:
        f.write(payload)


def read_json(uri: str) -> dict | None:
    payload = read_bytes(uri)
    return None if payload is None else json.loads(payload)


def write_json(uri: str, payload: dict):
    write_bytes(uri, json.dumps(payload, indent=1).encode())


@functools.cache
def local_folder(uri: str) -> str:
    """A local folder with the files of folder `uri`: the folder itself when it is local, else a
    copy downloaded once per process (and removed when the process ends). For readers of local
    files only, such as Hugging Face's `from_pretrained`."""
    if "://" not in uri:
        return os.path.abspath(uri)
    local = tempfile.mkdtemp(prefix=f"interestformer-{hashlib.sha256(uri.encode()).hexdigest()[:8]}-")
    atexit.register(shutil.rmtree, local, ignore_errors=True)
    pafs.copy_files(uri, local)
    return local

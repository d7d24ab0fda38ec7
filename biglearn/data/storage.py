"""One storage layer for datasets, runs and exports: local paths and `s3://bucket/prefix` URIs.

Bytes move through pyarrow's filesystems (the same ones Ray Data and Ray Train use, so a URI
means the same thing to the driver, the data readers and the checkpoint writer). S3 requests
are signed from the standard AWS chain (environment, profile, instance or pod role); an
S3-compatible store is reached by setting `AWS_ENDPOINT_URL_S3` (or `AWS_ENDPOINT_URL`), which
both pyarrow and boto3 honour. boto3 checks buckets up front and lists prefixes, because its
errors say precisely what is wrong (no such bucket, access denied, no credentials).

Credentials never enter a URI, a message or a saved file: URIs carrying them are refused, and
every error message is scrubbed of the secret values present in the environment.
"""

from __future__ import annotations

import os
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

SECRET_VARIABLES = ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
# Settings (not secrets) a remote Ray worker needs to reach the same store as the driver.
FORWARDED_VARIABLES = ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_REGION", "AWS_DEFAULT_REGION")


class StorageError(ValueError):
    """A location that cannot be read or written; the message names it and says what to do."""


def is_s3(uri: str) -> bool:
    return str(uri).startswith("s3://")


def join(root: str, name: str) -> str:
    return f"{str(root).rstrip('/')}/{name}"


def absolute(uri: str) -> str:
    """A local path made absolute (Ray Tune and Ray Train run trials and workers in folders of
    their own, where a relative path means something else); URIs pass through."""
    return uri if "://" in uri else os.path.abspath(uri)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """(filesystem, path inside it) for a local path or an s3:// URI."""
    uri = str(uri)
    if not is_s3(uri):
        if "://" in uri:
            raise StorageError(f"unsupported location {_shown(uri)}: use a local path or s3://bucket/prefix")
        return pafs.LocalFileSystem(), absolute(uri)
    bucket, key = _bucket_and_key(uri)
    with storage_errors(uri):
        fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
    return fs, f"{bucket}/{key}".rstrip("/")


def _bucket_and_key(uri: str) -> tuple[str, str]:
    parts = urlsplit(uri)
    if parts.username or parts.password or parts.query:
        raise StorageError(
            f"{_shown(uri)} carries credentials or options in the URI; use s3://bucket/prefix and give "
            "credentials through the AWS chain (environment, profile or role) and the endpoint through "
            "AWS_ENDPOINT_URL_S3"
        )
    if not parts.netloc:
        raise StorageError(f"{uri} names no bucket; use s3://bucket/prefix")
    return parts.netloc, parts.path.strip("/")


def check_bucket(uri: str) -> None:
    """Fails early, with the reason, when the bucket of an s3:// URI cannot be used."""
    if not is_s3(uri):
        return
    import botocore.exceptions

    bucket, _ = _bucket_and_key(uri)
    try:
        _s3_client().head_bucket(Bucket=bucket)
    except botocore.exceptions.NoCredentialsError:
        raise StorageError(
            f"no AWS credentials found for {uri}: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
            "AWS_PROFILE, or run where an instance/pod role is attached"
        ) from None
    except botocore.exceptions.EndpointConnectionError:
        raise StorageError(f"cannot reach the S3 endpoint for {uri} ({_endpoint()}); check AWS_ENDPOINT_URL_S3") from None
    except botocore.exceptions.ClientError as exc:
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        code = exc.response.get("Error", {}).get("Code", "")
        if status == 404 or code in {"404", "NoSuchBucket"}:
            raise StorageError(f"bucket {bucket!r} does not exist at {_endpoint()}: create it or fix the URI {uri}") from None
        if status == 403 or code in {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"}:
            raise StorageError(
                f"access to bucket {bucket!r} was denied at {_endpoint()}: the AWS credentials in use are wrong "
                "or lack permission for it; check AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE"
            ) from None
        raise StorageError(redact(f"cannot use bucket {bucket!r} ({code or status}): {exc}")) from None


def list_files(uri: str) -> dict[str, int]:
    """{path relative to `uri`: size in bytes} of every file under it (empty when none)."""
    if is_s3(uri):
        check_bucket(uri)
        bucket, prefix = _bucket_and_key(uri)
        prefix = f"{prefix}/" if prefix else ""
        found = {}
        with storage_errors(uri):
            for page in _s3_client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
                for item in page.get("Contents", []):
                    found[item["Key"][len(prefix):]] = item["Size"]
        return found
    root = Path(uri)
    if not root.is_dir():
        return {}
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def exists(uri: str) -> bool:
    fs, path = resolve(uri)
    with storage_errors(uri):
        return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with storage_errors(uri):
        with fs.open_input_stream(path) as stream:
            return stream.read()


def write_bytes(uri: str, data: bytes) -> None:
    """Writes a whole file so that readers see all of it or nothing.

    S3 objects appear whole by nature (pyarrow switches to a multipart upload for large ones);
    a local file is written beside its name and renamed into place.
    """
    fs, path = resolve(uri)
    with storage_errors(uri):
        if isinstance(fs, pafs.LocalFileSystem):
            fs.create_dir(os.path.dirname(path), recursive=True)
            staging = f"{path}.{uuid.uuid4().hex}.partial"
            with fs.open_output_stream(staging) as out:
                out.write(data)
            os.replace(staging, path)
        else:
            with fs.open_output_stream(path) as out:
                out.write(data)


def append_bytes(uri: str, data: bytes) -> None:
    """Appends `data` to a local file (made if absent) in one write; object stores cannot append,
    so an s3:// URI is a StorageError: write such files whole with `write_bytes`."""
    if is_s3(uri):
        raise StorageError(f"cannot append to {_shown(uri)}: object storage has no append; write the file whole")
    fs, path = resolve(uri)
    with storage_errors(uri):
        fs.create_dir(os.path.dirname(path), recursive=True)
        with fs.open_append_stream(path) as out:
            out.write(data)


def read_tagged(uri: str) -> tuple[bytes, str] | None:
    """(bytes, ETag) of an s3:// object, or None where there is none: the tag for `write_if`."""
    bucket, key = _bucket_and_key(uri)
    import botocore.exceptions

    with storage_errors(uri):
        try:
            found = _s3_client().get_object(Bucket=bucket, Key=key)
        except botocore.exceptions.ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None
            raise
        return found["Body"].read(), found["ETag"]


def write_if(uri: str, data: bytes, tag: str | None) -> str | None:
    """Writes an s3:// object only if it still has ETag `tag` (None: only if there is no object),
    an atomic compare-and-swap; returns the new ETag, or None where another writer came first."""
    bucket, key = _bucket_and_key(uri)
    import botocore.exceptions

    condition = {"IfNoneMatch": "*"} if tag is None else {"IfMatch": tag}
    with storage_errors(uri):
        try:
            return _s3_client().put_object(Bucket=bucket, Key=key, Body=data, **condition)["ETag"]
        except botocore.exceptions.ClientError as exc:
            # 412: the object changed or appeared; 409: a concurrent write to it won; NoSuchKey: it
            # was deleted since it was read.
            if exc.response.get("Error", {}).get("Code") in ("PreconditionFailed", "ConditionalRequestConflict",
                                                             "NoSuchKey", "412", "409", "404"):
                return None
            raise


def delete_file(uri: str) -> None:
    fs, path = resolve(uri)
    with storage_errors(uri):
        if fs.get_file_info(path).type == pafs.FileType.File:
            fs.delete_file(path)


def delete_dir(uri: str) -> None:
    fs, path = resolve(uri)
    with storage_errors(uri):
        if fs.get_file_info(path).type != pafs.FileType.NotFound:
            fs.delete_dir(path)


def fetch_folder(uri: str, destination: str | Path | None = None) -> Path:
    """A local folder with the files under `uri`: the folder itself when local, else a copy (in
    `destination`, or a fresh temporary folder)."""
    if not is_s3(uri):
        return Path(uri)
    check_bucket(uri)
    if not list_files(uri):
        raise StorageError(f"nothing found under {uri}: check the URI")
    fs, path = resolve(uri)
    destination = Path(destination or tempfile.mkdtemp(prefix="biglearn-"))
    destination.mkdir(parents=True, exist_ok=True)
    with storage_errors(uri):
        pafs.copy_files(path, str(destination), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    return destination


def forwarded_env() -> dict[str, str]:
    """The S3 settings of this process that Ray workers elsewhere need too (never secrets)."""
    return {name: os.environ[name] for name in FORWARDED_VARIABLES if os.environ.get(name)}


def redact(text: str) -> str:
    """`text` with every credential value of this process's environment blanked out."""
    for name in SECRET_VARIABLES:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, "***")
    return text


@contextmanager
def storage_errors(uri: str) -> Iterator[None]:
    """Turns pyarrow's and botocore's errors about `uri` into a StorageError saying what to do."""
    try:
        yield
    except FileNotFoundError:
        raise
    except StorageError:
        raise
    except (OSError, pa.ArrowException) as exc:
        message = str(exc)
        hint = ""
        if any(sign in message for sign in ("ACCESS_DENIED", "AccessDenied", "SignatureDoesNotMatch", "InvalidAccessKeyId", "403")):
            hint = ": access denied; check the AWS credentials (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or role)"
        elif "NO_SUCH_BUCKET" in message or "NoSuchBucket" in message:
            hint = ": the bucket does not exist; create it or fix the URI"
        raise StorageError(redact(f"storage error at {_shown(uri)}{hint} ({message.strip()})")) from None
    except Exception as exc:
        import botocore.exceptions

        if isinstance(exc, (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError)):
            raise StorageError(redact(f"storage error at {_shown(uri)}: {exc}")) from None
        raise


def _s3_client():
    import boto3.session

    # boto3 reads the endpoint override (AWS_ENDPOINT_URL[_S3]) and credentials itself; a new
    # session each time, because the default one keeps the credentials it first found.
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    return boto3.session.Session().client("s3", region_name=region)


def _endpoint() -> str:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or "AWS S3"


def _shown(uri: str) -> str:
    """The URI with any user:password part masked, for messages."""
    parts = urlsplit(str(uri))
    if parts.username or parts.password:
        return f"{parts.scheme}://***@{parts.hostname}{parts.path}"
    return str(uri).split("?", 1)[0]

"""The storage layer's guards: no credentials in URIs or messages, clear refusals."""

from __future__ import annotations

import pytest

from biglearn.data.storage import StorageError, append_bytes, list_files, redact, resolve, write_bytes


def test_uris_with_credentials_are_refused_without_echoing_them():
    for uri in ("s3://AKIAEXAMPLE:s3cr3t-value@bucket/data", "s3://bucket/data?secret_key=s3cr3t-value"):
        with pytest.raises(StorageError, match="AWS chain") as info:
            resolve(uri)
        assert "s3cr3t-value" not in str(info.value)
    with pytest.raises(StorageError, match="names no bucket"):
        resolve("s3:///data")
    with pytest.raises(StorageError, match="use a local path or s3://"):
        resolve("gs://bucket/data")


def test_redact_blanks_the_secrets_of_the_environment(monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG")
    monkeypatch.setenv("AWS_SESSION_TOKEN", "FwoGZXIvYXdzEJr")
    text = redact("signature for wJalrXUtnFEMI/K7MDENG with token FwoGZXIvYXdzEJr failed")
    assert text == "signature for *** with token *** failed"


def test_local_writes_replace_whole_files_and_listing_is_relative(tmp_path):
    write_bytes(str(tmp_path / "a" / "b.bin"), b"first")
    write_bytes(str(tmp_path / "a" / "b.bin"), b"second")
    assert (tmp_path / "a" / "b.bin").read_bytes() == b"second"
    assert list_files(str(tmp_path)) == {"a/b.bin": 6}  # no staging files left behind
    assert list_files(str(tmp_path / "missing")) == {}


def test_progress_lines_are_appended_locally_and_a_restore_rewrites_the_file(tmp_path):
    from biglearn.config import load_config
    from biglearn.train.config import PretrainConfig
    from biglearn.train.loop import METRICS, write_history

    cfg = load_config(PretrainConfig, None, [f"run.storage={tmp_path}", "run.name=r"])
    path = tmp_path / "r" / METRICS
    history = [{"step": 1}]
    write_history(cfg, history)
    inode = path.stat().st_ino
    for step in (2, 3):
        history.append({"step": step})
        write_history(cfg, history, appended=True)
    assert path.stat().st_ino == inode, "each progress line is appended, not the file rewritten"
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n{"step": 3}\n'
    write_history(cfg, history[:1])  # a resume from step 1's checkpoint
    assert path.read_text() == '{"step": 1}\n'
    with pytest.raises(StorageError, match="object storage has no append"):
        append_bytes("s3://bucket/run/metrics.jsonl", b"x")

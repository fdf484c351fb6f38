"""``stage`` against a real moto S3 server: bytes round-trip, resume, atomic swap, bad sources."""

from __future__ import annotations

import fcntl
import hashlib
import json
import math
from pathlib import Path
from typing import Any

import botocore.exceptions
import pytest

from workflows.steps.manifest import MANIFEST_FILENAME, read_manifest
from workflows.steps.s3 import S3Error, make_s3_client, parse_s3_uri, upload_dir
from workflows.steps.stage import StageError, stage
from workflows.steps.verify import VerifyError, verify_checksums

CHUNK_BYTES = 64 * 1024
# name -> size: three files over several chunks, one within one chunk, one empty.
SIZES = {
    "a.bin": 2 * CHUNK_BYTES + 5,
    "b.bin": 3 * CHUNK_BYTES,
    "c/d.bin": CHUNK_BYTES // 2,
    "e.txt": 0,
}


def make_source(src_dir: Path, seed: int = 0) -> dict[str, bytes]:
    contents = {name: _random_bytes(size, seed + n) for n, (name, size) in enumerate(SIZES.items())}
    for name, data in contents.items():
        (src_dir / name).parent.mkdir(parents=True, exist_ok=True)
        (src_dir / name).write_bytes(data)
    return contents


def _random_bytes(size: int, seed: int) -> bytes:
    return hashlib.shake_256(f"strata-{seed}".encode()).digest(size) if size else b""


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def num_ranges(sizes: list[int]) -> int:
    return sum(math.ceil(size / CHUNK_BYTES) for size in sizes)


def visible(cache_dir: Path) -> list[str]:
    """What a reader of the model cache sees: everything but the hidden staging files."""
    return sorted(p.name for p in cache_dir.iterdir() if not p.name.startswith("."))


@pytest.fixture
def published(tmp_path: Path, s3_client: Any, bucket: str) -> tuple[str, dict[str, bytes]]:
    """The source files uploaded to s3://bucket/models/model/ with a published manifest."""
    contents = make_source(tmp_path / "src")
    uri = f"s3://{bucket}/models/model"
    upload_dir(tmp_path / "src", uri, s3_client=s3_client)
    return uri, contents


def run_stage(uri: str, cache_dir: Path, client: Any, **kwargs: Any) -> Any:
    kwargs = {"max_workers": 4, "chunk_bytes": CHUNK_BYTES, "show_progress": False} | kwargs
    return stage(uri, cache_dir, s3_client=client, **kwargs)


def test_parse_s3_uri() -> None:
    assert parse_s3_uri("s3://b/models/x") == ("b", "models/x/")
    assert parse_s3_uri("s3://b/models/x/") == ("b", "models/x/")
    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(S3Error, match="not an s3:// URI"):
        parse_s3_uri("/local/path")
    with pytest.raises(StageError, match="not an s3:// URI"):
        stage("/local/path", Path("/nonexistent"), show_progress=False)


def test_bytes_round_trip_with_ranged_gets(
    published: tuple[str, dict[str, bytes]], tmp_path: Path, s3_client: Any, count_gets: Any
) -> None:
    uri, contents = published
    gets = count_gets(s3_client)
    result = run_stage(uri, tmp_path / "cache", s3_client)

    target = tmp_path / "cache" / "model"
    assert result.target_dir == target
    for name, data in contents.items():
        assert sha256((target / name).read_bytes()) == sha256(data), name
    assert len(gets.ranges) == num_ranges(list(SIZES.values()))
    assert gets.num_calls == len(gets.ranges) + 1  # + the published manifest
    assert (result.num_files, result.total_bytes) == (4, sum(SIZES.values()))
    assert (result.downloaded_bytes, result.skipped_bytes) == (sum(SIZES.values()), 0)
    assert result.has_published_manifest
    manifest = read_manifest(target)
    assert {e.path: e.sha256 for e in manifest.files} == {n: sha256(d) for n, d in contents.items()}
    assert manifest.digest == result.manifest_digest == manifest.published.digest
    assert manifest.source_uri == uri
    assert visible(tmp_path / "cache") == ["model"]
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".model.strata-lock", "model"]


def test_source_without_published_manifest(tmp_path: Path, s3_client: Any, bucket: str) -> None:
    s3_client.put_object(Bucket=bucket, Key="m/config.json", Body=b"{}")
    s3_client.put_object(Bucket=bucket, Key="m/w.bin", Body=b"x" * 1000)
    s3_client.put_object(Bucket=bucket, Key="m/sub/", Body=b"")  # a "directory" marker

    result = run_stage(f"s3://{bucket}/m/", tmp_path / "cache", s3_client, name="renamed")

    target = tmp_path / "cache" / "renamed"
    assert sorted(p.name for p in target.iterdir()) == ["config.json", MANIFEST_FILENAME, "w.bin"]
    assert not result.has_published_manifest
    assert read_manifest(target).published is None
    verify_checksums(target)


def test_rerun_skips_complete_files_and_fetches_only_changes(
    published: tuple[str, dict[str, bytes]],
    tmp_path: Path,
    s3_client: Any,
    bucket: str,
    count_gets: Any,
) -> None:
    uri, contents = published
    run_stage(uri, tmp_path / "cache", s3_client)

    gets = count_gets(s3_client)
    again = run_stage(uri, tmp_path / "cache", s3_client)
    assert gets.ranges == []
    assert (again.downloaded_bytes, again.skipped_bytes) == (0, sum(SIZES.values()))
    assert again.num_skipped_files == 4

    # A new version of one file at the source, republished: only that file moves.
    new_b = _random_bytes(SIZES["b.bin"], seed=99)
    (tmp_path / "src" / "b.bin").write_bytes(new_b)
    upload_dir(tmp_path / "src", uri, s3_client=s3_client)
    gets = count_gets(s3_client)
    third = run_stage(uri, tmp_path / "cache", s3_client)

    assert len(gets.ranges) == num_ranges([SIZES["b.bin"]])
    assert third.downloaded_bytes == SIZES["b.bin"]
    assert third.skipped_bytes == sum(SIZES.values()) - SIZES["b.bin"]
    assert (tmp_path / "cache" / "model" / "b.bin").read_bytes() == new_b
    assert (tmp_path / "cache" / "model" / "a.bin").read_bytes() == contents["a.bin"]
    verify_checksums(tmp_path / "cache" / "model")
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".model.strata-lock", "model"]


class FailRangedGetsAfter:
    """Lets ``num_ok`` ranged GETs through, then fails every one like a dropped connection."""

    def __init__(self, client: Any, num_ok: int) -> None:
        self.num_left = num_ok
        client.meta.events.register("before-call.s3.GetObject", self._on_call)

    def _on_call(self, params: dict[str, Any], **kwargs: Any) -> None:
        if "Range" not in params.get("headers", {}):
            return
        if self.num_left <= 0:
            raise botocore.exceptions.ConnectionClosedError(endpoint_url="injected failure")
        self.num_left -= 1


def test_interrupted_stage_leaves_no_target_and_rerun_resumes(
    published: tuple[str, dict[str, bytes]],
    tmp_path: Path,
    s3_client: Any,
    count_gets: Any,
) -> None:
    uri, contents = published
    # One worker fetches in file order: a.bin completes (3 ranges), b.bin fails in its 2nd.
    FailRangedGetsAfter(s3_client, num_ok=num_ranges([SIZES["a.bin"]]) + 1)
    with pytest.raises(StageError, match="injected failure"):
        run_stage(uri, tmp_path / "cache", s3_client, max_workers=1)
    assert visible(tmp_path / "cache") == []

    fresh_client = make_s3_client(s3_client.meta.endpoint_url)
    gets = count_gets(fresh_client)
    result = run_stage(uri, tmp_path / "cache", fresh_client, max_workers=1)

    assert (result.num_skipped_files, result.skipped_bytes) == (2, SIZES["a.bin"])  # + e.txt
    assert len(gets.ranges) == num_ranges([SIZES["b.bin"], SIZES["c/d.bin"]])
    for name, data in contents.items():
        assert (tmp_path / "cache" / "model" / name).read_bytes() == data
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".model.strata-lock", "model"]


def test_corrupted_object_fails_naming_it_and_keeps_previous_copy(
    published: tuple[str, dict[str, bytes]],
    tmp_path: Path,
    s3_client: Any,
    bucket: str,
) -> None:
    uri, contents = published
    cache_dir = tmp_path / "cache"
    run_stage(uri, cache_dir, s3_client)
    # Same size, other bytes: only the sha256 against the published manifest can tell.
    key = "models/model/b.bin"
    s3_client.put_object(Bucket=bucket, Key=key, Body=contents["a.bin"][: SIZES["b.bin"]])
    s3_client.put_object(Bucket=bucket, Key="models/model/e.txt", Body=b"")  # new ETag only

    with pytest.raises(VerifyError, match=r"b\.bin.*published manifest") as excinfo:
        run_stage(uri, cache_dir, s3_client)

    assert excinfo.value.path == "b.bin"
    assert visible(cache_dir) == ["model"]
    assert (cache_dir / "model" / "b.bin").read_bytes() == contents["b.bin"]
    verify_checksums(cache_dir / "model")  # the previous copy is untouched

    # The publisher fixes the object: every byte is already in the previous copy.
    s3_client.put_object(Bucket=bucket, Key=key, Body=contents["b.bin"])
    result = run_stage(uri, cache_dir, s3_client)
    assert (result.downloaded_bytes, result.num_skipped_files) == (0, 4)
    verify_checksums(cache_dir / "model")


def test_corrupted_object_on_first_stage_leaves_no_target_and_rerun_resumes(
    published: tuple[str, dict[str, bytes]],
    tmp_path: Path,
    s3_client: Any,
    bucket: str,
    count_gets: Any,
) -> None:
    uri, contents = published
    key = "models/model/c/d.bin"
    s3_client.put_object(Bucket=bucket, Key=key, Body=bytes(SIZES["c/d.bin"]))

    with pytest.raises(VerifyError, match=r"c/d\.bin") as excinfo:
        run_stage(uri, tmp_path / "cache", s3_client)

    assert excinfo.value.path == "c/d.bin"
    assert visible(tmp_path / "cache") == []

    # The publisher fixes the object; the rerun fetches it and nothing else.
    s3_client.put_object(Bucket=bucket, Key=key, Body=contents["c/d.bin"])
    gets = count_gets(s3_client)
    result = run_stage(uri, tmp_path / "cache", s3_client)
    assert result.downloaded_bytes == SIZES["c/d.bin"]
    assert len(gets.ranges) == 1
    verify_checksums(tmp_path / "cache" / "model")


def test_size_mismatch_with_published_manifest_fails_before_downloading(
    published: tuple[str, dict[str, bytes]],
    tmp_path: Path,
    s3_client: Any,
    bucket: str,
    count_gets: Any,
) -> None:
    uri, _ = published
    s3_client.put_object(Bucket=bucket, Key="models/model/a.bin", Body=b"truncated")
    gets = count_gets(s3_client)

    with pytest.raises(VerifyError, match=r"a\.bin: 9 bytes, the source's published manifest"):
        run_stage(uri, tmp_path / "cache", s3_client)
    assert gets.ranges == []


def test_object_missing_from_published_manifest_fails(
    published: tuple[str, dict[str, bytes]], tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    uri, _ = published
    s3_client.delete_object(Bucket=bucket, Key="models/model/c/d.bin")
    with pytest.raises(VerifyError, match=r"c/d\.bin: in the published manifest but not in S3"):
        run_stage(uri, tmp_path / "cache", s3_client)


def test_no_half_written_model_is_ever_visible(
    published: tuple[str, dict[str, bytes]], tmp_path: Path, s3_client: Any
) -> None:
    uri, _ = published
    cache_dir = tmp_path / "cache"
    seen: list[tuple[str, list[str]]] = []

    def check(staged: Path) -> None:  # runs on the complete copy, before the swap
        seen.append((staged.name, visible(cache_dir)))
        verify_checksums(staged)

    run_stage(uri, cache_dir, s3_client, check=check)
    assert seen == [(".model.strata-partial", [])]

    def refuse(staged: Path) -> None:
        raise RuntimeError("checkpoint does not load")

    (tmp_path / "src" / "a.bin").write_bytes(b"new version")
    upload_dir(tmp_path / "src", uri, s3_client=s3_client)
    with pytest.raises(RuntimeError, match="does not load"):
        run_stage(uri, cache_dir, s3_client, check=refuse)
    assert (cache_dir / "model" / "a.bin").read_bytes() != b"new version"
    verify_checksums(cache_dir / "model")


def test_missing_prefix_and_bucket_fail_clearly(
    tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    with pytest.raises(StageError, match=r"s3://.*/nothing/here/: no objects under this prefix"):
        run_stage(f"s3://{bucket}/nothing/here", tmp_path / "cache", s3_client)
    with pytest.raises(StageError, match="NoSuchBucket"):
        run_stage("s3://no-such-bucket-strata/x", tmp_path / "cache", s3_client)
    assert visible(tmp_path / "cache") == []


def test_a_second_concurrent_stage_is_refused(
    published: tuple[str, dict[str, bytes]], tmp_path: Path, s3_client: Any
) -> None:
    uri, _ = published
    cache_dir = tmp_path / "cache"
    cache_dir.mkdir()
    with (cache_dir / ".model.strata-lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        with pytest.raises(StageError, match="another stage of this model is running"):
            run_stage(uri, cache_dir, s3_client)


def test_progress_bar_and_upload_manifest(
    published: tuple[str, dict[str, bytes]],
    tmp_path: Path,
    s3_client: Any,
    bucket: str,
    capsys: pytest.CaptureFixture[str],
) -> None:
    uri, _ = published
    body = s3_client.get_object(Bucket=bucket, Key=f"models/model/{MANIFEST_FILENAME}")["Body"]
    doc = json.loads(body.read())
    assert [f["path"] for f in doc["files"]] == sorted(SIZES)
    assert "source" not in doc

    run_stage(uri, tmp_path / "cache", s3_client, show_progress=True)
    run_stage(uri, tmp_path / "cache", s3_client, show_progress=True)
    err = capsys.readouterr().err
    assert "stage" in err
    assert "resuming: 4 of 4 files" in err

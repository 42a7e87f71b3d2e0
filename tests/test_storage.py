"""The storage layer on local folders and on a real S3 endpoint (moto's HTTP server from conftest)."""

from __future__ import annotations

import io
import json
import os
import socket
import time
import uuid

import numpy as np
import pytest
import tifffile

from tgan_ray.config import StorageConfig
from tgan_ray.io import (
    StackError,
    StorageError,
    StorageNotFoundError,
    check_access,
    download_to,
    exists,
    is_s3,
    join,
    list_files,
    list_stack,
    load_stack,
    pyarrow_filesystem,
    read_bytes,
    read_image,
    s3_client,
    split_s3,
    upload_file,
    write_bytes,
)


def _tiff_bytes(array: np.ndarray, **kwargs) -> bytes:
    buffer = io.BytesIO()
    tifffile.imwrite(buffer, array, **kwargs)
    return buffer.getvalue()


# ---------------------------------------------------------------------------------------------- URIs


def test_uri_helpers():
    assert is_s3("s3://b/k") and is_s3("S3A://b/k") and not is_s3("/data/s3://x")
    assert split_s3("s3://bucket/a/b.tif") == ("bucket", "a/b.tif")
    assert split_s3("s3://bucket") == ("bucket", "")
    with pytest.raises(StorageError, match="no bucket"):
        split_s3("s3:///key")
    assert join("s3://b/run/", "/masks/", "a.png") == "s3://b/run/masks/a.png"
    assert join("s3://b", "x") == "s3://b/x"
    assert join("/tmp/run", "masks", "a.png") == os.path.join("/tmp/run", "masks", "a.png")


# ---------------------------------------------------------------------------------------------- local


def test_local_write_read_exists_and_atomic_overwrite(tmp_path):
    target = tmp_path / "deep" / "file.bin"
    write_bytes(target, b"first")
    write_bytes(target, b"second")
    assert read_bytes(target) == b"second" and exists(target)
    assert os.listdir(target.parent) == ["file.bin"]  # no temporary file left behind
    with pytest.raises(StorageNotFoundError, match="no such file: .*missing") as err:
        read_bytes(tmp_path / "missing")
    assert isinstance(err.value, FileNotFoundError)
    assert not exists(tmp_path / "missing")


def test_local_list_files(tmp_path):
    for name in ["b.tif", "a.PNG", "c.txt", ".hidden.tif", "sub/d.tif"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    names = lambda paths: [os.path.relpath(p, tmp_path) for p in paths]  # noqa: E731
    assert names(list_files(tmp_path)) == ["a.PNG", "b.tif", "c.txt"]
    assert names(list_files(tmp_path, exts=["png", ".TIF"])) == ["a.PNG", "b.tif"]
    assert names(list_files(tmp_path, exts=["tif"], recursive=True)) == [
        "b.tif",
        os.path.join("sub", "d.tif"),
    ]
    assert names(list_files(str(tmp_path / "*.tif"))) == ["b.tif"]
    assert names(list_files(str(tmp_path / "**" / "*.tif"))) == ["b.tif", os.path.join("sub", "d.tif")]
    assert names(list_files(tmp_path / "b.tif")) == ["b.tif"]
    assert list_files(str(tmp_path / "*.dm4")) == []
    with pytest.raises(StorageNotFoundError, match="no such folder or file"):
        list_files(tmp_path / "nowhere")


def test_local_copy_and_check_access(tmp_path):
    (tmp_path / "src.bin").write_bytes(b"payload")
    upload_file(tmp_path / "src.bin", tmp_path / "out" / "copy.bin")
    download_to(tmp_path / "out" / "copy.bin", tmp_path / "back.bin")
    assert (tmp_path / "back.bin").read_bytes() == b"payload"
    with pytest.raises(StorageNotFoundError):
        upload_file(tmp_path / "nope.bin", tmp_path / "x.bin")
    check_access(tmp_path)
    check_access(tmp_path / "not" / "yet" / "created")  # creatable under a writable folder
    (tmp_path / "file").write_text("x")
    with pytest.raises(StorageError, match="not a writable folder"):
        check_access(tmp_path / "file" / "below")


# ---------------------------------------------------------------------------------------------- S3


def test_s3_roundtrip_and_read_image(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = StorageConfig(s3_endpoint_url=endpoint)
    image = np.arange(12 * 16, dtype=np.uint16).reshape(12, 16)
    uri = f"s3://{bucket}/stack/a.tif"
    write_bytes(
        uri, _tiff_bytes(image, resolution=(1e7 / 0.25, 1e7 / 0.25), resolutionunit="CENTIMETER"), storage
    )
    img = read_image(uri, storage)
    np.testing.assert_array_equal(img.data, image)
    assert img.pixel_size_nm == pytest.approx(0.25) and img.source == uri
    assert exists(uri, storage) and exists(f"s3://{bucket}/stack", storage)
    assert not exists(f"s3://{bucket}/stack/b.tif", storage)
    assert exists(f"s3://{bucket}", storage) and not exists("s3://no-such-bucket-here", storage)
    with pytest.raises(StorageNotFoundError, match=f"no such S3 object: s3://{bucket}/stack/b.tif"):
        read_bytes(f"s3://{bucket}/stack/b.tif", storage)


def test_s3_endpoint_from_environment(s3_bucket, monkeypatch):
    endpoint, bucket = s3_bucket
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    write_bytes(f"s3://{bucket}/env.bin", b"via env")
    assert read_bytes(f"s3://{bucket}/env.bin") == b"via env"
    # the config wins over the environment
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:1")
    assert read_bytes(f"s3://{bucket}/env.bin", StorageConfig(s3_endpoint_url=endpoint)) == b"via env"


def test_s3_list_files_paginates_filters_and_globs(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = StorageConfig(s3_endpoint_url=endpoint)
    client = s3_client(storage)
    keys = [f"data/img_{i:02d}.tif" for i in range(7)] + [
        "data/readme.txt",
        "data/sub/deep.TIF",
        "datax/other.tif",
    ]
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=b"x")
    expected = [f"s3://{bucket}/data/img_{i:02d}.tif" for i in range(7)]
    assert list_files(f"s3://{bucket}/data", storage, exts=["tif"], page_size=2) == expected
    assert list_files(f"s3://{bucket}/data/", storage, page_size=3) == expected[:7] + [
        f"s3://{bucket}/data/readme.txt"
    ]
    recursive = list_files(f"s3://{bucket}/data", storage, exts=["tif"], recursive=True, page_size=2)
    assert recursive == expected + [f"s3://{bucket}/data/sub/deep.TIF"]
    assert list_files(f"s3://{bucket}/data/img_0[12].tif", storage) == expected[1:3]
    assert list_files(f"s3://{bucket}/data/img_03.tif", storage) == [expected[3]]
    assert list_files(f"s3://{bucket}/empty/", storage) == []


def test_s3_stack_and_transfers(s3_bucket, tmp_path):
    endpoint, bucket = s3_bucket
    storage = StorageConfig(s3_endpoint_url=endpoint)
    for i in range(3):
        write_bytes(f"s3://{bucket}/run1/img{i}.tif", _tiff_bytes(np.full((8, 8), i, np.uint8)), storage)
    write_bytes(f"s3://{bucket}/run1/broken.tif", b"not a tiff at all", storage)
    uris = list_stack(f"s3://{bucket}/run1", storage)
    assert len(uris) == 4
    with pytest.warns(UserWarning, match="broken.tif"):
        images, skipped = load_stack(uris, storage, min_images=2)
    assert [float(img.data.max()) for img in images] == [0.0, 1.0, 2.0] and len(skipped) == 1
    with pytest.raises(StackError, match=f"no EM images .* in s3://{bucket}/nothing"):
        list_stack(f"s3://{bucket}/nothing/", storage)

    local = download_to(f"s3://{bucket}/run1/img2.tif", tmp_path / "img2.tif", storage)
    assert read_image(local).data.max() == 2
    upload_file(local, f"s3://{bucket}/copy/img2.tif", storage)
    assert read_bytes(f"s3://{bucket}/copy/img2.tif", storage) == (tmp_path / "img2.tif").read_bytes()
    with pytest.raises(StorageNotFoundError, match="no such S3 object"):
        download_to(f"s3://{bucket}/run1/none.tif", tmp_path / "none.tif", storage)
    assert not (tmp_path / "none.tif").exists()


def test_pyarrow_filesystem_shares_endpoint_and_credentials(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = StorageConfig(s3_endpoint_url=endpoint)
    fs = pyarrow_filesystem(storage)
    with fs.open_output_stream(f"{bucket}/arrow/x.bin") as out:
        out.write(b"from pyarrow")
    assert read_bytes(f"s3://{bucket}/arrow/x.bin", storage) == b"from pyarrow"


def test_check_access_missing_bucket(s3_bucket):
    endpoint, bucket = s3_bucket
    storage = StorageConfig(s3_endpoint_url=endpoint)
    check_access(f"s3://{bucket}/anything/", storage)
    with pytest.raises(StorageNotFoundError) as err:
        check_access("s3://no-such-bucket-here/x", storage)
    assert str(err.value) == f"S3 bucket 'no-such-bucket-here' does not exist (endpoint {endpoint})"
    with pytest.raises(StorageError, match="no such folder|bucket 'no-such-bucket-here'"):
        list_stack("s3://no-such-bucket-here/x", storage)


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_check_access_unreachable_endpoint_fails_fast():
    endpoint = f"http://127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    with pytest.raises(StorageError) as err:
        check_access("s3://bucket/x", StorageConfig(s3_endpoint_url=endpoint))
    assert time.monotonic() - start < 10
    assert str(err.value) == f"cannot reach S3 endpoint {endpoint}: connection refused"
    with pytest.raises(StorageError, match="has no scheme: write http://localhost:9000"):
        check_access("s3://bucket/x", StorageConfig(s3_endpoint_url="localhost:9000"))


def test_check_access_rejected_credentials(s3_bucket, monkeypatch, moto_auth):
    """moto accepts any key unless its IAM checks are on: create a real key, switch them on, try wrong ones."""
    import boto3

    endpoint, bucket = s3_bucket
    storage = StorageConfig(s3_endpoint_url=endpoint)
    iam = boto3.client("iam", endpoint_url=endpoint, region_name="us-east-1")
    user = f"tgan-{uuid.uuid4().hex[:8]}"
    iam.create_user(UserName=user)
    policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "s3:*", "Resource": "*"}]}
    iam.put_user_policy(UserName=user, PolicyName="s3", PolicyDocument=json.dumps(policy))
    key = iam.create_access_key(UserName=user)["AccessKey"]

    previous = moto_auth("0")
    try:
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAWRONGWRONGWRONG0")
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "very-secret-value")
        with pytest.raises(StorageError) as err:
            check_access(f"s3://{bucket}/data", storage)
        assert str(err.value) == f"S3 credentials rejected for s3://{bucket}/data: InvalidAccessKeyId"

        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key["AccessKeyId"])
        with pytest.raises(StorageError, match="credentials rejected .*: SignatureDoesNotMatch") as err:
            check_access(f"s3://{bucket}/data", storage)
        assert "very-secret-value" not in str(err.value) and key["AccessKeyId"] not in str(err.value)

        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", key["SecretAccessKey"])
        check_access(f"s3://{bucket}/data", storage)
    finally:
        moto_auth(previous)


def test_missing_credentials(s3_bucket, monkeypatch, tmp_path):
    endpoint, bucket = s3_bucket
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    # keep boto3 away from a developer's real ~/.aws and from the EC2 metadata service
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no S3 credentials for s3://.*: set AWS_ACCESS_KEY_ID"):
        check_access(f"s3://{bucket}/x", StorageConfig(s3_endpoint_url=endpoint))


def test_run_folder_pull_refreshes_a_stale_manifest_of_the_same_size(s3_bucket, tmp_path, monkeypatch):
    """A working copy left behind by an earlier attempt on this machine: S3 moved on, the manifest kept its size."""
    from tgan_ray.config import StorageConfig
    from tgan_ray.io.storage import list_sizes
    from tgan_ray.run_folder import RunFolder

    endpoint, bucket = s3_bucket
    monkeypatch.setenv("TGAN_CACHE_DIR", str(tmp_path))
    storage = StorageConfig(s3_endpoint_url=endpoint)
    folder = RunFolder(f"s3://{bucket}/runs/r1", storage)
    (folder.local / "work").mkdir(parents=True)
    (folder.local / "manifest.json").write_text('{"steps": {"a": 1}}')
    (folder.local / "work" / "f.npy").write_bytes(b"1234")
    folder.push()
    assert sorted(list_sizes(f"s3://{bucket}/runs/r1", storage)) == ["manifest.json", "work/f.npy"]
    s3_client(storage).put_object(Bucket=bucket, Key="runs/r1/manifest.json", Body=b'{"steps": {"b": 2}}')
    RunFolder(f"s3://{bucket}/runs/r1", storage).pull()
    assert (folder.local / "manifest.json").read_text() == '{"steps": {"b": 2}}'

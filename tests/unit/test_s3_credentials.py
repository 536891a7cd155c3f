"""The credentials preflight: a run on s3:// without AWS credentials stops before Ray with one line saying how to
provide them (keys or an IAM role), and never prints a credential.

Every test runs with the AWS environment cleared, empty shared credential/config files and the instance metadata
lookup disabled, so botocore's chain finds nothing on this machine and makes no network call.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from orchestration.cluster import check_s3_credentials
from orchestration.pretrain import main
from tests.conftest import REPO

S3_RUN = {"storage.path": "s3://volta-checkpoints/runs", "data.train_shards": "data/synth/train"}


@pytest.fixture(autouse=True)
def no_aws_credentials(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An environment in which botocore's default chain has nothing to find; returns the credentials file."""
    for key in list(os.environ):
        if key.startswith("AWS_"):
            monkeypatch.delenv(key)
    credentials, config = tmp_path / "aws-credentials", tmp_path / "aws-config"
    credentials.write_text("")
    config.write_text("")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(credentials))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(config))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    return credentials


def test_local_locations_need_no_credentials() -> None:
    assert (
        check_s3_credentials({"storage.path": "runs/ray", "data.train_shards": ["a/{0..1}.tar", "b"]}) is None
    )
    assert check_s3_credentials({"data.val_shards": None}) is None


def test_missing_credentials_name_the_fields_and_both_ways_to_provide_them() -> None:
    problem = check_s3_credentials(
        {**S3_RUN, "data.val_shards": ["data/synth/val", "s3://volta-data/val/{0..4}.tar"]}
    )
    assert problem is not None and "\n" not in problem
    assert problem.startswith("storage.path, data.val_shards on s3:// but no AWS credentials found")
    assert "data.train_shards" not in problem  # local: not the problem
    for way in (
        "AWS_ACCESS_KEY_ID",
        "AWS_SECRET_ACCESS_KEY",
        "volta-s3 Secret",
        "eks.amazonaws.com/role-arn",
    ):
        assert way in problem, way


def test_credentials_from_the_environment_or_a_shared_file_are_found(
    monkeypatch: pytest.MonkeyPatch, no_aws_credentials: Path
) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY")
    assert check_s3_credentials(S3_RUN) is None
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    assert check_s3_credentials(S3_RUN) is not None
    no_aws_credentials.write_text(
        "[default]\naws_access_key_id = AKIAIOSFODNN7EXAMPLE\naws_secret_access_key = wJalrXUtnFEMIEXAMPLEKEY\n"
    )
    assert check_s3_credentials(S3_RUN) is None


def test_unusable_credentials_are_reported_without_their_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "AKIAIOSFODNN7EXAMPLE")  # half a key pair
    problem = check_s3_credentials(S3_RUN)
    assert problem is not None and "\n" not in problem
    assert "PartialCredentialsError" in problem and "AKIAIOSFODNN7EXAMPLE" not in problem
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.setenv("AWS_PROFILE", "no-such-profile")
    problem = check_s3_credentials(S3_RUN)
    assert problem is not None and "ProfileNotFound" in problem


def test_pretrain_stops_before_ray_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--config",
        str(REPO / "configs" / "debug.yaml"),
        "--check",
        "--set",
        "storage.path=s3://volta-ckpt/x",
    ]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("volta-pretrain: storage.path on s3:// but no AWS credentials found: ")

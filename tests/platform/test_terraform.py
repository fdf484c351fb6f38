"""terraform/: `terraform fmt -check`, structural checks of the HCL (python-hcl2) for pinned
versions, encryption, public access blocks and wildcard-free IAM, and a checkov scan with no
failed check left and every skipped one carrying a written reason."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import hcl2
import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
TERRAFORM_DIR = REPO_ROOT / "terraform"
CHECKOV = REPO_ROOT / ".venv-checkov" / "bin" / "checkov"
EXACT_VERSION = re.compile(r"^\d+\.\d+\.\d+$")
BOUNDED_CONSTRAINT = re.compile(r"^(~>\s*\d+\.\d+\.\d+|=?\s*\d+\.\d+\.\d+)$")
SKIP_COMMENT = re.compile(r"#checkov:skip=([A-Z0-9_]+):(.*)")


@pytest.fixture(scope="module")
def hcl() -> dict[str, list[dict[str, Any]]]:
    """Every top-level block of every .tf file, by block type."""
    blocks: dict[str, list[dict[str, Any]]] = {}
    for path in sorted(TERRAFORM_DIR.glob("*.tf")):
        with path.open() as f:
            for block_type, items in plain(hcl2.load(f)).items():
                blocks.setdefault(block_type, []).extend(items)
    return blocks


def plain(node: Any) -> Any:
    """python-hcl2 keeps HCL's quotes on names and literal strings: drop them (and its
    ``__is_block__`` markers) so blocks read like Terraform's JSON syntax."""
    if isinstance(node, dict):
        return {unquote(k): plain(v) for k, v in node.items() if k != "__is_block__"}
    if isinstance(node, list):
        return [plain(v) for v in node]
    return unquote(node)


def resources(hcl: dict, kind: str) -> dict[str, dict[str, Any]]:
    return {
        name: body
        for block in hcl.get("resource", [])
        for name, body in block.get(kind, {}).items()
    }


def unquote(value: Any) -> Any:
    if isinstance(value, str) and len(value) >= 2 and value[0] == value[-1] == '"':
        return value[1:-1]
    return value


def test_terraform_fmt_check() -> None:
    terraform = shutil.which("terraform")
    if terraform is None:
        pytest.skip("terraform not on PATH (only `terraform fmt` is used; no providers needed)")
    done = subprocess.run(
        [terraform, "fmt", "-check", "-recursive", "-diff", str(TERRAFORM_DIR)],
        capture_output=True, text=True, env={**os.environ, "TF_CLI_CONFIG_FILE": "/dev/null"},
        timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_modules_providers_and_charts_are_pinned(hcl: dict) -> None:
    modules = {n: b for block in hcl["module"] for n, b in block.items()}
    assert set(modules) == {"vpc", "eks", "karpenter"}
    for name, body in modules.items():
        assert EXACT_VERSION.match(unquote(body["version"])), name
    (settings,) = hcl["terraform"]
    (providers,) = settings["required_providers"]
    assert set(providers) == {"aws", "helm", "kubernetes"}
    for name, spec in providers.items():
        assert BOUNDED_CONSTRAINT.match(unquote(spec["version"])), (name, spec["version"])
    (charts,) = [b["charts"] for block in hcl["locals"] for b in [block] if "charts" in b]
    for name, chart in charts.items():
        assert EXACT_VERSION.match(unquote(chart["version"])), name
    for name, release in resources(hcl, "helm_release").items():
        chart = unquote(release["chart"])
        # A release is either a pinned upstream chart or one of ours under ../platform.
        assert "local.charts." in chart or "${local.platform}/" in chart, name


def test_buckets_are_encrypted_private_versioned_and_tls_only(hcl: dict) -> None:
    buckets = resources(hcl, "aws_s3_bucket")
    assert set(buckets) == {"data", "logs"}
    locals_ = {k: v for block in hcl["locals"] for k, v in block.items()}
    assert set(locals_["buckets"]) == {"models", "kv", "mlflow"}
    kinds = (
        "aws_s3_bucket_public_access_block",
        "aws_s3_bucket_versioning",
        "aws_s3_bucket_ownership_controls",
        "aws_s3_bucket_lifecycle_configuration",
    )
    for kind in kinds:
        found = resources(hcl, kind)
        assert set(found) == {"data", "logs"}, kind
        assert unquote(found["data"]["for_each"]) == "${local.buckets}", kind
    for name, block in resources(hcl, "aws_s3_bucket_public_access_block").items():
        for key in ("block_public_acls", "block_public_policy", "ignore_public_acls",
                    "restrict_public_buckets"):  # fmt: skip
            assert block[key] is True, (name, key)
    (rule,) = resources(hcl, "aws_s3_bucket_server_side_encryption_configuration")["data"]["rule"]
    (default,) = rule["apply_server_side_encryption_by_default"]
    assert unquote(default["sse_algorithm"]) == "aws:kms"
    assert "aws_kms_key.strata" in default["kms_master_key_id"]
    policy = {
        n: b for block in hcl["data"] for n, b in block.get("aws_iam_policy_document", {}).items()
    }
    (deny,) = policy["tls_only"]["statement"]
    assert unquote(deny["effect"]) == "Deny"
    assert deny["condition"][0]["values"] == ["false"]


def test_storage_and_database_are_encrypted_and_private(hcl: dict) -> None:
    fsx = resources(hcl, "aws_fsx_lustre_file_system")["models"]
    assert "aws_kms_key.strata" in fsx["kms_key_id"]
    dra = resources(hcl, "aws_fsx_data_repository_association")["models"]
    assert 'aws_s3_bucket.data["models"]' in dra["data_repository_path"]
    assert dra["s3"][0]["auto_import_policy"][0]["events"] == ["NEW", "CHANGED", "DELETED"]
    efs = resources(hcl, "aws_efs_file_system")["models"]
    assert efs["encrypted"] is True
    db = resources(hcl, "aws_db_instance")["mlflow"]
    assert db["storage_encrypted"] is True and db["publicly_accessible"] is False
    assert db["manage_master_user_password"] is True and "password" not in db
    (key,) = resources(hcl, "aws_kms_key").values()
    assert key["enable_key_rotation"] is True


def iam_statements(hcl: dict) -> dict[str, list[dict[str, Any]]]:
    docs = {
        n: b for block in hcl["data"] for n, b in block.get("aws_iam_policy_document", {}).items()
    }
    return {name: doc["statement"] for name, doc in docs.items()}


def test_no_wildcard_iam_actions(hcl: dict) -> None:
    locals_ = {k: v for block in hcl["locals"] for k, v in block.items()}
    for name, statements in iam_statements(hcl).items():
        for statement in statements:
            actions = statement.get("actions", [])
            if isinstance(actions, str):  # a local list, e.g. ${local.kms_read}
                actions = locals_[actions.removeprefix("${local.").removesuffix("}")]
            assert actions, (name, statement)
            assert not any("*" in a for a in actions), (name, actions)
            if unquote(statement.get("effect", "Allow")) == "Allow" and name != "kms":
                # Only a key policy may say "*" (there it means the key itself).
                assert "*" not in statement.get("resources", []), (name, statement)


def test_pod_identity_roles_are_least_privilege(hcl: dict) -> None:
    statements = iam_statements(hcl)

    def grants(name: str) -> set[tuple[str, str]]:
        locals_ = {k: v for block in hcl["locals"] for k, v in block.items()}
        out = set()
        for s in statements[name]:
            actions = s["actions"]
            if isinstance(actions, str):
                actions = locals_[actions.removeprefix("${local.").removesuffix("}")]
            out |= {(a, r) for a in actions for r in s["resources"]}
        return out

    workflows = grants("workflows")
    assert {a for a, _ in workflows} == {"s3:ListBucket", "s3:GetObject", "s3:GetObjectVersion",
                                         "kms:Decrypt", "kms:DescribeKey"}  # fmt: skip
    assert all("models" in r or "kms" in r for _, r in workflows)  # the models bucket only
    workers = grants("workers")
    writes = {r for a, r in workers if a in ("s3:PutObject", "s3:DeleteObject")}
    assert writes == {"${local.kv_bucket}/${local.kv_prefix}*"}
    mlflow = grants("mlflow")
    assert {r for a, r in mlflow if a.startswith("s3:") and a != "s3:ListBucket"} == {
        "${local.mlflow_bucket}/${local.mlflow_prefix}*"
    }
    roles = {k: v for block in hcl["locals"] for k, v in block.items()}["pod_roles"]
    assert set(roles) == {"workflows", "workers", "mlflow"}
    assert (
        resources(hcl, "aws_eks_pod_identity_association")["pod"]["for_each"]
        == "${local.pod_roles}"
    )


@pytest.mark.slow
def test_checkov_passes_with_every_skip_explained() -> None:
    if not CHECKOV.exists():
        pytest.skip(f"checkov not installed at {CHECKOV} (make checkov-install)")
    done = subprocess.run(
        [str(CHECKOV), "-d", str(TERRAFORM_DIR), "--framework", "terraform", "--skip-download",
         "-o", "json"],
        capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    report = json.loads(done.stdout)
    results = report["results"]
    failed = [(c["check_id"], c["resource"]) for c in results["failed_checks"]]
    assert failed == [], failed
    assert report["summary"]["passed"] > 150
    reasons = {}
    for path in TERRAFORM_DIR.glob("*.tf"):
        for check_id, reason in SKIP_COMMENT.findall(path.read_text()):
            assert len(reason.strip()) > 20, (check_id, reason)
            reasons[check_id] = reason
    readme = (TERRAFORM_DIR / "README.md").read_text()
    for check in results["skipped_checks"]:
        assert check["check_id"] in reasons, check["check_id"]
        assert check["check_id"] in readme, f"{check['check_id']} missing from terraform/README.md"

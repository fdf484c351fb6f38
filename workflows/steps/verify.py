"""``verify``: a staged model directory is intact and loads.

Checks, in order, each raising ``VerifyError`` that names the file at fault:

1. every file matches ``strata-manifest.json`` (size and sha256; nothing missing or extra);
2. the manifest matches the source's published manifest, when the source had one;
3. ``config.json`` parses into the engine's ``ModelArchConfig``;
4. the tokenizer loads with ``transformers.AutoTokenizer`` and fits the config's vocabulary;
5. every safetensors tensor has the shape the config implies (read from the file headers only).

Owns these checks; never downloads, writes or moves files.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from serving.engine.models.loader import ModelArchConfig, load_arch_config, weight_files
from workflows.steps.manifest import (
    MANIFEST_FILENAME,
    Manifest,
    ManifestError,
    file_sha256,
    model_files,
    read_manifest,
)

# Tensors a checkpoint may carry that the engine recomputes instead of loading.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class VerifyError(Exception):
    """A staged model failed a check; ``path`` is the file at fault, relative to the model
    directory, when there is one."""

    def __init__(self, message: str, path: str | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True)
class VerifyResult:
    staged_dir: Path
    manifest_digest: str
    num_files: int
    total_bytes: int
    checked_published: bool
    architecture: str
    num_layers: int
    num_tensors: int
    num_parameters: int
    tokenizer_class: str


def verify(staged_dir: Path) -> VerifyResult:
    """Run every check on ``staged_dir``; see the module docstring."""
    staged_dir = Path(staged_dir)
    manifest = verify_checksums(staged_dir)
    check_published(manifest)
    try:
        arch = load_arch_config(staged_dir)
    except ValueError as exc:
        raise VerifyError(str(exc), "config.json") from exc
    tokenizer_class = verify_tokenizer(staged_dir, arch)
    num_tensors, num_parameters = verify_weight_shapes(staged_dir, arch)
    return VerifyResult(
        staged_dir=staged_dir,
        manifest_digest=manifest.digest,
        num_files=len(manifest.files),
        total_bytes=manifest.total_bytes,
        checked_published=manifest.published is not None,
        architecture=arch.architecture,
        num_layers=arch.num_layers,
        num_tensors=num_tensors,
        num_parameters=num_parameters,
        tokenizer_class=tokenizer_class,
    )


def verify_checksums(staged_dir: Path) -> Manifest:
    """Re-hash every file and compare it with the directory's manifest; returns the manifest."""
    try:
        manifest = read_manifest(staged_dir)
    except ManifestError as exc:
        raise VerifyError(str(exc), MANIFEST_FILENAME) from exc
    expected = manifest.by_path()
    for rel in model_files(staged_dir):
        if rel not in expected:
            raise VerifyError(f"{staged_dir / rel}: not listed in {MANIFEST_FILENAME}", rel)
    for entry in manifest.files:
        path = staged_dir / entry.path
        if not path.is_file():
            raise VerifyError(f"{path}: listed in {MANIFEST_FILENAME} but missing", entry.path)
        size = path.stat().st_size
        if size != entry.size:
            raise VerifyError(
                f"{path}: {size} bytes, {MANIFEST_FILENAME} says {entry.size}", entry.path
            )
        sha256 = file_sha256(path)
        if sha256 != entry.sha256:
            raise VerifyError(
                f"{path}: sha256 {sha256} does not match {MANIFEST_FILENAME} ({entry.sha256})",
                entry.path,
            )
    return manifest


def check_published(manifest: Manifest) -> None:
    """The manifest lists exactly the files of the source's published manifest, byte for byte.
    A manifest without a published one passes."""
    if manifest.published is None:
        return
    where = f" (from {manifest.source_uri})" if manifest.source_uri else ""
    published = manifest.published.by_path()
    for entry in manifest.files:
        want = published.pop(entry.path, None)
        if want is None:
            raise VerifyError(
                f"{entry.path}{where}: not in the source's published manifest", entry.path
            )
        if (entry.size, entry.sha256) != (want.size, want.sha256):
            raise VerifyError(
                f"{entry.path}{where}: sha256 {entry.sha256} ({entry.size} bytes) does not match "
                f"the source's published manifest ({want.sha256}, {want.size} bytes): the object "
                "is corrupt or was replaced",
                entry.path,
            )
    if published:
        missing = sorted(published)[0]
        raise VerifyError(
            f"{missing}{where}: in the source's published manifest but not staged", missing
        )


def verify_tokenizer(staged_dir: Path, arch: ModelArchConfig) -> str:
    """Load the tokenizer; its vocabulary must fit the embedding. Returns its class name."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(staged_dir), local_files_only=True)
    except Exception as exc:
        raise VerifyError(f"{staged_dir}: the tokenizer does not load: {exc}") from exc
    num_tokens = len(tokenizer)
    if num_tokens > arch.vocab_size:
        raise VerifyError(
            f"{staged_dir}: the tokenizer has {num_tokens} tokens but config.json's vocab_size "
            f"is {arch.vocab_size}",
            "config.json",
        )
    return type(tokenizer).__name__


def expected_shapes(arch: ModelArchConfig) -> dict[str, tuple[tuple[int, ...], str]]:
    """Checkpoint tensor name -> (shape, the config fields behind it), as the engine loads them.
    ``lm_head.weight`` is listed even when embeddings are tied (then it is optional)."""
    h, v, i = arch.hidden_size, arch.vocab_size, arch.intermediate_size
    q, kv = arch.num_heads * arch.head_dim, arch.num_kv_heads * arch.head_dim
    q_why, kv_why = "num_attention_heads*head_dim", "num_key_value_heads*head_dim"
    shapes = {
        "model.embed_tokens.weight": ((v, h), "vocab_size, hidden_size"),
        "lm_head.weight": ((v, h), "vocab_size, hidden_size"),
        "model.norm.weight": ((h,), "hidden_size"),
    }
    for layer in range(arch.num_layers):
        p = f"model.layers.{layer}."
        attn, mlp = p + "self_attn.", p + "mlp."
        shapes |= {
            p + "input_layernorm.weight": ((h,), "hidden_size"),
            p + "post_attention_layernorm.weight": ((h,), "hidden_size"),
            attn + "q_proj.weight": ((q, h), f"{q_why}, hidden_size"),
            attn + "k_proj.weight": ((kv, h), f"{kv_why}, hidden_size"),
            attn + "v_proj.weight": ((kv, h), f"{kv_why}, hidden_size"),
            attn + "o_proj.weight": ((h, q), f"hidden_size, {q_why}"),
            mlp + "gate_proj.weight": ((i, h), "intermediate_size, hidden_size"),
            mlp + "up_proj.weight": ((i, h), "intermediate_size, hidden_size"),
            mlp + "down_proj.weight": ((h, i), "hidden_size, intermediate_size"),
        }
        if arch.attention_bias:
            shapes[attn + "q_proj.bias"] = ((q,), q_why)
            shapes[attn + "k_proj.bias"] = ((kv,), kv_why)
            shapes[attn + "v_proj.bias"] = ((kv,), kv_why)
        if arch.o_proj_bias:
            shapes[attn + "o_proj.bias"] = ((h,), "hidden_size")
        if arch.mlp_bias:
            shapes[mlp + "gate_proj.bias"] = ((i,), "intermediate_size")
            shapes[mlp + "up_proj.bias"] = ((i,), "intermediate_size")
            shapes[mlp + "down_proj.bias"] = ((h,), "hidden_size")
    return shapes


def verify_weight_shapes(staged_dir: Path, arch: ModelArchConfig) -> tuple[int, int]:
    """Every tensor the engine needs is present once with the shape the config implies, and no
    tensor is unknown. Reads safetensors headers only. Returns (tensors, parameters)."""
    from safetensors import safe_open

    try:
        files = weight_files(staged_dir)
    except ValueError as exc:
        raise VerifyError(str(exc)) from exc
    wanted = expected_shapes(arch)
    seen: dict[str, str] = {}
    num_parameters = 0
    for path in files:
        rel = path.relative_to(staged_dir).as_posix()
        try:
            with safe_open(str(path), framework="pt") as f:
                shapes = {name: tuple(f.get_slice(name).get_shape()) for name in f.keys()}  # noqa: SIM118
        except Exception as exc:
            raise VerifyError(f"{path}: not a readable safetensors file: {exc}", rel) from exc
        for name, shape in shapes.items():
            if name.endswith(_IGNORED_SUFFIXES):
                continue
            _check_tensor(path, rel, name, shape, wanted, seen, arch)
            seen[name] = rel
            num_parameters += _numel(shape)
    missing = sorted(set(wanted) - set(seen) - {"lm_head.weight"})
    if "lm_head.weight" not in seen and not arch.tie_word_embeddings:
        missing.insert(0, "lm_head.weight")
    if missing:
        raise VerifyError(
            f"{staged_dir}: the weights lack {len(missing)} tensor(s) config.json implies "
            f"(num_hidden_layers={arch.num_layers}): {', '.join(missing[:5])}"
        )
    return len(seen), num_parameters


def _check_tensor(
    path: Path,
    rel: str,
    name: str,
    shape: tuple[int, ...],
    wanted: dict[str, tuple[tuple[int, ...], str]],
    seen: dict[str, str],
    arch: ModelArchConfig,
) -> None:
    if name in seen:
        raise VerifyError(f"{path}: tensor {name!r} also appears in {seen[name]}", rel)
    if name not in wanted:
        raise VerifyError(
            f"{path}: tensor {name!r} matches no parameter of a {arch.architecture} with "
            f"num_hidden_layers={arch.num_layers} (config.json)",
            rel,
        )
    want, why = wanted[name]
    if shape != want:
        raise VerifyError(
            f"{path}: tensor {name!r} has shape {list(shape)}, config.json implies {list(want)} "
            f"({why})",
            rel,
        )


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n

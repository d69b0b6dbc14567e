"""The embeddings parquet: the one place that knows its columns, shapes and dtype.

One row per image, keyed by `image_hash` (sha256 of the pixels), and one row per validation prompt, keyed by
`prompt:<sha256 of the prompt>`. The tensors are flattened float lists, as in diffusers' research project
(`examples/research_projects/flux_lora_quantization`), so its files read here and ours read there. Ours also
carry a manifest in the parquet's key-value metadata: shapes, dtype, the model and `max_sequence_length` they
came from, so readers never guess and a stale cache is caught.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from flux_qlora import readers
from flux_qlora.data import Sample
from flux_qlora.errors import UserError
from flux_qlora.families import Family, check_same_family
from flux_qlora.files import written_atomically

logger = logging.getLogger(__name__)

MANIFEST_KEY = b"flux_qlora"
LAYOUT_VERSION = 1
TENSOR_COLUMNS = ("prompt_embeds", "pooled_prompt_embeds", "text_ids")
PROMPT_KEY_PREFIX = "prompt:"


def prompt_key(prompt: str) -> str:
    return PROMPT_KEY_PREFIX + hashlib.sha256(prompt.encode("utf-8")).hexdigest()


@dataclass
class TextEmbeddings:
    """Stacked embeddings: prompt_embeds (N, seq, dim), pooled_prompt_embeds (N, pooled_dim; (N, 0) for FLUX.2,
    which has no pooled vector), text_ids (seq, 3 or 4 position axes)."""

    keys: list[str]
    captions: list[str]
    prompt_embeds: torch.Tensor
    pooled_prompt_embeds: torch.Tensor
    text_ids: torch.Tensor
    manifest: dict

    def index(self) -> dict[str, int]:
        return {key: i for i, key in enumerate(self.keys)}

    def prompt(self, prompt: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(prompt_embeds (1, seq, dim), pooled (1, pooled_dim)) of a validation prompt stored in the file."""
        i = self.index().get(prompt_key(prompt))
        if i is None and not prompt:
            raise UserError("the embeddings file has no row for the empty caption (--caption_dropout trains on it): "
                            "re-run compute_embeddings.py, which adds it.")
        if i is None:
            raise UserError(f"validation prompt {prompt!r} is not in the embeddings file; re-run compute_embeddings.py "
                            "with --validation_prompt.")
        return self.prompt_embeds[i : i + 1], self.pooled_prompt_embeds[i : i + 1]


def _table(keys: list[str], captions: list[str], prompt_embeds: torch.Tensor, pooled: torch.Tensor,
           text_ids: torch.Tensor) -> pa.Table:
    def flat_lists(t: torch.Tensor) -> pa.Array:
        rows = t.detach().float().cpu().numpy().reshape(t.shape[0], -1)
        if rows.shape[1] == 0:  # FLUX.2's pooled column: no pooled vector, an empty list per row
            return pa.array([[]] * rows.shape[0], pa.list_(pa.float32()))
        return pa.FixedSizeListArray.from_arrays(pa.array(rows.reshape(-1)), rows.shape[1]).cast(pa.list_(pa.float32()))

    n = len(keys)
    ids = text_ids.expand(n, *text_ids.shape[-2:]) if text_ids.dim() == 2 else text_ids
    return pa.table({
        "image_hash": pa.array(keys, pa.string()),
        "caption": pa.array(captions, pa.string()),
        "prompt_embeds": flat_lists(prompt_embeds),
        "pooled_prompt_embeds": flat_lists(pooled),
        "text_ids": flat_lists(ids),
    })


def make_manifest(prompt_embeds_shape, pooled_shape, text_ids_shape, **source) -> dict:
    return {
        "layout_version": LAYOUT_VERSION,
        "dtype": "float32",
        "shapes": {"prompt_embeds": list(prompt_embeds_shape), "pooled_prompt_embeds": list(pooled_shape),
                   "text_ids": list(text_ids_shape)},
        **source,
    }


class EmbeddingsWriter:
    """Writes row batches to numbered part files next to the output, merged atomically by `finish`.

    An interrupted run leaves its finished parts behind; the next run reads them (`done_keys`) and goes on.
    """

    def __init__(self, output_path: str | Path, source: dict, family: str = "flux1", rows_per_part: int = 256):
        self.output_path = Path(output_path)
        self.family = family
        self.parts_dir = self.output_path.with_name(self.output_path.name + ".parts")
        self.source = source
        self.rows_per_part = rows_per_part
        self._pending: list[pa.Table] = []
        self._manifest: dict | None = None

    def done_rows(self) -> dict[str, str]:
        """key -> caption of rows written by an earlier, interrupted run with the same source (model, length)."""
        parts = sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []
        try:
            if parts and read_manifest(parts[0]).get("source") != self.source:
                shutil.rmtree(self.parts_dir)  # made with another model or length: start over
                return {}
            return {k: c for part in parts for k, c in readable_parquet(_keys_and_captions)(part).items()}
        except UserError as error:  # a damaged part: start over, as for another source
            logger.warning("%s; the earlier run's parts are encoded again.", str(error).split(": re-run")[0])
            shutil.rmtree(self.parts_dir)
            return {}

    def write(self, keys, captions, prompt_embeds, pooled, text_ids) -> None:
        if self._manifest is None:
            self._manifest = make_manifest(prompt_embeds.shape[1:], pooled.shape[1:], text_ids.shape[-2:],
                                           source=self.source, family=self.family)
        self._pending.append(_table(keys, captions, prompt_embeds, pooled, text_ids))
        if sum(t.num_rows for t in self._pending) >= self.rows_per_part:
            self._flush()

    def _flush(self) -> None:
        if not self._pending:
            return
        self.parts_dir.mkdir(parents=True, exist_ok=True)
        index = len(list(self.parts_dir.glob("part-*.parquet")))
        table = pa.concat_tables(self._pending)
        table = table.replace_schema_metadata({MANIFEST_KEY: json.dumps(self._manifest).encode()})
        _write_atomically(table, self.parts_dir / f"part-{index:05d}.parquet")
        self._pending = []

    def finish(self, keep: list[str], reuse: Path | None = None) -> int:
        """Writes the rows of `keep` (the last written row of each key) to `output_path`, atomically.

        Rows come from `reuse` (an earlier output) and the parts; returns the row count.
        """
        self._flush()
        parts = sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.is_dir() else []
        sources = ([reuse] if reuse is not None else []) + parts
        if not sources:
            raise UserError("nothing to write: no images and no validation prompts.")
        manifest = self._manifest or read_manifest(sources[-1])
        tables = [pq.read_table(p) for p in sources]
        columns = list(tables[0].schema.names)
        table = pa.concat_tables([t.replace_schema_metadata(None).select(columns) for t in tables])
        last_row = {key: i for i, key in enumerate(table["image_hash"].to_pylist())}
        missing = [key for key in keep if key not in last_row]
        if missing:
            raise RuntimeError(f"{len(missing)} embeddings were never written, e.g. {missing[0]}")
        table = table.take(pa.array([last_row[key] for key in keep]))
        table = table.replace_schema_metadata({MANIFEST_KEY: json.dumps(manifest).encode()})
        _write_atomically(table, self.output_path)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        return table.num_rows


def _keys_and_captions(path: Path) -> dict[str, str]:
    table = pq.read_table(path, columns=["image_hash", "caption"])
    return dict(zip(table["image_hash"].to_pylist(), table["caption"].to_pylist()))


def _write_atomically(table: pa.Table, path: Path) -> None:
    with written_atomically(path) as partial:
        pq.write_table(table, partial)


def readable_parquet(read: Callable) -> Callable:
    """Decorates a reader of the parquet at `path` (its first argument): a truncated or non-parquet file is one
    clear line, not pyarrow's traceback."""

    @functools.wraps(read)
    def reader(path, *args, **kwargs):
        try:
            return read(path, *args, **kwargs)
        except (pa.ArrowException, OSError) as error:
            if isinstance(error, FileNotFoundError):
                raise
            raise UserError(f"{path} is not a readable parquet file ({str(error).splitlines()[0][:120]}): "
                            "re-run compute_embeddings.py to rebuild it.") from None

    return reader


@readable_parquet
def read_manifest(path: str | Path) -> dict:
    return _manifest_of(pq.read_schema(path), path)


def _manifest_of(schema: pa.Schema, path: str | Path) -> dict:
    """The manifest in a parquet's key-value metadata ({} for a file without one: diffusers' research layout)."""
    metadata = schema.metadata or {}
    if MANIFEST_KEY not in metadata:
        return {}
    try:
        manifest = json.loads(metadata[MANIFEST_KEY])
    except (json.JSONDecodeError, UnicodeDecodeError):
        manifest = None
    shapes = manifest.get("shapes", {}) if isinstance(manifest, dict) else None
    if not isinstance(shapes, dict) or not all(isinstance(shapes.get(c, []), list) for c in TENSOR_COLUMNS):
        raise UserError(f"{path}: its flux_qlora manifest is damaged (not the JSON object compute_embeddings.py "
                        "writes): re-run compute_embeddings.py to rebuild it.")
    return manifest


def reusable_rows(path: str | Path, source: dict) -> dict[str, str]:
    """key -> caption of the rows of an existing output made from the same source, to skip recomputing them."""
    path = Path(path)
    if not path.exists():
        return {}
    try:
        if read_manifest(path).get("source") != source:
            return {}
        return readable_parquet(_keys_and_captions)(path)
    except UserError as error:  # a damaged earlier output is rebuilt, not refused
        logger.warning("%s; it is rebuilt.", str(error).split(": re-run")[0])
        return {}


def _infer_shapes(table: pa.Table) -> dict[str, list[int]]:
    """Shapes of a file without our manifest (diffusers' research layout): text_ids is (seq, 3) per row."""
    first = {c: len(table[c][0].values) for c in TENSOR_COLUMNS}
    seq = first["text_ids"] // 3
    if seq == 0 or first["prompt_embeds"] % seq:
        raise UserError(f"cannot tell the shapes of the embeddings: text_ids has {first['text_ids']} values and "
                        f"prompt_embeds {first['prompt_embeds']}; expected (seq, 3) and (seq, dim).")
    return {"prompt_embeds": [seq, first["prompt_embeds"] // seq],
            "pooled_prompt_embeds": [first["pooled_prompt_embeds"]], "text_ids": [seq, 3]}


def _stack(column: pa.ChunkedArray, shape: list[int], name: str, path: Path) -> torch.Tensor:
    values = pa.concat_arrays([chunk.flatten() for chunk in column.chunks]) if column.num_chunks else pa.array([])
    array = values.to_numpy(zero_copy_only=False).astype(np.float32)  # a writable copy
    expected = len(column) * int(np.prod(shape))
    if array.size != expected:
        raise UserError(f"{path}: column {name} holds {array.size} values, expected {len(column)} rows x {shape}; "
                        "the file is damaged or mixes models: re-run compute_embeddings.py.")
    return torch.from_numpy(array.reshape(len(column), *shape))


@readable_parquet
def read_embeddings(path: str | Path) -> TextEmbeddings:
    """Reads our parquet or diffusers' research-project parquet into stacked tensors."""
    path = _existing(path)
    table = pq.read_table(path)
    if table.num_rows == 0:
        raise UserError(f"{path} has no rows: re-run compute_embeddings.py.")
    manifest = read_manifest(path)
    shapes = manifest.get("shapes") or _infer_shapes(table)
    tensors = {c: _stack(table[c], shapes[c], c, path) for c in TENSOR_COLUMNS}
    captions = table["caption"].to_pylist() if "caption" in table.column_names else [""] * table.num_rows
    for name in TENSOR_COLUMNS:
        finite = torch.isfinite(tensors[name].flatten(1)).all(1)
        if not bool(finite.all()):
            row = int((~finite).nonzero()[0])
            raise UserError(f"{path}: {int((~finite).sum())} row(s) of {name} hold NaN/inf (e.g. the caption "
                            f"{captions[row][:60]!r}): re-run compute_embeddings.py (in fp32 or bf16, not fp16).")
    return TextEmbeddings(
        keys=table["image_hash"].to_pylist(), captions=captions,
        prompt_embeds=tensors["prompt_embeds"], pooled_prompt_embeds=tensors["pooled_prompt_embeds"],
        text_ids=tensors["text_ids"][0], manifest=manifest or {"shapes": shapes},
    )


def check_embeddings_fit(embeddings: TextEmbeddings, family: Family, config: dict, path: str) -> None:
    """The parquet was made for this family (its manifest says; files without one are FLUX.1's) and its widths are
    the transformer's text inputs (T5 or the stacked Qwen3/Mistral layers -> joint_attention_dim, CLIP ->
    pooled_projection_dim; FLUX.2 has none): embeddings of other text encoders are refused before the model loads."""
    check_same_family(embeddings.manifest.get("family"), family, f"--data_df_path {path}",
                      "re-run compute_embeddings.py with this model")
    found = {"joint_attention_dim": embeddings.prompt_embeds.shape[-1],
             "pooled_projection_dim": embeddings.pooled_prompt_embeds.shape[-1]}
    expected = {"joint_attention_dim": config.get("joint_attention_dim", found["joint_attention_dim"]),
                "pooled_projection_dim": config.get("pooled_projection_dim", 0)}  # FLUX.2: none
    wrong = [name for name in found if found[name] != expected[name]]
    if wrong:
        name = wrong[0]
        raise UserError(f"{path} holds embeddings {found[name]} wide, the transformer's {name} is {expected[name]}: "
                        "it was made with other text encoders; re-run compute_embeddings.py with this model.")


def match_embeddings(samples: list[Sample], embeddings: TextEmbeddings, data_df_path: str,
                     rerun: str = "re-run compute_embeddings.py with the same data flags") -> TextEmbeddings:
    """The embeddings of exactly these samples, in their order; refuses images the parquet doesn't know, saying
    `rerun` (what to run to fix it)."""
    index = embeddings.index()
    missing = [s for s in samples if s.image_hash not in index]
    if missing:
        raise UserError(
            f"{len(missing)} of {len(samples)} images have no embeddings in {data_df_path} (e.g. {missing[0].source}): "
            f"the images or captions changed since it was made; {rerun}."
        )
    rows = torch.tensor([index[s.image_hash] for s in samples])
    stale = [s.source for s, r in zip(samples, rows.tolist()) if embeddings.captions[r] not in ("", s.caption)]
    if stale:
        raise UserError(f"{len(stale)} caption(s) changed since {data_df_path} was made (e.g. {stale[0]}); "
                        "re-run compute_embeddings.py to update it.")
    return TextEmbeddings(
        keys=[s.image_hash for s in samples], captions=[s.caption for s in samples],
        prompt_embeds=embeddings.prompt_embeds[rows], pooled_prompt_embeds=embeddings.pooled_prompt_embeds[rows],
        text_ids=embeddings.text_ids, manifest=embeddings.manifest,
    )


def _existing(path: str | Path) -> Path:
    """The embeddings file, its schema checked (the columns, and float lists in the tensor columns) before any row
    is read: missing, a folder, empty, not a parquet, or another file's columns are one line each."""
    path = readers.existing_file(path, "embeddings file", f"run compute_embeddings.py --output_path {path} first")
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowException, OSError) as error:
        raise UserError(f"{path} is not a readable parquet file ({str(error).splitlines()[0][:120]}): re-run "
                        "compute_embeddings.py to rebuild it.") from None
    missing = [c for c in ("image_hash", *TENSOR_COLUMNS) if c not in schema.names]
    if missing:
        raise UserError(f"{path} lacks column(s) {missing}: not an embeddings file of compute_embeddings.py; give "
                        "its --output_path, or re-run it.")
    wrong = [f"{c} ({schema.field(c).type})" for c in TENSOR_COLUMNS if not _float_lists(schema.field(c).type)]
    wrong += [f"{c} ({schema.field(c).type})" for c in ("image_hash", "caption")
              if c in schema.names and not pa.types.is_string(schema.field(c).type)
              and not pa.types.is_large_string(schema.field(c).type)]
    if wrong:
        raise UserError(f"{path}: column(s) {', '.join(wrong)} have the wrong type (tensor columns hold lists of "
                        "floats, image_hash and caption strings): re-run compute_embeddings.py to rebuild it.")
    return path


def _float_lists(kind: pa.DataType) -> bool:
    lists = pa.types.is_list(kind) or pa.types.is_large_list(kind) or pa.types.is_fixed_size_list(kind)
    return lists and pa.types.is_floating(kind.value_type)


@readable_parquet
def rows_and_text_tokens(path: str | Path) -> tuple[int, int]:
    """(rows, T5 tokens per caption) of an embeddings file, for the memory plan: from its footer and its manifest
    (or its first row), one open of the file, no tensors loaded."""
    file = pq.ParquetFile(_existing(path))
    shapes = _manifest_of(file.schema_arrow, path).get("shapes")
    if shapes:
        return file.metadata.num_rows, shapes["prompt_embeds"][0]
    first = file.read_row_group(0, columns=["text_ids"])
    return file.metadata.num_rows, len(first["text_ids"][0].values) // 3


TEXT_ENCODERS_GIB = 12.0  # T5-XXL + CLIP in bf16 (~9.8 GB) with room for the encoding: below this, on the CPU


@torch.no_grad()
def validation_embeddings(table, prompts: list[str], family: Family, model: str, device: torch.device,
                          **hub_kwargs) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """prompt -> (prompt_embeds, pooled) for each validation prompt: from the embeddings file, or, for prompts
    compute_embeddings.py didn't embed, encoded here with the text encoders at the file's sequence length, on a GPU
    with room (else on the CPU, in bf16: half of fp32's RAM) and freed before the transformer loads, the GPU's peak
    memory statistics reset so that the run reports its training peak."""
    from flux_qlora.models import load_text_pipeline

    index = table.index()
    missing = [p for p in dict.fromkeys(prompts) if prompt_key(p) not in index]
    embeddings = {p: table.prompt(p) for p in prompts if p not in missing}
    if not missing:
        return embeddings
    on_gpu = device.type == "cuda" and torch.cuda.mem_get_info(device)[0] / 2**30 >= TEXT_ENCODERS_GIB
    where = str(device) if on_gpu else "cpu"
    pipe = load_text_pipeline(family, model, where, dtype=None if on_gpu else torch.bfloat16, **hub_kwargs)
    prompt_embeds, pooled, _ = family.encode_prompts(pipe, missing, table.prompt_embeds.shape[1])  # one pass
    for i, prompt in enumerate(missing):
        embeddings[prompt] = (prompt_embeds[i : i + 1].float().cpu(), pooled[i : i + 1].float().cpu())
    del pipe
    if on_gpu:
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
    logger.info("Encoded %d validation prompt(s) not in the embeddings file on the %s (text encoders freed)",
                len(missing), "GPU" if on_gpu else "CPU")
    return embeddings

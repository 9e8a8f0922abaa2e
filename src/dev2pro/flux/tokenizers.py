"""Tokenizers for text encoders that come without one (the single files of `dev2pro.flux.encoder_files`).

Where a tokenizer is looked for, in order: the folder the user named (`model.tokenizers`, `--tokenizers`), laid out
as an HF snapshot of FLUX.1 (`tokenizer/` = CLIP, `tokenizer_2/` = T5; the two are told apart by folder, never
guessed); `model.path` (the same layout); then the hub ids kohya sd-scripts uses by default
(`openai/clip-vit-large-patch14`, `google/t5-v1_1-xxl`), which transformers finds in the local HF cache or
downloads. When none works the error says exactly which key to set and what to put there, so an offline machine is
one setting away from working.

The FLUX.1 snapshot tokenizers and the kohya defaults are the same vocabularies (CLIP BPE 49408 tokens, T5
SentencePiece 32100 + 28 extra ids), so embeddings do not depend on which one was found.
"""

from __future__ import annotations

from pathlib import Path

from dev2pro.errors import UserError
from dev2pro.flux.encoders import looks_like_hub_id, one_line

HUB_TOKENIZERS = {"clip": "openai/clip-vit-large-patch14", "t5": "google/t5-v1_1-xxl"}
SNAPSHOT_SUBFOLDER = {"clip": "tokenizer", "t5": "tokenizer_2"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "vocab.json")
NAMES = {"clip": "CLIP", "t5": "T5"}


def _has_tokenizer(folder: Path) -> bool:
    return any((folder / f).is_file() for f in TOKENIZER_FILES)


def _auto(ref: str, **kw):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ref, **kw)


def tokenizer_folder(ref: str | Path, kind: str) -> Path | None:
    """The `kind` tokenizer's folder in a local snapshot-layout `ref` (`tokenizer/` or `tokenizer_2/`), or None."""
    cand = Path(ref).expanduser() / SNAPSHOT_SUBFOLDER[kind]
    return cand if cand.is_dir() and _has_tokenizer(cand) else None


def load_tokenizer(kind: str, refs: list[tuple[str, str | None]], for_what: str):
    """The `kind` ('clip' or 't5') tokenizer for the encoder `for_what`. `refs`: (config key, value) pairs tried in
    order (unset values skipped); a value that is set but holds no tokenizer is an error naming its key. Falls back
    to `HUB_TOKENIZERS[kind]` (HF cache or download)."""
    sub = SNAPSHOT_SUBFOLDER[kind]
    for key, ref in refs:
        if not ref:
            continue
        folder = tokenizer_folder(ref, kind)
        if folder is not None:
            try:
                return _auto(str(folder))
            except (OSError, ValueError) as e:
                raise UserError(f"{key} = {ref}: cannot load the {NAMES[kind]} tokenizer in {folder}: "
                                f"{one_line(e)}") from None
        if Path(ref).expanduser().exists() or not looks_like_hub_id(str(ref)):
            if key == "model.path":
                continue  # a model folder without tokenizers (e.g. ComfyUI's): look further
            raise UserError(f"{key} = {ref}: no {NAMES[kind]} tokenizer there (expected {sub}/ with tokenizer.json or "
                            f"tokenizer_config.json, as in a FLUX.1 folder)")
        for kw in ({"subfolder": sub}, {}):
            try:
                return _auto(str(ref), **kw)
            except (OSError, ValueError):
                continue
    hub = HUB_TOKENIZERS[kind]
    try:
        return _auto(hub)
    except (OSError, ValueError) as e:
        raise UserError(
            f"no {NAMES[kind]} tokenizer for {for_what}: set model.tokenizers (dev2pro sample/cache: --tokenizers) "
            f"to a folder holding tokenizer/ and tokenizer_2/ as FLUX.1 has them (e.g. /models/FLUX.1-dev; or "
            f"`huggingface-cli download black-forest-labs/FLUX.1-schnell --include 'tokenizer*' --local-dir DIR` on "
            f"a machine online); the default {hub} could not be loaded: {one_line(e)}") from None

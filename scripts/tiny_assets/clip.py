"""The real CLIP tokenizer's vocabulary (from the open-clip-torch wheel), tiny CLIP text configs, and the Hub
repos' model_index.json, shared by every tiny model repo."""

from __future__ import annotations

import gzip
import importlib.util
import json
import shutil
from pathlib import Path

# The real CLIP vocabulary: 256 byte tokens, the same with an end-of-word mark,
# 48,894 merges, then the two special tokens (49,408 in all).
NUM_CLIP_MERGES = 49152 - 256 - 2
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def byte_to_unicode() -> dict[int, str]:
    """The byte-level BPE alphabet in CLIP's order: printable bytes as themselves first, then the rest above 255."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    table = {byte: chr(byte) for byte in printable}
    table.update({byte: chr(256 + n) for n, byte in enumerate(others)})
    return table


def write_clip_vocab(directory: Path) -> tuple[Path, Path]:
    """Turn open_clip's BPE file into the vocab.json + merges.txt of the real CLIP tokenizer."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or spec.origin is None:
        raise SystemExit("error: the CLIP vocabulary comes from the open-clip-torch wheel; run `make venv` first")
    bpe_file = Path(spec.origin).parent / "bpe_simple_vocab_16e6.txt.gz"
    with gzip.open(bpe_file) as handle:
        lines = handle.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_CLIP_MERGES + 1]]
    alphabet = list(byte_to_unicode().values())
    tokens = alphabet + [t + "</w>" for t in alphabet] + ["".join(m) for m in merges] + [BOS, EOS]
    vocab_file, merges_file = directory / "vocab.json", directory / "merges.txt"
    vocab_file.write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    merges_file.write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n")
    return vocab_file, merges_file


def clip_tokenizer(vocab: tuple[Path, Path], pad_token: str):
    from transformers import CLIPTokenizer

    return CLIPTokenizer(vocab=str(vocab[0]), merges=str(vocab[1]), pad_token=pad_token, model_max_length=77)


def save_tokenizer(tokenizer, directory: Path, vocab: tuple[Path, Path]) -> None:
    """Save like the Hub repos: tokenizer.json and config, plus the slow tokenizer's vocab.json + merges.txt."""
    tokenizer.save_pretrained(directory)
    for file in vocab:
        shutil.copy(file, directory / file.name)


def clip_text_config(tokenizer, hidden: int, hidden_act: str, projection_dim: int | None = None):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=77,
        hidden_act=hidden_act,
        projection_dim=projection_dim or hidden,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def write_model_index(directory: Path, index: dict) -> None:
    """Write model_index.json the way the Hub repos have it (Wuerstchen classes under "wuerstchen")."""
    import diffusers

    (directory / "model_index.json").write_text(
        json.dumps({**index, "_diffusers_version": diffusers.__version__}, indent=2) + "\n"
    )

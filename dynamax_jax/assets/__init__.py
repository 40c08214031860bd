"""Small models shipped with the package.

``mamba2-small``: a Mamba2 pretrained from scratch on the Python standard library's English
prose by ``python -m train.pretrain`` (see ``docs/pretrain.md``); a Hugging Face checkpoint
directory that ``dx.load_pretrained(asset_path("mamba2-small"))`` reads, with its tokenizer.
"""

from __future__ import annotations

from pathlib import Path

ASSET_DIR = Path(__file__).resolve().parent


def asset_path(name: str) -> Path:
    """Directory of the shipped model ``name`` (e.g. ``"mamba2-small"``)."""
    path = ASSET_DIR / name
    if not (path / "config.json").is_file():
        available = sorted(p.name for p in ASSET_DIR.iterdir() if (p / "config.json").is_file())
        raise FileNotFoundError(f"no shipped model {name!r}; available: {', '.join(available) or 'none'}")
    return path

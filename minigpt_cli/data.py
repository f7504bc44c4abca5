"""Finding, downloading and checking text, and the raw-text tf.data pipelines.

Text comes from ``data.train`` / ``data.valid`` (a file, a folder of ``.txt``
files, or a glob) or, when those are empty, from the SimpleBooks archive at
``data.url``, downloaded once and cached, as the reference example does.
"""

from __future__ import annotations

import glob
import hashlib
import os
import shutil
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from minigpt_cli.config import DataConfig
from minigpt_cli.errors import MinigptError

OFFLINE_HINT = (
    "to work offline, point data.train and data.valid at local text "
    "(--set data.train=PATH --set data.valid=PATH) or data.url at a mirror"
)


def cache_dir(cfg: DataConfig) -> Path:
    """Where downloads are kept: ``data.cache_dir``, $MINIGPT_CACHE, or ~/.cache/minigpt."""
    if cfg.cache_dir:
        return Path(cfg.cache_dir).expanduser()
    return Path(os.environ.get("MINIGPT_CACHE", "~/.cache/minigpt")).expanduser()


def _find_subset(root: Path, subset: str) -> Path | None:
    hits = sorted(p for p in root.rglob(subset) if p.is_dir())
    return hits[0] if hits else None


def _unsafe_member(names: list[str], folder: Path) -> str | None:
    """The first archive member that would land outside ``folder`` (``../x``, ``/abs/x``), or None."""
    base = folder.resolve()
    for name in names:
        if name.startswith(("/", "\\")) or not (base / name).resolve().is_relative_to(base):
            return name
    return None


def download_corpus(cfg: DataConfig, quiet: bool = False) -> Path:
    """Download and extract the archive at ``cfg.url`` once; return the subset folder.

    The archive is fetched to a temporary name and extracted into a temporary
    folder, each renamed into place when complete, so an interrupted download
    is never mistaken for a finished one.
    """
    import keras

    key = hashlib.sha1(cfg.url.encode()).hexdigest()[:10]
    name = os.path.basename(urlsplit(cfg.url).path) or "corpus.zip"
    root = cache_dir(cfg) / f"{Path(name).stem}-{key}"
    extracted = root / "extracted"
    if not extracted.is_dir():
        archive = root / name
        root.mkdir(parents=True, exist_ok=True)
        if not archive.is_file():
            partial = f".{name}.partial"
            try:
                got = keras.utils.get_file(
                    fname=partial, origin=cfg.url, cache_dir=str(root), cache_subdir="", force_download=True
                )
            except Exception as e:  # keras wraps every network error in a bare Exception
                raise MinigptError(f"could not download {cfg.url} ({e}); {OFFLINE_HINT}") from None
            os.replace(got, archive)
        tmp = Path(tempfile.mkdtemp(dir=root, prefix=".extract-"))
        try:
            with zipfile.ZipFile(archive) as zf:
                unsafe = _unsafe_member(zf.namelist(), tmp)
                if unsafe is not None:
                    archive.unlink()
                    raise MinigptError(
                        f"the archive from {cfg.url} has a member outside its folder ({unsafe!r}); nothing was "
                        f"extracted and the download was deleted. Check data.url. {OFFLINE_HINT}"
                    )
                zf.extractall(tmp)
        except zipfile.BadZipFile:
            archive.unlink()
            shutil.rmtree(tmp, ignore_errors=True)
            raise MinigptError(f"{cfg.url} did not give a zip archive; check data.url. {OFFLINE_HINT}") from None
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        os.replace(tmp, extracted)
    folder = _find_subset(extracted, cfg.subset)
    if folder is None:
        raise MinigptError(f"the archive from {cfg.url} has no folder '{cfg.subset}'; check data.subset")
    return folder


def expand_paths(spec: str, what: str) -> list[Path]:
    """A file, a folder of .txt files, or a glob -> sorted list of files."""
    path = Path(spec).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.glob("*.txt") if p.is_file())
        if not files:
            raise MinigptError(f"{what}: folder {path} has no .txt files")
        return files
    if glob.has_magic(spec):
        files = sorted(Path(p) for p in glob.glob(os.path.expanduser(spec), recursive=True) if Path(p).is_file())
        if not files:
            raise MinigptError(f"{what}: no file matches {spec!r}")
        return files
    raise MinigptError(f"{what}: no such file or folder: {spec}")


def text_files(cfg: DataConfig, split: str) -> list[Path]:
    """The files of ``split`` ("train" or "valid")."""
    spec = cfg.train if split == "train" else cfg.valid
    if spec:
        return expand_paths(spec, f"data.{split}")
    return [download_corpus(cfg) / f"{split}.txt"]


@dataclass(frozen=True)
class TextStats:
    files: int
    lines: int
    kept_lines: int
    characters: int


def check_text(files: list[Path], min_string_len: int, what: str) -> TextStats:
    """Read ``files`` once: refuse non-UTF-8, empty, or too-short text with a clear error.

    Line length is counted in UTF-8 bytes, as the reference's ``tf.strings.length`` does.
    """
    lines = kept = chars = 0
    for path in files:
        try:
            with open(path, "rb") as f:
                for lines_in_file, line in enumerate(f, 1):
                    line = line.rstrip(b"\r\n")
                    try:
                        chars += len(line.decode("utf-8"))
                    except UnicodeDecodeError as e:
                        raise MinigptError(
                            f"{what}: {path} is not valid UTF-8 text (line {lines_in_file}, byte {e.start + 1}); "
                            "convert it to UTF-8"
                        ) from None
                    lines += 1
                    kept += len(line) > min_string_len
        except OSError as e:
            raise MinigptError(f"{what}: cannot read {path}: {e.strerror}") from None
    if chars == 0:
        raise MinigptError(f"{what}: the text in {', '.join(map(str, files))} is empty")
    if kept == 0:
        raise MinigptError(
            f"{what}: no line is longer than data.min_string_len={min_string_len} bytes; "
            "lower it (e.g. --set data.min_string_len=64) or use text with longer paragraphs"
        )
    return TextStats(files=len(files), lines=lines, kept_lines=kept, characters=chars)


def line_threshold(windows: str, min_string_len: int) -> int:
    """Lines of at most this many bytes are dropped: ``min_string_len`` for reference windows, none when packed."""
    return -1 if windows == "packed" else min_string_len


def raw_text_dataset(files: list[Path], cfg: DataConfig):
    """Lines longer than the threshold, in batches: what the vocabulary is learned from."""
    import tensorflow as tf

    threshold = line_threshold(cfg.windows, cfg.min_string_len)
    ds = tf.data.TextLineDataset([str(f) for f in files])
    ds = ds.filter(lambda x: tf.strings.length(x) > threshold)
    return ds.batch(cfg.batch_size)

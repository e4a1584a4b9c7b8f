"""Image sources for ingest: the Fashion-MNIST idx files, or a local folder / s3:// prefix of images (one level of
optional class sub-folders), decoded and normalized to fixed-size uint8 arrays; files that cannot be used come back
as a stable kind and a reason saying what to do."""
from __future__ import annotations

import gzip
import hashlib
import io
import os
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

from oar_core.storage import fs_for, is_remote, join, storage_errors

FASHION_MNIST_CLASSES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]


IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".webp"}


IGNORED_KINDS = ("hidden", "empty_folder")  # listed in the report, never counted as skipped images


@dataclass(frozen=True)
class ImageFormat:
    """What every image is brought to: size x size pixels, 1 or 3 channels; another size is resized or rejected."""
    size: int
    channels: int
    on_size_mismatch: str = "resize"  # or reject


def normalize_image(img: Image.Image, fmt: ImageFormat, changed: Counter | None = None
                    ) -> tuple[np.ndarray | None, str | None]:
    """PIL image -> (H,W,C) uint8 in `fmt`, or (None, reason) when it must be skipped. `changed` counts what was
    done to the images kept (a mode conversion, a resize, a crop to square), for the ingest report."""
    changed = Counter() if changed is None else changed
    mode = "L" if fmt.channels == 1 else "RGB"
    if img.mode != mode:
        changed[f"converted {img.mode} to {mode}" + (" (alpha dropped)" if "A" in img.mode else "")] += 1
    img = _to_8bit(img).convert(mode)
    if img.size != (fmt.size, fmt.size):
        if fmt.on_size_mismatch == "reject":
            return None, f"size {img.size[0]}x{img.size[1]} != {fmt.size}x{fmt.size} (on_size_mismatch=reject)"
        changed[f"resized to {fmt.size}x{fmt.size}"] += 1
        if img.size[0] != img.size[1]:
            changed["center-cropped to a square (not square)"] += 1
        img = _square_resize(img, fmt.size)
    arr_HWC = np.asarray(img, dtype=np.uint8).reshape(fmt.size, fmt.size, fmt.channels)
    return arr_HWC, None


def _to_8bit(img: Image.Image) -> Image.Image:
    """16/32-bit grayscale (16-bit PNG/TIFF) -> 8-bit "L" by scaling; PIL's convert("L") would clip every value
    above 255 to white. Mode "I" is taken as 16-bit data when any value exceeds 255."""
    if not (img.mode.startswith("I;16") or img.mode == "I"):
        return img
    a = np.asarray(img).astype(np.float64)
    if img.mode != "I" or a.max() > 255:
        a = a / 257.0
    return Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8))


def _square_resize(img: Image.Image, size: int) -> Image.Image:
    # center-crop to a square first so non-square photos are not squashed; LANCZOS is the best
    # anti-aliasing filter when shrinking, BICUBIC avoids LANCZOS ringing when enlarging
    w, h = img.size
    if w != h:
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        img = img.crop((left, top, left + s, top + s))
    resample = Image.LANCZOS if img.size[0] > size else Image.BICUBIC
    return img.resize((size, size), resample)


def skip(rel: str, kind: str, reason: str) -> dict:
    """A skipped or ignored file: `kind` is stable (counted at the end of the stage), `reason` says what to do."""
    return {"file": rel, "kind": kind, "reason": reason}


def sniff(data: bytes) -> str:
    """What a file that is not an image holds, from its first bytes."""
    head = data[:512]
    for magic, kind in ((b"%PDF", "a PDF"), (b"PK\x03\x04", "a zip archive"), (b"\x1f\x8b", "gzip data"),
                        (b"\x7fELF", "an executable")):
        if head.startswith(magic):
            return kind
    if head.lstrip()[:1] == b"<":
        return "HTML/XML text (a saved web page or error page?)"
    try:
        head.decode("utf-8")
        return "text"
    except UnicodeDecodeError:
        return "unknown binary data"


def decode_image(data: bytes, fmt: ImageFormat, changed: Counter | None = None
                 ) -> tuple[np.ndarray | None, tuple[str, str] | None]:
    """(H,W,C) uint8, or None and (kind, reason) when the file must be skipped. Reasons never carry exception
    reprs (PIL's hold memory addresses), so the report is the same bytes on every run."""
    if not data:
        return None, ("empty", "empty file (0 bytes): re-export it or delete it")
    try:
        img = Image.open(io.BytesIO(data))
    except UnidentifiedImageError:
        return None, ("not_an_image", f"not an image: the content is {sniff(data)}; delete it or replace it")
    except Image.DecompressionBombError:
        return None, ("too_large", "more pixels than PIL's decompression-bomb limit: downscale it")
    except (OSError, ValueError, SyntaxError):  # cut off inside its header
        return None, ("truncated", "truncated or corrupt image header: re-download or re-export it")
    with img:
        try:
            img.load()  # force full decode: a truncated file only fails here, not at open()
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):
            return None, ("truncated", f"truncated or corrupt {img.format} data: re-download or re-export it")
        try:
            arr_HWC, why = normalize_image(img, fmt, changed)
        except (OSError, ValueError):
            return None, ("unsupported_mode", f"unsupported pixel mode {img.mode}: convert it to RGB or grayscale")
        return arr_HWC, None if why is None else ("size", why)


FASHION_MNIST_FILES = tuple(f"{stem}-{kind}-idx{d}-ubyte.gz" for stem in ("train", "t10k")
                            for kind, d in (("images", 3), ("labels", 1)))


def is_fashion_mnist(source: str) -> bool:
    """A source holding any of the Fashion-MNIST idx files is read as Fashion-MNIST (a missing one is then an
    error naming it, rather than a folder "without images")."""
    with storage_errors(source, "list images"):
        fs, root = fs_for(source)
        return any(fs.exists(f"{root.rstrip('/')}/{f}") for f in FASHION_MNIST_FILES)


def _open_idx(path: str, magic: int):
    """An idx .gz file opened for streaming, past its header: (file, count, row shape)."""
    try:
        with storage_errors(path, "read"):
            fs, p = fs_for(path)
            f = gzip.GzipFile(fileobj=fs.open(p, "rb"))
    except FileNotFoundError:
        raise FileNotFoundError(
            f"{path}: Fashion-MNIST file not found; install the Debian package `dataset-fashion-mnist` "
            f"or point ingest.source to the folder holding all four idx .gz files"
        ) from None
    dims = 3 if magic == 2051 else 1
    head = f.read(4 * (1 + dims))
    got_magic = int.from_bytes(head[0:4], "big")
    if got_magic != magic:
        raise ValueError(f"{path}: not an idx file (magic {got_magic:#x}, expected {magic:#x}); re-install the dataset")
    n, *shape = (int.from_bytes(head[4 * i:4 * i + 4], "big") for i in range(1, 1 + dims))
    return f, n, tuple(shape)


def fashion_mnist_split(source: str, split: str, limit: int | None, fmt: ImageFormat
                        ) -> tuple[int, Iterator[tuple[np.ndarray, int, str]]]:
    """How many images one official split gives, and its (image HWC, label, id), read from the .gz a chunk of rows
    at a time."""
    stem = "train" if split == "train" else "t10k"
    lf, n_labels, _ = _open_idx(join(source, f"{stem}-labels-idx1-ubyte.gz"), 2049)
    with lf:
        labels_N = np.frombuffer(lf.read(n_labels), dtype=np.uint8)
    f, n, (rows, cols) = _open_idx(join(source, f"{stem}-images-idx3-ubyte.gz"), 2051)
    if fmt.on_size_mismatch == "reject" and fmt.size != rows:
        raise ValueError(
            f"ingest.image_size={fmt.size} but Fashion-MNIST is {rows}x{cols} and "
            f"ingest.on_size_mismatch=reject; set image_size: 28 or on_size_mismatch: resize")
    n = min(n, len(labels_N), limit or n)  # the official files are class-mixed, so a prefix is a fair subset

    def samples():
        with f:
            for start in range(0, n, 1000):
                chunk_nHW = np.frombuffer(f.read((min(n, start + 1000) - start) * rows * cols), np.uint8)
                for i, im_HW in enumerate(chunk_nHW.reshape(-1, rows, cols), start):
                    arr_HWC = (im_HW[..., None] if fmt.size == rows and fmt.channels == 1
                               else normalize_image(Image.fromarray(im_HW, mode="L"), fmt)[0])
                    yield arr_HWC, int(labels_N[i]), f"fmnist-{split}-{i:05d}"

    return n, samples()


def split_of(rel: str, test_fraction: float, seed: int) -> tuple[str, int]:
    """Deterministic split from a hash of the relative path: adding or removing images never moves others.
    Returns (split, hash) and the hash also orders images, so max_train/max_test prefixes mix classes."""
    h = int.from_bytes(hashlib.sha1(f"{seed}:{rel}".encode()).digest()[:8], "big")
    return ("test" if h / 2**64 < test_fraction else "train"), h


def scan_folder(source: str) -> tuple[list[tuple[str, str, str | None]], list[dict], list[str]]:
    """List (full_path, relative_path, class_name) for every image under `source`, plus skipped entries
    and class names. Raises a clear error when the folder is missing or has no images."""
    with storage_errors(source, "list images"):
        fs, root = fs_for(source)
        root = root.rstrip("/")
        if not fs.exists(root) or not fs.isdir(root):
            raise FileNotFoundError(
                f"{source}: image folder not found; set ingest.source to an existing folder or an s3:// prefix "
                f"(of images, or of the Fashion-MNIST idx files)"
            )
        found = fs.find(root, withdirs=True, detail=True)
    files = sorted(f for f, info in found.items() if info["type"] != "directory")
    top_dirs = {f[len(root) + 1:] for f, info in found.items() if info["type"] == "directory" and f != root}
    entries, skipped, ignored = [], [], []
    for d in sorted(top_dirs):
        if "/" not in d and not d.startswith(".") and not any(f.startswith(f"{root}/{d}/") for f in files):
            ignored.append(skip(d + "/", "empty_folder", "empty class folder: ignored (no class is made for it)"))
    for full in files:
        rel = full[len(root) + 1:]
        parts = rel.split("/")
        link = None if is_remote(source) else _symlink_problem(Path(full))
        if any(part.startswith(".") for part in parts):  # .DS_Store, editor temp files: never data
            ignored.append(skip(rel, "hidden", "hidden file: ignored"))
        elif link:
            skipped.append(skip(rel, "symlink", link))
        elif Path(rel).suffix.lower() not in IMAGE_EXTS:
            skipped.append(skip(rel, "extension", f"unsupported extension (expected one of {sorted(IMAGE_EXTS)}); "
                                                  f"convert it or move it out of the source"))
        elif len(parts) > 2:
            skipped.append(skip(rel, "nested", "nested deeper than one class sub-folder; move it up"))
        else:
            entries.append((full, rel, parts[0] if len(parts) == 2 else None))
    if not entries:
        raise ValueError(
            f"{source}: no images found (looked for {sorted(IMAGE_EXTS)} at the top level or in one level of "
            f"class sub-folders); put images there or point ingest.source elsewhere"
        )
    class_names = sorted({c for _, _, c in entries if c is not None})
    if class_names:
        # mixing class folders with loose top-level files would leave the loose ones without a label
        for _, rel, c in entries:
            if c is None:
                skipped.append(skip(rel, "no_class",
                                    "top-level file beside class sub-folders has no class; move it into one"))
        entries = [e for e in entries if e[2] is not None]
    else:
        class_names = [Path(root).name or "images"]
    if is_remote(source):
        scheme = source.split("://", 1)[0]
        entries = [(f"{scheme}://{full}", rel, c) for full, rel, c in entries]
    return entries, skipped + ignored, class_names


def _symlink_problem(path: Path) -> str | None:
    """Why a symbolic link cannot be read as an image, or None (not a link, or a link to a file: followed)."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return f"broken symbolic link (to {os.readlink(path)}): point it at an image or remove it"
    except (RuntimeError, OSError):  # a loop: RuntimeError before Python 3.13, OSError (ELOOP) after
        return ("symbolic link loop: remove it (DVC cannot hash a source folder holding one either: `dvc status` "
                "fails on it with [Errno 40])")
    if target.is_dir():
        return "symbolic link to a folder: not followed (it could loop); move or copy its images into the source"
    return None


def _fetch(paths: list[str]) -> dict[str, bytes | Exception]:
    """Bulk read; s3fs fetches a list concurrently, which matters for thousands of small objects."""
    fs, _ = fs_for(paths[0])
    stripped = [fs_for(path)[1] for path in paths]
    got = fs.cat(stripped, on_error="return")
    return {path: got.get(s, FileNotFoundError(s)) for path, s in zip(paths, stripped)}


def folder_samples(todo: list[tuple[int, str, str, int]], limit: int | None, skipped: list[dict], fmt: ImageFormat,
                   chunk: int = 256, changed: Counter | None = None) -> Iterator[tuple[np.ndarray, int, str]]:
    """(image HWC, label, id) of one split's (hash, rel, full path, label) entries, fetched and decoded a chunk at a
    time; stops once `limit` usable images are out, so a small subset of a big bucket is cheap. `changed` counts
    the conversions and resizes of the images kept."""
    n = 0
    for start in range(0, len(todo), chunk):
        batch = todo[start:start + chunk]
        data = _fetch([full for _, _, full, _ in batch])
        for _, rel, full, label in batch:
            if limit is not None and n >= limit:
                return
            blob = data[full]
            if isinstance(blob, Exception):
                skipped.append(skip(rel, "unreadable_file", f"cannot read the file ({type(blob).__name__}); check "
                                                            "its permissions or the storage"))
                continue
            arr_HWC, why = decode_image(blob, fmt, changed)
            if arr_HWC is None:
                skipped.append(skip(rel, *why))
                continue
            n += 1
            yield arr_HWC, label, rel

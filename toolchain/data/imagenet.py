"""ImageNet-style image data: a folder per class, or a Caffe file list (`path label` per line).

Layouts (DIR is what --data names):
  * DIR/<class>/<image>            class index = position of <class> among the sorted folder names
  * DIR/train/<class>/..., DIR/val/<class>/...       one such tree per split
  * DIR/train.txt, DIR/val.txt     Caffe-style lists; relative paths are under DIR/train/ (DIR/val/)
                                   when that folder exists, else under DIR
A file list may also be named directly.

Preprocessing as Caffe's AlexNet: resize to 256x256, crop to the model's input size (227 or 224;
random crop and mirror for training, centre crop for evaluation), BGR channel order, float32 pixels
in [0, 1] (pixel / 255: the AlexNet graph multiplies by 255 and subtracts the mean pixel itself).
Images are decoded with Pillow in DataLoader worker processes (default: one per core this process may
use, less one, shared among the local torchrun processes); batches go to page-locked (pinned) memory
when training on a GPU, so the host-to-device copy is asynchronous. Training crops are drawn from
(seed, epoch, image index), so they do not depend on the worker or the number of processes.

Decoding is what bounds a fast GPU: a full-size ImageNet JPEG (about 400x350, some far larger)
costs several times the decode of a 256x256 one, and the resize comes on top. Pre-resizing the data
set once to 256x256 (what Caffe's `convert_imageset --resize_height 256 --resize_width 256` stores)
gives the same training inputs (the resize here is then a no-op) at a fraction of the CPU cost;
tools/throughput.py loader measures both.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ..errors import DataError

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".gif", ".tif", ".tiff", ".webp"}
RESIZE = 256  # Caffe's convert_imageset --resize_height/--resize_width for AlexNet


@dataclass
class _Unreadable:
    """What a worker returns for an image it cannot decode (raised as DataError in the main process)."""

    message: str


def crop_size(input_shape) -> int:
    """The square crop a model wants from its input shape [N, 3, S, S] (or [3, S, S])."""
    shape = list(input_shape)
    dims = shape[-3:]
    if len(shape) < 3 or not all(isinstance(d, int) and d > 0 for d in dims) or dims[0] != 3 or dims[1] != dims[2]:
        raise DataError(f"model input shape {shape} is not a square 3-channel image input [N, 3, S, S]")
    return dims[1]


def decode(path: str, size: int = RESIZE) -> np.ndarray:
    """An image file as uint8 RGB [size, size, 3] (resized, aspect ratio not kept: Caffe's way)."""
    from PIL import Image

    with Image.open(path) as im:
        im.draft("RGB", (size, size))  # JPEG: decode at a reduced scale when the file is much larger
        im = im.convert("RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BILINEAR)
        return np.asarray(im)


def to_input(rgb: np.ndarray, crop: int, top: int, left: int, mirror: bool) -> np.ndarray:
    """Crop an RGB uint8 [H, W, 3] image and make the model input: float32 [3, crop, crop], BGR, in [0, 1]."""
    a = rgb[top : top + crop, left : left + crop]
    if mirror:
        a = a[:, ::-1]
    return np.ascontiguousarray(a[:, :, ::-1].transpose(2, 0, 1), dtype=np.float32) / np.float32(255.0)


class PathTable:
    """File paths packed in two numpy arrays: DataLoader workers forked from the training process
    share them without the copy-on-write growth a list of a million Python strings causes."""

    def __init__(self, paths):
        enc = [os.fsencode(str(p)) for p in paths]
        self.offsets = np.cumsum([0] + [len(b) for b in enc], dtype=np.int64)
        self.blob = np.frombuffer(b"".join(enc), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> str:
        return os.fsdecode(self.blob[self.offsets[i] : self.offsets[i + 1]].tobytes())


class _ImageDataset(torch.utils.data.Dataset):
    """Indexed by (image index, seed, epoch); returns (float32 [3, crop, crop], label) or _Unreadable."""

    def __init__(self, paths: PathTable, labels: np.ndarray, crop: int, train: bool, resize: int):
        self.paths, self.labels, self.crop, self.train, self.resize = paths, labels, crop, train, resize

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, key):
        idx, seed, epoch = key
        path = self.paths[idx]
        try:
            rgb = decode(path, self.resize)
        except Exception as e:  # missing, truncated or not an image: reported with the file's name
            return _Unreadable(f"cannot read image {path}: {_reason(e)}")
        span = self.resize - self.crop
        if self.train:
            r = np.random.default_rng([seed, epoch, idx])
            top, left, mirror = int(r.integers(span + 1)), int(r.integers(span + 1)), bool(r.integers(2))
        else:
            top = left = span // 2
            mirror = False
        return to_input(rgb, self.crop, top, left, mirror), int(self.labels[idx])


def _reason(e: Exception) -> str:
    from PIL import UnidentifiedImageError

    if isinstance(e, UnidentifiedImageError):
        return "not an image Pillow can decode"
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _collate(items):
    for it in items:
        if isinstance(it, _Unreadable):
            return it
    if not items:
        return None
    return torch.from_numpy(np.stack([x for x, _ in items])), torch.tensor([y for _, y in items], dtype=torch.int64)


MAX_WORKERS = 32


def usable_cpus() -> int:
    """The cores this process may run on (its affinity mask: what a job scheduler or taskset granted)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def default_workers() -> int:
    """Decoding processes per training process: its share of the usable cores (split among the local
    torchrun processes) less one for the training process itself, at most MAX_WORKERS."""
    per_rank = usable_cpus() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return max(0, min(MAX_WORKERS, per_rank - 1))


class ImageFolderSource:
    """A list of (image path, label) read through a DataLoader; a data source for toolchain.train."""

    def __init__(self, paths: list[str], labels, crop: int, train: bool, resize: int = RESIZE,
                 num_workers: int | None = None, classes: list[str] | None = None, origin: str = "",
                 pin_memory: bool | None = None):
        if resize < crop:
            raise DataError(f"cannot crop {crop}x{crop} from images resized to {resize}x{resize}")
        self.paths = paths if isinstance(paths, PathTable) else PathTable(paths)
        self.labels = np.asarray(labels, dtype=np.int64)
        if len(self.labels) != len(self.paths):
            raise DataError(f"{len(self.paths)} images but {len(self.labels)} labels")
        self.crop, self.train, self.resize = crop, train, resize
        self.num_workers = default_workers() if num_workers is None else num_workers
        if self.num_workers < 0:
            raise DataError(f"the number of data-loading workers must be >= 0, not {self.num_workers}")
        self.classes = classes
        self.origin = origin
        # Page-locked batches for an asynchronous copy to the GPU; None: whenever CUDA is available.
        self.pin_memory = torch.cuda.is_available() if pin_memory is None else bool(pin_memory)
        self._dataset = _ImageDataset(self.paths, self.labels, crop, train, resize)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def num_classes(self) -> int:
        return len(self.classes) if self.classes is not None else int(self.labels.max()) + 1

    def load(self, batches, seed: int = 0, epoch: int = 0):
        """Yield (x float32 [B, 3, crop, crop], y int64 [B]) tensors for each array of indices in `batches`."""
        keys = [[(int(i), seed, epoch) for i in b] for b in batches]
        if not keys:
            return
        loader = torch.utils.data.DataLoader(
            self._dataset, batch_sampler=keys, collate_fn=_collate, num_workers=min(self.num_workers, len(keys)),
            pin_memory=self.pin_memory, prefetch_factor=2 if self.num_workers else None)
        for out in loader:
            if isinstance(out, _Unreadable):
                raise DataError(out.message)
            if out is None:  # an empty share (the last global batch is smaller than the process count)
                out = torch.zeros(0, 3, self.crop, self.crop), torch.zeros(0, dtype=torch.int64)
            yield out


def _image_files(folder: Path) -> list[str]:
    with os.scandir(folder) as it:  # scandir: no stat() per file, which matters for a million images
        return sorted(e.path for e in it if os.path.splitext(e.name)[1].lower() in IMAGE_EXTENSIONS and e.is_file())


def scan_class_folders(root: Path) -> tuple[list[str], list[int], list[str]]:
    """(paths, labels, class names) of root/<class>/<image>; classes indexed in sorted name order."""
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"image folder {root} has no class subfolders (expected {root}/<class>/<image>)")
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = _image_files(root / name)
        paths += files
        labels += [label] * len(files)
    if not paths:
        raise DataError(f"image folder {root} has no images in its {len(classes)} class folders "
                        f"(extensions: {', '.join(sorted(IMAGE_EXTENSIONS))})")
    return paths, labels, classes


def read_file_list(list_path: Path, image_root: Path | None = None) -> tuple[list[str], list[int]]:
    """(paths, labels) from a Caffe-style list: `relative/or/absolute/path label` per line."""
    if image_root is None:
        sibling = list_path.with_suffix("")
        image_root = sibling if sibling.is_dir() else list_path.parent
    try:
        text = list_path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"cannot read file list {list_path}: {getattr(e, 'strerror', None) or e}") from None
    paths, labels = [], []
    for no, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(None, 1)
        if len(parts) != 2 or not parts[1].isdigit():
            raise DataError(f"{list_path}:{no}: expected 'path label' with a non-negative integer label, got {line.strip()!r}")
        paths.append(str(image_root / parts[0].strip()))
        labels.append(int(parts[1]))
    if not paths:
        raise DataError(f"file list {list_path} lists no images")
    return paths, labels


def open_imagenet(path, crop: int, train: bool, split: str | None = None, require_split: bool = False,
                  num_workers: int | None = None, resize: int = RESIZE,
                  pin_memory: bool | None = None) -> ImageFolderSource:
    """A data source for an ImageNet-style folder or file list (see the module docstring).

    With `split` ("train" / "val"), DIR/<split>.txt or DIR/<split>/ is used when present; otherwise
    DIR itself is the class-folder root, unless `require_split`.
    """
    if path is None:
        raise DataError("no image data given: pass --data DIR (a folder per class, or a train.txt/val.txt list)")
    path = Path(path)
    if not path.exists():
        raise DataError(f"image data {path} does not exist")
    classes = None
    if path.is_file():
        paths, labels = read_file_list(path)
    elif split and (path / f"{split}.txt").is_file():
        paths, labels = read_file_list(path / f"{split}.txt")
    elif split and (path / split).is_dir():
        paths, labels, classes = scan_class_folders(path / split)
    elif require_split:
        raise DataError(f"{path} has neither {split}/ (a folder per class) nor {split}.txt (a file list)")
    else:
        paths, labels, classes = scan_class_folders(path)
    return ImageFolderSource(paths, labels, crop, train, resize, num_workers, classes, str(path), pin_memory)


def iterate_eval_batches(data_dir, input_shape, batch_size: int = 500, limit: int | None = None,
                         progress: bool = True, num_workers: int | None = None):
    """Yield (x float32 [B, 3, S, S] BGR in [0, 1], y int64 [B]) numpy batches of the evaluation images.

    `data_dir`: a class-folder root, a folder holding val/ or val.txt, or a file list. `input_shape`
    is the model's ([N, 3, S, S]; a fixed N sets the batch size). `limit` evaluates that many
    images spread evenly over the (class-sorted) list, so every part of it is represented.
    """
    crop = crop_size(input_shape)
    shape = list(input_shape)
    fixed = shape[0] if len(shape) == 4 and isinstance(shape[0], int) and shape[0] > 0 else None
    src = open_imagenet(data_dir, crop, train=False, split="val", num_workers=num_workers)
    n = len(src)
    if limit is not None and limit < n:
        if limit <= 0:
            raise DataError(f"limit must be positive, not {limit}")
        idx = np.unique(np.linspace(0, n - 1, limit).round().astype(np.int64))
    else:
        idx = np.arange(n)
    bs = fixed or batch_size
    if fixed and fixed > 1 and len(idx) % fixed:
        raise DataError(f"model input has a fixed batch size {fixed} that does not divide the {len(idx)} images; "
                        "re-export it with a dynamic batch dimension")
    batches = [idx[i : i + bs] for i in range(0, len(idx), bs)]
    for xb, yb in tqdm(src.load(batches), total=len(batches), desc="eval", unit="batch", disable=not progress,
                       leave=False):
        yield xb.numpy(), yb.numpy()

"""Dataset folders -> lists of ``Sample(path, pid, camid)`` (docs/method.md#datasets).

Supported layouts (``build_dataset(name, root)``):

* ``market1501``: ``{bounding_box_train, query, bounding_box_test}`` in ``root``, in
  ``root/Market-1501-v15.09.15`` or in ``root/market1501/Market-1501-v15.09.15``.
  Names are parsed with the reference regex ``([-\\d]+)_c(\\d)``.
* ``dukemtmc``: the same Market-style folders in ``root``, ``root/DukeMTMC-reID`` or
  ``root/dukemtmc/DukeMTMC-reID``.
* ``msmt17``: any of
  (a) the re-organised Market-style copy the reference reads (regex ``([-\\d]+)_c(\\d+)``),
  (b) the official V1 release (``train/``, ``test/``, ``list_{train,val,query,gallery}.txt``),
  (c) the official V2 release (``mask_train_v2/``, ``mask_test_v2/`` and the same lists),
  each in ``root``, ``root/MSMT17_V1``, ``root/MSMT17_V2``, ``root/msmt17/MSMT17_V1`` or
  ``root/msmt17/MSMT17_V2``. In the official releases the pid comes from the list file and the
  camera from the third ``_`` field of the file name
  (``0000_000_01_0303morning_0015_0.jpg`` -> camera 01); train = list_train + list_val.
* ``demo``: the Market layout written by ``isereid demo-data``.
* ``folder``: your own crops, training only unless it holds Market-style split folders.
  ``root`` is (a) a folder with Market-style split folders (labeled), (b) a folder of images
  (searched recursively) whose cameras come from the Market-style file names when every name
  has one (``0002_c1s1_000451_03.jpg``: identity 2, camera 1), else from one sub-folder per
  camera (``root/<camera>/*.jpg``, any file names, identities unknown), else every image is
  camera 0; or (c) a CSV file with rows ``path,camera[,pid]`` (paths relative to the CSV's
  folder; an optional header row; camera any label; pid optional). The dataset summary says
  which (``ReidDataset.cameras_from``).

Differences from the reference (docs/reference_quirks.md#q18): names are parsed from the **basename**, not the
full path, and MSMT17 is also read from the official list files.  Everything else is as the
reference: junk (pid -1) is dropped from every split, distractors (pid 0) are kept,
cameras are 0-based, and every list is sorted by path.
"""
from __future__ import annotations

import csv
import difflib
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, NamedTuple, Optional, Sequence

from ..errors import DatasetError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
DATASET_NAMES = ("market1501", "msmt17", "dukemtmc", "folder", "demo")
MARKET_SPLITS = ("bounding_box_train", "query", "bounding_box_test")

# Reference regexes (docs/method.md#datasets), applied with ``search`` to the basename.
MARKET_PATTERN = re.compile(r"([-\d]+)_c(\d)")
MULTI_CAM_PATTERN = re.compile(r"([-\d]+)_c(\d+)")


class Sample(NamedTuple):
    """One image: its path, person id (-1 = unknown) and 0-based camera index."""

    path: str
    pid: int
    camid: int


@dataclass
class ReidDataset:
    """A dataset's three splits; ``query``/``gallery`` are empty for a training-only folder.

    ``cameras_from`` says how the camera ids were found (shown by :meth:`summary`).
    """

    name: str
    root: str
    train: list[Sample] = field(default_factory=list)
    query: list[Sample] = field(default_factory=list)
    gallery: list[Sample] = field(default_factory=list)
    cameras_from: str = "Market-style file names"

    @property
    def has_test(self) -> bool:
        return bool(self.query) and bool(self.gallery)

    def summary(self) -> str:
        lines = [f"dataset {self.name} at {self.root}", f"  {'split':<8}{'images':>8}{'ids':>7}{'cams':>6}"]
        for split in ("train", "query", "gallery"):
            samples = getattr(self, split)
            if not samples and split != "train":
                continue
            pids = {s.pid for s in samples if s.pid >= 0}
            ids = str(len(pids)) if pids else "-"
            cams = len({s.camid for s in samples})
            lines.append(f"  {split:<8}{len(samples):>8}{ids:>7}{cams:>6}")
        lines.append(f"  cameras: {self.cameras_from}")
        return "\n".join(lines)


# ---------------------------------------------------------------------------- name parsing
def _parse(basename: str, pattern: re.Pattern) -> Optional[tuple[int, int]]:
    m = pattern.search(basename)
    if m is None:
        return None
    try:
        pid, cam = int(m.group(1)), int(m.group(2))
    except ValueError:  # e.g. "1-2_c3": the signed-integer group is not an integer
        return None
    if pid < -1 or cam < 1:
        return None
    return pid, cam - 1


def parse_image_name(basename: str) -> Optional[tuple[int, int]]:
    """``(pid, 0-based camid)`` of a Market-style name such as ``0002_c1s1_000451_03.jpg``.

    The camera may have several digits (MSMT17's ``_c12``). Returns None when the name does
    not carry an identity and a camera >= 1; never raises.
    """
    return _parse(os.path.basename(basename), MULTI_CAM_PATTERN)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS) and not name.startswith(".")


def _list_images(directory: Path, recursive: bool) -> list[str]:
    if recursive:
        found = []
        for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
            dirnames[:] = [d for d in dirnames if not d.startswith(".")]
            found += [os.path.join(dirpath, f) for f in filenames if _is_image(f)]
    else:
        found = [str(p) for p in directory.iterdir() if _is_image(p.name) and p.is_file()]
    return sorted(found)


def _parse_folder(directory: Path, pattern: re.Pattern, name: str) -> list[Sample]:
    """Market-style split folder: parse every image name, drop junk and unparsable names."""
    samples = []
    for path in _list_images(directory, recursive=False):
        parsed = _parse(os.path.basename(path), pattern)
        if parsed is None or parsed[0] == -1:
            continue
        samples.append(Sample(path, parsed[0], parsed[1]))
    if not samples:
        raise DatasetError(
            f"{name}: no usable images in {directory} (expected names like 0001_c1s1_000151_01.jpg); "
            "check that data.root points at the right dataset"
        )
    return samples


def images_in_folder(directory) -> list[Sample]:
    """Every image under ``directory`` (recursive, sorted); pid/camid from the name when it is
    Market-style, else pid -1 and camid 0."""
    directory = Path(directory)
    if not directory.is_dir():
        raise DatasetError(f"image folder not found: {directory}")
    paths = _list_images(directory, recursive=True)
    if not paths:
        raise DatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {directory}")
    samples = []
    for path in paths:
        parsed = parse_image_name(os.path.basename(path))
        samples.append(Sample(path, *(parsed or (-1, 0))))
    return samples


# ---------------------------------------------------------------------------- layouts
def closest_existing_path(path: Path) -> Optional[Path]:
    """The existing folder whose name is closest to the first missing part of ``path`` (a typo
    such as ``dmeo`` for ``demo``), with the rest of ``path`` appended when that exists too;
    None when nothing is close."""
    parts = path.parts
    base = Path(parts[0])
    for i, part in enumerate(parts[1:], 1):
        if not (base / part).exists():
            break
        base = base / part
    else:
        return None
    try:
        names = [p.name for p in base.iterdir() if p.is_dir() and not p.name.startswith(".")]
    except OSError:
        return None
    close = difflib.get_close_matches(parts[i], names, n=1, cutoff=0.6)
    if not close:
        return None
    guess = base / close[0]
    return guess / Path(*parts[i + 1:]) if len(parts) > i + 1 and (guess / Path(*parts[i + 1:])).exists() else guess


def _check_root(name: str, root: Path) -> None:
    if not root.exists():
        guess = closest_existing_path(root)
        if guess is not None:
            hint = f"did you mean {guess}? (set --data-root or data.root)"
        elif name == "demo":
            hint = f"create it with `isereid demo-data {root}` or set data.root (or --data-root)"
        else:
            hint = "set data.root (or --data-root) to the dataset folder or its parent"
        raise DatasetError(f"{name}: data root not found: {root}; {hint}")
    if not root.is_dir():
        csv_hint = " (a CSV of path,camera[,pid] rows needs data.dataset=folder)" if root.suffix.lower() == ".csv" \
            else ""
        raise DatasetError(f"{name}: data root is not a folder: {root}; set data.root (or --data-root) to a "
                           f"folder{csv_hint}")


def _has_market(folder: Path) -> bool:
    return any((folder / s).is_dir() for s in MARKET_SPLITS)


def _market_splits(name: str, folder: Path, pattern: re.Pattern) -> tuple[list, list, list]:
    missing = [s for s in MARKET_SPLITS if not (folder / s).is_dir()]
    if missing:
        raise DatasetError(
            f"{name}: {folder} has a Market-style layout but lacks {', '.join(missing)} "
            f"(expected {', '.join(MARKET_SPLITS)}); restore the missing folder(s)"
        )
    train, query, gallery = (_parse_folder(folder / s, pattern, name) for s in MARKET_SPLITS)
    return train, query, gallery


def _holds_images(root: Path) -> bool:
    for _, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        if any(_is_image(f) for f in filenames):
            return True
    return False


def _no_layout(name: str, root: Path, layout: str, folders: Sequence[str], candidates: Sequence[Path]) -> DatasetError:
    where = ", ".join(str(c) for c in candidates)
    hint = "set data.root (or --data-root) to the dataset folder or its parent"
    if _holds_images(root):
        hint = ("for a folder of your own crops add data.dataset=folder (cameras from one sub-folder per camera, "
                "Market-style names or a CSV), or " + hint)
    return DatasetError(f"{name}: no {layout} layout under {root} (looked for {', '.join(folders)} in {where}); "
                        + hint)


def _market_like(name: str, root: Path, subdirs: Sequence[str], layout: str) -> ReidDataset:
    _check_root(name, root)
    candidates = [root] + [root / s for s in subdirs]
    for folder in candidates:
        if _has_market(folder):
            train, query, gallery = _market_splits(name, folder, MARKET_PATTERN)
            return ReidDataset(name, str(folder), train, query, gallery)
    raise _no_layout(name, root, layout, MARKET_SPLITS, candidates)


def _market1501(root: Path) -> ReidDataset:
    return _market_like("market1501", root, ["Market-1501-v15.09.15", "market1501/Market-1501-v15.09.15",
                                             "Market-1501"], "Market-1501")


def _dukemtmc(root: Path) -> ReidDataset:
    return _market_like("dukemtmc", root, ["DukeMTMC-reID", "dukemtmc/DukeMTMC-reID", "dukemtmcreid/DukeMTMC-reID"],
                        "DukeMTMC-reID")


def _demo(root: Path) -> ReidDataset:
    return _market_like("demo", root, [], "demo (Market-1501)")


# MSMT17 official releases: (train folder, test folder)
_MSMT_OFFICIAL = {"V1": ("train", "test"), "V2": ("mask_train_v2", "mask_test_v2")}
_MSMT_LISTS = ("list_train.txt", "list_query.txt", "list_gallery.txt")


def _msmt_camera(basename: str) -> Optional[int]:
    """Camera (1-based) of an official MSMT17 name ``PPPP_III_CC_dateTime_FFFF_N.jpg``."""
    parts = basename.split("_")
    if len(parts) < 3 or not parts[2].isdigit():
        return None
    return int(parts[2])


def _read_msmt_list(list_file: Path, image_dir: Path) -> list[Sample]:
    samples = []
    with open(list_file, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            parts = line.split()
            try:
                if len(parts) < 2:
                    raise ValueError(line)
                rel, pid = parts[0], int(parts[-1])
            except ValueError:
                raise DatasetError(
                    f"msmt17: {list_file} line {lineno} is not 'relative/path.jpg pid': {line!r}; "
                    "restore the official list file"
                ) from None
            cam = _msmt_camera(os.path.basename(rel))
            if cam is None or cam < 1:
                raise DatasetError(
                    f"msmt17: cannot read the camera from {rel!r} ({list_file} line {lineno}); official names "
                    "look like 0000_000_01_0303morning_0015_0.jpg"
                )
            if pid == -1:
                continue
            samples.append(Sample(str(image_dir / rel), pid, cam - 1))
    if not samples:
        raise DatasetError(f"msmt17: {list_file} lists no images; restore the official list file")
    return sorted(samples, key=lambda s: s.path)


def _msmt_official(folder: Path, version: str) -> ReidDataset:
    train_dir, test_dir = (folder / d for d in _MSMT_OFFICIAL[version])
    train = _read_msmt_list(folder / "list_train.txt", train_dir)
    if (folder / "list_val.txt").is_file():
        train = sorted(train + _read_msmt_list(folder / "list_val.txt", train_dir), key=lambda s: s.path)
    query = _read_msmt_list(folder / "list_query.txt", test_dir)
    gallery = _read_msmt_list(folder / "list_gallery.txt", test_dir)
    missing = next((s.path for s in train[:1] + query[:1] + gallery[:1] if not os.path.isfile(s.path)), None)
    if missing:
        raise DatasetError(f"msmt17: image listed in {folder}'s list files not found: {missing}; "
                           "extract the full MSMT17 archive")
    return ReidDataset("msmt17", str(folder), train, query, gallery,
                       cameras_from="official MSMT17 file names (third field)")


def _msmt17(root: Path) -> ReidDataset:
    name = "msmt17"
    _check_root(name, root)
    candidates = [root] + [root / s for s in ("MSMT17_V1", "MSMT17_V2", "msmt17/MSMT17_V1", "msmt17/MSMT17_V2",
                                              "MSMT17", "msmt17")]
    for folder in candidates:
        if _has_market(folder):
            train, query, gallery = _market_splits(name, folder, MULTI_CAM_PATTERN)
            return ReidDataset(name, str(folder), train, query, gallery)
        for version, dirs in _MSMT_OFFICIAL.items():
            if all((folder / d).is_dir() for d in dirs):
                missing = [f for f in _MSMT_LISTS if not (folder / f).is_file()]
                if missing:
                    raise DatasetError(
                        f"msmt17: {folder} looks like the official MSMT17_{version} release but lacks "
                        f"{', '.join(missing)}; restore the list files from the archive"
                    )
                return _msmt_official(folder, version)
    folders = list(MARKET_SPLITS) + ["train+test+list_*.txt (V1)", "mask_train_v2+mask_test_v2+list_*.txt (V2)"]
    raise _no_layout(name, root, "MSMT17 (re-organised or official V1/V2)", folders, candidates)


def _camera_list(labels: Sequence[str]) -> str:
    shown = ", ".join(labels[:6]) + (", ..." if len(labels) > 6 else "")
    return f"{len(labels)} camera(s): {shown}"


def _camera_index(labels: Sequence[str]) -> dict[str, int]:
    """0-based camera ids for camera labels: in numeric order when every label is an integer, else by name."""
    unique = set(labels)
    numeric = all(re.fullmatch(r"-?\d+", c) for c in unique)
    return {c: i for i, c in enumerate(sorted(unique, key=(lambda c: (int(c), c)) if numeric else None))}


NO_CAMERAS_HINT = ("put each camera's crops in its own sub-folder (ROOT/<camera>/*.jpg), use Market-style names "
                   "(0001_c1_xxx.jpg) or give a CSV of path,camera[,pid] rows as data.root")


def _folder_images(root: Path) -> ReidDataset:
    """A folder of crops without split folders: cameras from the names, sub-folders or nothing."""
    samples = images_in_folder(root)
    parsed = [parse_image_name(s.path) for s in samples]
    if all(p is not None for p in parsed):
        cams = sorted({p[1] + 1 for p in parsed if p is not None})
        train = [Sample(s.path, *p) for s, p in zip(samples, parsed) if p is not None]
        return ReidDataset("folder", str(root), train, [], [], cameras_from="Market-style file names, "
                           + _camera_list([f"c{c}" for c in cams]))
    tops = [Path(s.path).relative_to(root).parts for s in samples]
    folders = sorted({t[0] for t in tops if len(t) > 1})
    if all(len(t) > 1 for t in tops) and len(folders) >= 2:
        index = _camera_index(folders)
        train = [Sample(s.path, -1, index[t[0]]) for s, t in zip(samples, tops)]
        return ReidDataset("folder", str(root), train, [], [],
                           cameras_from="one sub-folder per camera, " + _camera_list(list(index)))
    named = sum(p is not None for p in parsed)
    train = [Sample(s.path, -1, s.camid) for s in samples]
    how = (f"Market-style names for {named} of {len(samples)} images, camera 0 for the rest" if named else
           "none found, every image is camera 0")
    return ReidDataset("folder", str(root), train, [], [], cameras_from=f"{how} ({NO_CAMERAS_HINT})")


def _folder_csv(path: Path) -> ReidDataset:
    """Rows ``path,camera[,pid]`` (an optional header row ``path,camera,pid``); paths relative to the CSV's folder."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = [(n, r) for n, r in enumerate(csv.reader(f), 1) if r and any(c.strip() for c in r)]
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise DatasetError(f"folder: cannot read {path}: {e}") from None
    if rows and [c.strip().lower() for c in rows[0][1][:2]] == ["path", "camera"]:
        rows = rows[1:]
    if not rows:
        raise DatasetError(f"folder: {path} lists no images; write one 'path,camera[,pid]' row per image")
    entries = []
    for lineno, row in rows:
        cells = [c.strip() for c in row]
        if len(cells) not in (2, 3) or not cells[0] or not cells[1]:
            raise DatasetError(f"folder: {path} line {lineno} is not 'path,camera[,pid]': {','.join(row)!r}")
        pid = cells[2] if len(cells) == 3 else ""
        if pid and not pid.lstrip("-").isdigit():
            raise DatasetError(f"folder: {path} line {lineno}: the identity {pid!r} is not an integer "
                               "(leave it empty when unknown)")
        entries.append((str(path.parent / cells[0]), cells[1], int(pid) if pid else -1))
    missing = [p for p, _, _ in entries if not os.path.isfile(p)]
    if missing:
        more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
        raise DatasetError(f"folder: image listed in {path} not found: {missing[0]}{more}; paths are relative "
                           "to the CSV's folder")
    index = _camera_index([c for _, c, _ in entries])
    train = sorted((Sample(p, pid, index[c]) for p, c, pid in entries), key=lambda s: s.path)
    return ReidDataset("folder", str(path), train, [], [],
                       cameras_from=f"CSV {path.name}, " + _camera_list(list(index)))


def _folder(root: Path) -> ReidDataset:
    name = "folder"
    if root.is_file() and root.suffix.lower() == ".csv":
        return _folder_csv(root)
    _check_root(name, root)
    if _has_market(root):
        if not (root / "bounding_box_train").is_dir():
            raise DatasetError(f"folder: {root} has query/bounding_box_test but no bounding_box_train; "
                               "add the training folder")
        train = _parse_folder(root / "bounding_box_train", MULTI_CAM_PATTERN, name)
        has_q, has_g = (root / "query").is_dir(), (root / "bounding_box_test").is_dir()
        if has_q != has_g:
            lacking = "bounding_box_test" if has_q else "query"
            raise DatasetError(f"folder: {root} lacks {lacking} (query and bounding_box_test go together); "
                               "add it or remove the other one")
        query = _parse_folder(root / "query", MULTI_CAM_PATTERN, name) if has_q else []
        gallery = _parse_folder(root / "bounding_box_test", MULTI_CAM_PATTERN, name) if has_g else []
        return ReidDataset(name, str(root), train, query, gallery)
    return _folder_images(root)


_BUILDERS: dict[str, Callable[[Path], ReidDataset]] = {
    "market1501": _market1501,
    "msmt17": _msmt17,
    "dukemtmc": _dukemtmc,
    "folder": _folder,
    "demo": _demo,
}


def build_dataset(name: str, root) -> ReidDataset:
    """Read dataset ``name`` from ``root`` (the dataset folder or its parent, see module doc)."""
    builder = _BUILDERS.get(str(name).lower())
    if builder is None:
        raise DatasetError(f"unknown dataset {name!r}; choose one of {', '.join(DATASET_NAMES)} (data.dataset)")
    if root is None or str(root) == "":
        raise DatasetError(f"{name}: no data root given; set data.root (or --data-root)")
    return builder(Path(os.path.abspath(os.path.expanduser(str(root)))))

"""DICOM whole-slide images: a folder of .dcm instances is one slide.

A DICOM WSI series is a folder with one instance per pyramid level (a level may be split over
several instances, a concatenation) and often label, overview and thumbnail instances. Every
instance's header is read without its pixel data (pydicom's ``stop_before_pixels``) to learn
its series, its kind (DICOM ImageType value 3) and its size; the pixels of LABEL and OVERVIEW
instances, which can show patient identifiers, are never read, and sorting never copies them.
Thumbnails are rendered from the volume frames (JPEG at reduced scale, see ``tiles.py``).
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

from thumbclf.core.errors import INCOMPLETE, NOT_FOUND, SEVERAL_SERIES, ImageReadError
from thumbclf.core.files import regular_file
from thumbclf.inputs.tiles import MAX_TILES, SlideTooLarge, TiledLevel

WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
NEVER_READ = ("LABEL", "OVERVIEW")  # may show the patient's name or barcode
JPEG_SYNTAXES = {"1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57",
                 "1.2.840.10008.1.2.4.70"}
JPEG2000_SYNTAXES = {"1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                     "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                     "1.2.840.10008.1.2.4.203"}
NATIVE_SYNTAXES = {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1"}
_PIXEL_DATA_TAG = b"\xe0\x7f\x10\x00"
_ITEM, _SEQ_END = 0xE000, 0xE0DD


def _pydicom():
    try:
        import pydicom
    except ImportError:
        raise ImageReadError("reading DICOM slides needs pydicom; pip install pydicom"
                             ) from None
    return pydicom


def is_dcm(path: Path) -> bool:
    """True for a visible file named *.dcm (any case)."""
    return path.suffix.lower() == ".dcm" and not path.name.startswith(".")


def is_dicom_folder(path: Path) -> bool:
    """True for a folder holding .dcm files (read as one DICOM slide)."""
    try:
        return path.is_dir() and any(is_dcm(p) and p.is_file() for p in path.iterdir())
    except OSError:
        return False


def slide_folder(path: Path) -> Path | None:
    """The DICOM slide folder a path names: the folder itself, or the folder of a .dcm file."""
    if path.is_dir():
        return path if is_dicom_folder(path) else None
    if is_dcm(path):
        return path.parent
    return None


def group_folders(files: list[Path]) -> list[Path]:
    """Found files with each folder's .dcm files replaced by the folder (one slide)."""
    out, seen = [], set()
    for f in files:
        if is_dcm(f):
            if f.parent not in seen:
                seen.add(f.parent)
                out.append(f.parent)
        else:
            out.append(f)
    return sorted(out)


@dataclass(frozen=True)
class Instance:
    """The header facts of one DICOM WSI instance."""

    path: Path
    series: str
    image_type: tuple[str, ...]
    width: int
    height: int
    tile_w: int
    tile_h: int
    frames: int
    syntax: str
    photometric: str
    tiled_full: bool
    concatenation: str | None = None
    part: int = 1
    parts: int = 1
    frame_offset: int = 0
    pixel_offset: int = -1
    positions: tuple[tuple[int, int], ...] | None = None  # TILED_SPARSE: tile of each frame
    mpp: tuple[float | None, float | None] = (None, None)
    objective: float | None = None
    vendor: str | None = None

    @property
    def kind(self) -> str:
        return self.image_type[2] if len(self.image_type) > 2 else ""


def _num(value) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _first(ds, *names):
    for name in names:
        if ds is None:
            return None
        seq = ds.get(name)
        ds = seq[0] if seq else None
    return ds


def _sparse_positions(ds, tile_w: int, tile_h: int) -> tuple[tuple[int, int], ...]:
    out = []
    for frame in ds.get("PerFrameFunctionalGroupsSequence", []):
        pos = _first(frame, "PlanePositionSlideSequence")
        if pos is None:
            raise ValueError("a TILED_SPARSE frame without PlanePositionSlideSequence")
        out.append(((int(pos.ColumnPositionInTotalImagePixelMatrix) - 1) // tile_w,
                    (int(pos.RowPositionInTotalImagePixelMatrix) - 1) // tile_h))
    return tuple(out)


def read_header(path: Path) -> Instance | None:
    """The header of a .dcm file, read without its pixel data; None if not a WSI instance."""
    pydicom = _pydicom()
    regular_file(path)
    try:
        with open(path, "rb") as fh:
            ds = pydicom.dcmread(fh, stop_before_pixels=True)
            pixel_offset = fh.tell() if fh.read(4) == _PIXEL_DATA_TAG else -1
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, EOFError) as exc:
        raise ImageReadError(f"{path}: not a readable DICOM file ({exc})") from None
    return instance_of(ds, path, pixel_offset, str(ds.file_meta.TransferSyntaxUID))


def instance_of(ds, path: Path, pixel_offset: int, syntax: str) -> Instance | None:
    """The header facts of a dataset (read from a file, or a DICOMweb server's metadata:
    ``path`` then names the instance); None if not a WSI instance."""
    if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
        return None
    image_type = tuple(str(v).upper() for v in ds.get("ImageType", ()))
    kind = image_type[2] if len(image_type) > 2 else ""
    try:
        tile_w, tile_h = int(ds.Columns), int(ds.Rows)
        width = int(ds.get("TotalPixelMatrixColumns", tile_w))
        height = int(ds.get("TotalPixelMatrixRows", tile_h))
        tiled_full = str(ds.get("DimensionOrganizationType", "TILED_FULL")).upper() != "TILED_SPARSE"
        positions = (None if tiled_full or kind in NEVER_READ
                     else _sparse_positions(ds, tile_w, tile_h))
        spacing = _first(ds, "SharedFunctionalGroupsSequence", "PixelMeasuresSequence")
        spacing = spacing.get("PixelSpacing") if spacing is not None else None
        mm = (_num(spacing[1]), _num(spacing[0])) if spacing and len(spacing) == 2 else (None, None)
        optical = _first(ds, "OpticalPathSequence")
        return Instance(
            path=path, series=str(ds.get("SeriesInstanceUID", "")), image_type=image_type,
            width=width, height=height, tile_w=tile_w, tile_h=tile_h,
            frames=int(ds.get("NumberOfFrames", 1)), syntax=syntax,
            photometric=str(ds.get("PhotometricInterpretation", "")), tiled_full=tiled_full,
            concatenation=str(ds["ConcatenationUID"].value) if "ConcatenationUID" in ds else None,
            part=int(ds.get("InConcatenationNumber", 1) or 1),
            parts=int(ds.get("InConcatenationTotalNumber", 1) or 1),
            frame_offset=int(ds.get("ConcatenationFrameOffsetNumber", 0) or 0),
            pixel_offset=pixel_offset, positions=positions,
            mpp=tuple(None if v is None else v * 1000 for v in mm),
            objective=_num(optical.get("ObjectiveLensPower")) if optical is not None else None,
            vendor=str(ds.get("Manufacturer", "")) or None)
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise ImageReadError(f"{path}: DICOM header without the fields of a tiled slide ({exc})"
                             ) from None


@dataclass(frozen=True)
class Level:
    """One pyramid level: the instances holding its frames (one, or a concatenation's parts)."""

    parts: tuple[Instance, ...]

    @property
    def width(self) -> int:
        return self.parts[0].width

    @property
    def height(self) -> int:
        return self.parts[0].height


@dataclass(frozen=True)
class Series:
    """One DICOM WSI slide: its levels (largest first) and the instances never to be read."""

    folder: Path
    levels: tuple[Level, ...]
    kept_out: tuple[Path, ...]  # label and overview instances
    others: tuple[Path, ...] = ()  # the series' other instances (a THUMBNAIL), never read

    @property
    def files(self) -> list[Path]:
        """The slide's own instances (levels and thumbnails): what sorting copies."""
        return sorted({p.path for lv in self.levels for p in lv.parts} | set(self.others))


def open_series(path: Path) -> Series:
    """The one DICOM WSI series in a folder (or in the folder of a .dcm file), checked."""
    folder = slide_folder(path)
    if folder is None or not folder.is_dir():
        raise ImageReadError(f"{path}: file not found", kind=NOT_FOUND)
    where = folder
    headers = [(p, read_header(p)) for p in sorted(folder.iterdir()) if is_dcm(p) and p.is_file()]
    wsi = [h for _, h in headers if h is not None]
    if not wsi:
        raise ImageReadError(f"{where}: no DICOM whole-slide image instances (SOP class VL "
                             "Whole Slide Microscopy) among its .dcm files")
    kept_out = tuple(h.path for h in wsi if h.kind in NEVER_READ)
    volumes = [h for h in wsi if h.kind == "VOLUME"]
    series = sorted({h.series for h in volumes})
    if len(series) > 1:
        counts = ", ".join(f"...{s[-12:]} ({sum(h.series == s for h in volumes)} files)"
                           for s in series)
        raise ImageReadError(f"{where}: holds {len(series)} DICOM WSI series ({counts}); a slide "
                             "folder holds one series: put each series into its own folder",
                             kind=SEVERAL_SERIES)
    if not volumes:
        kinds = ", ".join(sorted({h.kind or "?" for h in wsi}))
        raise ImageReadError(f"{where}: incomplete DICOM slide: no VOLUME instances (only "
                             f"{kinds}); copy the whole series", kind=INCOMPLETE)
    others = tuple(h.path for h in wsi if h.kind not in (*NEVER_READ, "VOLUME")
                   and h.series == volumes[0].series)
    return Series(folder, group_levels(volumes, where), kept_out, others)


def group_levels(volumes: list[Instance], where: Path) -> tuple[Level, ...]:
    """The pyramid levels of a series' VOLUME instances, largest first, checked."""
    by_size: dict[tuple[int, int], list[Instance]] = {}
    for h in volumes:
        by_size.setdefault((h.width, h.height), []).append(h)
    levels = []
    for (w, h), group in sorted(by_size.items(), key=lambda kv: -kv[0][0] * kv[0][1]):
        concat = sorted({i.concatenation for i in group if i.concatenation})
        if concat:
            parts = sorted((i for i in group if i.concatenation == concat[0]), key=lambda i: i.part)
            missing = sorted(set(range(1, parts[0].parts + 1)) - {i.part for i in parts})
            if missing:
                raise ImageReadError(f"{where}: incomplete DICOM slide: level {w} x {h} is "
                                     f"split over {parts[0].parts} instances and part(s) "
                                     f"{', '.join(map(str, missing))} are missing; copy the "
                                     "whole series", kind=INCOMPLETE)
            levels.append(Level(tuple(parts)))
        else:
            levels.append(Level((sorted(group, key=lambda i: str(i.path))[0],)))
    base = levels[0].parts[0]
    if base.image_type and base.image_type[0] != "ORIGINAL":
        sizes = ", ".join(f"{lv.width} x {lv.height}" for lv in levels)
        raise ImageReadError(f"{where}: incomplete DICOM slide: the full-resolution level "
                             f"(ImageType ORIGINAL) is missing; found only derived levels "
                             f"{sizes}; copy the whole series", kind=INCOMPLETE)
    return tuple(levels)


def _fragments(fh, offset: int, where: Path) -> tuple[list[int], list[tuple[int, int]]]:
    """The basic offset table and the (offset, length) of every fragment after it."""
    fh.seek(offset + 8)  # past the Pixel Data tag, VR, reserved bytes and undefined length
    spans: list[tuple[int, int]] = []
    bot: list[int] = []
    first = True
    while True:
        head = fh.read(8)
        if len(head) < 8:
            raise ImageReadError(f"{where}: truncated DICOM pixel data; copy the file again")
        _, elem, length = struct.unpack("<HHI", head)
        if elem == _SEQ_END:
            return bot, spans
        if elem != _ITEM:
            raise ImageReadError(f"{where}: malformed DICOM pixel data (tag {elem:#06x})")
        if first:
            bot = list(struct.unpack(f"<{length // 4}I", fh.read(length))) if length else []
            first = False
            continue
        spans.append((fh.tell(), length))
        fh.seek(length, 1)


def _frame_spans(inst: Instance) -> list[list[tuple[int, int]]]:
    """The encoded bytes of each frame of an instance, as spans of the file."""
    if inst.pixel_offset < 0:
        raise ImageReadError(f"{inst.path}: no pixel data found after the header")
    if inst.syntax in NATIVE_SYNTAXES:
        size = inst.tile_w * inst.tile_h * 3
        return [[(inst.pixel_offset + 8 + k * size, size)] for k in range(inst.frames)]
    regular_file(inst.path)
    with open(inst.path, "rb") as fh:
        bot, frags = _fragments(fh, inst.pixel_offset, inst.path)
    if len(frags) == inst.frames:
        return [[s] for s in frags]
    if len(bot) == inst.frames:  # several fragments per frame: group them by the offset table
        first = frags[0][0] - 8 if frags else 0
        starts = [first + b for b in bot] + [math.inf]
        out: list[list[tuple[int, int]]] = [[] for _ in bot]
        k = 0
        for span in frags:
            while span[0] - 8 >= starts[k + 1]:
                k += 1
            out[k].append(span)
        return out
    raise ImageReadError(f"{inst.path}: {len(frags)} fragments for {inst.frames} frames and no "
                         "offset table to tell them apart; not supported")


def tiled_level(level: Level) -> TiledLevel:
    """A level's frames as a TiledLevel (first focal plane and optical path)."""
    inst = level.parts[0]
    if inst.syntax in JPEG_SYNTAXES:
        codec = "jpeg"
    elif inst.syntax in JPEG2000_SYNTAXES:
        codec = "jpeg2000"
    elif inst.syntax in NATIVE_SYNTAXES and inst.photometric == "RGB":
        codec = "raw"
    else:
        raise ImageReadError(f"{inst.path}: DICOM transfer syntax {inst.syntax} "
                             f"({inst.photometric}) is not supported for slides")
    if inst.tile_w < 1 or inst.tile_h < 1:
        raise ImageReadError(f"{inst.path}: frames of {inst.tile_w} x {inst.tile_h} pixels")
    cols = math.ceil(level.width / inst.tile_w)
    rows = math.ceil(level.height / inst.tile_h)
    frames = sum(part.frames for part in level.parts)
    if max(frames, cols * rows) > MAX_TILES:  # before a list of them is made (issue 33)
        raise SlideTooLarge(f"{inst.path}: too large: {max(frames, cols * rows):,} frames in the "
                            f"level read (at most {MAX_TILES:,}); convert it to a pyramidal slide")
    where: dict[tuple[int, int], tuple[Path, list[tuple[int, int]]]] = {}
    for part in level.parts:
        spans = _frame_spans(part)
        for k, frame in enumerate(spans):
            index = part.frame_offset + k
            if part.positions is not None:
                pos = part.positions[k] if k < len(part.positions) else None
            else:
                pos = (index % cols, index // cols) if index < cols * rows else None
            if pos is not None and pos not in where:  # first plane and path only
                where[pos] = (part.path, frame)
    several = len({p for p, _ in where.values()}) > 1  # a concatenation's parts
    return TiledLevel(level.width, level.height, inst.tile_w, inst.tile_h, inst.path,
                      lambda tx, ty: where.get((tx, ty), (None, None))[1], codec,
                      rgb=codec == "jpeg" and inst.photometric == "RGB",
                      positions=set(where) if inst.positions is not None else None,
                      source_of=(lambda tx, ty: where[(tx, ty)][0]) if several else None,
                      photometric=inst.photometric)


def properties(series: Series) -> tuple[str, float | None, float | None, float | None, int, int,
                                        int]:
    """Vendor, objective power, microns per pixel (x, y), level count, width, height."""
    base = series.levels[0].parts[0]
    return ("dicom", base.objective, base.mpp[0], base.mpp[1], len(series.levels), base.width,
            base.height)


def fingerprint(folder: Path) -> str:
    """Names, sizes and modification times of a DICOM folder's .dcm files (no reading)."""
    parts = []
    for p in sorted(folder.iterdir()):
        if is_dcm(p) and p.is_file():
            st = p.stat()
            parts.append(f"{p.name}:{st.st_size}:{st.st_mtime_ns}")
    return "|".join(parts)

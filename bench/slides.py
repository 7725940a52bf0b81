"""Slides of a real archive: generate one, read every slide's thumbnail, compare with the decoder.

    python bench/slides.py                     # 12 pyramids, a DICOM slide, the 48,600 x 27,760 giant
    python bench/slides.py --quick             # small: 4 pyramids, a 12,000 x 8,000 single-level slide
    python bench/slides.py --giant 0           # no single-level slide
    python bench/slides.py --deploy            # also deploy (a tiny model) on a tiny slide and the giant
    python bench/slides.py --executors         # deploy 10 copies of the archive: 1 and 2 workers, Ray
    python bench/slides.py --dicomweb 7        # the DICOM slide from its folder and over DICOMweb, 7x

The archive (patient folders; JPEG-tiled pyramidal TIFFs with levels /4, one DICOM WSI folder
written by wsidicomizer, one single-level JPEG-tiled TIFF) is written to --out (a temporary
folder by default) from a small library of encoded tiles, so that even the giant takes seconds
to write. Printed: per-slide reading time next to the JPEG decoder's own time (imagecodecs /
libjpeg-turbo, one thread, every tile of the level thumbclf reads, decoded at full size),
slides/s with 1 and 2 decoding workers, and the giant's extra wall time and peak memory over a
tiny slide's, each measured in a fresh process. --executors deploys hard-linked copies of the
archive (distinct paths, so every copy is read) with executor local (1 and 2 workers) and ray.
--dicomweb N writes the DICOM slide only, loads it into a throwaway Orthanc on 127.0.0.1 (the
tests' server, tests/inputs/orthanc_server.py) and reads its thumbnail N times, alternating, from
its folder and over DICOMweb (the series metadata asked afresh each time): the medians of the
wall seconds and the bytes read. Needs the test extra (imagecodecs, wsidicomizer); --executors
also the ray extra; --dicomweb also the dicomweb extra and Debian's orthanc and orthanc-dicomweb.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from thumbclf.inputs import cache, slides, tiles  # noqa: E402
from thumbclf.inputs.images import Preprocessing  # noqa: E402

TILE = 256
SIZE = 1024  # slide_thumbnail_size


def tile_library(seed: int = 0) -> list[bytes]:
    """JPEG tiles: 2 background (about 2 KB), 6 tissue textures (about 12 KB), as scanned."""
    import imagecodecs

    rng = np.random.default_rng(seed)
    out = []
    for k in range(8):
        base = (242, 240, 244) if k < 2 else (180 - 8 * k, 80 + 5 * k, 150 - 4 * k)
        noise = rng.normal(0, 2 if k < 2 else 7, (TILE, TILE, 1))
        blobs = rng.normal(0, 18, (TILE // 16, TILE // 16, 3)).repeat(16, 0).repeat(16, 1)
        img = np.clip(np.array(base) + noise + (0 if k < 2 else blobs), 0, 255).astype(np.uint8)
        out.append(imagecodecs.jpeg8_encode(img, level=85))
    return out


def _tiles(lib: list[bytes], cols: int, rows: int, seed: int):
    """Encoded tiles row by row: tissue inside two ellipses, background outside."""
    rng = np.random.default_rng(seed)
    for ty in range(rows):
        for tx in range(cols):
            u, v = (tx + 0.5) / cols, (ty + 0.5) / rows
            tissue = ((u - 0.35) / 0.25) ** 2 + ((v - 0.5) / 0.35) ** 2 < 1 or \
                ((u - 0.72) / 0.15) ** 2 + ((v - 0.45) / 0.25) ** 2 < 1
            yield lib[2 + int(rng.integers(0, 6))] if tissue else lib[int(rng.integers(0, 2))]


def write_tiff(path: Path, w: int, h: int, lib: list[bytes], *, pyramid: bool, seed: int = 0,
               mpp: float = 0.25) -> Path:
    """A JPEG-tiled TIFF from encoded tiles: levels /4 down to about 1,000 px, or one level."""
    import tifffile

    path.parent.mkdir(parents=True, exist_ok=True)
    with tifffile.TiffWriter(path, bigtiff=w * h > 2 ** 30) as tw:
        k = 1
        while True:
            lw, lh = math.ceil(w / k), math.ceil(h / k)
            res = 1e4 / (mpp * k)
            tw.write(_tiles(lib, math.ceil(lw / TILE), math.ceil(lh / TILE), seed),
                     shape=(lh, lw, 3), dtype="uint8", tile=(TILE, TILE), compression="jpeg",
                     photometric="rgb", resolution=(res, res), resolutionunit="CENTIMETER",
                     subfiletype=0 if k == 1 else 1)
            if not pyramid or max(lw, lh) <= 4 * SIZE:
                break
            k *= 4
    return path


def make_archive(out: Path, n_pyramids: int, giant: tuple[int, int] | None, small: bool) -> dict:
    """patientNN/slide.tiff pyramids, a DICOM folder, the single-level slide."""
    lib = tile_library()
    rng = np.random.default_rng(1)
    paths: dict[str, list[Path]] = {"pyramid": [], "dicom": [], "single": []}
    lo, hi = (4_000, 8_000) if small else (10_000, 22_000)
    for i in range(n_pyramids):
        w = int(rng.integers(lo, hi))
        paths["pyramid"].append(write_tiff(out / f"patient{i // 3:02d}" / f"slide{i:02d}.tiff",
                                           w, int(w * rng.uniform(0.6, 0.8)), lib,
                                           pyramid=True, seed=i))
    try:
        from wsidicomizer import WsiDicomizer

        src = write_tiff(out.parent / f"{out.name}-src" / "d.tiff", 8_000, 6_000, lib,
                         pyramid=True, seed=99)
        (out / "patientD").mkdir(parents=True, exist_ok=True)
        WsiDicomizer.convert(src, out / "patientD" / "dicom-slide", workers=1,
                             include_label=False, include_overview=False)
        paths["dicom"].append(out / "patientD" / "dicom-slide")
    except ImportError:
        print("wsidicomizer is not installed: no DICOM slide (pip install wsidicomizer)")
    if giant:
        paths["single"].append(write_tiff(out / "patientG" / "single-level.tiff", *giant, lib,
                                          pyramid=False, seed=7))
    return paths


def decoder_seconds(path: Path, long_side: int = SIZE) -> tuple[float, int]:
    """imagecodecs' own time to decode, at full size and in one thread, every tile of the level
    thumbclf reads; and the number of tiles."""
    import imagecodecs

    level = slides.tiled_level(path, long_side)[1]  # the level thumbclf reads
    spans = [level.locate(tx, ty) for ty in range(level.grid[1]) for tx in range(level.grid[0])]
    with open(level.source, "rb") as fh:
        data = []
        for s in spans:
            if s:
                parts = []
                for offset, length in s:
                    fh.seek(offset)
                    parts.append(fh.read(length))
                data.append(b"".join(parts))
    start = time.perf_counter()
    for d in data:
        imagecodecs.jpeg8_decode(d, tables=level.tables)
    return time.perf_counter() - start, len(data)


def per_slide(paths: list[Path], repeats: int = 3) -> list[dict]:
    """Each slide read in this process (no cache), next to the decoder's time; the best of
    ``repeats`` alternating tries of each (the machine may be shared)."""
    rows = []
    for p in paths:
        best, dec = None, math.inf
        for _ in range(repeats):
            stats = tiles.ReadStats()  # seconds: the reading, as thumbnail() times it
            slides.thumbnail(p, SIZE, stats=stats)
            best = stats if best is None or stats.seconds < best.seconds else best
            d, n = decoder_seconds(p)
            dec = min(dec, d)
        rows.append({"slide": p.name, "seconds": best.seconds, "decoder": dec, "tiles": n,
                     "tile_phase": best.tiles_seconds, "resize": best.resize_seconds,
                     "level": best.level, "scale": best.dct_scale, "reader": best.reader})
    return rows


def throughput(paths: list[Path], workers: int) -> float:
    """Slides per second through thumbclf's decode-once step (thumbnail and 224 px array)."""
    start = time.perf_counter()
    got = cache.build(paths, Preprocessing(size=224, slide_size=SIZE), mode="memory",
                      workers=workers, progress=False)
    assert not got.errors, got.errors
    return len(paths) / (time.perf_counter() - start)


CHILD = ("import resource,sys,time; sys.path.insert(0,{root!r}); "
         "from pathlib import Path; from thumbclf.inputs.decode import load_array; "
         "from thumbclf.inputs.images import Preprocessing; t=time.perf_counter(); "
         "load_array(Path({path!r}), Preprocessing(slide_size={size})); "
         "print(time.perf_counter()-t, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)")


def in_fresh_process(path: Path) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of a fresh Python process that reads one slide."""
    start = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", CHILD.format(root=str(ROOT), path=str(path),
                                                           size=SIZE)],
                       capture_output=True, text=True, check=True)
    wall = time.perf_counter() - start
    return wall, float(r.stdout.split()[1]) / 1024


def tiny_model(work: Path) -> Path:
    """A tiny model (2 classes, 1 epoch) trained once in ``work``."""
    from thumbclf.inputs import synth

    model = work / "t" / "model.pt"
    if model.is_file():
        return model
    table = synth.generate(work / "train-data", per_class=6, seed=3, sides=(60, 160),
                           classes=("Biopsy", "IHC"), patients=4)
    (work / "t.yaml").write_text(f"thumbData: {table}\ntrainFull: true\npretrained: false\n"
                                 "max_epochs: 1\nstopEpoch: 0\nbootstrap: 0\n")
    subprocess.run([sys.executable, str(ROOT / "train_thumbclassifier.py"), str(work / "t.yaml")],
                   check=True, capture_output=True)
    return model


def deploy_delta(tiny: Path, giant: Path, work: Path) -> dict:
    """Wall time and peak memory of deploy_thumbclassifier.py on one tiny slide and on the giant
    (a tiny model trained here first)."""
    model = tiny_model(work)
    out = {}
    for name, slide in (("tiny", tiny), ("giant", giant)):
        folder = work / f"in-{name}"
        folder.mkdir()
        os.symlink(slide, folder / slide.name)
        (work / f"{name}.yaml").write_text(
            f"thumbData: {folder}\nhasLabels: false\nmodelAdr: {model}\n"
            "bootstrap: 0\nnum_workers: 1\ncache_dir: " + str(work / f"cache-{name}") + "\n")
        start = time.perf_counter()
        r = subprocess.run(["/usr/bin/time", "-f", "%M", sys.executable,
                            str(ROOT / "deploy_thumbclassifier.py"), str(work / f"{name}.yaml")],
                           capture_output=True, text=True, check=True)
        out[name] = (time.perf_counter() - start, int(r.stderr.strip().splitlines()[-1]) / 1024,
                     [ln for ln in r.stderr.splitlines() if "accounted for" in ln])
    return out


def linked_copies(archive: list[Path], folder: Path, copies: int) -> int:
    """``copies`` hard-linked copies of every slide (a DICOM folder: of its files) in ``folder``:
    distinct paths, so each is read (the thumbnail cache is keyed by path), no disk used."""
    n = 0
    for i in range(copies):
        for p in archive:
            target = folder / f"copy{i:02d}" / p.parent.name / p.name
            target.parent.mkdir(parents=True, exist_ok=True)
            if p.is_dir():
                target.mkdir()
                for f in p.iterdir():
                    os.link(f, target / f.name)
            else:
                os.link(p, target)
            n += 1
    return n


def timed_deploy(work: Path, name: str, folder: Path, model: Path, settings: str) -> float:
    """Wall seconds of one deploy (a fresh thumbnail cache, so every slide is read)."""
    (work / f"{name}.yaml").write_text(
        f"thumbData: {folder}\nhasLabels: false\nmodelAdr: {model}\nbootstrap: 0\n"
        f"cache_dir: {work / ('cache-' + name)}\n{settings}")
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "thumbclf", "deploy", str(work / f"{name}.yaml"),
                    "--quiet"], check=True, capture_output=True, cwd=work)
    return time.perf_counter() - start


def executors(archive: list[Path], work: Path, copies: int = 10) -> None:
    """Deploy slides/s with executor local (1 and 2 workers) and ray: the time beyond a deploy
    of one slide (start-up, model loading, Ray's start) over the slides beyond it."""
    model = tiny_model(work)
    many = work / "many"
    n = linked_copies(archive, many, copies)
    one = work / "one"
    linked_copies(archive[:1], one, 1)
    print(f"\ndeploy of {n} slides ({copies} hard-linked copies of the archive), tiny model:")
    for key, label, settings in (
            ("local1", "local, 1 worker", "num_workers: 1\n"),
            ("local2", "local, 2 workers", "num_workers: 2\n"),
            ("ray", "ray (local instance, 2 CPUs)", "executor: ray\nnum_workers: 2\n")):
        base = timed_deploy(work, f"one-{key}", one, model, settings)
        full = timed_deploy(work, f"many-{key}", many, model, settings)
        print(f"  {label:<30} {full:6.1f} s; one slide {base:5.1f} s: "
              f"{(n - 1) / max(full - base, 1e-9):5.1f} slides/s beyond start-up")


def dicomweb_vs_folder(folder: Path, work: Path, repeats: int) -> dict:
    """Median wall seconds and bytes of the DICOM slide's thumbnail read ``repeats`` times,
    alternating, from its folder and over DICOMweb from a local Orthanc (metadata included)."""
    import statistics

    sys.path.insert(0, str(ROOT / "tests" / "inputs"))
    import orthanc_server

    from thumbclf.inputs import dicomweb

    srv, why = orthanc_server.start(work / "orthanc")
    if srv is None:
        raise SystemExit(f"--dicomweb: {why}")
    os.environ[dicomweb.USER], os.environ[dicomweb.PASSWORD] = (orthanc_server.USER,
                                                                orthanc_server.PASSWORD)
    try:
        srv.upload(sorted(folder.glob("*.dcm")))
        url = dicomweb.list_series(srv.dicomweb)[0].url
        runs = {"folder": [], "dicomweb": []}
        for _ in range(repeats):
            for name in runs:
                dicomweb._KNOWN.clear()  # the metadata is asked every time
                stats, start = tiles.ReadStats(), time.perf_counter()
                if name == "folder":
                    slides.thumbnail(folder, SIZE, stats=stats)
                else:
                    dicomweb.thumbnail(url, SIZE, stats=stats)
                runs[name].append((time.perf_counter() - start, stats.encoded_bytes))
    finally:
        srv.stop()
    out = {k: (statistics.median(t for t, _ in v), statistics.median(b for _, b in v))
           for k, v in runs.items()}
    ratios = [w[0] / f[0] for f, w in zip(runs["folder"], runs["dicomweb"])]
    print(f"\nDICOM slide ({SIZE} px thumbnail), {repeats} alternating reads, medians:")
    for k, (t, b) in out.items():
        print(f"  {k:<9} {t:7.3f} s  {b / 1e6:6.2f} MB  (all: "
              f"{', '.join(f'{x:.3f}' for x, _ in runs[k])})")
    print(f"  DICOMweb / folder: {out['dicomweb'][0] / out['folder'][0]:.2f}x (median of the "
          f"pairs {statistics.median(ratios):.2f}x; target <= 1.5x)")
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, help="where to write the archive (default: a temp dir)")
    ap.add_argument("--pyramids", type=int, default=12)
    ap.add_argument("--giant", default="48600x27760", help="WxH of the single-level slide; 0: none")
    ap.add_argument("--quick", action="store_true", help="4 small pyramids, a 12000x8000 giant")
    ap.add_argument("--deploy", action="store_true", help="deploy on a tiny slide and the giant")
    ap.add_argument("--executors", action="store_true",
                    help="deploy 10 hard-linked copies of the archive: 1, 2 workers and Ray")
    ap.add_argument("--dicomweb", type=int, default=0, metavar="N",
                    help="only the DICOM slide: N reads from its folder and over DICOMweb")
    args = ap.parse_args(argv)
    if args.quick:
        args.pyramids, args.giant = 4, "12000x8000" if args.giant == "48600x27760" else args.giant
    giant = None if args.giant in ("0", "") else tuple(int(v) for v in args.giant.split("x"))
    with tempfile.TemporaryDirectory(prefix="thumbclf-slides-") as tmp:
        out = args.out or Path(tmp) / "archive"
        t0 = time.perf_counter()
        if args.dicomweb:
            paths = make_archive(out, 0, None, args.quick)
            dicomweb_vs_folder(paths["dicom"][0], Path(tmp), args.dicomweb)
            return 0
        paths = make_archive(out, args.pyramids, giant, args.quick)
        print(f"archive written in {time.perf_counter() - t0:.1f} s: {out}")
        report(paths, Path(tmp), args.deploy)
        if args.executors:
            executors(paths["pyramid"] + paths["dicom"], Path(tmp))
    return 0


def report(paths: dict, tmp: Path, deploy: bool) -> None:
    archive = paths["pyramid"] + paths["dicom"]
    rows = per_slide(archive)
    print(f"\n{'slide':<22}{'read s':>8}{'tiles s':>8}{'resize s':>9}{'decoder s':>10}"
          f"{'ratio':>7}{'tiles':>7}  level, scale")
    for r in rows:
        print(f"{r['slide']:<22}{r['seconds']:>8.3f}{r['tile_phase']:>8.3f}{r['resize']:>9.3f}"
              f"{r['decoder']:>10.3f}{r['seconds'] / r['decoder']:>7.2f}{r['tiles']:>7}  "
              f"{r['level']}, 1/{r['scale']} ({r['reader']})")
    read = sum(r["seconds"] for r in rows)
    phase = sum(r["tile_phase"] for r in rows)
    resize = sum(r["resize"] for r in rows)
    dec = sum(r["decoder"] for r in rows)
    print(f"pyramidal + DICOM: {len(rows)} slides read in {read:.2f} s: {phase:.2f} s reading and "
          f"decoding tiles, {resize:.2f} s the last resize, {read - phase - resize:.2f} s opening "
          f"the files and their headers; the decoder alone {dec:.2f} s for the same tiles: "
          f"{read / dec:.2f}x the decoder's time in all, {phase / dec:.2f}x for the tiles "
          f"({len(rows) / read:.1f} slides/s in one process)")
    for w in (1, 2):
        print(f"decode step (thumbnail + 224 px array), {w} worker{'s' * (w > 1)}: "
              f"{throughput(archive, w):.1f} slides/s")
    if paths["single"]:
        big = paths["single"][0]
        tiny = paths["pyramid"][0]
        big_dec, n = decoder_seconds(big)
        (tw, tm), (gw, gm) = in_fresh_process(tiny), in_fresh_process(big)
        print(f"\nsingle-level {big.name} ({big.stat().st_size / 1e6:.0f} MB, {n} tiles): "
              f"{gw:.1f} s and {gm:.0f} MB peak in a fresh process; a pyramid slide "
              f"{tw:.1f} s and {tm:.0f} MB: +{gw - tw:.1f} s, +{gm - tm:.0f} MB. The decoder at "
              f"full size needs {big_dec:.1f} s for its tiles (one thread)")
        if deploy:
            d = deploy_delta(tiny, big, tmp)
            print(f"deploy: tiny slide {d['tiny'][0]:.1f} s, {d['tiny'][1]:.0f} MB; giant "
                  f"{d['giant'][0]:.1f} s, {d['giant'][1]:.0f} MB: +{d['giant'][0] - d['tiny'][0]:.1f} s, "
                  f"+{d['giant'][1] - d['tiny'][1]:.0f} MB peak")
            print("  " + "; ".join(d["giant"][2]))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak memory of this process: {peak:.0f} MB")
    print(json.dumps({"slides": len(rows), "read_s": round(read, 3), "decoder_s": round(dec, 3)}))


if __name__ == "__main__":
    sys.exit(main())

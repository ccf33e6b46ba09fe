"""Broden loader benchmark: images per second and peak memory of
:func:`pyneuron.concepts.broden.broden` (PNG decoding + the concept-store writer) on a
synthetic Broden-format folder, generated in a temporary directory.

    python bench/broden_bench.py [--images 5000] [--seg-size 112] [--keep DIR]

The synthetic folder has Broden's layout and rough statistics: ~1,260 labels (11 colors,
600 objects, 200 parts, 400 scenes, 47 textures); per image an object PNG (3-12 Zipf-
distributed objects as rectangles and ellipses, ~15 % unlabelled), a color PNG (blocky
palette), part PNGs for half the images (a second part level for a fifth), one scene
number (sometimes two), textures on a quarter; sources ade20k / pascal / dtd /
opensurfaces as in Broden's image paths. Label PNGs are ``seg-size`` squared, RGB,
label = R + 256 G.

Each configuration runs in a fresh child process so its peak RSS is its own; a second
child repeats it under ``tracemalloc`` for the peak of Python/numpy allocations.
A decode-only pass (open every PNG and compute R + 256 G, no store) gives the I/O floor.
Results go to ``bench/results/broden.json`` and a small table is printed.
``run()`` is the entry point other benchmarks (bench/segment.py) can call.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

RESULTS = Path(__file__).resolve().parent / "results"
CATEGORIES = ["color", "object", "part", "material", "scene", "texture"]
COLORS = ["black", "blue", "brown", "green", "grey", "orange", "pink", "purple", "red"]
COLORS += ["white", "yellow"]
N_OBJECTS, N_PARTS, N_SCENES, N_TEXTURES = 600, 200, 400, 47


def _label_table() -> list[tuple[int, str, str]]:
    labels: list[tuple[int, str, str]] = []
    number = 1
    for name in COLORS:
        labels.append((number, f"{name}-c", "color(1000)"))
        number += 1
    for kind, count, category in (
        ("object", N_OBJECTS, "object"),
        ("part", N_PARTS, "part"),
        ("scene", N_SCENES, "scene"),
        ("texture", N_TEXTURES, "texture"),
    ):
        for k in range(count):
            labels.append((number, f"{kind}{k:04d}", f"{category}({max(1, 1000 // (k + 1))})"))
            number += 1
    return labels


def _zipf(rng: np.random.Generator, n: int, size: int) -> np.ndarray:
    weights = 1.0 / np.arange(1, n + 1)
    return rng.choice(n, size=size, p=weights / weights.sum())


def _paint(rng: np.random.Generator, canvas: np.ndarray, labels: np.ndarray) -> None:
    """Paint rectangles/ellipses of ``labels`` (big first) into ``canvas`` in place."""
    size = canvas.shape[0]
    yy, xx = np.ogrid[:size, :size]
    radii = np.sort(rng.uniform(0.08, 0.5, size=labels.size))[::-1] * size
    for label, radius in zip(labels, radii):
        cy, cx = rng.uniform(0, size, 2)
        ry, rx = radius * rng.uniform(0.5, 1.0, 2)
        if rng.random() < 0.5:
            region = (np.abs(yy - cy) < ry) & (np.abs(xx - cx) < rx)
        else:
            region = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 < 1
        canvas[region] = label


def _save_labels(path: Path, labels: np.ndarray) -> None:
    rgb = np.zeros((*labels.shape, 3), dtype=np.uint8)
    rgb[..., 0] = labels % 256
    rgb[..., 1] = labels // 256
    Image.fromarray(rgb).save(path, compress_level=1)


def make_broden(root: Path, n_images: int = 5000, seg_size: int = 112, seed: int = 0) -> Path:
    """Write a synthetic Broden-format folder (see the module docstring) under ``root``."""
    rng = np.random.default_rng(seed)
    labels = _label_table()
    first = {"color": 1, "object": 1 + len(COLORS)}
    first["part"] = first["object"] + N_OBJECTS
    first["scene"] = first["part"] + N_PARTS
    first["texture"] = first["scene"] + N_SCENES
    sources = rng.choice(
        ["ade20k", "pascal", "dtd", "opensurfaces"], n_images, p=[0.6, 0.2, 0.1, 0.1]
    )
    rows = []
    for i, source in enumerate(sources):
        folder = root / "images" / source
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"{source}/img_{i:05d}"
        row = {c: "" for c in CATEGORIES}
        row.update(image=f"{stem}.jpg", split="train" if i % 5 else "val")
        palette = first["color"] + rng.choice(len(COLORS), size=rng.integers(2, 5), replace=False)
        blocks = rng.choice(palette, size=(8, 8))
        color = np.kron(blocks, np.ones((seg_size // 8 + 1,) * 2, dtype=np.int64))
        _save_labels(root / "images" / f"{stem}_color.png", color[:seg_size, :seg_size])
        row["color"] = f"{stem}_color.png"
        if source != "dtd":
            objects = np.zeros((seg_size, seg_size), dtype=np.int64)
            objects[:] = first["object"] + _zipf(rng, 3, 1)[0]  # a "wall" behind everything
            _paint(rng, objects, first["object"] + _zipf(rng, N_OBJECTS, int(rng.integers(3, 12))))
            hole = rng.integers(0, seg_size - seg_size // 3, 2)
            objects[hole[0] : hole[0] + seg_size // 3, hole[1] : hole[1] + seg_size // 3] = 0
            _save_labels(root / "images" / f"{stem}_object.png", objects)
            row["object"] = f"{stem}_object.png"
            parts = []
            for level in range(2):
                if rng.random() < (0.5 if level == 0 else 0.4):
                    part = np.zeros_like(objects)
                    _paint(rng, part, first["part"] + _zipf(rng, N_PARTS, int(rng.integers(1, 5))))
                    part[objects == 0] = 0
                    _save_labels(root / "images" / f"{stem}_part_{level + 1}.png", part)
                    parts.append(f"{stem}_part_{level + 1}.png")
            row["part"] = ";".join(parts)
            scenes = first["scene"] + _zipf(rng, N_SCENES, 1 + int(rng.random() < 0.05))
            row["scene"] = ";".join(str(s) for s in np.unique(scenes))
        if source == "dtd" or rng.random() < 0.15:
            textures = first["texture"] + _zipf(rng, N_TEXTURES, 1 + int(rng.random() < 0.3))
            row["texture"] = ";".join(str(t) for t in np.unique(textures))
        rows.append(row)
    header = ["image", "split", "ih", "iw", "sh", "sw", *CATEGORIES]
    with open(root / "index.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in rows:
            writer.writerow(
                [row["image"], row["split"], 2 * seg_size, 2 * seg_size, seg_size, seg_size]
                + [row[c] for c in CATEGORIES]
            )
    with open(root / "label.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["number", "name", "category", "frequency", "coverage", "syns"])
        writer.writerows([n, name, cat, 1, 0.1, ""] for n, name, cat in labels)
    with open(root / "category.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["name", "first", "last", "count", "frequency"])
        writer.writerows([c, 0, 0, 0, 0] for c in CATEGORIES)
    return root


# -- measurement in a child process ----------------------------------------------------------


def _status_kb(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _child(config: dict[str, Any]) -> dict[str, Any]:
    import tracemalloc

    from pyneuron.concepts.broden import _label_image, _read_index, broden

    root = Path(config["root"])
    if config.get("tracemalloc"):
        tracemalloc.start()
    baseline_kb = _status_kb("VmRSS")
    start = time.perf_counter()
    if config["mode"] == "decode":
        table = _read_index(root, None, None, None, "index.csv")
        files = 0
        for row in table.rows:
            for category in table.categories:
                for item in row[category]:
                    if isinstance(item, str):
                        _label_image(root / "images" / item)
                        files += 1
        result: dict[str, Any] = {"images": len(table.rows), "png_files": files}
    else:
        out = config.get("out")
        store = broden(root, grid=config["grid"], out=out, progress=False)
        result = {
            "images": store.grid.n_images,
            "concepts": len(store),
            "entries": int(store._images.shape[0]),
            "bitsets": int(store._words.shape[0]),
            "store_bytes": int(store.nbytes),
        }
        if out is not None:
            result["disk_bytes"] = sum(p.stat().st_size for p in Path(out).iterdir())
    seconds = time.perf_counter() - start
    result.update(seconds=seconds, images_per_s=result["images"] / seconds)
    if config.get("tracemalloc"):
        result["traced_peak_mb"] = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    else:
        result["baseline_rss_mb"] = baseline_kb / 1024
        result["peak_rss_mb"] = _status_kb("VmHWM") / 1024
        result["peak_rss_delta_mb"] = result["peak_rss_mb"] - result["baseline_rss_mb"]
    return result


def _in_child(config: dict[str, Any]) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(config)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(done.stdout.strip().splitlines()[-1])


def run(
    n_images: int = 5000,
    seg_size: int = 112,
    seed: int = 0,
    keep: str | os.PathLike[str] | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Generate the folder, time every configuration, return (and write) the results."""
    workdir = Path(keep) if keep is not None else Path(tempfile.mkdtemp(prefix="broden-bench-"))
    try:
        root = workdir / "broden"
        start = time.perf_counter()
        if not (root / "index.csv").is_file():
            make_broden(root, n_images, seg_size, seed)
        generate_s = time.perf_counter() - start
        folder_bytes = sum(p.stat().st_size for p in root.rglob("*") if p.is_file())
        configs = [
            ("decode only (PIL, R+256G)", {"mode": "decode"}),
            (f"broden grid={seg_size}, in memory", {"mode": "store", "grid": seg_size}),
            (f"broden grid={seg_size}, to disk", {"mode": "store", "grid": seg_size, "out": 1}),
            (
                f"broden grid={seg_size // 2}, to disk",
                {"mode": "store", "grid": seg_size // 2, "out": 1},
            ),
        ]
        runs = []
        for k, (name, config) in enumerate(configs):
            config = dict(config, root=str(root))
            if config.pop("out", None):
                config["out"] = str(workdir / f"store{k}")
            measured = _in_child(config)
            if "out" in config:
                shutil.rmtree(config["out"], ignore_errors=True)
            traced = _in_child(dict(config, tracemalloc=True))
            if "out" in config:
                shutil.rmtree(config["out"], ignore_errors=True)
            measured["traced_peak_mb"] = traced["traced_peak_mb"]
            runs.append({"name": name, **config, **measured})
    finally:
        if keep is None:
            shutil.rmtree(workdir, ignore_errors=True)
    import pyneuron

    result = {
        "benchmark": "broden loader",
        "spec": {
            "n_images": n_images,
            "seg_size": seg_size,
            "seed": seed,
            "labels": len(_label_table()),
            "folder_mb": folder_bytes / 2**20,
            "generate_s": generate_s,
        },
        "machine": {
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "numpy": np.__version__,
            "pillow": Image.__version__,
            "pyneuron": pyneuron.__version__,
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        },
        "runs": [{k: v for k, v in r.items() if k not in ("root", "out")} for r in runs],
    }
    if write:
        RESULTS.mkdir(exist_ok=True)
        (RESULTS / "broden.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def table(result: dict[str, Any]) -> str:
    """The results as a small text table."""
    spec = result["spec"]
    lines = [
        f"Broden loader, {spec['n_images']} synthetic images, {spec['seg_size']}^2 label PNGs, "
        f"{spec['labels']} labels ({spec['folder_mb']:.1f} MB folder, generated in "
        f"{spec['generate_s']:.0f} s)",
        f"{'configuration':<34} {'images/s':>9} {'seconds':>8} {'peak RSS +MB':>13} "
        f"{'traced MB':>10} {'store MB':>9}",
    ]
    floor = result["runs"][0]["images_per_s"]
    for r in result["runs"]:
        store = f"{r['store_bytes'] / 2**20:9.1f}" if "store_bytes" in r else f"{'-':>9}"
        ratio = "" if r is result["runs"][0] else f"  ({r['images_per_s'] / floor:.2f}x decode)"
        lines.append(
            f"{r['name']:<34} {r['images_per_s']:9.0f} {r['seconds']:8.2f} "
            f"{r['peak_rss_delta_mb']:13.1f} {r['traced_peak_mb']:10.1f} {store}{ratio}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--seg-size", type=int, default=112)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--keep", help="generate into (or reuse) this folder and keep it")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(_child(json.loads(args.child))))
        return {}
    result = run(args.images, args.seg_size, args.seed, args.keep)
    print(table(result))
    print(f"written to {RESULTS / 'broden.json'}")
    return result


if __name__ == "__main__":
    main()

"""Benchmark (issue 23): ``pyneuron dissect`` end to end against the bare forward pass.

Measures peak memory as the probing set grows, and the pipeline's cost over the model's
forward pass.

A ResNet-50 (bench/pipeline_model.py, random weights from a fixed seed) is dissected
at ``--layers`` (default layer1..layer4, 3,840 units) over synthetic probing sets of
``--images`` PNGs (default 1,000 and 4,000, ``--image-size`` pixels square: colored
blobs on a smooth background) with a concept store on disk (``--concepts`` blob concepts
on the ``--grid`` grid, present in from 0.3 % to 50 % of the images; the store records
the image names, so the CLI checks the folder against it). Each measured run is its own
subprocess, and its peak RSS is the child's own (``os.wait4``), with the peaks of its
anonymous and file-backed resident memory sampled every 50 ms (``/proc/PID/status``:
file-backed pages are the memory-mapped store, unit masks and activations, which the
kernel can drop; anonymous pages are what the run really holds):

- ``forward``: the model over the folder as the CLI feeds it (same decoding, resize and
  normalization, same batch size), nothing kept: the baseline, run before and after the
  others (the faster of the two is kept, both times are recorded);
- ``dissect``: ``pyneuron dissect`` at ``--layers`` (``--length`` from
  ``--search-length``, more options from ``--extra``), with the run's own timings from
  its summary.json (capture, the stages of each layer, report, total);
- ``dissect_layer4``: the same at ``--single-layer`` (layer4) only;
- ``segmenter``: ``dissect`` on a concept list segmented by a tiny random CLIPSeg
  (``--segmenter clipseg:DIR``) in place of the store, at ``--segmenter-images`` sizes
  (default all); segmentation comes before the run's own timer: compare wall times.

Printed per size: wall time, the run's own time and stages, images/s (run and wall),
peak RSS, and the pipeline overhead ``run / forward - 1`` (run: the run's ``total``,
from the start of capture to the written run, also without its report; forward: the
baseline's timed loop), with the single layer's stages of the ``dissect`` run over the
forward time; then the growth of each kind of run's peak RSS from the smallest to the
largest set. Targets: peak RSS grows < 15 % while the images grow 4x; the layer4-only
pipeline costs < 25 % over the forward pass. ``--threads`` sets torch's and the
engine's threads in every run (OMP_NUM_THREADS, PYNEURON_NUM_THREADS): on a shared
machine 1 keeps timings steady, as 2 threads on 2 busy cores stall.

    python bench/pipeline.py [--images 1000,4000] [--image-size 112] [--grid 56]
        [--threads 1] [--search-length 1] [--extra "--beam 5"] [--skip-segmenter]
        [--out bench/results/pipeline.json]

Writes ``--out`` (default bench/results/pipeline.json).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import string
import subprocess
import sys
import tempfile
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
MODEL = f"{BENCH / 'pipeline_model.py'}:resnet50"
RESULTS = BENCH / "results" / "pipeline.json"
TARGET_RSS_GROWTH = 0.15
TARGET_SINGLE_OVERHEAD = 0.25  # at layer4


# -- the probing set ----------------------------------------------------------------------


def concept_names(k: int) -> list[str]:
    """``k`` distinct lowercase words (the tiny CLIPSeg's tokenizer knows only letters)."""
    rng = np.random.default_rng(1)
    names: list[str] = []
    while len(names) < k:
        name = "".join(rng.choice(list(string.ascii_lowercase), 6))
        if name not in names:
            names.append(name)
    return names


def write_probing_set(
    folder: Path, n: int, image_size: int, grid: int, n_concepts: int, seed: int = 0
) -> tuple[Path, Path]:
    """``n`` PNGs under ``folder/images`` and their concept store ``folder/store``.

    Image ``i`` depends only on ``seed`` and ``i``, so a smaller set is a prefix of a larger.
    Concept ``c`` is an elliptic blob of its own color, present in an image with a
    probability from 0.3 % (concept 0) to 50 % (the last), log-spaced.
    """
    from PIL import Image

    import pyneuron

    images = folder / "images"
    images.mkdir(parents=True)
    names = concept_names(n_concepts)
    presence = np.geomspace(0.003, 0.5, n_concepts)
    colors = np.random.default_rng([seed, 0]).integers(0, 256, (n_concepts, 3), dtype=np.uint8)
    centers = (np.arange(grid) + 0.5) / grid
    yy, xx = np.meshgrid(centers, centers, indexing="ij")
    upsample = (np.arange(image_size) * grid) // image_size  # grid cell of each pixel
    files = [f"{i:05d}.png" for i in range(n)]
    with pyneuron.ConceptStore.writer(
        (n, grid, grid), names, path=folder / "store", metadata={"images": files}
    ) as writer:
        for i, file in enumerate(files):
            rng = np.random.default_rng([seed, 1, i])
            small = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8))
            pixels = np.array(small.resize((image_size, image_size), Image.BILINEAR))
            masks = {}
            for c in np.flatnonzero(rng.random(n_concepts) < presence):
                cy, cx = rng.random(2)
                ry, rx = rng.uniform(0.08, 0.3, 2)
                mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
                masks[names[c]] = mask
                pixels[mask[upsample][:, upsample]] = colors[c]
            Image.fromarray(pixels).save(images / file)
            writer.add_image(i, masks=masks)
    return images, folder / "store"


def write_segmenter(folder: Path) -> None:
    """The tests' tiny random CLIPSeg with its processor (tests/test_segment.py), saved."""
    import transformers

    transformers.utils.logging.disable_progress_bar()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from test_segment import save_tiny_clipseg

    save_tiny_clipseg(folder)


# -- measured subprocesses ----------------------------------------------------------------


def measure(command: list[str], log: Path, threads: int | None) -> dict[str, float]:
    """Run ``command`` (output to ``log``; ``threads``: torch's and the engine's, None for
    their defaults): its wall time and its own peak RSS."""
    env = dict(os.environ)
    if threads is not None:
        for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYNEURON_NUM_THREADS"):
            env[name] = str(threads)
    with open(log, "w") as output:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=env)
        peaks = {"RssAnon": 0, "RssFile": 0}
        sampler = threading.Thread(target=_sample_rss, args=(process.pid, peaks), daemon=True)
        sampler.start()
        _, status, usage = os.wait4(process.pid, 0)
        wall = time.perf_counter() - start
        sampler.join()
    process.returncode = os.waitstatus_to_exitcode(status)  # reaped by wait4, not Popen
    if process.returncode != 0:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"failed ({process.returncode}): {shlex.join(command)}")
    return {
        "wall_s": wall,
        "peak_rss_mb": usage.ru_maxrss / 1024,
        "peak_anon_mb": peaks["RssAnon"] / 1024,
        "peak_file_mb": peaks["RssFile"] / 1024,
    }


def _sample_rss(pid: int, peaks: dict[str, int]) -> None:
    """The peaks of ``pid``'s anonymous and file-backed resident memory (KiB), sampled
    every 50 ms until it exits: file-backed pages are memory-mapped files (stores, unit
    masks, activations) that the kernel can drop; anonymous ones are what the run holds."""
    while True:
        try:
            with open(f"/proc/{pid}/status") as status:
                for line in status:
                    key, _, value = line.partition(":")
                    if key in peaks:
                        peaks[key] = max(peaks[key], int(value.split()[0]))
        except (OSError, ValueError):
            return
        time.sleep(0.05)


def dissect(
    args: argparse.Namespace,
    layers: tuple[str, ...],
    concepts: Path,
    images: Path,
    out: Path,
    extra: tuple[str, ...] = (),
) -> dict[str, Any]:
    """``pyneuron dissect`` in a subprocess: wall time, peak RSS and the run's timings."""
    command = [
        sys.executable, "-m", "pyneuron", "dissect", "--model", MODEL,
        *[option for layer in layers for option in ("--layer", layer)],
        "--concepts", str(concepts), "--images", str(images), "--out", str(out),
        "--image-size", str(args.image_size), "--grid", str(args.grid),
        "--batch-size", str(args.batch_size), "--length", str(args.search_length),
        "--quiet", *extra, *shlex.split(args.extra),
    ]  # fmt: skip
    result: dict[str, Any] = measure(command, out.with_name(out.name + ".log"), args.threads)
    summary = json.loads((out / "summary.json").read_text())
    result["timings_seconds"] = summary["timings_seconds"]
    result["command"] = shlex.join(command)
    return result


def forward(args: argparse.Namespace, images: Path, work: Path) -> dict[str, Any]:
    """The bare forward pass (:func:`worker_forward`) in a subprocess."""
    output = work / "forward.json"
    command = [
        sys.executable, __file__, "--worker", "forward", "--images-dir", str(images),
        "--image-size", str(args.image_size), "--batch-size", str(args.batch_size),
        "--worker-out", str(output),
    ]  # fmt: skip
    result: dict[str, Any] = measure(command, work / "forward.log", args.threads)
    return {**result, **json.loads(output.read_text())}


def worker_forward(args: argparse.Namespace) -> None:
    """Decode, transform and run the model over the folder as the CLI does; time it."""
    import torch

    from pyneuron.image_files import list_images, open_image
    from pyneuron.model.models import image_transform, load_model

    model, _ = load_model(MODEL)
    transform = image_transform(args.image_size)
    files = list_images(args.images_dir)
    start = time.perf_counter()
    with torch.inference_mode():
        for at in range(0, len(files), args.batch_size):
            batch = torch.stack(
                [transform(open_image(f)) for f in files[at : at + args.batch_size]]
            )
            model(batch)
    seconds = time.perf_counter() - start
    Path(args.worker_out).write_text(json.dumps({"forward_s": seconds}))


# -- the benchmark ------------------------------------------------------------------------


def run_size(
    args: argparse.Namespace, n: int, work: Path, segmenter: Path | None
) -> dict[str, Any]:
    """Every measured run over a probing set of ``n`` images."""
    folder = work / f"n{n}"
    start = time.perf_counter()
    images, store = write_probing_set(folder, n, args.image_size, args.grid, args.concepts)
    print(f"{n} images: probing set written in {time.perf_counter() - start:.1f} s", flush=True)
    first = forward(args, images, folder)
    runs: dict[str, Any] = {"forward": first}
    runs["dissect"] = dissect(args, args.layers, store, images, folder / "run")
    runs[f"dissect_{args.single_layer}"] = dissect(
        args, (args.single_layer,), store, images, folder / "run-single"
    )
    if segmenter is not None and n in args.segmenter_images:
        vocabulary = folder / "concepts.txt"
        vocabulary.write_text("\n".join(concept_names(args.concepts)) + "\n")
        runs["segmenter"] = dissect(
            args, args.layers, vocabulary, images, folder / "run-segmenter",
            extra=("--segmenter", f"clipseg:{segmenter}"),
        )  # fmt: skip
    second = forward(args, images, folder)  # the faster of two, one on each side
    runs["forward"] = min(first, second, key=lambda run: run["forward_s"])
    runs["forward"]["forward_s_each"] = [first["forward_s"], second["forward_s"]]
    forward_s = runs["forward"]["forward_s"]
    runs["forward"]["images_per_s"] = n / forward_s
    for name, run in runs.items():
        run["images_per_s_wall"] = n / run["wall_s"]
        if name == "forward":
            continue
        timings = run["timings_seconds"]
        run["images_per_s"] = n / timings["total"]
        run["outside_run_s"] = run["wall_s"] - timings["total"]
        run["layer_stages_s"] = {layer: stage_seconds(timings, layer) for layer in args.layers}
        if name != "segmenter":  # its total leaves out the segmentation (before the run)
            run["overhead"] = timings["total"] / forward_s - 1
            run["overhead_without_report"] = (
                (timings["total"] - timings["report"]) / forward_s - 1
                if "report" in timings
                else None
            )
    if args.single_layer in args.layers:
        runs["dissect"]["single_layer_stage_over_forward"] = (
            runs["dissect"]["layer_stages_s"][args.single_layer] / forward_s
        )
    print(f"{n} images: done in {time.perf_counter() - start:.1f} s", flush=True)
    return runs


def stage_seconds(timings: dict[str, float], layer: str) -> float:
    """Seconds a run spent on ``layer`` after the capture: its timings named
    ``"<stage> <layer>"`` (``explain layer4``; thresholds and masks where timed apart)."""
    return sum(v for k, v in timings.items() if k.partition(" ")[2] == layer)


def print_table(results: dict[str, Any]) -> None:
    """The runs side by side, then the targets."""
    settings = results["settings"]
    single = settings["single_layer"]
    print(
        f"\nResNet-50 (random), layers {','.join(settings['layers'])}, "
        f"{settings['image_size']}x{settings['image_size']} PNGs, grid {settings['grid']}, "
        f"{settings['concepts']} concepts, batch {settings['batch_size']}, threads "
        f"{settings['threads'] or 'default'}, search length {settings['search_length']}"
        + (f", extra {settings['extra']!r}" if settings["extra"] else "")
        + f"; load average at start {results['machine']['load_average']:.1f}"
    )
    print(
        "run: the run's own timings (summary.json); outside: wall - run (start-up, model, "
        "store, segmentation); layers: thresholds, masks and search of every layer; "
        "overhead: run / forward - 1 (and without the report)"
    )
    columns = (
        ("wall s", 8), ("outside s", 10), ("run s", 8), ("capture s", 10), ("layers s", 9),
        ("report s", 9), ("img/s", 8), ("img/s wall", 11), ("peak RSS MB", 12),
        ("anon MB", 8), ("file MB", 8), ("overhead", 9), ("w/o report", 11),
    )  # fmt: skip
    print(f"{'images':>7}  {'run':<16}" + "".join(f"{name:>{width}}" for name, width in columns))
    for n, runs in results["sizes"].items():
        for name, run in runs.items():
            timings = run.get("timings_seconds", {})
            values = (
                run["wall_s"], run.get("outside_run_s"),
                run["forward_s"] if name == "forward" else timings["total"],
                timings.get("capture"),
                sum(run["layer_stages_s"].values()) if "layer_stages_s" in run else None,
                timings.get("report"), run["images_per_s"], run["images_per_s_wall"],
                run["peak_rss_mb"], run["peak_anon_mb"], run["peak_file_mb"],
            )  # fmt: skip
            cells = [_cell(v, w, ".1f") for v, (_, w) in zip(values, columns)]
            cells += [
                _cell(run.get(key), width, "+.0%")
                for key, (_, width) in zip(("overhead", "overhead_without_report"), columns[-2:])
            ]
            print(f"{n:>7}  {name:<16}" + "".join(cells))
        stage = runs["dissect"].get("single_layer_stage_over_forward")
        if stage is not None:
            print(f"{'':>9}{single} stages of the dissect run: {stage:.0%} of forward")
    for name, growth in results["peak_rss_growth"].items():
        verdict = "ok" if growth < TARGET_RSS_GROWTH else "over target"
        anon = results["peak_anon_growth"][name]
        print(
            f"peak RSS growth of {name}, {results['growth_between']}: {growth:+.0%} "
            f"(target < {TARGET_RSS_GROWTH:.0%}: {verdict}); anonymous memory {anon:+.0%}"
        )
    for n, runs in results["sizes"].items():
        run = runs[f"dissect_{single}"]
        verdict = "ok" if run["overhead"] < TARGET_SINGLE_OVERHEAD else "over target"
        print(
            f"{single}-only pipeline overhead at {n} images: {run['overhead']:+.0%}, without "
            f"the report {_cell(run['overhead_without_report'], 0, '+.0%')} "
            f"(target < {TARGET_SINGLE_OVERHEAD:.0%}: {verdict})"
        )


def _growth(small: dict[str, Any], large: dict[str, Any], key: str) -> dict[str, float]:
    """``key`` of every kind of run at the larger size over the smaller, minus 1."""
    return {name: large[name][key] / small[name][key] - 1 for name in large if name in small}


def _cell(value: float | None, width: int, form: str) -> str:
    return f"{'-' if value is None else format(value, form):>{width}}"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse(argv)
    if args.worker == "forward":
        worker_forward(args)
        return {}
    import torch

    import pyneuron

    load_average = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="pyneuron-bench-pipeline-") as tmp:
        work = Path(tmp)
        segmenter = None
        if not args.skip_segmenter:
            segmenter = work / "clipseg"
            write_segmenter(segmenter)
        sizes = {n: run_size(args, n, work, segmenter) for n in args.images}
    small, large = min(sizes), max(sizes)
    results: dict[str, Any] = {
        "benchmark": "pipeline",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "pyneuron": pyneuron.__version__,
            "pyneuron_path": str(Path(pyneuron.__file__).parent),
            "simd": pyneuron.simd_level(),
            "load_average": load_average,
        },
        "settings": {
            "model": "ResNet-50 (bench/pipeline_model.py:resnet50), random weights",
            "layers": list(args.layers),
            "single_layer": args.single_layer,
            "image_size": args.image_size,
            "grid": args.grid,
            "concepts": args.concepts,
            "batch_size": args.batch_size,
            "threads": args.threads,
            "search_length": args.search_length,
            "extra": args.extra,
            "segmenter": None if args.skip_segmenter else "tiny random CLIPSeg",
        },
        "sizes": sizes,
        "growth_between": f"{small} -> {large} images",
        "peak_rss_growth": _growth(sizes[small], sizes[large], "peak_rss_mb"),
        "peak_anon_growth": _growth(sizes[small], sizes[large], "peak_anon_mb"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print_table(results)
    print(f"wrote {args.out}")
    return results


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=_sizes, default=[1000, 4000], help="1000,4000")
    parser.add_argument("--layers", type=_names, default=("layer1", "layer2", "layer3", "layer4"))
    parser.add_argument("--single-layer", default="layer4", help="of the one-layer run")
    parser.add_argument("--image-size", type=int, default=112)
    parser.add_argument("--grid", type=int, default=56)
    parser.add_argument("--concepts", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=32, help="the CLI's default")
    parser.add_argument("--search-length", type=int, default=1)
    parser.add_argument("--extra", default="", help='more dissect options: "--beam 5"')
    parser.add_argument(
        "--threads", type=int, default=None, help="torch and engine threads of every run"
    )
    parser.add_argument("--skip-segmenter", action="store_true")
    parser.add_argument("--segmenter-images", type=_sizes, default=None, help="default: every size")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--worker", choices=["forward"], help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", help=argparse.SUPPRESS)
    parser.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.segmenter_images is None:
        args.segmenter_images = args.images
    return args


def _sizes(text: str) -> list[int]:
    return [int(part) for part in _names(text)]


def _names(text: str) -> tuple[str, ...]:
    return tuple(part.strip() for part in text.split(",") if part.strip())


if __name__ == "__main__":
    main()

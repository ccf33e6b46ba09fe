"""Benchmarks of open-vocabulary segmentation: the segmenter families side by side, and a
CLIPSeg of real size into a concept store.

``families`` (the default): images/s of each segmenter family — CLIPSeg, Grounding DINO +
SAM, OWLv2 + SAM, SAM 3 — on the tests' tiny random models (built from their configs by
tests/test_segment.py and tests/test_segmenter_sam3.py, saved and loaded back by path),
for 1, 8 and 32 concepts (``--concept-counts``), with the share of time in

- ``vision``: the image encoders (CLIPSeg's CLIP vision tower; Grounding DINO's Swin
  backbone and SAM's image encoder; OWLv2's ``image_embedder`` and SAM's image encoder;
  SAM 3's ViT + feature pyramid);
- ``text``: the text encoders (cached per concept list by CLIPSeg, OWLv2 and SAM 3, so
  ~0 after the warm-up call; Grounding DINO encodes its prompt in every forward);
- ``prompt``: the prompt-dependent rest of the models (CLIPSeg's decoder; Grounding
  DINO's fusion encoder and decoder, with SAM's prompt encoder and mask decoder per box;
  OWLv2's class and box heads with SAM's per box; SAM 3's DETR encoder and decoder and
  mask decoder per (image, concept));
- ``other``: pre- and post-processing outside the models (image processors, box
  selection, SAM's mask resizing, copies).

Each part is the wall time inside the hooked modules or methods, less the time of the
hooked ones nested in them. Every setting runs once to warm up (which also encodes and
caches the concept texts), then ``--repeat`` times over ``--images`` synthetic 64 x 48
images in batches of ``--batch-size``; the fastest repeat is kept. The tiny models are
of the families' architectures, not their sizes: compare how time grows with the
concept count, not the absolute rates across families (Grounding DINO's tiny text
length of 12 tokens puts about five concepts in one prompt, so it runs the whole
detector, backbone included, once per five concepts).

    python bench/segment.py [families] [--quick] [--images 16] [--batch-size 8]
        [--concept-counts 1,8,32] [--repeat 3] [--threads 1] [--out bench/results/segment.json]

``clipseg-base``: a randomly initialised CLIPSeg with the dimensions of
CIDAS/clipseg-rd64-refined (ViT-B/16 vision tower at 352 x 352, 12-layer 512-wide text
tower, reduce_dim 64, extract layers 3/6/9, the "refined" transposed-convolution head;
150.7 M parameters), saved and loaded back by path, over a folder of synthetic
512 x 384 JPEGs, each measured in a fresh process (so peak memory is its own):

- ``segment``: ``pyneuron.concepts.segment`` over the folder, N images x K concepts on the
  112 x 112 grid, argmax with a filler — images/s, the share spent inside the model, and
  peak RSS (also above the RSS right after loading the model);
- ``segment (cached)``: the same call again with the cache filled by the first;
- ``naive``: the model called the documented way, ``processor(text=concepts,
  images=[image] * K)``, which encodes every image K times (on fewer images; no store).

    python bench/segment.py clipseg-base [--quick] [--images 200] [--concepts 50]
        [--batch-size 8] [--threads 2]

Each part writes its section of ``--out`` (``families``, ``clipseg``; the others are
kept), atomically.
"""

from __future__ import annotations

import argparse
import importlib
import json
import platform
import resource
import string
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "segment.json"
PARTS = ("vision", "text", "prompt", "other")
FAMILIES = ("clipseg", "grounding-dino+sam", "owlv2+sam", "sam3")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        pages = int(handle.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def build_model(folder: Path) -> None:
    """A random CLIPSeg of clipseg-rd64-refined's shape, with processor, saved to folder."""
    import torch
    import transformers
    from transformers.models.vit.image_processing_pil_vit import ViTImageProcessorPil

    torch.manual_seed(0)
    config = transformers.CLIPSegConfig(
        text_config=dict(vocab_size=49408),  # 512 wide, 12 layers, 8 heads (CLIP defaults)
        vision_config=dict(image_size=224, patch_size=16),  # ViT-B/16: 768 wide, 12 layers
        projection_dim=512,
        reduce_dim=64,
        extract_layers=[3, 6, 9],
        decoder_num_attention_heads=4,
        decoder_intermediate_size=2048,
        use_complex_transposed_convolution=True,
    )
    model = transformers.CLIPSegForImageSegmentation(config)
    model.save_pretrained(folder)
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    processor = transformers.CLIPSegProcessor(
        image_processor=ViTImageProcessorPil(
            size={"height": 352, "width": 352},
            image_mean=[0.485, 0.456, 0.406],
            image_std=[0.229, 0.224, 0.225],
        ),
        tokenizer=transformers.CLIPTokenizer(vocab=vocab, merges=[]),
    )
    processor.save_pretrained(folder)


def synthetic_images(n: int, size: tuple[int, int], seed: int = 0) -> list[Any]:
    """``n`` smooth random RGB images of ``size`` (width, height): upsampled noise, so they
    compress like photos."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    return [
        Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8)).resize(
            size, Image.BILINEAR
        )
        for _ in range(n)
    ]


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    """Smooth random 512 x 384 JPEGs."""
    folder.mkdir(parents=True, exist_ok=True)
    for i, image in enumerate(synthetic_images(n, (512, 384), seed)):
        image.save(folder / f"{i:05d}.jpg", quality=90)


def concept_names(k: int) -> list[str]:
    rng = np.random.default_rng(1)
    letters = list(string.ascii_lowercase)
    return ["".join(rng.choice(letters, 6)) for _ in range(k - 1)] + ["background"]


# -- families: each segmenter family on the tests' tiny models ---------------------------


def _tests_module(name: str) -> Any:
    """A module of tests/ (the tiny-model builders live there), imported by name."""
    tests = str(BENCH.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    return importlib.import_module(name)


class _Folders:
    """What the tests' model fixtures ask of pytest's ``tmp_path_factory``: new folders."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def mktemp(self, name: str) -> Path:
        folder = self.root / name
        folder.mkdir()
        return folder


def build_families(root: Path, device: str) -> dict[str, Any]:
    """A segmenter of each family on the tests' tiny random models, saved under ``root``
    and loaded back by path."""
    from pyneuron.concepts.segmenters import (
        CLIPSegSegmenter,
        GroundingDinoSamSegmenter,
        Owlv2SamSegmenter,
        Sam3Segmenter,
    )

    tests, tests_sam3 = _tests_module("test_segment"), _tests_module("test_segmenter_sam3")
    folders = _Folders(root)

    def fixture(function: Any) -> str:  # a pytest fixture of the tests, called as a function
        return str(function.__wrapped__(folders))

    sam = fixture(tests.sam_dir)
    clipseg = tests.save_tiny_clipseg(folders.mktemp("clipseg"))
    sam3 = tests_sam3.save_tiny_sam3(folders.mktemp("sam3"))
    return {
        "clipseg": CLIPSegSegmenter.from_pretrained(str(clipseg), device=device),
        "grounding-dino+sam": GroundingDinoSamSegmenter.from_pretrained(
            fixture(tests.grounding_dino_dir), sam, device=device
        ),
        "owlv2+sam": Owlv2SamSegmenter.from_pretrained(
            fixture(tests.owlv2_dir), sam, device=device
        ),
        "sam3": Sam3Segmenter.from_pretrained(str(sam3), device=device),
    }


class PartTimer:
    """Wall time and calls per part (``vision``, ``text``, ``prompt``) of hooked modules and
    methods; a call counts its own time less that of the hooked calls nested in it."""

    def __init__(self) -> None:
        self.seconds = dict.fromkeys(PARTS[:-1], 0.0)
        self.calls = dict.fromkeys(PARTS[:-1], 0)
        self._open: list[list[float]] = []  # [start, nested seconds] of the calls in flight

    def reset(self) -> None:
        self.seconds = dict.fromkeys(self.seconds, 0.0)
        self.calls = dict.fromkeys(self.calls, 0)

    def _enter(self) -> None:
        self._open.append([time.perf_counter(), 0.0])

    def _leave(self, part: str) -> None:
        start, nested = self._open.pop()
        elapsed = time.perf_counter() - start
        self.seconds[part] += elapsed - nested
        self.calls[part] += 1
        if self._open:
            self._open[-1][1] += elapsed

    def module(self, module: Any, part: str) -> None:
        module.register_forward_pre_hook(lambda *_: self._enter())
        module.register_forward_hook(lambda *_: self._leave(part))

    def method(self, owner: Any, name: str, part: str) -> None:
        method = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            self._enter()
            try:
                return method(*args, **kwargs)
            finally:
                self._leave(part)

        setattr(owner, name, timed)  # on the instance, over the class's method


def hook_parts(family: str, segmenter: Any, timer: PartTimer) -> None:
    """Time the family's image encoders, text encoders and prompt-dependent modules."""
    if family == "clipseg":
        clip = segmenter.model.clip
        timer.module(clip.vision_model, "vision")
        timer.module(clip.text_model, "text")
        timer.module(segmenter.model.decoder, "prompt")
        return
    if family == "sam3":
        model = segmenter.model
        timer.module(model.vision_encoder, "vision")
        timer.module(model.text_encoder, "text")
        timer.module(model.text_projection, "text")
        timer.module(model, "prompt")  # called with vision_embeds= and text_embeds=
        return
    sam, detector = segmenter.sam.model, segmenter.detector
    timer.module(sam.vision_encoder, "vision")
    timer.module(sam, "prompt")  # called with image_embeddings= and boxes
    if family == "grounding-dino+sam":
        timer.module(detector.model.backbone, "vision")
        timer.module(detector.model.text_backbone, "text")
        timer.module(detector, "prompt")
    else:
        timer.method(detector, "image_embedder", "vision")
        timer.module(detector.owlv2.text_model, "text")
        timer.method(detector, "class_predictor", "prompt")
        timer.method(detector, "box_predictor", "prompt")


def measure_family(
    family: str, segmenter: Any, images: list[Any], args: argparse.Namespace
) -> dict[str, Any]:
    """Per concept count: images/s and the time per image in each part (best repeat)."""
    timer = PartTimer()
    hook_parts(family, segmenter, timer)
    batches = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    result: dict[str, Any] = {}
    for k in args.concept_counts:
        concepts = concept_names(k)
        segmenter(batches[0], concepts)  # warm-up; encodes (and caches) the concept texts
        best: tuple[float, dict[str, float], dict[str, int]] | None = None
        for _ in range(args.repeat):
            timer.reset()
            start = time.perf_counter()
            for batch in batches:
                segmenter(batch, concepts)
            seconds = time.perf_counter() - start
            if best is None or seconds < best[0]:
                best = (seconds, dict(timer.seconds), dict(timer.calls))
        assert best is not None
        seconds, parts, calls = best
        parts["other"] = seconds - sum(parts.values())
        n = len(images)
        result[str(k)] = {
            "seconds": seconds,
            "images_per_s": n / seconds,
            "ms_per_image": 1000 * seconds / n,
            "ms_per_image_by_part": {part: 1000 * parts[part] / n for part in PARTS},
            "share": {part: parts[part] / seconds for part in PARTS},
            "vision_calls_per_batch": calls["vision"] / len(batches),
        }
    return result


def run_families(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    images = synthetic_images(args.images, (64, 48))
    results, models = {}, {}
    with tempfile.TemporaryDirectory(prefix="pyneuron-bench-segment-") as tmp:
        segmenters = build_families(Path(tmp), args.device)
        for family in FAMILIES:
            segmenter = segmenters[family]
            models[family] = {
                "adapter": type(segmenter).__name__,
                "parameters": sum(
                    p.numel() for m in segmenter._models().values() for p in m.parameters()
                ),
            }
            results[family] = measure_family(family, segmenter, images, args)
            print(f"{family} done", flush=True)

    counts = [str(k) for k in args.concept_counts]
    growth = {
        family: results[family][counts[-1]]["ms_per_image"]
        / results[family][counts[0]]["ms_per_image"]
        for family in FAMILIES
    }
    print(
        f"\nsegmenter families, tiny random models, {args.device}, {args.threads} thread(s), "
        f"{args.images} images of 64x48, batch {args.batch_size}, best of {args.repeat}"
    )
    header = f"{'family':<20}{'K':>4}{'img/s':>9}{'ms/img':>9}"
    header += "".join(f"{part:>8}" for part in PARTS) + f"{'enc/batch':>11}"
    print(header)
    for family in FAMILIES:
        for k in counts:
            row = results[family][k]
            shares = "".join(f"{row['share'][part]:>8.0%}" for part in PARTS)
            print(
                f"{family:<20}{k:>4}{row['images_per_s']:>9.1f}{row['ms_per_image']:>9.2f}"
                f"{shares}{row['vision_calls_per_batch']:>11.1f}"
            )
    print(f"time per image, {counts[-1]} vs {counts[0]} concepts: " + ", ".join(
        f"{family} {growth[family]:.1f}x" for family in FAMILIES
    ))  # fmt: skip
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "models": models,
        "settings": {
            "quick": args.quick,
            "images": args.images,
            "image_size": [48, 64],
            "batch_size": args.batch_size,
            "concept_counts": args.concept_counts,
            "repeat": args.repeat,
            "threads": args.threads,
            "device": args.device,
        },
        "results": results,
        "growth_ms_per_image_last_vs_first_count": growth,
    }


# -- workers (each in its own process) --------------------------------------------------


def worker_segment(args: argparse.Namespace) -> dict:
    import torch

    from pyneuron.concepts.segment import segment
    from pyneuron.concepts.segmenters import CLIPSegSegmenter

    torch.set_num_threads(args.threads)
    segmenter = CLIPSegSegmenter.from_pretrained(args.model)
    _ = segmenter.fingerprint  # hash the weights before timing (done once per segmenter)
    concepts = concept_names(args.concepts)
    segmenter([_first_image(args.images_dir)], concepts[:2])  # warm-up
    rss_loaded = current_rss_mb()
    model_seconds = [0.0]

    class Timed:
        name, fingerprint, describe = segmenter.name, segmenter.fingerprint, segmenter.describe

        def __call__(self, images, names):
            start = time.perf_counter()
            out = segmenter(images, names)
            model_seconds[0] += time.perf_counter() - start
            return out

    cache = Path(args.work) / "cache"
    start = time.perf_counter()
    store = segment(
        args.images_dir, concepts, Timed(), grid=112, batch_size=args.batch_size,
        cache_dir=cache, progress=False,
    )  # fmt: skip
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    start = time.perf_counter()
    again = segment(
        args.images_dir, concepts, Timed(), grid=112, batch_size=args.batch_size,
        cache_dir=cache, progress=False,
    )  # fmt: skip
    cached_seconds = time.perf_counter() - start
    assert again.names == store.names
    n = store.grid.n_images
    return {
        "images": n,
        "concepts": len(concepts),
        "seconds": seconds,
        "images_per_s": n / seconds,
        "model_share": model_seconds[0] / seconds,
        "peak_rss_mb": peak,
        "rss_after_model_load_mb": rss_loaded,
        "peak_above_loaded_mb": peak - rss_loaded,
        "cached_seconds": cached_seconds,
        "cached_images_per_s": n / cached_seconds,
        "store_concepts_present": int((store.image_counts > 0).sum()),
    }


def worker_naive(args: argparse.Namespace) -> dict:
    import torch
    import transformers

    from pyneuron.image_files import list_images, open_image

    torch.set_num_threads(args.threads)
    model = transformers.CLIPSegForImageSegmentation.from_pretrained(args.model).eval()
    processor = transformers.AutoProcessor.from_pretrained(args.model)
    concepts = concept_names(args.concepts)
    files = list_images(args.images_dir)[: args.naive_images]
    rss_loaded = current_rss_mb()
    start = time.perf_counter()
    for path in files:
        image = open_image(path).convert("RGB")
        inputs = processor(
            text=concepts, images=[image] * len(concepts), padding=True, return_tensors="pt"
        )
        with torch.inference_mode():
            torch.sigmoid(model(**inputs).logits)
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "images": len(files),
        "concepts": len(concepts),
        "seconds": seconds,
        "images_per_s": len(files) / seconds,
        "peak_rss_mb": peak,
        "rss_after_model_load_mb": rss_loaded,
        "peak_above_loaded_mb": peak - rss_loaded,
    }


def _first_image(folder: str):
    from pyneuron.image_files import list_images, open_image

    return open_image(list_images(folder)[0]).convert("RGB")


def run_worker(kind: str, args: argparse.Namespace, work: Path, model: Path, images: Path) -> dict:
    command = [
        sys.executable, __file__, "clipseg-base", "--worker", kind, "--work", str(work),
        "--model", str(model), "--images-dir", str(images), "--concepts", str(args.concepts),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads),
        "--naive-images", str(args.naive_images),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"worker {kind} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_clipseg_base(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import transformers

    with tempfile.TemporaryDirectory(prefix="pyneuron-bench-segment-") as tmp:
        work = Path(tmp)
        model, images = work / "model", work / "images"
        start = time.perf_counter()
        build_model(model)
        write_images(images, args.images)
        print(f"set-up {time.perf_counter() - start:.1f} s", flush=True)
        seg = run_worker("segment", args, work, model, images)
        naive = run_worker("naive", args, work, model, images)

    speedup = seg["images_per_s"] / naive["images_per_s"]
    rows = [
        ("segment()", seg["images"], seg["images_per_s"], seg["peak_rss_mb"],
         seg["peak_above_loaded_mb"]),
        ("segment() cached rerun", seg["images"], seg["cached_images_per_s"], None, None),
        ("naive model call", naive["images"], naive["images_per_s"], naive["peak_rss_mb"],
         naive["peak_above_loaded_mb"]),
    ]  # fmt: skip
    print(f"\nCLIPSeg-base-shaped random model, CPU, {args.threads} threads, "
          f"{args.concepts} concepts, grid 112x112, batch {args.batch_size}")  # fmt: skip
    print(f"{'variant':<24}{'images':>8}{'img/s':>10}{'peak RSS MB':>14}{'above load MB':>15}")
    for name, n, rate, peak, above in rows:
        peak_text = f"{peak:14.0f}" if peak is not None else f"{'-':>14}"
        above_text = f"{above:15.0f}" if above is not None else f"{'-':>15}"
        print(f"{name:<24}{n:>8}{rate:>10.3f}{peak_text}{above_text}")
    print(f"segment() vs naive: {speedup:.1f}x; model share of segment(): "
          f"{seg['model_share']:.1%}")  # fmt: skip
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": "random CLIPSegForImageSegmentation shaped like CIDAS/clipseg-rd64-refined "
        "(150.7 M parameters), float32, CPU",
        "settings": {
            "quick": args.quick,
            "images": args.images,
            "image_size": [384, 512],
            "concepts": args.concepts,
            "grid": [112, 112],
            "batch_size": args.batch_size,
            "threads": args.threads,
        },
        "segment": seg,
        "naive": naive,
        "speedup_vs_naive": speedup,
    }


def _counts(text: str) -> list[int]:
    counts = [int(v) for v in text.split(",") if v.strip()]
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"concept counts must be integers >= 1: {text!r}")
    return counts


def _defaults(args: argparse.Namespace, full: dict[str, Any], quick: dict[str, Any]) -> None:
    """Fill the options not given: ``quick`` values under --quick, else ``full``."""
    for name, value in (quick if args.quick else full).items():
        if getattr(args, name) is None:
            setattr(args, name, value)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Run one part, print its table, write its section of ``--out``; returns the section."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = parser.add_subparsers(dest="part")
    families = parts.add_parser("families", help="the segmenter families on tiny models")
    families.add_argument(
        "--quick", action="store_true", help="2 images, batch 2, 1 repeat, 1 and 8 concepts"
    )
    families.add_argument("--images", type=int, help="synthetic images (16)")
    families.add_argument("--batch-size", type=int, help="images per segmenter call (8)")
    families.add_argument("--concept-counts", type=_counts, help="1,8,32")
    families.add_argument("--repeat", type=int, help="timed runs per setting, best kept (3)")
    families.add_argument("--threads", type=int, default=1, help="torch threads")
    families.add_argument("--device", default="cpu", help="where the models run")
    families.add_argument("--out", type=Path, default=RESULTS, help="JSON path")
    base = parts.add_parser("clipseg-base", help="a CLIPSeg of real size into a store")
    base.add_argument("--quick", action="store_true", help="4 images, 5 concepts, 1 naive image")
    base.add_argument("--images", type=int, help="200")
    base.add_argument("--concepts", type=int, help="50")
    base.add_argument("--batch-size", type=int, default=8)
    base.add_argument("--threads", type=int, default=2)
    base.add_argument("--naive-images", type=int, help="4")
    base.add_argument("--out", type=Path, default=RESULTS, help="JSON path")
    base.add_argument("--worker", choices=["segment", "naive"], help=argparse.SUPPRESS)
    base.add_argument("--work", help=argparse.SUPPRESS)
    base.add_argument("--model", help=argparse.SUPPRESS)
    base.add_argument("--images-dir", help=argparse.SUPPRESS)
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("families", "clipseg-base", "-h", "--help"):
        argv.insert(0, "families")
    args = parser.parse_args(argv)
    if args.part == "families":
        _defaults(
            args,
            dict(images=16, batch_size=8, concept_counts=[1, 8, 32], repeat=3),
            dict(images=2, batch_size=2, concept_counts=[1, 8], repeat=1),
        )
        section, report = "families", run_families(args)
    else:
        _defaults(
            args,
            dict(images=200, concepts=50, naive_images=4),
            dict(images=4, concepts=5, naive_images=1),
        )
        if args.worker:
            result = worker_segment(args) if args.worker == "segment" else worker_naive(args)
            print(json.dumps(result))
            return result
        section, report = "clipseg", run_clipseg_base(args)

    from pyneuron.engine.atomic import write_atomically

    results = json.loads(args.out.read_text()) if args.out.exists() else {}
    results[section] = report
    args.out.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(results, indent=2) + "\n"
    write_atomically(args.out, lambda path: path.write_text(text))
    print(f"wrote the {section} section of {args.out}")
    return report


if __name__ == "__main__":
    main()

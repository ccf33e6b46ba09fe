"""Benchmark: open-vocabulary segmentation into a concept store (CLIPSeg-shaped, CPU).

Builds a randomly initialised CLIPSeg with the dimensions of CIDAS/clipseg-rd64-refined
(ViT-B/16 vision tower at 352 x 352, 12-layer 512-wide text tower, reduce_dim 64,
extract layers 3/6/9, the "refined" transposed-convolution head; 150.7 M parameters),
saves it and loads it back by path, writes a folder of synthetic 512 x 384 JPEGs, and
measures, each in a fresh process (so peak memory is its own):

- ``segment``: ``pyneuron.concepts.segment`` over the folder, N images x K concepts on the
  112 x 112 grid, argmax with a filler — images/s, the share spent inside the model, and
  peak RSS (also above the RSS right after loading the model);
- ``segment (cached)``: the same call again with the cache filled by the first;
- ``naive``: the model called the documented way, ``processor(text=concepts,
  images=[image] * K)``, which encodes every image K times (on fewer images; no store).

    python bench/segment.py [--images 200] [--concepts 50] [--batch-size 8] [--threads 2]

Writes the ``clipseg`` section of bench/results/segment.json (other sections are kept).
"""

from __future__ import annotations

import argparse
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

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "segment.json"


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


def write_images(folder: Path, n: int, seed: int = 0) -> None:
    """Smooth random 512 x 384 JPEGs (upsampled noise, so they compress like photos)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (12, 16, 3), dtype=np.uint8))
        small.resize((512, 384), Image.BILINEAR).save(folder / f"{i:05d}.jpg", quality=90)


def concept_names(k: int) -> list[str]:
    rng = np.random.default_rng(1)
    letters = list(string.ascii_lowercase)
    return ["".join(rng.choice(letters, 6)) for _ in range(k - 1)] + ["background"]


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
        sys.executable, __file__, "--worker", kind, "--work", str(work), "--model", str(model),
        "--images-dir", str(images), "--concepts", str(args.concepts),
        "--batch-size", str(args.batch_size), "--threads", str(args.threads),
        "--naive-images", str(args.naive_images),
    ]  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        sys.stderr.write(done.stderr)
        raise SystemExit(f"worker {kind} failed")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--concepts", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--naive-images", type=int, default=4)
    parser.add_argument("--worker", choices=["segment", "naive"], help=argparse.SUPPRESS)
    parser.add_argument("--work", help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--images-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        result = worker_segment(args) if args.worker == "segment" else worker_naive(args)
        print(json.dumps(result))
        return

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

    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    results["clipseg"] = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {"platform": platform.platform(), "processor": platform.processor()},
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__},
        "model": "random CLIPSegForImageSegmentation shaped like CIDAS/clipseg-rd64-refined "
        "(150.7 M parameters), float32, CPU",
        "settings": {
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
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()

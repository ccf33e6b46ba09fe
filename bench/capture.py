"""Benchmark: capturing activations and turning them into unit masks.

Compares, in the same run, a plain forward pass of a ResNet-18-shaped random model
over synthetic 224x224 images with `pyneuron.capture` of the same model over the same
data (target: capture costs at most 1.2x the plain forward), then times turning the
captured 512-unit layer4 into unit masks on the 112x112 grid.

    python bench/capture.py [--images 2048] [--batch-size 64] [--threads 2]

Writes bench/results/capture.json.
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from datetime import UTC, datetime
from pathlib import Path

import torch
from torch import nn

import pyneuron
from pyneuron.engine.upsample import unit_masks_from_activations
from pyneuron.model.thresholds import quantile_thresholds


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(y)) + self.down(x))


class ResNet18(nn.Module):
    """The ResNet-18 architecture (torchvision layer names), randomly initialized."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        widths = [64, 128, 256, 512]
        cin = 64
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            setattr(
                self,
                f"layer{i + 1}",
                nn.Sequential(BasicBlock(cin, width, stride), BasicBlock(width, width, 1)),
            )
            cin = width
        self.fc = nn.Linear(512, 1000)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(torch.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(x.mean((2, 3)))


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--grid", type=int, default=112)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
        pyneuron.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = ResNet18().eval()
    images = torch.rand(args.images, 3, 224, 224).numpy()  # ~1.2 GB for 2048 images
    batches = [
        torch.from_numpy(images[i : i + args.batch_size])
        for i in range(0, args.images, args.batch_size)
    ]

    with torch.inference_mode():  # warm-up
        model(batches[0][:4])
    start = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(batch)
    forward_s = time.perf_counter() - start

    rss_before = peak_rss_mb()
    start = time.perf_counter()
    acts = pyneuron.capture(model, "layer4", images, batch_size=args.batch_size, progress=False)
    capture_s = time.perf_counter() - start
    layer4 = acts["layer4"]

    start = time.perf_counter()
    thresholds = quantile_thresholds(layer4, 0.005)
    threshold_s = time.perf_counter() - start
    start = time.perf_counter()
    masks = unit_masks_from_activations(layer4, thresholds, (args.grid, args.grid), progress=False)
    masks_s = time.perf_counter() - start

    n_values = layer4.size
    result = {
        "benchmark": "capture",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": torch.get_num_threads(),
            "platform": platform.platform(),
            "torch": torch.__version__,
            "pyneuron": pyneuron.__version__,
            "simd": pyneuron.simd_level(),
            "engine_threads": pyneuron.num_threads(),
        },
        "images": args.images,
        "batch_size": args.batch_size,
        "plain_forward_s": forward_s,
        "capture_layer4_s": capture_s,
        "capture_over_forward": capture_s / forward_s,
        "images_per_s_forward": args.images / forward_s,
        "images_per_s_capture": args.images / capture_s,
        "activations_per_s_capture": n_values / capture_s,
        "layer4_shape": list(layer4.shape),
        "quantile_thresholds_s": threshold_s,
        "unit_masks_s": masks_s,
        "unit_masks_grid": args.grid,
        "unit_masks_per_1000_images_s": masks_s / args.images * 1000,
        "unit_masks_extrapolated_ade_22210_s": masks_s / args.images * 22210,
        "unit_masks_nbytes": masks.nbytes,
        "unit_mask_density": float(
            masks.pixel_counts.sum() / (len(masks) * masks.grid.total_pixels)
        ),
        "peak_rss_mb_before_capture": rss_before,
        "peak_rss_mb": peak_rss_mb(),
    }
    print(f"{'step':<36}{'seconds':>10}{'ratio / note':>28}")
    print(f"{'plain forward':<36}{forward_s:>10.2f}{args.images / forward_s:>20.1f} img/s")
    print(f"{'capture layer4':<36}{capture_s:>10.2f}{capture_s / forward_s:>22.2f}x fwd")
    print(f"{'quantile thresholds (512 units)':<36}{threshold_s:>10.2f}")
    print(
        f"{f'unit masks 512 units @ {args.grid}²':<36}{masks_s:>10.2f}"
        f"{masks_s / args.images * 22210:>18.0f} s @ADE"
    )
    print(f"peak RSS {result['peak_rss_mb']:.0f} MB (inputs alone {images.nbytes / 2**20:.0f} MB)")
    out = Path(__file__).parent / "results" / "capture.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

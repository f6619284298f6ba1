"""What a run shows: rank-0 progress bar, metrics.jsonl, optional TensorBoard, PNG curves."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ifc_ds.dist import is_main

log = logging.getLogger("ifc_ds")


def setup_logging() -> None:
    level = logging.INFO if is_main() else logging.WARNING
    logging.basicConfig(level=level, format="%(asctime)s %(name)s: %(message)s", datefmt="%H:%M:%S", force=True)


class Observer:
    """Rank 0 only: progress bar (tqdm) with loss / lr / images per second, one JSON object per log
    step in ``metrics.jsonl``, TensorBoard scalars when enabled. Other ranks get a no-op."""

    def __init__(self, output_dir: str, total_steps: int, start_step: int, progress: bool, tensorboard: bool):
        self.active = is_main()
        self.path = Path(output_dir) / "metrics.jsonl"
        self.bar = self.writer = None
        self._t0, self._images = time.perf_counter(), 0
        if not self.active:
            return
        if progress:
            from tqdm import tqdm

            self.bar = tqdm(total=total_steps, initial=start_step, desc="pretrain", dynamic_ncols=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(output_dir) / "tensorboard"))

    def count_images(self, n: int) -> None:
        self._images += n

    def images_per_sec(self) -> float:
        elapsed = time.perf_counter() - self._t0
        rate = self._images / elapsed if elapsed > 0 else 0.0
        self._t0, self._images = time.perf_counter(), 0
        return rate

    def step(self, metrics: dict | None) -> None:
        if not self.active:
            return
        if self.bar is not None:
            self.bar.update(1)
            if metrics:
                self.bar.set_postfix(loss=f"{metrics['loss']:.3f}", lr=f"{metrics['lr']:.3g}",
                                     img_s=f"{metrics['images_per_sec']:.0f}")
        if metrics:
            with self.path.open("a") as f:
                f.write(json.dumps(metrics) + "\n")
            if self.writer is not None:
                for key, value in metrics.items():
                    if key not in ("step", "epoch") and isinstance(value, (int, float)):
                        self.writer.add_scalar(f"train/{key}", value, metrics["step"])

    def scalar(self, name: str, value: float, step: int) -> None:
        if self.active and self.writer is not None:
            self.writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()


def read_metrics(output_dir: str) -> list[dict]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


def plot_curves(output_dir: str, evals: list[dict]) -> Path:
    """``training.png``: loss (and instance accuracy) per step, kNN top-1 per evaluation."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = read_metrics(output_dir)
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    if metrics:
        axes[0].plot([m["step"] for m in metrics], [m["loss"] for m in metrics], label="loss")
        axes[0].set_xlabel("step")
        axes[0].set_ylabel("instance-classification loss")
    if evals:
        axes[1].plot([e["step"] for e in evals], [100 * e["knn_top1"] for e in evals], marker="o")
    axes[1].set_xlabel("step")
    axes[1].set_ylabel("kNN top-1 (%)")
    fig.tight_layout()
    path = Path(output_dir) / "training.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path

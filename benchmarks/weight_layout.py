"""Channels-last or plain convolution weights on CPU (oneDNN), with channels-last inputs as the trainer
feeds them: one process, ``--threads`` threads (1), interleaved round by round, medians.

* every distinct convolution of the model at ``--size`` px, forward + backward (input and weight
  gradients) on a ``--batch`` of channels-last inputs, with the weight channels-last against plain;
* the whole encoder step (forward, backward, torch SGD with momentum): every weight channels-last
  against the trainer's layout (``ifc_ds.model.to_channels_last``: plain for k x k kernels on 1x1 maps).

    python benchmarks/weight_layout.py                                  # ResNet-18 at 32 px, batch 128
    python benchmarks/weight_layout.py --model resnet50 --batch 64
    python benchmarks/weight_layout.py --size 224 --batch 32
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from ifc_ds.config import load_config  # noqa: E402
from ifc_ds.model import (  # noqa: E402
    InstanceEncoder,
    convolution_inputs,
    to_channels_last,
    wide_kernels_on_single_pixels,
)


def _interleaved(steps: dict, rounds: int, warmup: int = 2) -> dict[str, list[float]]:
    """Seconds per call of each step, one call of every step per round (host drift hits them alike)."""
    for _ in range(warmup):
        for step in steps.values():
            step()
    times = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - t0)
    return times


def _convolution_step(conv: nn.Conv2d, shape, batch: int, weight_format, input_grad: bool):
    """fwd + bwd of a copy of ``conv`` with its weight in ``weight_format``, on channels-last inputs."""
    conv = copy.deepcopy(conv)
    conv.weight.data = conv.weight.data.contiguous(memory_format=weight_format)
    inputs = torch.randn(batch, *shape).contiguous(memory_format=torch.channels_last).requires_grad_(input_grad)
    grad = torch.randn_like(conv(inputs))

    def step():
        conv.weight.grad, inputs.grad = None, None
        conv(inputs).backward(grad)
    return step


def _encoder_step(encoder: nn.Module, images: torch.Tensor):
    optimizer = torch.optim.SGD(encoder.parameters(), lr=0.01, momentum=0.9)

    def step():
        loss = encoder(images).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return step


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    encoder = InstanceEncoder(load_config(None, [f"model.name={args.model}"]).model, args.size)
    single_pixel = set(wide_kernels_on_single_pixels(encoder, args.size))
    print(f"{args.model} at {args.size} px, batch {args.batch}, {args.threads} thread(s), channels-last inputs, "
          f"median of {args.rounds} interleaved rounds\n")
    print("| convolutions (count) | input [C, H, W] | out, kernel, stride | fwd + bwd, channels-last weight (ms) | "
          "plain weight (ms) | plain / channels-last | the trainer's layout |")
    print("|---|---|---|---|---|---|---|")
    groups: dict[tuple, list] = {}
    for name, conv, shape in convolution_inputs(encoder, args.size):
        key = (tuple(shape), conv.out_channels, conv.kernel_size, conv.stride, conv.groups)
        groups.setdefault(key, []).append((name, conv))
    totals = {"channels-last": 0.0, "plain": 0.0}
    stem = next(iter(groups.values()))[0][1]
    for (shape, out, kernel, stride, _), convs in groups.items():
        conv = convs[0][1]
        input_grad = conv is not stem  # (the images need no gradient)
        times = _interleaved({fmt: _convolution_step(conv, shape, args.batch, memory_format, input_grad)
                              for fmt, memory_format in (("channels-last", torch.channels_last),
                                                         ("plain", torch.contiguous_format))}, args.rounds)
        ms = {fmt: 1e3 * statistics.median(t) for fmt, t in times.items()}
        for fmt in totals:
            totals[fmt] += len(convs) * ms[fmt]
        layout = "plain" if conv in single_pixel else "channels-last"
        print(f"| {convs[0][0]} ({len(convs)}) | {list(shape)} | {out}, {kernel[0]}x{kernel[1]}, {stride[0]} | "
              f"{ms['channels-last']:.2f} | {ms['plain']:.2f} | {ms['plain'] / ms['channels-last']:.3f} | {layout} |")
    print(f"| all, weighted by count | | | {totals['channels-last']:.1f} | {totals['plain']:.1f} | "
          f"{totals['plain'] / totals['channels-last']:.3f} | |")

    images = torch.randn(args.batch, 3, args.size, args.size).contiguous(memory_format=torch.channels_last)
    every = copy.deepcopy(encoder).to(memory_format=torch.channels_last)
    trainers = copy.deepcopy(encoder)
    to_channels_last(trainers, args.size)
    times = _interleaved({"every weight channels-last": _encoder_step(every, images),
                          "the trainer's layout": _encoder_step(trainers, images)}, args.rounds)
    base = times["every weight channels-last"]
    print("\n| encoder step (fwd + bwd + SGD) | ms median (min-max) | images/s | per-round ratio of times to every "
          "weight channels-last |")
    print("|---|---|---|---|")
    for name, t in times.items():
        ratio = statistics.median(a / b for a, b in zip(t, base))
        print(f"| {name} | {1e3 * statistics.median(t):.1f} ({1e3 * min(t):.1f}-{1e3 * max(t):.1f}) | "
              f"{args.batch / statistics.median(t):.1f} | {ratio:.3f} |")


if __name__ == "__main__":
    main()

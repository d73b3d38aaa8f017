"""Benchmark: ``medcam3d.targets.channel_argmax`` against ``Tensor.argmax`` and the channel-by-channel loop.

For segmentation outputs ``(1, C, D, H, W)`` with C from 3 to 105 channels, on one CPU thread, it
prints the best CPU time (``time.process_time``, so a busy machine counts less) of ``--repeat`` runs of: ``channel_argmax`` (the running comparison below
``VECTOR_CHANNELS`` channels, ``argmax`` over channel-last slabs from there on), the running
comparison alone, the channel-last form alone, and PyTorch's ``argmax(1)``; then the ratios
loop / channel-last (above 1: the channel-last form is faster) and argmax / channel_argmax.

Usage::

    python benchmarks/bench_channel_argmax.py [--size 64] [--repeat 5] [--channels 3 8 14 40 105]
"""

from __future__ import annotations

import argparse
import time

import torch

from medcam3d import targets


def _best(call, values: torch.Tensor, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        started = time.process_time()  # CPU time of this process: other processes on the machine do not count
        call(values)
        times.append(time.process_time() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64, help="spatial size of the cube (default 64)")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--channels", type=int, nargs="+", default=[3, 8, 14, 40, 105])
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    loop = lambda v: targets._running_argmax(v, 1)  # noqa: E731
    last = lambda v: v.movedim(1, -1).contiguous().argmax(-1)  # noqa: E731
    print(f"VECTOR_CHANNELS = {targets.VECTOR_CHANNELS}; (1, C, {args.size}^3) float32, one thread, best of {args.repeat}")
    print(f"{'C':>4} {'channel_argmax':>15} {'loop':>9} {'chan-last':>10} {'argmax':>9} {'loop/last':>10} {'argmax/ours':>12}")
    for channels in args.channels:
        values = torch.randn(1, channels, args.size, args.size, args.size, generator=generator)
        assert torch.equal(targets.channel_argmax(values), values.argmax(1))
        ours, plain, moved, native = (_best(call, values, args.repeat) for call in
                                      (targets.channel_argmax, loop, last, lambda v: v.argmax(1)))
        print(f"{channels:>4} {1000 * ours:>12.1f} ms {1000 * plain:>6.1f} ms {1000 * moved:>7.1f} ms {1000 * native:>6.1f} ms "
              f"{plain / moved:>10.2f} {native / ours:>12.2f}")


if __name__ == "__main__":
    main()

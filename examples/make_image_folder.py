#!/usr/bin/env python3
"""Writes a directory tree in torchvision's ImageFolder layout: ROOT/<class>/<n>.bin, each a
file of random bytes in which about a third are drawn from a band of byte values that depends
on the class (so that a model can learn the class from a byte histogram: examples/train.py).
Deterministic for a given --seed. Used by the demo and benchmarks."""
import argparse
import os
import random


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("root")
    ap.add_argument("--classes", type=int, default=10)
    ap.add_argument("--per-class", type=int, default=100)
    ap.add_argument("--min-bytes", type=int, default=1024)
    ap.add_argument("--max-bytes", type=int, default=16384)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    rng = random.Random(args.seed)
    for c in range(args.classes):
        d = os.path.join(args.root, f"class_{c:03d}")
        os.makedirs(d, exist_ok=True)
        for i in range(args.per_class):
            size = rng.randint(args.min_bytes, args.max_bytes)
            data = bytearray(rng.randbytes(size))
            band = 256 // args.classes
            for k in range(0, size, 3):
                data[k] = c * band + data[k] % band
            with open(os.path.join(d, f"{i:06d}.bin"), "wb") as f:
                f.write(data)


if __name__ == "__main__":
    main()

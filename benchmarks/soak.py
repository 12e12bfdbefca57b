#!/usr/bin/env python3
"""Soak (issue 8; not in CI): epochs for MINUTES with a resume from a saved state every
RESUME_MINUTES (the loader deleted and rebuilt mid-epoch, as after a preemption), checking on
every epoch that each sample came exactly once, and sampling RSS and the open file count once a
minute: both must stay flat.

  python benchmarks/soak.py CONFIG.yaml [--minutes 30] [--resume-minutes 3]
Prints one line per minute and a summary (markdown) at the end; exits 1 on a violation.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np

import sluice


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def open_files() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config")
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--resume-minutes", type=float, default=3)
    a = p.parse_args()
    loader = sluice.Loader(a.config, rank=0, world_size=1)
    n = loader.num_samples
    seen = np.zeros(n, dtype=np.uint8)
    start = time.monotonic()
    next_sample, next_resume = start + 60, start + a.resume_minutes * 60
    samples, epochs, resumes, problems = [], 0, 0, []
    epoch = loader.epoch
    while time.monotonic() - start < a.minutes * 60:
        for batch in loader:
            idx = batch["index"].numpy()
            if "padding" in batch:
                idx = idx[~batch["padding"].numpy()]
            seen[idx] += 1
            now = time.monotonic()
            if now >= next_sample:
                samples.append((round((now - start) / 60, 1), rss_mib(), open_files(), epochs, resumes))
                print(f"t={samples[-1][0]} min rss={samples[-1][1]:.0f} MiB fds={samples[-1][2]} "
                      f"epochs={epochs} resumes={resumes}", flush=True)
                next_sample += 60
            if now >= next_resume:  # save, drop the loader, resume from the state
                state = loader.state_dict()
                del batch
                loader.close()
                del loader
                gc.collect()
                loader = sluice.Loader(a.config, rank=0, world_size=1)
                loader.load_state_dict(state)
                resumes += 1
                next_resume += a.resume_minutes * 60
                break  # iterate the resumed loader (the rest of this epoch)
        else:
            # The epoch is over: every sample exactly once.
            if not (seen == 1).all():
                bad = np.flatnonzero(seen != 1)
                problems.append(f"epoch {epoch}: {len(bad)} samples not seen exactly once "
                                f"(first {bad[:5].tolist()}, counts {seen[bad[:5]].tolist()})")
            seen[:] = 0
            epochs += 1
            epoch += 1
    rss = [s[1] for s in (samples[1:] or samples)] or [0]
    fds = [s[2] for s in (samples[1:] or samples)] or [0]
    print(f"\n| minutes | epochs checked | resumes | RSS min-max (after minute 1) | open files min-max | exactly-once violations |")
    print("|---|---|---|---|---|---|")
    print(f"| {a.minutes:g} | {epochs} | {resumes} | {min(rss):.0f}-{max(rss):.0f} MiB | {min(fds)}-{max(fds)} | {len(problems)} |")
    for line in problems:
        print(line)
    sys.exit(1 if problems or max(rss) > 1.5 * min(rss) + 64 or max(fds) > min(fds) + 4 else 0)


if __name__ == "__main__":
    main()

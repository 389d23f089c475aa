"""OpenMP's wait policy for decoding on CPU.

A decode step runs four small matrix products per layer, each a parallel region of torch's
OpenMP pool, with some 0.1 ms of small operators and Python in between. Under libgomp's default
policy the pool's threads soon sleep between regions, and waking them is a cost per product that
does not shrink with the matrix: on SmolLM2-135M at batch 8 on 2 cores, timed in place in the
decode loop, the width-pruned student's layer products took 1.50x less time than the teacher's
for 1.79x fewer weight bytes, while run back to back (``benchmarks/decode_bound.py``) they
follow the FLOP ratio. With ``OMP_WAIT_POLICY=ACTIVE`` the threads
spin between regions (libgomp still caps the spinning when threads outnumber cores): the
student's decode step went from 46-48 to 40-41 ms, the teacher's from 63 to 57-63, and the
products alone from 0.90-0.97 of the FLOP ratio to 1.00-1.11, alternated in one quiet batch.

libgomp reads the policy once, when torch loads it, so this works only before the first
``import torch`` of the process: the command line sets it for its decoding verbs
(``prefer_spinning_threads``); a script of one's own exports ``OMP_WAIT_POLICY=ACTIVE`` itself. A
policy already in the environment is kept."""

from __future__ import annotations

import os
import sys

POLICY = "OMP_WAIT_POLICY"


def prefer_spinning_threads() -> None:
    """Ask OpenMP's threads to spin between parallel regions, unless the environment already
    names a policy, or torch (and so libgomp) is already loaded: then the policy in force stays,
    and child processes are not handed one this process does not have."""
    if "torch" not in sys.modules:
        os.environ.setdefault(POLICY, "ACTIVE")

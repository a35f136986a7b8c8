"""Peer trainers run side by side with ours by benchmarks/bench_train.py (issue 5).

Each peer is a standalone script run in its own child process; its third-party code
is found through an environment variable and never committed (see kohya_flux.py).
"""

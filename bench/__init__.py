"""The benchmark suite: accept rate, per-task overhead, backlog efficiency and scale, in one run.

python -m bench            # (or `make bench`) prints a table and writes bench/results/<time>.json

Everything runs on the embedded stack (Tansu, SeaweedFS) with the Piper engine on this machine, and
every figure that depends on the machine's speed is a ratio against a baseline measured in the same
run: the engine's own synthesis time and rate, measured in this process on the same texts.
"""

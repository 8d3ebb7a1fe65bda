#!/usr/bin/env python3
"""Tune clconv for this machine's OpenCL device; the same as `clconv tune`.

    python tuning/tune.py                              # the standard suite, 20 s per layer
    python tuning/tune.py --suite resnet50 --batch 8 --budget 30
    python tuning/tune.py --export tuning/database/my-device.json

Winners go to the per-device cache (see `clconv info`), which every later run uses.
"""
import sys

from clconv.cli import main

if __name__ == "__main__":
    sys.exit(main(["tune", *sys.argv[1:]]))

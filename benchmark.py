"""Benchmarks with recorded results (BENCHMARKS.md): speed and memory targets are checked here, never in tests.

    python benchmark.py bpe        # BPE training time, encode throughput, bytes per token
    python benchmark.py prepare    # prepare without the CNN vs decoding every frame with PyAV
    python benchmark.py loader     # pretrain DataLoader clips/s and CPU training rate
    python benchmark.py gpu        # on a GPU: ResNet-18 frames/s in prepare, training clips/s, MFU
"""
import argparse

# ----------------------------------------------------------------------------------------------------
# bpe (owner: tokenizer)

# ----------------------------------------------------------------------------------------------------
# prepare (owner: prepare)

# ----------------------------------------------------------------------------------------------------
# loader and gpu (owner: pretrain)

# ----------------------------------------------------------------------------------------------------
if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="what", required=True)
    # each section registers its sub-command here: sub.add_parser("bpe", help=...).set_defaults(run=bench_bpe)
    args = parser.parse_args()
    args.run(args)

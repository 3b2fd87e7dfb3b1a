"""cgm-provenance: ship a finished pre-training run with its manifest, or verify a shipped checkpoint.

    cgm-provenance ship --run RUN_DIR --dest checkpoints/mini-llava-1.5 --command "cgm-train pretrain ..."
    cgm-provenance verify checkpoints/mini-llava-1.5

`verify` exits 0 when every file matches the manifest's SHA-256 and the first losses of a fresh run of the
pre-training script equal the recorded ones (relative difference below 1e-4), 1 otherwise.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

from . import run
from ..world import provenance as pv


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cgm-provenance", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("ship", help="copy a finished run into the repository with its manifest")
    s.add_argument("--run", required=True)
    s.add_argument("--dest", required=True)
    s.add_argument("--command", required=True, help="the exact command that made the run")
    s.add_argument("--code-commit", help="git commit of the code that made the run")
    v = sub.add_parser("verify", help="file hashes, and the first losses of a fresh run, against the manifest")
    v.add_argument("ckpt")
    a = ap.parse_args(argv)
    if a.cmd == "ship":
        print(f"shipped {pv.ship(Path(a.run), Path(a.dest), a.command, a.code_commit)}")
        return 0
    ckpt = Path(a.ckpt)
    if not ckpt.is_dir():
        raise FileNotFoundError(f"no checkpoint folder {ckpt}")
    bad = pv.check_files(ckpt)
    want = pv.read_manifest(ckpt)["first_losses"]
    got = pv.rerun_first_losses(ckpt, len(want))
    worst = max(abs(x - y) / abs(y) for x, y in zip(got, want))
    print(f"files differing from the manifest: {bad or 'none'}; first {len(want)} losses: max rel. diff {worst:.2e}")
    return 0 if not bad and worst < 1e-4 else 1


def entry() -> int:
    return run(main)


if __name__ == "__main__":
    raise SystemExit(entry())

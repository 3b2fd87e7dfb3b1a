"""python -m cgm_min.real [NAME ...]: the real backbones' parameter counts and the cgm-merge plan of the
paper's merge, computed from the published configs without weights (header-only files in a temporary
folder, removed afterwards)."""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from typing import Sequence

from ..cli import run
from .architectures import REAL_MODELS, get_real, parameter_counts
from .merge_plan import real_merge_plan


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m cgm_min.real", description=__doc__.split("\n\n")[0])
    p.add_argument("names", nargs="*", default=list(REAL_MODELS), help=f"default: {', '.join(REAL_MODELS)}")
    p.add_argument("--method", default="cgm", help="the merge method of the plan (default cgm)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="a hyperparameter of the method (default for cgm: alpha_normalised=1)")
    p.add_argument("--plan", action="store_true", help="also print the merged tensors one per line")
    a = p.parse_args(argv)
    params = {}
    for item in a.param:
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ValueError(f"--param takes NAME=VALUE, got {item!r}")
        try:
            params[key] = float(value) if any(ch in value for ch in ".eE") else int(value)
        except ValueError:
            params[key] = {"true": True, "false": False}.get(value.lower(), value)
    for name in a.names:
        m = get_real(name)
        c = parameter_counts(name)
        print(f"{name} ({m.hub_id}): {c['total']:,} parameters = language model {c['language_model']:,} + "
              f"vision tower {c['vision_tower']:,} + projector {c['projector']:,}; {c['tensors']} tensors")
        print(f"  merge set ({m.paper.split(';')[0]}): {c['merge_set']:,} parameters in "
              f"{c['merge_set_tensors']} tensors ({c['merge_set'] / c['total']:.1%})")
        with tempfile.TemporaryDirectory() as tmp:
            plan = real_merge_plan(name, tmp, a.method, params or None)
        lines = plan["describe"].replace(tmp, "<header-only files>").splitlines()
        print("\n".join("  " + line for line in lines if a.plan or not line.startswith("  merge ")))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")       # the command never fetches; set before any hub import
    sys.exit(run(main))

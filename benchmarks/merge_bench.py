"""cgm-merge against mergekit on a synthetic Llama-shaped pair: ratios measured side by side in one run.

    .venv/bin/python benchmarks/merge_bench.py --dir DIR                               # the issue's size
    .venv/bin/python benchmarks/merge_bench.py --dir DIR --scale small --repeats 1     # checks the script

Scales (every input generated here, seeded, into --dir; nothing large goes into the repository):
  full   1.143 B parameters (hidden 2048, 20 layers, FFN 5504, 16 heads, vocab 32000, untied head): each
         checkpoint 2.29 GB bf16 in 3 shards (save_pretrained, max_shard_size 1GB), each curvature file set
         4.57 GB fp32 in the same layout; a CGM merge moves 16 GB. Needs about 25 GB of free disk.
  small  53 M parameters (hidden 768, 4 layers, FFN 2048, vocab 16000), 50 MB shards: about 0.7 GB in all.

What is measured (whole processes, start-up included; tools alternated; --repeats runs each, median and
min-max reported):
  * `cgm-merge` CGM (raw alpha, every tensor merged) and linear, with the input hashes remembered from an
    untimed first run, and CGM hashing every input again (warm only); `mergekit-yaml -j 1` linear (mergekit 0.1.5,
    installed into DIR/mergekit-venv with torch pinned by a constraints file when missing; --no-mergekit
    skips it). Warm: the inputs are read into the page cache just before each run. Cold: `sync; echo 3 >
    /proc/sys/vm/drop_caches` and a 10 s wait (SETTLE_S: see drop_caches) before each run (root only; skipped
    otherwise, and said so).
  * peak anonymous and file-backed memory of each process (RssAnon / RssFile, sampled every 5 ms from
    /proc/PID/status): mmapped or cached file pages are reclaimable and are reported apart.
  * CGM-dagger's per-row selection: cgm.select_lowest (partial selection, O(n)) against a per-row stable sort, on
    score matrices of the model's largest shape, one thread; the two masks must be equal.
  * bit identity: every tensor of cgm-merge's CGM output against cgm.cgm_merge of the same tensors.
The table ends with the issue's targets and whether each is met. Run it on an idle machine (`uptime`).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SCALES = {
    "full": dict(hidden_size=2048, num_hidden_layers=20, intermediate_size=5504, num_attention_heads=16,
                 num_key_value_heads=16, vocab_size=32000, shard="1GB"),
    "small": dict(hidden_size=768, num_hidden_layers=4, intermediate_size=2048, num_attention_heads=12,
                  num_key_value_heads=12, vocab_size=16000, shard="50MB"),
}
TARGETS = {"warm": 0.5, "cold": 1.0, "anon_gb": 1.5, "dagger": 3.0}
MERGEKIT = "mergekit==0.1.5"
TORCH_PIN = "torch==2.13.0"


# ----------------------------------------------------------------------------------------------
# Inputs.

def generate(work: Path, scale: str, seed: int = 0) -> dict[str, Path]:
    """pre-trained and fine-tuned bf16 checkpoints and fp32 curvature of every tensor, once per --dir."""
    paths = {k: work / scale / k for k in ("pt", "ft", "h_pt", "h_ft")}
    if all((p / "model.safetensors.index.json").exists() or (p / "model.safetensors").exists()
           for p in paths.values()):
        return paths
    from transformers import LlamaConfig, LlamaForCausalLM
    from cgm_min.io.curvature_files import write_curvature
    spec = dict(SCALES[scale])
    shard = spec.pop("shard")
    cfg = LlamaConfig(**spec, max_position_embeddings=2048, tie_word_embeddings=False)
    with torch.device("meta"):
        model = LlamaForCausalLM._from_config(cfg, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in sorted(model.named_parameters()):
            p.normal_(1.0 if "norm" in n else 0.0, 0.02, generator=g)
        print(f"generating {scale}: {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B parameters", flush=True)
        for role in ("pt", "ft"):
            shutil.rmtree(paths[role], ignore_errors=True)
            if role == "ft":
                for n, p in sorted(model.named_parameters()):
                    p.add_(torch.randn(p.shape, generator=g, dtype=torch.bfloat16) * 0.002)
            model.save_pretrained(paths[role], max_shard_size=shard)
    shapes = {n: p.shape for n, p in model.named_parameters()}
    del model

    class Random(dict):
        """{name: fresh fp32 curvature}, drawn when looked up (one tensor in memory at a time)."""
        def __getitem__(self, name):
            return torch.rand(shapes[name], generator=g) ** 2

    for role, model_dir in (("h_pt", paths["pt"]), ("h_ft", paths["ft"])):
        shutil.rmtree(paths[role], ignore_errors=True)
        write_curvature(Random.fromkeys(shapes), model_dir, paths[role], {"kind": role, "estimator": "synthetic"})
    return paths


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def write_configs(work: Path, paths: dict[str, Path]) -> dict[str, Path]:
    import yaml
    common = {"pre_trained": str(paths["pt"]), "fine_tuned": str(paths["ft"]), "merge_set": {"patterns": ["*"]}}
    cgm_cfg = {**common, "curvature": {"pre_trained": str(paths["h_pt"]), "fine_tuned": str(paths["h_ft"])},
               "method": "cgm", "parameters": {"alpha": 1.0}}
    lin_cfg = {**common, "method": "linear", "parameters": {"lam": 0.5}}
    mk_cfg = {"merge_method": "linear", "dtype": "bfloat16",
              "models": [{"model": str(paths["pt"]), "parameters": {"weight": 0.5}},
                         {"model": str(paths["ft"]), "parameters": {"weight": 0.5}}]}
    out = {}
    for name, cfg in (("cgm", cgm_cfg), ("linear", lin_cfg), ("mergekit", mk_cfg)):
        out[name] = work / f"{name}.yaml"
        out[name].write_text(yaml.safe_dump(cfg, sort_keys=False))
    return out


def mergekit_exe(work: Path) -> Path:
    """mergekit-yaml from DIR/mergekit-venv, installed there (torch pinned) when missing."""
    venv = work / "mergekit-venv"
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"installing {MERGEKIT} into {venv} (torch pinned to {TORCH_PIN.split('==')[1]})", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pins = work / "constraints.txt"
    pins.write_text(TORCH_PIN + "\n")
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "-c", str(pins), MERGEKIT], check=True)
    return exe


# ----------------------------------------------------------------------------------------------
# Running and sampling.

def _status(pid: int) -> dict[str, int]:
    out = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, rest = line.partition(":")
                if key in ("RssAnon", "RssFile", "VmRSS"):
                    out[key] = int(rest.split()[0]) * 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return out


def timed(cmd: list[str], env: dict | None = None) -> dict:
    """Wall time and peak RssAnon / RssFile of one process."""
    peak = {"RssAnon": 0, "RssFile": 0, "VmRSS": 0}
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, **(env or {})})
    done = threading.Event()

    def sample():
        while not done.is_set():
            for k, v in _status(proc.pid).items():
                peak[k] = max(peak[k], v)
            time.sleep(0.005)
    th = threading.Thread(target=sample, daemon=True)
    th.start()
    err = proc.communicate()[1]
    wall = time.perf_counter() - t0
    done.set()
    th.join()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {err[-2000:]}")
    return {"wall": wall, "anon": peak["RssAnon"], "file": peak["RssFile"]}


def warm_up(paths: list[Path]) -> None:
    buf = bytearray(64 << 20)
    for root in paths:
        for f in sorted(root.rglob("*")):
            if f.is_file():
                with open(f, "rb", buffering=0) as fh:
                    while fh.readinto(buf):
                        pass


SETTLE_S = 10.0


def drop_caches(settle: float = SETTLE_S) -> bool:
    """sync, drop the page cache, then wait `settle` seconds. The wait makes every cold run equally cold: in a
    VM with free page reporting (virtio-balloon, as on the project's machine class) the memory the drop frees
    goes back to the host within a few seconds, and refilling it costs system time. A run that starts at
    once still finds that memory backed: reading 4 GB cold with cat took 1.2 s right after the drop and
    4.7-6.9 s three to twenty seconds after it, and one cold cgm-merge run of the first benchmark took
    13.1 s against 26.7 s for the others."""
    try:
        subprocess.run(["sync"], check=True)
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
    except OSError:
        return False
    time.sleep(settle)
    return True


def run_tools(tools: dict[str, tuple[list[str], dict]], inputs: dict[str, list[Path]], outs: dict[str, Path],
              repeats: int, cold: bool) -> dict[str, list[dict]]:
    res: dict[str, list[dict]] = {t: [] for t in tools}
    for r in range(repeats):
        for name, (cmd, env) in tools.items():
            shutil.rmtree(outs[name], ignore_errors=True)
            if cold:
                drop_caches()
            else:
                warm_up(inputs[name])
            m = timed(cmd, env)
            res[name].append(m)
            print(f"  {'cold' if cold else 'warm'} {r + 1}/{repeats} {name:<18} {m['wall']:6.2f} s  "
                  f"anon {m['anon'] / 1e9:.2f} GB  file {m['file'] / 1e9:.2f} GB", flush=True)
    return res


# ----------------------------------------------------------------------------------------------
# CGM-dagger selection and bit identity.

def select_by_sort(score: torch.Tensor, k: float) -> torch.Tensor:
    """The per-row sort the O(n) selection replaces: the revert_count(n, k) lowest per row, ties by index."""
    from cgm_min import cgm
    rows = score.reshape(score.shape[0], -1)
    m = cgm.revert_count(rows.shape[1], k)
    idx = rows.argsort(dim=1, stable=True)[:, :m]
    return torch.zeros_like(rows, dtype=torch.bool).scatter_(1, idx, True).reshape(score.shape)


def dagger_selection(shape: tuple[int, int], repeats: int, k: float = 0.1) -> dict:
    from cgm_min import cgm
    torch.set_num_threads(1)
    score = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    times = {"selection": [], "sort": []}
    for _ in range(repeats):
        for name, fn in (("selection", lambda: cgm.select_lowest(score, k, True)),
                         ("sort", lambda: select_by_sort(score, k))):
            t = time.perf_counter()
            mask = fn()
            times[name].append(time.perf_counter() - t)
    same = torch.equal(cgm.select_lowest(score, k, True), select_by_sort(score, k))
    return {"shape": list(shape), "selection": times["selection"], "sort": times["sort"], "masks_equal": same,
            "entries": int(mask.numel())}


def bit_identity(out: Path, paths: dict[str, Path], alpha: float) -> tuple[int, int]:
    """(identical tensors, all tensors): cgm-merge's output against cgm.cgm_merge, tensor by tensor."""
    from cgm_min import cgm
    from cgm_min.io.reader import Checkpoint
    cks = {k: Checkpoint(p, k) for k, p in paths.items()}
    res = Checkpoint(out, "output")
    same = 0
    for n in res.names:
        t = {k: ck.read(n, copy=True) for k, ck in cks.items()}
        ref = cgm.cgm_merge({n: t["pt"]}, {n: t["ft"]}, {n: t["h_pt"]}, {n: t["h_ft"]}, alpha)[n]
        got = res.read(n)
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[ref.element_size()]
        same += bool(got.dtype == ref.dtype and torch.equal(got.view(bits), ref.view(bits)))
    return same, len(res.names)


# ----------------------------------------------------------------------------------------------

def med(xs):
    return statistics.median(xs)


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    return f"{cpu}, {os.cpu_count()} vCPU, {mem:.0f} GiB, Linux {platform.release()}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dir", required=True, help="work folder for the generated checkpoints, venv and outputs")
    ap.add_argument("--scale", choices=sorted(SCALES), default="full")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--no-mergekit", action="store_true", help="skip mergekit (no install, no comparison)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold-cache runs")
    a = ap.parse_args()
    load_at_start = os.getloadavg()[0]
    work = Path(a.dir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    paths = generate(work, a.scale)
    cfgs = write_configs(work, paths)
    exe = str(Path(sys.executable).parent / "cgm-merge")
    cache = {"CGM_MERGE_HASH_CACHE": str(work / "sha256-cache.json")}
    outs = {"cgm-merge cgm": work / "out-cgm", "cgm-merge linear": work / "out-linear",
            "mergekit -j 1 linear": work / "out-mergekit", "cgm-merge cgm, inputs hashed": work / "out-cgm-hash"}
    cgm_cmd = [exe, str(cfgs["cgm"]), str(outs["cgm-merge cgm"]), "--no-progress"]
    tools = {"cgm-merge cgm": (cgm_cmd, cache),
             "cgm-merge linear": ([exe, str(cfgs["linear"]), str(outs["cgm-merge linear"]), "--no-progress"], cache)}
    inputs = {"cgm-merge cgm": [paths[k] for k in ("pt", "ft", "h_pt", "h_ft")],
              "cgm-merge linear": [paths["pt"], paths["ft"]], "mergekit -j 1 linear": [paths["pt"], paths["ft"]]}
    inputs["cgm-merge cgm, inputs hashed"] = inputs["cgm-merge cgm"]
    mk_version = None
    if not a.no_mergekit:
        mk = mergekit_exe(work)
        tools["mergekit -j 1 linear"] = (
            [str(mk), str(cfgs["mergekit"]), str(outs["mergekit -j 1 linear"]), "-j", "1"], {})
        mk_version = MERGEKIT.split("==")[1]
    # cgm-merge remembers input SHA-256 hashes across runs (validated by size, mtime, inode): one untimed run
    # fills that cache for the rows above; the warm row below hashes all 14 GB of inputs again (no cache).
    for name in ("cgm-merge cgm", "cgm-merge linear"):
        shutil.rmtree(outs[name], ignore_errors=True)
        timed(*tools[name])
    no_cache = {"cgm-merge cgm, inputs hashed": (
        [exe, str(cfgs["cgm"]), str(outs["cgm-merge cgm, inputs hashed"]), "--no-progress"],
        {"CGM_MERGE_HASH_CACHE": "0"})}
    sizes = {k: dir_bytes(p) for k, p in paths.items()}
    print(f"inputs: {', '.join(f'{k} {v / 1e9:.2f} GB' for k, v in sizes.items())}", flush=True)
    results = {"warm": run_tools({**tools, **no_cache}, inputs, outs, a.repeats, cold=False)}
    can_drop = not a.no_cold and drop_caches(0)
    if can_drop:
        results["cold"] = run_tools(tools, inputs, outs, a.repeats, cold=True)
    same, total = bit_identity(outs["cgm-merge cgm"], paths, 1.0)
    cfg = json.loads((paths["pt"] / "config.json").read_text())
    shape = (cfg["intermediate_size"], cfg["hidden_size"])
    dagger = dagger_selection(shape, max(3, a.repeats))

    # ------------------------------------------------------------------------------------------
    lines = [f"## cgm-merge benchmark ({a.scale}), {datetime.date.today().isoformat()}",
             "", f"machine: {machine()}; 1-minute load at the start {load_at_start:.2f}, at the end {os.getloadavg()[0]:.2f}",
             f"versions: torch {torch.__version__}, cgm_min {__import__('cgm_min').__version__}"
             + (f", mergekit {mk_version}" if mk_version else ""),
             f"inputs: pair {sizes['pt'] / 1e9:.2f} + {sizes['ft'] / 1e9:.2f} GB bf16, curvature "
             f"{sizes['h_pt'] / 1e9:.2f} + {sizes['h_ft'] / 1e9:.2f} GB fp32; {a.repeats} runs each, alternated", "",
             "| run | cache | wall s, median (min-max) | peak anonymous GB | peak file-backed GB |",
             "|---|---|---|---|---|"]
    for cache, res in results.items():
        for name, runs in res.items():
            w = [r["wall"] for r in runs]
            lines.append(f"| {name} | {cache} | {med(w):.2f} ({min(w):.2f}-{max(w):.2f}) | "
                         f"{max(r['anon'] for r in runs) / 1e9:.2f} | {max(r['file'] for r in runs) / 1e9:.2f} |")
    lines += ["", "| ratio | target | measured (spread) | met |", "|---|---|---|---|"]

    def ratio_row(cache):
        c = [r["wall"] for r in results[cache]["cgm-merge cgm"]]
        m = [r["wall"] for r in results[cache]["mergekit -j 1 linear"]]
        per = [x / y for x, y in zip(c, m)]
        v = med(c) / med(m)
        return (f"| cgm-merge CGM / mergekit -j 1 linear, {cache} | <= {TARGETS[cache]} | {v:.2f} "
                f"({min(per):.2f}-{max(per):.2f}) | {'yes' if v <= TARGETS[cache] else 'NO'} |")
    for cache in results:
        if "mergekit -j 1 linear" in results[cache]:
            lines.append(ratio_row(cache))
        else:
            lines.append(f"| cgm-merge CGM / mergekit -j 1 linear, {cache} | <= {TARGETS[cache]} | not measured "
                         "(--no-mergekit) | - |")
    if "cold" not in results:
        lines.append("| cold-cache ratio | <= 1.0 | not measured (drop_caches needs root) | - |")
    anon = max(r["anon"] for res in results.values() for r in res["cgm-merge cgm"]) / 1e9
    lines.append(f"| cgm-merge CGM peak anonymous memory | <= {TARGETS['anon_gb']} GB | {anon:.2f} GB | "
                 f"{'yes' if anon <= TARGETS['anon_gb'] else 'NO'} |")
    sp = med(dagger["sort"]) / med(dagger["selection"])
    lines.append(f"| CGM-dagger per-row sort / per-row O(n), {dagger['shape']} | >= {TARGETS['dagger']} | "
                 f"{sp:.1f} ({med(dagger['selection']) * 1e3:.0f} ms vs {med(dagger['sort']) * 1e3:.0f} ms; masks "
                 f"{'equal' if dagger['masks_equal'] else 'DIFFER'}) | {'yes' if sp >= TARGETS['dagger'] else 'NO'} |")
    lines.append(f"| output bit-identical to cgm.cgm_merge | every tensor | {same} of {total} | "
                 f"{'yes' if same == total else 'NO'} |")
    table = "\n".join(lines)
    print("\n" + table)
    (work / f"results-{a.scale}.json").write_text(json.dumps(
        {"results": results, "dagger": dagger, "bit_identical": [same, total], "sizes": sizes, "table": table},
        indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

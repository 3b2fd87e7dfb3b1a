"""Fuzzing the cgm-merge config loader: 240 random malformed or out-of-range configs, derived from a valid
one, never end in a Python traceback: each is merged (exit 0) or refused with one line (exit 2)."""
from __future__ import annotations

import random
import shutil

import pytest
import yaml

from cgm_min.cli import run
from cgm_min.cli.merge import main
from cgm_min.merge import METHODS

from cgm_merge_fixtures import make_family, write_config
from cgm_merge_fixtures import private_hash_cache  # noqa: F401 (an autouse fixture)

N_CASES = 240
JUNK = [None, True, False, 0, -1, 1, 2, 0.5, -0.5, 1.5, 1e30, 10 ** 30, float("inf"), float("-inf"), float("nan"),
        "", " ", "x", "cgm", "llava-1.5", "model.*", "*", "[", "~/nowhere", "/", "..", "a" * 300, "\u00e9\u00e8",
        [], [1, 2], ["model.*"], [None], {}, {"a": 1}, {"preset": "qwen2.5-vl"}, 3e-320, "2024-01-01"]
TOP = ["pre_trained", "fine_tuned", "curvature", "method", "parameters", "merge_set", "dtype", "extra"]
PARAMS = ["alpha", "alpha_normalised", "k", "lam", "lam_pt", "p", "seed", "scale", "per_row", "beta"]
RAW = ["", "---", "- a\n- b\n", "method: [cgm\n", "a: b: c", "\t method: cgm", "method: cgm\nmethod: linear\n",
       "!!python/object:os.system {}", "&a [*a]", "[" * 3000, "{" * 3000 + "}" * 3000, "x: !!binary AAAA",
       "? [a]\n: b\n", "%YAML 9.9\n---\na: 1"]


def mutate(rng: random.Random, base: dict) -> str:
    """YAML text: the valid config changed at 1-3 places, or broken as text."""
    if rng.random() < 0.15:
        text = yaml.safe_dump(base, sort_keys=False)
        pick = rng.randrange(4)
        if pick == 0:
            return text[:rng.randrange(len(text))]
        if pick == 1:
            i = rng.randrange(len(text))
            return text[:i] + rng.choice([":", "\t", "{", "]", "&x", "*y", "!!", "'", '"', "\x00", "\u2028"]) + text[i:]
        return rng.choice(RAW) if pick == 2 else bytes(rng.randrange(256) for _ in range(80)).decode("latin-1")
    cfg = yaml.safe_load(yaml.safe_dump(base))
    for _ in range(rng.randint(1, 3)):
        where = rng.randrange(6)
        if where == 0:                                           # a top-level key removed or replaced
            key = rng.choice(TOP)
            if key in cfg and rng.random() < 0.4:
                del cfg[key]
            else:
                cfg[key] = rng.choice(JUNK)
        elif where == 1:                                         # a method with its own, maybe bad, values
            cfg["method"] = rng.choice(sorted(METHODS) + JUNK[:6])
            ranges = getattr(METHODS.get(cfg["method"]) if isinstance(cfg["method"], str) else None, "ranges", {})
            cfg["parameters"] = {k: rng.choice([0.5, 0.5, True, 1, rng.choice(JUNK)]) for k in ranges}
        elif where == 2 and isinstance(cfg.get("parameters"), dict):
            cfg["parameters"][rng.choice(PARAMS)] = rng.choice(JUNK)
        elif where == 3:
            cfg["parameters"] = {k: rng.choice(JUNK + [0.3, 0.7]) for k in rng.sample(PARAMS, rng.randint(0, 3))}
        elif where == 4:
            cfg["merge_set"] = rng.choice([
                {"preset": rng.choice(["llava-1.5", "qwen2.5-vl", "x", None]),
                 "last_layers": rng.choice(JUNK + [2, 4])},
                {"patterns": rng.choice(JUNK)}, {"patterns": ["model.language_model.layers.3.*"]}, rng.choice(JUNK)])
        else:
            cfg[rng.choice(["dtype", "curvature"])] = rng.choice(JUNK + ["bfloat16", "float32", {"pre_trained": "x"}])
    try:
        return yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True)
    except yaml.YAMLError:
        return str(cfg)


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    paths = make_family(root / "llava", "llava")
    return yaml.safe_load(write_config(root / "valid.yaml", paths, "cgm", {"alpha": 0.5}).read_text())


def test_random_bad_configs_never_raise_a_traceback(base, tmp_path, capsys):
    rng = random.Random(20261130)
    outcomes = {0: 0, 2: 0}
    for i in range(N_CASES):
        text = mutate(rng, base)
        cfg = tmp_path / f"c{i}.yaml"
        cfg.write_text(text, encoding="utf-8", errors="surrogatepass")
        out = tmp_path / f"out{i}"
        mode = ["--no-progress"] if i % 8 == 0 else ["--dry-run"]     # every eighth merges for real
        try:
            code = run(main, [str(cfg), str(out), *mode])
        except BaseException as err:                                  # a traceback: report the config
            pytest.fail(f"case {i} raised {type(err).__name__}: {err}\n--- config ---\n{text[:2000]}")
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if line.strip()]
        assert code in (0, 2), (i, text)
        assert "Traceback" not in err, (i, text)
        if code == 2:
            assert len(lines) == 1 and lines[0].startswith("error: "), (i, err, text)
        outcomes[code] += 1
        shutil.rmtree(out, ignore_errors=True)
    assert outcomes[2] >= N_CASES // 2 and sum(outcomes.values()) == N_CASES

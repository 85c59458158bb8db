"""bench/bench_evaluate.py reads the time split of evaluate.py's log line; the two must agree."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_evaluate

from jaxmol.evaluation import protocols


def test_the_bench_parses_the_evaluation_log_line():
    line = protocols.TIME_SPLIT_FORMAT % ("chebi20/test", "pool", 114.25, 80.1, 10.2, 23.9, 9, 31.0)
    found = bench_evaluate._SPLIT_LINE.search("I1201 protocols.py:340] " + line)
    assert found, line
    values = {k: float(v) for k, v in found.groupdict().items()}
    assert values == {
        "eval_s": 114.2,
        "texts_s": 80.1,
        "molecules_s": 10.2,
        "other_s": 23.9,
        "programs": 9.0,
        "compile_s": 31.0,
    }


def test_the_text_embedding_utilisation_uses_the_text_seconds():
    run = {"wall_s": 100.0, "probes": [100.0, 100.0], "texts_s": 50.0}
    util = bench_evaluate._utilisation(run, pairs=1000, text_flops=2e12, mol_flops=1e12)
    assert util["texts_per_s"] == 10.0
    assert util["text_util"] == 0.2  # 2e12 FLOP / 100 s / 100 GFLOP/s
    assert util["all_util"] == 0.3
    assert util["text_embed_util"] == 0.4  # the same FLOPs over the 50 text seconds

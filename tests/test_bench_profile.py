"""bench/bench_profile.py's reading of XLA's optimised HLO: which op holds a matmul and which
model part emitted it (the profile's attribution rests on both)."""

import sys
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import bench_profile


def _optimised_hlo(fn, *args) -> str:
    return jax.jit(fn).lower(*args).compile().as_text()


def test_parse_hlo_finds_the_matmul_and_the_source_path_of_each_op():
    def model(x, w):
        with jax.named_scope("txt/layer_0/intermediate"):
            h = jnp.tanh(x @ w)
        with jax.named_scope("txt/layer_0/attention/Dropout_0"):
            return jnp.where(h > 0.1, h * 2.0, 0.0).sum()

    x, w = jnp.ones((64, 32)), jnp.ones((32, 48))
    ops = bench_profile.parse_hlo(_optimised_hlo(model, x, w))
    matmuls = [o for o in ops.values() if o["matmul"]]
    assert matmuls, ops
    assert all("intermediate" in o["op_name"] for o in matmuls if o["op_name"])
    others = [o for o in ops.values() if not o["matmul"] and "Dropout_0" in o["op_name"]]
    assert others, ops  # the select / multiply after the matmul is not one
    for op in matmuls:
        if op["op_name"]:
            assert bench_profile.component_of(op["op_name"]) == "text, other (feed-forward)"


def test_components_follow_the_model_paths():
    of = bench_profile.component_of
    base = "jit(local)/jvp(RetrievalModel)/RetrievalModel."
    assert of(base + "embed_text/txt/layer_2/attention/Dropout_0/and") == "dropout draws and masks"
    assert of(base + "embed_text/txt/layer_2/attention/bnqk,bnkd->bnqd/dot_general") == (
        "text attention"
    )
    assert of(base + "embed_text/txt/layer_5/erfc") == "GELU"
    assert of(base + "embed_text/txt/layer_1/output/LayerNorm_0/mul") == "LayerNorm"
    assert of(base + "embed_molecules/mol/conv_0/mlp_0/dot_general") == "molecule tower"
    assert of(base + "embed_text/head/linear/dot_general") == "projector, head, losses"
    assert of("jit(local)/add") == "optimizer, rest of the step"
    assert of("") == "no source path"


def test_a_fused_matmul_counts_for_the_text_tower_whatever_its_name():
    ops = {
        "fusion.1": {
            "matmul": True,
            "op_name": "jit(local)/RetrievalModel.embed_text/txt/layer_2/"
            "output_layer_norm/reduce_sum",
        },
        "fusion.2": {
            "matmul": True,
            "op_name": "jit(local)/RetrievalModel.embed_text/projector."
            "embed_text/projector.project_text/text_norm/reduce_sum",
        },
    }
    assert bench_profile.component_of(ops["fusion.1"]["op_name"]) == "LayerNorm"
    assert bench_profile._in_text("fusion.1", ops)  # the output dense layer fused into the norm
    assert not bench_profile._in_text("fusion.2", ops)  # the projector is not the text tower

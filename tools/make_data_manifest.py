"""Writes data/MANIFEST.json: SHA-256 and row count of every shipped data file.

Run after (and only after) deliberately changing a file under data/:

    python tools/make_data_manifest.py
"""

import json

from jaxmol.data.datasets import DATA_DIR, MANIFEST_NAME, count_rows, sha256_file

SHIPPED = (
    "chebi20/validation.tsv",
    "chebi20/test.tsv",
    "chebi20/train_cid_smiles_only.tsv",
    "pcdes/train.tsv",
    "pcdes/validation.tsv",
    "pcdes/test.tsv",
    "text2mol/mol2vec_token_embeddings.npz",
)


def main() -> None:
    files = {}
    for relative in SHIPPED:
        path = DATA_DIR / relative
        files[relative] = {
            "sha256": sha256_file(path),
            "bytes": path.stat().st_size,
            "rows": count_rows(path),
        }
    (DATA_DIR / MANIFEST_NAME).write_text(json.dumps({"files": files}, indent=2) + "\n")
    for relative, entry in files.items():
        print(f"{relative}: {entry['rows']} rows, sha256 {entry['sha256']}")


if __name__ == "__main__":
    main()

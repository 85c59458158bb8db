"""Split loading, manifest checks, user TSV files and tokenisation."""

import json
import shutil

import numpy as np
import pytest

from jaxmol.data import datasets
from jaxmol.data.datasets import DataError, load_split
from jaxmol.data.tokenize import load_tokenizer, tokenize_texts


@pytest.mark.parametrize(
    ("name", "rows"),
    [
        ("pcdes/train", 10500),
        ("pcdes/validation", 1500),
        ("pcdes/test", 3000),
        ("chebi20/validation", 3301),
        ("chebi20/test", 3300),
        ("pcdes_momu/train", 10494),
        ("pcdes_momu/validation", 1500),
        ("pcdes_momu/test", 2998),
    ],
)
def test_shipped_splits_have_their_sizes(name, rows):
    dataset = load_split(name)
    assert len(dataset) == rows
    assert len(dataset.smiles) == len(dataset.texts) == rows
    assert all(dataset.texts) and all(dataset.smiles)


def test_pcdes_rows_are_in_file_order_and_momu_drops_its_eight_ids():
    train = load_split("pcdes/train")
    assert train.ids[0] == "1" and train.ids[-1] == "10500"
    assert train.smiles[0] == "CCCC[Si](Cl)(Cl)Cl"
    assert train.texts[0].startswith("it appears as a colorless liquid")
    momu = load_split("pcdes_momu/train")
    assert set(train.ids) - set(momu.ids) == {"924", "3714", "5716", "6163", "9954", "10073"}


def test_chebi20_backslashes_are_single_and_molecule_only_split_has_no_texts():
    test = load_split("chebi20/test")
    assert not any("\\\\" in s for s in test.smiles)
    assert all(t.startswith("The molecule is") for t in test.texts)
    molecules = load_split("chebi20/train_molecules")
    assert len(molecules) == 26408 and molecules.texts is None


def _copy_data(tmp_path):
    target = tmp_path / "data"
    shutil.copytree(datasets.DATA_DIR, target, ignore=shutil.ignore_patterns("train.txt"))
    return target


def test_manifest_mismatch_names_the_file(tmp_path):
    data_dir = _copy_data(tmp_path)
    path = data_dir / "pcdes" / "validation.tsv"
    path.write_bytes(path.read_bytes()[:-200])  # truncated copy
    with pytest.raises(DataError, match=r"pcdes/validation\.tsv.*sha256"):
        load_split("pcdes/validation", data_dir=data_dir)
    load_split("pcdes/test", data_dir=data_dir)  # other files are unaffected


def test_missing_file_and_manifest_row_count(tmp_path):
    data_dir = _copy_data(tmp_path)
    (data_dir / "chebi20" / "test.tsv").unlink()
    with pytest.raises(DataError, match=r"missing data file.*chebi20/test\.tsv"):
        load_split("chebi20/test", data_dir=data_dir)
    manifest = json.loads((data_dir / "MANIFEST.json").read_text())
    manifest["files"]["pcdes/test.tsv"]["rows"] = 2999
    (data_dir / "MANIFEST.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="3000 rows, manifest says 2999"):
        load_split("pcdes/test", data_dir=data_dir)


def test_unknown_split_lists_the_known_ones():
    with pytest.raises(DataError, match=r"unknown split 'pcdes/tset'.*pcdes/test"):
        load_split("pcdes/tset")


def test_chebi20_train_explains_how_to_get_the_file_and_checks_its_blob_id(tmp_path):
    data_dir = _copy_data(tmp_path)
    with pytest.raises(DataError, match=r"MolT5.*train\.txt.*c1b42b82"):
        load_split("chebi20/train", data_dir=data_dir)
    (data_dir / "chebi20" / "train.txt").write_text("CID\tSMILES\tdescription\n1\tC\tx\n")
    with pytest.raises(DataError, match="is not MolT5's"):
        load_split("chebi20/train", data_dir=data_dir)


def test_chebi20_train_is_read_and_unescaped_when_the_blob_id_matches(tmp_path, monkeypatch):
    data_dir = _copy_data(tmp_path)
    path = data_dir / "chebi20" / "train.txt"
    path.write_text("CID\tSMILES\tdescription\n7\tC/C=C\\\\C\tThe molecule is a test.\n")
    monkeypatch.setattr(datasets, "CHEBI20_TRAIN_BLOB_ID", datasets.git_blob_id(path))
    train = load_split("chebi20/train", data_dir=data_dir)
    assert train.smiles == ("C/C=C\\C",)
    assert train.ids == ("7",)


def _write(tmp_path, text):
    path = tmp_path / "pairs.tsv"
    path.write_text(text)
    return f"tsv:{path}"


def test_user_tsv(tmp_path):
    name = _write(tmp_path, "id\tsmiles\tdescription\nm1\tCCO\tethanol\nm2\tC\tmethane\n")
    dataset = load_split(name)
    assert dataset.ids == ("m1", "m2") and dataset.texts == ("ethanol", "methane")


@pytest.mark.parametrize(
    ("content", "pattern"),
    [
        ("name\tsmiles\ttext\nm1\tC\tx\n", r":1: bad header"),
        ("id\tsmiles\tdescription\nm1\tC\tx\nm2\tCC\n", r":3: 2 tab-separated fields"),
        ("id\tsmiles\tdescription\nm1\tC\tx\nm1\tCC\ty\n", r":3: duplicate id 'm1'"),
        ("id\tsmiles\tdescription\nm1\t\tx\n", r":2: empty SMILES"),
        ("id\tsmiles\tdescription\nm1\tC\t \n", r":2: empty description"),
        ("", "empty file"),
    ],
)
def test_user_tsv_errors_name_the_line(tmp_path, content, pattern):
    with pytest.raises(DataError, match=pattern):
        load_split(_write(tmp_path, content))


def test_user_tsv_missing_file(tmp_path):
    with pytest.raises(DataError, match="file not found"):
        load_split(f"tsv:{tmp_path / 'nope.tsv'}")


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer(max_length=16)


def test_tokenizer_adds_special_tokens_and_counts_truncation(tokenizer):
    tokens = tokenize_texts(tokenizer, ["the ring", "word " * 40])
    first = tokens.text(0)
    assert first[0] == tokenizer.cls_id and first[-1] == tokenizer.sep_id
    assert len(first) == 4  # [CLS] the ring [SEP]
    assert tokens.lengths.tolist() == [4, 16]
    assert tokens.text(1)[-1] == tokenizer.sep_id
    assert tokens.num_truncated == 1
    assert tokens.token_ids.dtype == np.int32


def test_tokenizer_ignores_the_fixed_padding_of_tokenizer_json():
    tokens = tokenize_texts(load_tokenizer(), ["a " * 200])
    assert tokens.lengths.tolist() == [202]  # not 128, MiniLM's tokenizer.json default
    assert tokens.num_truncated == 0


def test_empty_text_is_an_error(tokenizer):
    with pytest.raises(ValueError, match="empty text at id 'b'"):
        tokenize_texts(tokenizer, ["fine", "  "], ids=["a", "b"])


def test_missing_tokenizer_directory(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer directory not found"):
        load_tokenizer(tmp_path / "nothing")
    with pytest.raises(FileNotFoundError, match=r"neither tokenizer\.json nor vocab\.txt"):
        load_tokenizer(tmp_path)

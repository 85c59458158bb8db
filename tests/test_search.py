"""Search: input readers, exact top-k, the index (build, resume, round trip, damage, wrong
checkpoint), the pool-protocol equality, the CLI, a build and a top-k over 2 processes, the web
server and the page in a browser.

The checkpoint is the session's shared tiny training run (`trained_run` in conftest.py, read
only); every index here holds a few dozen ChEBI-20 test molecules.
"""

import gzip
import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from jaxmol.search import readers
from jaxmol.search.topk import ExactTopK, competition_ranks
from tests import conftest, topk_case

ROOT = Path(__file__).resolve().parents[1]
NUM_PAIRS = 40
SHARD_SIZE = 16
MULTIPROCESS_TIMEOUT_S = 300  # every launch of several processes; a hang fails, never blocks CI


# ----------------------------------------------------------------------------------------------
# Readers (no model).


def _records(source):
    return [(r.line, r.id, r.value, r.error is not None) for r in source.records()]


def test_smi_reader_ids_header_comments_and_gzip(tmp_path):
    text = "SMILES\tName\nCCO ethanol\n# a comment\n\nc1ccccc1\nC1CC( broken ring\n"
    plain = tmp_path / "lib.smi"
    plain.write_text(text)
    zipped = tmp_path / "lib.smi.gz"
    zipped.write_bytes(gzip.compress(text.encode()))
    expected = [(2, "ethanol", "CCO", False), (5, "5", "c1ccccc1", False)]
    expected.append((6, "broken ring", "C1CC(", False))  # RDKit rejects it later, in the build
    assert _records(readers.molecule_source(plain)) == expected
    assert _records(readers.molecule_source(zipped)) == expected
    assert [r.id for r in readers.molecule_source(plain).records(skip=2)] == ["broken ring"]
    assert readers.molecule_source(plain).description["format"] == "smi"


def test_csv_and_tsv_readers_name_columns_and_report_bad_rows(tmp_path):
    csv_path = tmp_path / "lib.csv"
    csv_path.write_text(
        'name,SMILES,note\nm1,CCO,"has, a comma"\nm2,,empty\nm3,CCN\nm4,"C1=CC=CC=C1",ok\n'
    )
    source = readers.molecule_source(csv_path, smiles_col="smiles", id_col="name")
    got = _records(source)
    assert got[0] == (2, "m1", "CCO", False)
    assert got[1][:2] == (3, "m2") and got[1][3]  # empty SMILES field
    assert got[2][:2] == (4, "m3") and got[2][3]  # too few fields
    assert got[3] == (5, "m4", "C1=CC=CC=C1", False)
    assert "fields" in list(source.records())[2].error
    tsv_path = tmp_path / "lib.tsv.gz"
    tsv_path.write_bytes(gzip.compress(b"id\tsmiles\na\tCCO\nb\tCC(=O)O\n"))
    assert _records(readers.molecule_source(tsv_path)) == [
        (2, "a", "CCO", False),
        (3, "b", "CC(=O)O", False),
    ]
    with pytest.raises(readers.ReaderError, match="no column 'structure'"):
        list(readers.molecule_source(csv_path, smiles_col="structure").records())
    (tmp_path / "lib.xyz").write_text("CCO\n")
    with pytest.raises(readers.ReaderError, match=r"suffix '\.xyz'"):
        readers.molecule_source(tmp_path / "lib.xyz")


def _write_sdf(path: Path, bad_at: int = 1) -> None:
    from rdkit import Chem

    blocks = []
    for i, smiles in enumerate(["CCO", "c1ccccc1O", "CC(=O)O"]):
        mol = Chem.MolFromSmiles(smiles)
        mol.SetProp("_Name", f"mol{i}")
        mol.SetProp("CATALOG", f"X-{i}")
        block = Chem.MolToMolBlock(mol) + f">  <CATALOG>\nX-{i}\n\n$$$$\n"
        if i == bad_at:  # a bond to an atom that does not exist
            lines = block.splitlines(keepends=True)
            counts = lines[3]
            atoms = int(counts[:3])
            lines[4 + atoms] = f"{1:>3}{atoms + 5:>3}  1  0\n"
            block = "".join(lines)
        blocks.append(block)
    data = "".join(blocks).encode()
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)


def test_sdf_reader_names_properties_bad_record_and_gzip(tmp_path):
    for name in ("lib.sdf", "lib.sdf.gz"):
        path = tmp_path / name
        _write_sdf(path)
        got = list(readers.molecule_source(path).records())
        assert [(r.id, r.value, r.error is None) for r in got] == [
            ("mol0", "CCO", True),
            ("mol1", "", False),
            ("mol2", "CC(=O)O", True),
        ]
        assert got[0].line == 1 and got[1].line > 1 and got[2].line > got[1].line
        assert "RDKit cannot parse" in got[1].error
        by_property = readers.molecule_source(path, id_col="CATALOG").records(skip=2)
        assert [r.id for r in by_property] == ["X-2"]


def test_text_reader_lines(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("an alcohol\n\nan acid\n")
    assert _records(readers.text_source(path)) == [
        (1, "1", "an alcohol", False),
        (2, "2", "", True),
        (3, "3", "an acid", False),
    ]


def test_split_source_deduplicates_by_id_and_checks_texts():
    from jaxmol.data import datasets

    test = datasets.load_split("chebi20/test")
    records = list(readers.split_source("chebi20/test,chebi20/test").records())
    assert [r.id for r in records] == list(test.ids)  # the second copy adds nothing
    assert records[0].value == test.smiles[0]
    texts = readers.split_source(["chebi20/test"], "texts").records(skip=len(test) - 1)
    assert [r.value for r in texts] == [test.texts[-1]]
    with pytest.raises(readers.ReaderError, match="has no texts"):
        readers.split_source("chebi20/train_molecules", "texts")
    with pytest.raises(readers.ReaderError, match="unknown split"):
        readers.split_source("chebi20/tset")


# ----------------------------------------------------------------------------------------------
# Exact top-k (no model).


def test_exact_topk_matches_brute_force_with_ties_chunks_and_devices():
    import jax

    engine = ExactTopK(jax.local_devices(), chunk_rows=48, query_batch=2)
    assert engine.num_devices == len(jax.local_devices())
    topk_case.check_exact_topk_against_brute_force(engine)
    assert competition_ranks(np.array([3.0, 2.0, 2.0, 1.0])).tolist() == [1, 2, 2, 4]


# The same case, run by each of 2 processes over the 4 devices of both.
_TOPK_OVER_PROCESSES = """
import jax

from jaxmol.search import join_processes
from jaxmol.search.topk import ExactTopK
from tests import topk_case

assert join_processes() and jax.device_count() == 4 and jax.local_device_count() == 2
engine = ExactTopK(jax.devices(), chunk_rows=48, query_batch=2)
assert engine.multiprocess
topk_case.check_exact_topk_against_brute_force(engine)
print(f"top-k over processes: process {jax.process_index()} ok", flush=True)
"""


def _launch(*command, processes=2, devices_per_process=2):
    """`python -m jaxmol.launch` of `command`, bounded by `MULTIPROCESS_TIMEOUT_S`."""
    launcher = [sys.executable, "-m", "jaxmol.launch", f"--processes={processes}"]
    launcher += [f"--devices_per_process={devices_per_process}", "--", *map(str, command)]
    return subprocess.run(
        launcher,
        cwd=ROOT,
        env=conftest.subprocess_env(),  # the session's compilation cache
        capture_output=True,
        text=True,
        timeout=MULTIPROCESS_TIMEOUT_S,
    )


@pytest.mark.slow
def test_exact_topk_over_two_processes_matches_brute_force():
    done = _launch(sys.executable, "-c", _TOPK_OVER_PROCESSES)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    for process in (0, 1):
        assert f"process {process} ok" in done.stdout


# ----------------------------------------------------------------------------------------------
# A tiny trained model and indexes.


@pytest.fixture(scope="module")
def workdir(trained_run):
    """The session's shared tiny training run (conftest; read only here)."""
    return trained_run[0]


@pytest.fixture(scope="module")
def retriever(workdir):
    from jaxmol.search import Retriever

    return Retriever.from_workdir(workdir, "latest")


@pytest.fixture(scope="module")
def pairs():
    from jaxmol.data import datasets

    return datasets.load_split("chebi20/test").select(range(NUM_PAIRS))


@pytest.fixture(scope="module")
def library(tmp_path_factory, pairs) -> Path:
    """The pairs' molecules as a .smi file, with an unreadable SMILES on line 6."""
    lines = [f"{s} {i}" for i, s in zip(pairs.ids, pairs.smiles, strict=True)]
    lines.insert(5, "C1CC( bad")
    path = tmp_path_factory.mktemp("library") / "library.smi"
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def index(retriever, library, tmp_path_factory):
    from jaxmol.search import Index

    path = tmp_path_factory.mktemp("indexes") / "library"
    return Index.build(retriever, library, path, shard_size=SHARD_SIZE)


def test_retriever_encodes_like_the_evaluation_embedder(retriever, pairs):
    from jaxmol import metrics as metrics_lib

    texts = retriever.encode_texts(list(pairs.texts[:6]))
    assert texts.shape == (6, retriever.embed_dim) and texts.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(texts, axis=1), 1, atol=1e-6)
    reference = retriever.embedder.embed_texts(
        retriever.variables, retriever.encoder.texts(list(pairs.texts[:6])), batch_size=4
    )
    np.testing.assert_allclose(texts, metrics_lib.l2_normalize_rows(reference), atol=1e-5)
    with pytest.raises(ValueError, match="text 1 is empty"):
        retriever.encode_texts(["an alcohol", "  "])

    molecules, failures = retriever.encode_smiles(["CCO", "C1CC(", pairs.smiles[0]])
    assert molecules.shape == (3, retriever.embed_dim)
    assert np.isnan(molecules[1]).all() and np.isfinite(molecules[[0, 2]]).all()
    assert [(p, s) for p, s, _ in failures] == [(1, "C1CC(")]


def test_index_files_failures_and_round_trip(index, retriever, pairs, tmp_path):
    from rdkit import rdBase

    from jaxmol.search import FORMAT_VERSION, Index

    meta = json.loads((index.path / "meta.json").read_text())
    assert meta["status"] == "complete" and meta["format_version"] == FORMAT_VERSION
    assert meta["count"] == NUM_PAIRS == len(index) and meta["num_records"] == NUM_PAIRS + 1
    assert meta["checkpoint"]["params_sha256"] == retriever.params_hash
    assert meta["checkpoint"]["step"] == conftest.IN_PROCESS_STEPS
    assert meta["dimension"] == retriever.embed_dim
    assert meta["model"]["rdkit_version"] == rdBase.rdkitVersion
    assert meta["model"]["featurizer"] == "ogb" and meta["dtype"] == "float32"
    assert len(meta["shards"]) == 3  # 41 records in shards of 16
    assert index.failures() == [
        {"line": 6, "id": "bad", "value": "C1CC(", "reason": index.failures()[0]["reason"]}
    ]
    assert "syntax error" in index.failures()[0]["reason"]
    assert (index.path / "failures.tsv").read_text().startswith("line\tid\tsmiles\treason\n")
    assert [index.item(r)[0] for r in range(NUM_PAIRS)] == list(pairs.ids)
    assert index.item(7)[1] == pairs.smiles[7]

    saved = index.save(tmp_path / "copy")
    loaded = Index.load(saved, retriever, verify=True)
    np.testing.assert_array_equal(loaded.embeddings(), index.embeddings())
    first, second = index.search(pairs.texts[:2], k=5), loaded.search(pairs.texts[:2], k=5)
    assert [r.to_dict() for r in first] == [r.to_dict() for r in second]
    assert first[0].smiles == [index.item(r)[1] for r in first[0].rows]
    assert np.all(np.diff(first[0].scores) <= 0) and first[0].ranks[0] == 1


def test_search_reproduces_the_pool_protocol_both_directions(index, retriever, pairs, tmp_path):
    """Text queries over the indexed molecules (and SMILES queries over an index of the texts)
    give the pool protocol's optimistic hits@1 and hits@10 on the same pairs, exactly."""
    from jaxmol import evaluation, scoring
    from jaxmol.search import Index

    report = evaluation.evaluate_split(
        retriever.embedder,
        retriever.variables,
        "chebi20/test",
        protocol="pool",
        encoder=retriever.encoder,
        batch_size=8,
        workdir=None,
        checkpoint_step=retriever.step,
        max_pairs=NUM_PAIRS,
    )
    texts = Index.build_texts(
        retriever, list(zip(pairs.ids, pairs.texts, strict=True)), tmp_path / "texts"
    )
    queries = {"t2m": (index, list(pairs.texts)), "m2t": (texts, list(pairs.smiles))}
    ids = list(pairs.ids)
    for direction, (searched, query_list) in queries.items():
        results = searched.search(query_list, k=10)
        gold_ranks = []
        for gold, result in zip(ids, results, strict=True):
            where = [r for r, i in zip(result.ranks, result.ids, strict=True) if i == gold]
            gold_ranks.append(where[0] if where else 11)
        gold_ranks = np.asarray(gold_ranks)
        optimistic = report[direction]["optimistic"]
        assert np.mean(gold_ranks <= 1) == optimistic["hits@1"], direction
        assert np.mean(gold_ranks <= 10) == optimistic["hits@10"], direction
        assert report[direction]["num_queries"] == NUM_PAIRS
    # And on the very same vectors, the protocols' scoring agrees with the index's top-k.
    text_emb, mol_emb = texts.embeddings(), index.embeddings()
    metrics = scoring.pool_metrics_from_embeddings(text_emb, mol_emb)
    _, rows = index.search_embeddings(text_emb, k=NUM_PAIRS)
    ranks = 1 + np.argmax(rows == np.arange(NUM_PAIRS)[:, None], axis=1)
    np.testing.assert_array_equal(ranks, metrics["t2m_ranks"])


def test_a_different_checkpoint_is_refused(index, retriever, workdir):
    import jax

    from jaxmol.search import Index, Retriever, WrongCheckpointError

    changed = jax.tree.map(lambda x: x * 1.001, retriever.variables.tree)
    other = Retriever(retriever.model, changed, retriever.config, step=4, workdir=workdir)
    with pytest.raises(WrongCheckpointError, match="params sha256"):
        Index.load(index.path, other)


def test_damaged_or_unfinished_indexes_fail_clearly(index, tmp_path):
    from jaxmol.search import Index, IndexFileError

    def fresh(name):
        return index.save(tmp_path / name)

    with pytest.raises(IndexFileError, match="not a search index"):
        Index.load(tmp_path)
    path = fresh("truncated")
    shard = path / "shards" / "000001.emb.npy"
    shard.write_bytes(shard.read_bytes()[:-100])
    with pytest.raises(IndexFileError, match=r"000001\.emb\.npy has .* bytes"):
        Index.load(path)
    path = fresh("missing")
    (path / "shards" / "000002.ids.txt").unlink()
    with pytest.raises(IndexFileError, match=r"000002\.ids\.txt is missing"):
        Index.load(path)
    path = fresh("flipped")
    values = path / "shards" / "000000.values.txt"
    data = bytearray(values.read_bytes())
    data[3] ^= 1
    values.write_bytes(bytes(data))
    Index.load(path)  # same size: only the checksum finds it
    with pytest.raises(IndexFileError, match="SHA-256"):
        Index.load(path, verify=True)
    path = fresh("garbled")
    (path / "meta.json").write_text("{not json")
    with pytest.raises(IndexFileError, match="damaged"):
        Index.load(path)
    path = fresh("unfinished")
    meta = json.loads((path / "meta.json").read_text())
    meta["status"] = "building"
    (path / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(IndexFileError, match=r"unfinished index .* resume"):
        Index.load(path)


class _Stop(Exception):
    pass


def test_an_interrupted_build_resumes_to_the_uninterrupted_index(
    index, retriever, library, tmp_path
):
    from jaxmol.search import BuildError, Index, IndexFileError

    path = tmp_path / "resumed"
    finished = []

    def stop_after_first(entry):
        finished.append(entry["name"])
        raise _Stop

    with pytest.raises(_Stop):
        Index.build(retriever, library, path, shard_size=SHARD_SIZE, on_shard=stop_after_first)
    assert finished == ["000000"]
    with pytest.raises(IndexFileError, match="unfinished"):
        Index.load(path)
    (path / "shards" / "000001.emb.npy").write_bytes(b"half a shard")  # killed mid-write
    with pytest.raises(BuildError, match="shard_size"):
        Index.build(retriever, library, path, shard_size=SHARD_SIZE + 1)
    resumed = Index.build(retriever, library, path, shard_size=SHARD_SIZE)
    np.testing.assert_array_equal(resumed.embeddings(), index.embeddings())
    assert [resumed.item(r) for r in range(len(index))] == [
        index.item(r) for r in range(len(index))
    ]
    assert resumed.failures() == index.failures()
    assert [s["files"] for s in resumed.meta["shards"]] == [
        s["files"] for s in index.meta["shards"]
    ]
    with pytest.raises(BuildError, match="already holds a finished index"):
        Index.build(retriever, library, path, shard_size=SHARD_SIZE)


@pytest.mark.slow
def test_a_build_over_two_processes_equals_the_one_process_index(index, workdir, library, tmp_path):
    """`search.py build` under `python -m jaxmol.launch`, 2 processes x 2 devices: every process
    embeds its devices' share of every batch, process 0 writes; the index equals the one built
    by 1 process on 8 devices (other batch shapes: equal to float rounding)."""
    from jaxmol.search import Index

    out = tmp_path / "two_processes"
    start = time.perf_counter()
    done = _launch(
        sys.executable,
        ROOT / "search.py",
        "build",
        f"--workdir={workdir}",
        "--step=latest",
        f"--molecules={library}",
        f"--index={out}",
        f"--shard_size={SHARD_SIZE}",
    )
    seconds = time.perf_counter() - start
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]
    print(f"2 x 2 build of {NUM_PAIRS + 1} records: {seconds:.1f} s")
    # Process 0 alone prints the weights, the progress bar and the summary; process 1 builds
    # silently (warnings and errors only).
    assert f"[0] index: {out}" in done.stdout
    assert f"[0]   {NUM_PAIRS + 1} input records in " in done.stdout
    assert "[0] weights: " in done.stdout
    process_1 = [line for line in done.stdout.splitlines() if line.startswith("[1] ")]
    for said in ("index:", "input records", "weights:", "embedded"):
        assert not any(said in line for line in process_1), (said, process_1)
    built = Index.load(out, verify=True)
    np.testing.assert_allclose(built.embeddings(), index.embeddings(), atol=1e-5, rtol=0)
    assert [built.item(r) for r in range(len(index))] == [index.item(r) for r in range(len(index))]
    assert built.failures() == index.failures()
    for key in ("count", "num_records", "num_failures", "checkpoint", "model"):
        assert built.meta[key] == index.meta[key], key
    assert [(s["name"], s["count"]) for s in built.meta["shards"]] == [
        (s["name"], s["count"]) for s in index.meta["shards"]
    ]


def test_build_from_sdf_reports_the_bad_record(retriever, tmp_path):
    from jaxmol.search import Index

    path = tmp_path / "lib.sdf.gz"
    _write_sdf(path)
    built = Index.build(retriever, readers.molecule_source(path), dtype="float16")
    assert len(built) == 2 and built.meta["dtype"] == "float16"
    assert [f["id"] for f in built.failures()] == ["mol1"]
    (result,) = built.search("an alcohol", k=5)
    assert sorted(result.ids) == ["mol0", "mol2"]


# ----------------------------------------------------------------------------------------------
# The command line (subprocesses on one device).


def _cli(*args, cwd=ROOT, timeout=300):
    command = [sys.executable, str(ROOT / "search.py"), *map(str, args)]
    env = conftest.subprocess_env(devices=1)  # the session's compilation cache, one device
    return subprocess.run(
        command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_cli_build_query_and_errors(workdir, pairs, tmp_path):
    csv_path = tmp_path / "lib.csv"
    rows = [f"{i},{s}" for i, s in zip(pairs.ids[:12], pairs.smiles[:12], strict=True)]
    csv_path.write_text("name,SMILES\n" + "\n".join([*rows[:3], "x1,not a smiles", *rows[3:]]))
    queries = tmp_path / "queries.txt"
    queries.write_text(f"{pairs.texts[0]}\n{pairs.texts[1]}\n")
    out = tmp_path / "index"
    built = _cli(
        "build",
        f"--workdir={workdir}",
        "--step=latest",
        f"--molecules={csv_path}",
        "--smiles_col=smiles",
        "--id_col=name",
        f"--index={out}",
        "--shard_size=5",
    )
    assert built.returncode == 0, built.stderr[-3000:]
    assert "12 molecules" in built.stdout and "1 input rows could not be embedded" in built.stdout
    assert "mol/s" in built.stderr  # the progress bar
    found = _cli("query", f"--index={out}", f"--queries={queries}", "-k", "3", "--json")
    assert found.returncode == 0, found.stderr[-3000:]
    answers = json.loads(found.stdout)
    assert [a["query"] for a in answers] == list(pairs.texts[:2])
    assert [h["rank"] for h in answers[0]["results"]] == [1, 2, 3]
    assert set(answers[0]["results"][0]) == {"rank", "score", "id", "smiles"}

    # Expected failures: one line and the statuses of train.py / evaluate.py (jaxmol.cli).
    def fails(result, status: int, message: str) -> bool:
        lines = result.stderr.strip().splitlines()
        return (
            result.returncode == status
            and message in lines[-1]
            and "Traceback" not in result.stderr
        )

    missing_index = _cli("query", f"--index={tmp_path / 'nowhere'}", "--text=an acid")
    assert fails(missing_index, 3, "search.py query: error: no index"), missing_index.stderr
    missing_input = _cli(
        "build", f"--workdir={workdir}", f"--molecules={tmp_path / 'no.smi'}", f"--index={out}2"
    )
    assert fails(missing_input, 3, "input file not found"), missing_input.stderr
    missing_queries = _cli("query", f"--index={out}", f"--queries={tmp_path / 'no.txt'}")
    assert fails(missing_queries, 3, "--queries file not found"), missing_queries.stderr
    no_checkpoint = _cli(
        "build", f"--workdir={tmp_path}", f"--molecules={csv_path}", f"--index={out}2"
    )
    assert fails(no_checkpoint, 4, "no checkpoints in"), no_checkpoint.stderr
    # The index holds step 4's embeddings (the shared run keeps every step's checkpoint).
    other_weights = _cli("query", f"--index={out}", "--step=1", "--text=an acid")
    assert fails(other_weights, 4, "embeddings of different weights"), other_weights.stderr
    wrong_kind = _cli("query", f"--index={out}", "--smiles=CCO")
    assert fails(wrong_kind, 2, "query it with --text"), wrong_kind.stderr
    again = _cli("build", f"--workdir={workdir}", f"--molecules={csv_path}", f"--index={out}")
    assert fails(again, 2, "overwrite"), again.stderr
    no_command = _cli()
    assert fails(no_command, 2, "give one command"), no_command.stderr


def test_search_errors_carry_the_documented_exit_statuses():
    from jaxmol import cli
    from jaxmol.search import BuildError, IndexFileError, ReaderError, WrongCheckpointError

    assert cli.exit_status(ReaderError("x")) == cli.EXIT_DATA
    assert cli.exit_status(IndexFileError("x")) == cli.EXIT_DATA
    assert cli.exit_status(WrongCheckpointError("x")) == cli.EXIT_CHECKPOINT
    assert cli.exit_status(BuildError("x")) == cli.EXIT_CONFIG


def test_search_failures_exit_cleanly_without_optax(tmp_path):
    # The [search] extra installs no optax (pyproject.toml); None in sys.modules blocks it.
    program = (
        "import sys; sys.modules['optax'] = None; "
        f"sys.argv = ['search.py', 'query', '--index={tmp_path / 'nowhere'}', '--text=acid']; "
        "from jaxmol.cli.search import run; run()"
    )
    env = conftest.subprocess_env(devices=1)
    result = subprocess.run(
        [sys.executable, "-c", program], env=env, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 3 and "Traceback" not in result.stderr, result.stderr[-2000:]


# ----------------------------------------------------------------------------------------------
# The web page.


@pytest.fixture(scope="module")
def served(index):
    from jaxmol.search import server

    index.place_on_device()
    httpd = server.make_server(index, port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


def _request(url: str, data: bytes | None = None) -> tuple[int, str]:
    request = urllib.request.Request(url, data=data)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.read().decode()


def test_server_answers_good_and_bad_requests(served, index, pairs):
    query = urllib.parse.quote(pairs.texts[0])
    status, body = _request(f"{served}/api/search?q={query}&k=4")
    assert status == 200
    (answer,) = json.loads(body)["results"]
    assert answer["results"] == index.search(pairs.texts[0], k=4)[0].hits()
    status, body = _request(
        f"{served}/api/search", json.dumps({"queries": ["an acid"] * 2}).encode()
    )
    assert status == 200 and len(json.loads(body)["results"]) == 2

    bad = {
        "/api/search?q=&k=3": (400, "empty query"),
        "/api/search?q=acid&k=0": (400, "k must be from 1"),
        "/api/search?q=acid&k=ten": (400, "whole number"),
        f"/api/search?q={'x' * 2100}": (413, "too long"),
        "/nowhere": (404, "no such page"),
    }
    for path, (code, message) in bad.items():
        status, body = _request(served + path)
        assert status == code and message in json.loads(body)["error"], path
    status, body = _request(f"{served}/api/search", b"{" * 70_000)
    assert status == 413 and "at most" in json.loads(body)["error"]
    status, body = _request(f"{served}/api/search", b"[1, 2")
    assert status == 400 and "invalid JSON" in json.loads(body)["error"]

    status, page = _request(f"{served}/?q=&k=5")
    assert status == 400 and "class='error'" in page and "empty query" in page
    status, page = _request(f"{served}/?q=acid&k=500")
    assert status == 400 and "k must be from 1 to 100" in page
    status, page = _request(f"{served}/?q={query}&k=3")  # still serving after the errors
    assert status == 200 and page.count('<div class="hit">') == 3 and page.count("<svg") == 3


def test_the_page_shows_result_drawings_in_a_headless_browser(served, pairs, tmp_path):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("no chromium binary on PATH (Debian: apt-get install chromium)")
    url = f"{served}/?{urllib.parse.urlencode({'q': pairs.texts[3], 'k': 6})}"
    command = [
        browser,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--dump-dom",
        url,
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-2000:]
    dom = done.stdout
    results = dom[dom.index('id="results"') :]
    assert results.count('class="hit"') == 6
    assert results.count("<svg") == 6 and results.count("<path") > 6  # real drawings
    assert pairs.texts[3][:40] in dom  # the query stays in the box

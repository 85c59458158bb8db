"""Search your own library by description, or a text corpus by molecule (docs/search.md).

python search.py build --workdir runs/quickstart --molecules library.smi --index DIR
python search.py build --workdir runs/quickstart \
    --split chebi20/train_molecules,chebi20/validation,chebi20/test --index DIR
python search.py query --index DIR --text "an aromatic amine that is a dopamine ligand" -k 10
python search.py query --index DIR --queries questions.txt --json
python search.py build --workdir runs/quickstart --texts corpus.txt --index TEXTDIR
python search.py query --index TEXTDIR --smiles "CCO" -k 5
python search.py serve --index DIR [--port 8000]

`build` reads the input in shards (never the whole library in memory) and resumes an
interrupted build when run again with the same arguments; rows that cannot be embedded are
listed in DIR/failures.tsv. `query` and `serve` restore the checkpoint the index names (or
`--workdir`) and refuse an index built from other weights.

Several processes (docs/multihost.md): started by `python -m jaxmol.launch --processes N ... --
search.py build ...` (or with ``$JAXMOL_*`` set by hand), `build` and `query` join the other
processes and embed on the devices of all of them; `--distributed` joins on clusters JAX detects
itself (SLURM, TPU pods). Process 0 alone writes the index, prints and shows progress; the
others print only warnings and errors, tagged with their process index. `serve` runs on one
process.

Exit statuses are those of train.py and evaluate.py (`jaxmol.cli.run_guarded`): an expected
failure prints one line, ``search.py COMMAND: error: ...``, and exits with 2 (usage: flags, an
existing index without --overwrite, a changed input on resume), 3 (data: a missing or unreadable
input or queries file, an unknown split, a missing, unfinished or damaged index), 4 (checkpoint:
none restores, or the index was built from other weights) or 7 (several processes cannot be
joined). Ctrl-C during `build` exits with 130 after keeping the finished shards.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # never reach a model hub

import json
import sys
from pathlib import Path

from absl import app, flags

from jaxmol import allocator, cli
from jaxmol.config import ConfigError

COMMANDS = ("build", "query", "serve")

FLAGS = flags.FLAGS
flags.DEFINE_string("index", None, "Index directory (build writes it; query/serve read it).")
# build
flags.DEFINE_string("workdir", None, "Training workdir (build: required; query/serve: "
                    "default the workdir the index names).")  # fmt: skip
flags.DEFINE_string("step", "", "Checkpoint: 'best', 'latest' or a step number (build: "
                    "default 'best'; query/serve: default the step the index names).")  # fmt: skip
flags.DEFINE_string("molecules", None, "Molecule file: .smi/.txt, .csv, .tsv, .sdf (or .gz).")
flags.DEFINE_string("texts", None, "Text corpus file: .txt (one per line), .csv, .tsv (or .gz).")
flags.DEFINE_string(
    "split",
    None,
    "Registered split(s), comma-separated, as the input (molecules; with --corpus=texts their "
    "texts), e.g. chebi20/train_molecules,chebi20/validation,chebi20/test.",
)
flags.DEFINE_enum("corpus", "molecules", ["molecules", "texts"], "What --split indexes.")
flags.DEFINE_enum("format", None, ["smi", "txt", "csv", "tsv", "sdf"], "Input format; "
                  "default from the file suffix.")  # fmt: skip
flags.DEFINE_string("smiles_col", "smiles", "CSV/TSV column holding the SMILES.")
flags.DEFINE_string("text_col", "text", "CSV/TSV column holding the texts.")
flags.DEFINE_string(
    "id_col", None, "CSV/TSV column (SDF: property) holding the ids; default the 'id' column "
    "if any (SDF: the name line), else the line number."
)  # fmt: skip
flags.DEFINE_integer("shard_size", 16_384, "Input records per shard (the unit of resumption).")
flags.DEFINE_enum("dtype", "float32", ["float32", "float16"], "Stored embedding type.")
flags.DEFINE_bool("overwrite", False, "Replace a finished index (or another unfinished one).")
flags.DEFINE_integer("batch_size", 0, "Embedding batch; 0 = the run's eval_batch_size.")
flags.DEFINE_integer("num_devices", -1, "Devices to embed on; -1 = all local devices (all "
                     "devices of all processes when several are joined).")  # fmt: skip
flags.DEFINE_string("data_dir", None, "Folder of the shipped splits (for --split).")
flags.DEFINE_bool(
    "distributed",
    False,
    "build/query: join the other processes of a multi-process run (jax.distributed; as for "
    "training: $JAXMOL_COORDINATOR_ADDRESS/... or `python -m jaxmol.launch`, which join without "
    "this flag, else the cluster JAX detects: SLURM, TPU pods); embeds on all devices of all "
    "processes, process 0 writes the index and prints.",
)
# query
flags.DEFINE_multi_string("text", [], "A text query (molecule index); repeatable.")
flags.DEFINE_multi_string("smiles", [], "A SMILES query (text index); repeatable.")
flags.DEFINE_string("queries", None, "File of queries, one per line (a SMILES line may carry "
                    "an id after whitespace), searched in one batched pass.")  # fmt: skip
flags.DEFINE_integer("k", 10, "Results per query.")
flags.DEFINE_bool("json", False, "Print JSON (one object per query, in a list).")
flags.DEFINE_bool("tsv", False, "Print tab-separated rows with a header.")
flags.DEFINE_bool("verify", False, "Check every index file's SHA-256 before searching.")
flags.DEFINE_integer("chunk_rows", 0, "Top-k chunk rows (0 = default).")
# serve
flags.DEFINE_string("host", "127.0.0.1", "Address to serve on (default: this machine only).")
flags.DEFINE_integer("port", 8000, "Port to serve on (0: any free port).")


class UsageError(ConfigError):
    """A bad flag or combination of flags (a `ConfigError`: exit status 2)."""


def _parse_step(value: str, default):
    if not value:
        return default
    if value in ("best", "latest"):
        return value
    try:
        return int(value)
    except ValueError as error:
        raise UsageError(f"--step must be 'best', 'latest' or an integer, got {value!r}") from error


def _join() -> bool | None:
    """`Retriever.from_workdir`'s ``join``: True with --distributed, else None (join when
    started by `python -m jaxmol.launch`, i.e. ``$JAXMOL_PROCESS_ID`` is set)."""
    return True if FLAGS.distributed else None


def _primary() -> bool:
    """True on the process that prints (process 0; the only one of a 1-process run)."""
    from jaxmol import distributed

    return distributed.is_primary()


def _retriever_for_index(index_dir: str):
    """The retriever of the checkpoint an index names (or --workdir / --step)."""
    from jaxmol.search import Retriever
    from jaxmol.search.index import read_meta

    meta = read_meta(index_dir)
    built = meta["checkpoint"]
    workdir = FLAGS.workdir or built["workdir"]
    if not workdir:
        raise UsageError("the index names no workdir: pass --workdir")
    step = _parse_step(FLAGS.step, built["step"])
    return Retriever.from_workdir(
        workdir, step, num_devices=FLAGS.num_devices, batch_size=FLAGS.batch_size, join=_join()
    )


def _source():
    from jaxmol.search import readers

    given = [name for name in ("molecules", "texts", "split") if getattr(FLAGS, name)]
    if len(given) != 1:
        raise UsageError("build needs exactly one input: --molecules, --texts or --split")
    if FLAGS.molecules:
        fmt = FLAGS.format
        return readers.molecule_source(
            FLAGS.molecules, fmt=fmt, smiles_col=FLAGS.smiles_col, id_col=FLAGS.id_col
        )
    if FLAGS.texts:
        return readers.text_source(
            FLAGS.texts, fmt=FLAGS.format, text_col=FLAGS.text_col, id_col=FLAGS.id_col
        )
    cli.use_data_dir(FLAGS.data_dir, FLAGS.split.split(","))
    return readers.split_source(FLAGS.split, FLAGS.corpus)


def _split_total(source) -> int | None:
    if source.description.get("type") != "splits":
        return None
    from jaxmol.data import datasets

    seen = set()
    for name in source.description["splits"]:
        seen.update(datasets.load_split(name).ids)
    return len(seen)


def build() -> None:
    import time

    from tqdm import tqdm

    from jaxmol.search import Index, Retriever

    if not FLAGS.workdir or not FLAGS.index:
        raise UsageError("build needs --workdir and --index")
    source = _source()  # a bad input fails before the (slow) restore
    retriever = Retriever.from_workdir(
        FLAGS.workdir,
        _parse_step(FLAGS.step, "best"),
        num_devices=FLAGS.num_devices,
        batch_size=FLAGS.batch_size,
        join=_join(),
    )
    primary = _primary()  # the others build alongside, silently (warnings and errors only)
    if primary:
        print(f"weights: {retriever.weights}", file=sys.stderr)
    unit = "mol" if source.kind == "molecules" else "text"
    bar = tqdm(
        total=_split_total(source), unit=unit, desc="embedded", smoothing=0.1, disable=not primary
    )
    start = time.perf_counter()
    try:
        index = Index.build_from_source(
            retriever,
            source,
            FLAGS.index,
            shard_size=FLAGS.shard_size,
            dtype=FLAGS.dtype,
            overwrite=FLAGS.overwrite,
            progress=lambda records, embedded: bar.update(records),
        )
    finally:
        bar.close()
    elapsed = time.perf_counter() - start
    if not primary:
        return
    print(f"index: {index.path}")
    print(f"  {index.describe()}")
    print(f"  {index.meta['num_records']:,} input records in {elapsed:.1f} s")
    if index.meta["num_failures"]:
        print(
            f"  {index.meta['num_failures']} input rows could not be embedded: "
            f"see {index.path / 'failures.tsv'}"
        )


def _queries(kind: str) -> list[str]:
    texts, smiles = list(FLAGS.text), list(FLAGS.smiles)
    if kind == "molecules" and smiles:
        raise UsageError("this index holds molecules: query it with --text (or --queries)")
    if kind == "texts" and texts:
        raise UsageError("this index holds texts: query it with --smiles (or --queries)")
    queries = texts + smiles
    if FLAGS.queries:
        path = Path(FLAGS.queries).expanduser()
        if not path.is_file():
            from jaxmol.search import ReaderError

            raise ReaderError(f"--queries file not found: {path}")
        for line in path.read_text(encoding="utf-8-sig").splitlines():
            line = line.strip()
            if line and not line.startswith("#"):
                queries.append(line if kind == "molecules" else line.split()[0])
    if not queries:
        raise UsageError("query needs --text/--smiles or --queries")
    for position, query in enumerate(queries):
        if not query.strip():
            raise UsageError(f"query {position + 1} is empty")
    return queries


def _print_results(results, kind: str) -> None:
    value_name = "smiles" if kind == "molecules" else "text"
    if FLAGS.json:
        print(json.dumps([r.to_dict() for r in results], indent=1, ensure_ascii=False))
        return
    if FLAGS.tsv:
        print(f"query_index\tquery\trank\tscore\tid\t{value_name}\terror")
        for q, result in enumerate(results, start=1):
            clean = " ".join(result.query.split())
            if result.error:
                print(f"{q}\t{clean}\t\t\t\t\t{' '.join(result.error.split())}")
            for hit in result.hits():
                value = " ".join(hit[value_name].split())
                print(f"{q}\t{clean}\t{hit['rank']}\t{hit['score']:.6f}\t{hit['id']}\t{value}\t")
        return
    for q, result in enumerate(results, start=1):
        print(f"query {q}: {result.query}")
        if result.error:
            print(f"  error: {result.error}")
            continue
        hits = result.hits()
        id_width = max([len("id"), *(len(h["id"]) for h in hits)])
        print(f"  {'rank':>4}  {'score':>7}  {'id':<{id_width}}  {value_name.upper()}")
        for hit in hits:
            print(
                f"  {hit['rank']:>4}  {hit['score']:>7.4f}  {hit['id']:<{id_width}}  "
                f"{hit[value_name]}"
            )


def query() -> None:
    from jaxmol.search import MAX_K, Index

    if not FLAGS.index:
        raise UsageError("query needs --index")
    if FLAGS.json and FLAGS.tsv:
        raise UsageError("choose one of --json and --tsv")
    if not 1 <= FLAGS.k <= MAX_K:
        raise UsageError(f"-k must be from 1 to {MAX_K:,}, got {FLAGS.k}")
    index = Index.load(FLAGS.index, verify=FLAGS.verify)  # a bad index fails before the restore
    queries = _queries(index.kind)
    index.attach(_retriever_for_index(FLAGS.index))
    if FLAGS.chunk_rows > 0:
        index.configure(chunk_rows=FLAGS.chunk_rows)
    results = index.search(queries, k=FLAGS.k)  # every process searches; process 0 prints
    if _primary():
        _print_results(results, index.kind)


def serve() -> None:
    from jaxmol.search import Index, server

    if not FLAGS.index:
        raise UsageError("serve needs --index")
    from jaxmol import distributed

    if FLAGS.distributed or distributed.requested():
        # Every search is a collective over the joined processes' devices, but only one
        # process would get each request: the others would wait forever.
        raise UsageError(
            "serve runs on one process: start it without --distributed or jaxmol.launch "
            "(--distributed and the launcher are for build and query)"
        )
    index = Index.load(FLAGS.index, verify=FLAGS.verify)
    index.attach(_retriever_for_index(FLAGS.index))
    index.place_on_device()
    httpd = server.make_server(index, host=FLAGS.host, port=FLAGS.port)
    host, port = httpd.server_address[:2]
    print(f"serving {index.describe()}", file=sys.stderr)
    print(f"open http://{host}:{port}/ (Ctrl-C stops)", file=sys.stderr, flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        httpd.server_close()


def main(argv):
    command_name = argv[1] if len(argv) == 2 and argv[1] in COMMANDS else None
    program = f"search.py {command_name}" if command_name else "search.py"
    cli.setup_logging()

    def run_command() -> None:
        if command_name is None:
            raise UsageError(f"give one command: {', '.join(COMMANDS)} (got {argv[1:]})")
        {"build": build, "query": query, "serve": serve}[command_name]()

    try:
        # Expected failures become one line and their documented status (module docstring).
        cli.run_guarded(program, run_command)
    except KeyboardInterrupt:
        if command_name == "build":
            print(
                f"search.py build{cli._process_tag()}: interrupted; the finished shards are "
                "kept: run the same command to resume",
                file=sys.stderr,
            )
            sys.exit(cli.EXIT_CTRL_C)
        if command_name != "serve":
            raise


def run() -> None:
    """Entry point (`jaxmol-search`, `python search.py`)."""
    allocator.keep_freed_memory()  # opt-in (jaxmol.allocator); before JAX starts its threads
    app.run(main)


if __name__ == "__main__":
    run()

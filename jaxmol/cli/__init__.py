"""The command-line entry points (`train`, `evaluate`) and their shared set-up.

Config files. `--config` takes a path to a `get_config()` module or the name of a shipped config
(`default`, `quickstart`, `pcdes`, `tiny`: the files of `jaxmol/configs/`, which in a checkout is
a link to the top-level `configs/`). A config file may import its sibling configs as
`configs.<name>` (e.g. `from configs import default`): the directory of the file given is bound
to the package name `configs`, so this works in a checkout, from an installed wheel, and for a
copy of the folder elsewhere, whatever the current directory.

Data. The shipped splits are read from `--data_dir`, else `$JAXMOL_DATA_DIR`, else the
checkout's `data/` (a wheel carries no data: point `--data_dir` at a checkout's `data/`).

Exit statuses (`run_guarded`). An expected failure prints one line on stderr
(``<program>: error: <message>``) and exits with its status; ``JAXMOL_TRACEBACK=1`` adds the
traceback. Anything else is a bug and shows its traceback (status 1).

  0    success, or SIGTERM (preemption): the run saved a checkpoint; the same command resumes
  1    unexpected error (traceback)
  2    config or usage error (a bad value names its key; no data folder)
  3    data error (missing file, malformed row, a molecule RDKit cannot read with
       data.on_invalid='error')
  4    checkpoint error (unreadable, written by another run, not writable)
  5    the loss became NaN or infinite (names the step; nothing after the last finite
       checkpoint is saved)
  6    the workdir is locked by another training run (names its pid and host)
  7    the processes of a multi-process run cannot work together (coordinator unreachable,
       different configs); a process that dies ends the others (JAX aborts them, status 134)
  130  Ctrl-C: the run saved a checkpoint; the same command resumes
"""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path

# The shipped configs inside the package (a link to the top-level configs/ in a checkout).
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
# The package name under which a config file's siblings are importable.
CONFIG_PACKAGE = "configs"
DATA_ENV = "JAXMOL_DATA_DIR"
TRACEBACK_ENV = "JAXMOL_TRACEBACK"
EXIT_UNEXPECTED = 1
EXIT_CONFIG = 2
EXIT_DATA = 3
EXIT_CHECKPOINT = 4
EXIT_NONFINITE = 5
EXIT_LOCKED = 6
EXIT_DISTRIBUTED = 7
EXIT_CTRL_C = 130
MANIFEST_NAME = "MANIFEST.json"

logger = logging.getLogger(__name__)


def setup_logging() -> None:
    """Our progress at INFO; orbax (logs through absl) and JAX internals only when something is
    wrong."""
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax").setLevel(logging.WARNING)


# ---------------------------------------------------------------------------------------------
# Config files.
# ---------------------------------------------------------------------------------------------


def shipped_config_names() -> list[str]:
    """Names accepted by `--config` besides a path: the modules of `jaxmol/configs/`."""
    if not CONFIG_DIR.is_dir():
        return []
    return sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__")


def resolve_config_path(value: str) -> str:
    """`value` unchanged when it names an existing file, else the shipped config of that name.

    An ml_collections `:argument` suffix is kept. A value that is neither is returned unchanged
    (the config flag then reports the missing file).
    """
    path, sep, rest = value.partition(":")
    if os.path.isfile(path):
        return value
    name = path.removesuffix(".py")
    if name in shipped_config_names():
        return str(CONFIG_DIR / f"{name}.py") + sep + rest
    return value


def bind_config_package(config_path: str | os.PathLike) -> None:
    """Makes `from configs import <sibling>` work inside the config file at `config_path`.

    When the file's directory is a package (has `__init__.py`), that directory is imported as the
    package `configs`, exactly as `import configs` would from its parent directory. Nothing
    happens for a file outside a package, or when a `configs` package from another directory is
    already imported (then a warning is logged and that one is used).
    """
    directory = Path(config_path).resolve().parent
    init = directory / "__init__.py"
    if not init.is_file():
        return
    loaded = sys.modules.get(CONFIG_PACKAGE)
    if loaded is not None:
        paths = {Path(p).resolve() for p in getattr(loaded, "__path__", [])}
        if directory not in paths:
            logger.warning(
                "package %r is already imported from %s; %s imports its siblings from there",
                CONFIG_PACKAGE,
                sorted(map(str, paths)),
                config_path,
            )
        return
    spec = importlib.util.spec_from_file_location(
        CONFIG_PACKAGE, init, submodule_search_locations=[str(directory)]
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules[CONFIG_PACKAGE] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[CONFIG_PACKAGE]
        raise


def _is_flag(arg: str, name: str) -> bool:
    return arg in (f"--{name}", f"-{name}")


def _flag_value_prefix(arg: str, name: str) -> str | None:
    for prefix in (f"--{name}=", f"-{name}="):
        if arg.startswith(prefix):
            return prefix
    return None


def prepare_config_argv(argv: Sequence[str], flag: str = "config") -> list[str]:
    """Resolves the `--config` value of a command line (path or shipped name) and binds its
    package (see `bind_config_package`) before absl parses the flags and loads the file.

    `--config.key=value` overrides are left alone. Returns the rewritten argv.
    """
    args = list(argv)
    for i, arg in enumerate(args[1:], start=1):
        if arg == "--":
            break
        prefix = _flag_value_prefix(arg, flag)
        if prefix is not None:
            index, value = i, arg[len(prefix) :]
        elif _is_flag(arg, flag) and i + 1 < len(args):
            index, value, prefix = i + 1, args[i + 1], ""
        else:
            continue
        resolved = resolve_config_path(value)
        args[index] = prefix + resolved
        path = resolved.partition(":")[0]
        if os.path.isfile(path):
            bind_config_package(path)
        break
    return args


def load_config_file(value: str):
    """Loads a config (path or shipped name) outside absl: `get_config()` of its module."""
    resolved = resolve_config_path(value)
    path, _, argument = resolved.partition(":")
    if not os.path.isfile(path):
        names = ", ".join(shipped_config_names())
        raise FileNotFoundError(
            f"config {value!r} is neither a file nor a shipped config ({names})"
        )
    bind_config_package(path)
    spec = importlib.util.spec_from_file_location(f"_jaxmol_config_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(argument) if argument else module.get_config()


# ---------------------------------------------------------------------------------------------
# Data folder.
# ---------------------------------------------------------------------------------------------


class DataDirError(ValueError):
    """The data folder the shipped splits need does not exist."""


def use_data_dir(data_dir: str | os.PathLike | None, split_names: Sequence[str] = ()) -> Path:
    """Points the split registry at `data_dir` (None: keep `$JAXMOL_DATA_DIR` or the default).

    Call before loading data. Sets `$JAXMOL_DATA_DIR` (read when `jaxmol.data.datasets` is
    imported) and, if that module is already imported, its `DATA_DIR`. Raises DataDirError, with
    what to do, when one of `split_names` is a shipped split (not `tsv:PATH`) and the folder has
    no `MANIFEST.json`.

    Returns:
      The data folder in use.
    """
    if data_dir is not None:
        os.environ[DATA_ENV] = str(Path(data_dir).expanduser().absolute())
    from jaxmol.data import datasets  # after the environment: DATA_DIR is read at import

    if data_dir is not None:
        datasets.DATA_DIR = Path(os.environ[DATA_ENV])
    folder = Path(datasets.DATA_DIR)
    needs_data = any(not str(name).startswith("tsv:") for name in split_names)
    if needs_data and not (folder / MANIFEST_NAME).is_file():
        raise DataDirError(
            f"no data folder at {folder} (no {MANIFEST_NAME}). An installed jaxmol carries no "
            f"data: pass --data_dir=DIR or set ${DATA_ENV}=DIR, with DIR a jaxmol checkout's "
            "data/ folder, or use tsv:PATH splits"
        )
    return folder


# ---------------------------------------------------------------------------------------------
# Exit statuses.
# ---------------------------------------------------------------------------------------------


def exit_status(error: BaseException) -> int | None:
    """The documented exit status of an expected failure (module docstring); None when
    `error` is unexpected (a bug: it keeps its traceback)."""
    # Imported here, not at module level: the split registry must not be imported before
    # `use_data_dir` has set the data folder.
    from jaxmol.checkpointing import CheckpointError
    from jaxmol.config import ConfigError
    from jaxmol.data.datasets import DataError
    from jaxmol.data.featurize import InvalidSmilesError
    from jaxmol.distributed import DistributedError
    from jaxmol.evaluation import ProtocolError
    from jaxmol.workdir import WorkdirLockedError

    # Training's errors only exist once train_lib is imported; importing it here would need
    # optax, which a search-only install (the [search] extra) does not have.
    train_lib = sys.modules.get("jaxmol.train_lib")
    training_errors = (train_lib.NonFiniteLossError,) if train_lib else ()
    if train_lib and isinstance(error, train_lib.TrainingInterrupted):
        return 0 if error.signum == signal.SIGTERM else EXIT_CTRL_C
    statuses = (
        ((ConfigError, DataDirError, ProtocolError), EXIT_CONFIG),
        ((DataError, InvalidSmilesError), EXIT_DATA),
        ((CheckpointError,), EXIT_CHECKPOINT),
        (training_errors, EXIT_NONFINITE),
        ((WorkdirLockedError,), EXIT_LOCKED),
        ((DistributedError,), EXIT_DISTRIBUTED),
    )
    for kinds, status in statuses:
        if isinstance(error, kinds):
            return status
    return None


def run_guarded(program: str, body: Callable[[], object]) -> None:
    """Runs `body`; an expected failure becomes one line on stderr and its exit status."""
    try:
        body()
    except (Exception, KeyboardInterrupt) as error:
        status = exit_status(error)
        if status is None:
            raise
        if os.environ.get(TRACEBACK_ENV, "") not in ("", "0"):
            traceback.print_exc()
        tag = _process_tag()
        if status == 0:
            print(f"{program}{tag}: {error}; run the same command to resume", file=sys.stderr)
        else:
            print(f"{program}{tag}: error: {error}", file=sys.stderr)
        if tag:
            # Several processes: leave now. A normal exit would wait in JAX's shutdown barrier
            # for processes that may be stuck in a collective with this one; leaving makes the
            # coordination service end them within the heartbeat timeout instead.
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(status)
        sys.exit(status)


def _process_tag() -> str:
    """' [process i]' in a run of several processes, else ''."""
    if "jax" not in sys.modules:
        return ""
    import jax

    if not jax.distributed.is_initialized() or jax.process_count() == 1:
        return ""
    return f" [process {jax.process_index()}]"

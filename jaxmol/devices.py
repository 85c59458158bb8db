"""Which devices JAX sees, and whether the train step will use them.

    python -m jaxmol.devices                        # the default config
    python -m jaxmol.devices --config quickstart --num_devices 4 --batch_size 64

Prints the JAX version, the backend platform, every local device, and, for a config (a shipped
name or a file; `default` unless given), how many devices the data-parallel train step would run
on and whether `batch_size` (the global batch) divides among them. Exits with status 1 when the
train step could not start with these settings, 0 otherwise.

Needs only JAX; reading a config needs the `train` extra (ml-collections). Without it, or with
`--no_config`, only the `--num_devices` / `--batch_size` / `--parallel` given are checked.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

import jax

from jaxmol.parallel import MODES, select_devices

ACCELERATOR_PLATFORMS = ("gpu", "tpu")
# The matching accelerator builds (also in the README); {v} is the installed JAX version.
INSTALL_LINES = (
    'pip install "jax[cuda12]=={v}"   # NVIDIA GPU, CUDA 12 (jax[cuda13] for CUDA 13)',
    'pip install "jax[tpu]=={v}"      # Cloud TPU',
)


@dataclasses.dataclass(frozen=True)
class StepSettings:
    """The config values that decide where and how the train step runs."""

    num_devices: int = -1  # -1: all local devices
    batch_size: int = 32  # the global batch
    parallel: str = "shard_map"
    source: str = "the arguments"


def settings_from_config(config, source: str) -> StepSettings:
    return StepSettings(
        num_devices=int(config.num_devices),
        batch_size=int(config.batch_size),
        parallel=str(config.parallel),
        source=source,
    )


def _device_line(device) -> str:
    kind = getattr(device, "device_kind", "") or device.platform
    return f"  {device} ({kind}, process {device.process_index})"


def report(settings: StepSettings) -> tuple[list[str], bool]:
    """The report lines and whether the train step could start with `settings`."""
    version = jax.__version__
    try:
        import jaxlib

        version += f" (jaxlib {jaxlib.__version__})"
    except (ImportError, AttributeError):
        pass
    platform = jax.default_backend()
    local = jax.local_devices()
    lines = [f"jax {version}, platform: {platform}"]
    if os.environ.get("JAX_PLATFORMS"):
        lines.append(f"JAX_PLATFORMS={os.environ['JAX_PLATFORMS']}")
    lines.append(
        f"processes: {jax.process_count()} (this is process {jax.process_index()}); "
        f"devices: {jax.device_count()} in all, {len(local)} local:"
    )
    lines.extend(_device_line(d) for d in local)
    if platform not in ACCELERATOR_PLATFORMS:
        lines.append("no GPU or TPU visible to JAX; for one, install the matching JAX build:")
        lines.extend("  " + line.format(v=jax.__version__) for line in INSTALL_LINES)

    lines.append(
        f"train step ({settings.source}: parallel={settings.parallel}, "
        f"num_devices={settings.num_devices}, batch_size={settings.batch_size}):"
    )
    if settings.parallel not in MODES:
        lines.append(f"NOT OK: parallel must be one of {MODES}")
        return lines, False
    try:
        devices = select_devices(settings.num_devices)
    except ValueError as error:
        lines.append(f"NOT OK: {error}")
        return lines, False
    count = len(devices)
    if settings.batch_size % count:
        lines.append(
            f"NOT OK: batch_size {settings.batch_size} is not a multiple of the {count} devices "
            "it would use; change --config.batch_size or --config.num_devices"
        )
        return lines, False
    which = "all" if count == len(local) else "the first"
    lines.append(
        f"OK: uses {which} {count} of {len(local)} local devices ({platform}), "
        f"{settings.batch_size // count} of the {settings.batch_size} pairs per device"
    )
    return lines, True


def _parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m jaxmol.devices", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--config", default="default", help="Config file or shipped name.")
    parser.add_argument("--no_config", action="store_true", help="Do not read a config.")
    parser.add_argument("--num_devices", type=int, default=None, help="Override (-1: all).")
    parser.add_argument("--batch_size", type=int, default=None, help="Override: global batch.")
    parser.add_argument("--parallel", default=None, choices=MODES, help="Override the runner.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    settings = StepSettings()
    note = None
    if not args.no_config:
        try:
            from jaxmol import cli

            settings = settings_from_config(cli.load_config_file(args.config), args.config)
        except ImportError as error:
            note = f"config {args.config!r} not read ({error}; it needs the train extra)"
            settings = StepSettings(source="the defaults of configs/default.py")
        except FileNotFoundError as error:
            print(f"jaxmol.devices: error: {error}", file=sys.stderr)
            return 2
    overrides = {
        k: v
        for k, v in (
            ("num_devices", args.num_devices),
            ("batch_size", args.batch_size),
            ("parallel", args.parallel),
        )
        if v is not None
    }
    if overrides:
        source = f"{settings.source} with overrides" if not args.no_config else "the arguments"
        settings = dataclasses.replace(settings, **overrides, source=source)
    lines, ok = report(settings)
    if note:
        lines.insert(0, note)
    print("\n".join(lines))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

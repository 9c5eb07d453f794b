"""Where the MLflow store is: recorded by the commands that write to it, found by those that read it.

``clipforge demo`` and ``clipforge run`` record the tracking URI (and the artifact root of a local
store) in ``.clipforge.json`` beside the store they write (their ``--workdir``) and in the user's
config folder (``$XDG_CONFIG_HOME/clipforge/tracking.json``, by default under ``~/.config``).
A command that reads the registry (``evaluate``, ``promote``, ``rollback``, ``clipforge tracking-uri``)
takes, in this order: ``MLFLOW_TRACKING_URI``; the store of an explicit ``--workdir``; the nearest
``.clipforge.json`` in the working directory or a folder above it; the user's record. It never
creates a store: a SQLite file that does not exist is refused with where it was looked for.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

from clipforge.core.errors import ConfigError

STATE_FILE = ".clipforge.json"
USER_STATE_FILE = "tracking.json"


@dataclass(frozen=True)
class TrackingLocation:
    """A tracking URI, the artifact root of a local store (None for a server), and where it was found."""

    uri: str
    artifact_root: str | None
    source: str


class RegistryNotFoundError(ConfigError):
    """No MLflow store to read: raised with every place that was looked at."""


def user_state_dir() -> Path:
    """The user's clipforge config folder: ``$XDG_CONFIG_HOME/clipforge``, else ``~/.config/clipforge``."""
    base = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(base).expanduser() / "clipforge"


def local_store(workdir: str | Path) -> TrackingLocation:
    """The SQLite store a command keeps in ``workdir`` (``mlflow.db`` and ``mlartifacts/``)."""
    folder = Path(workdir).expanduser().resolve()
    return TrackingLocation(f"sqlite:///{(folder / 'mlflow.db').as_posix()}", str(folder / "mlartifacts"), f"--workdir {folder}")


def record_tracking(location: TrackingLocation, workdir: str | Path) -> list[Path]:
    """Record ``location`` beside the store (in ``workdir``) and in the user's config folder; the files written.

    A folder that cannot be written (a read-only home) is skipped: recording is a convenience, the
    run itself does not depend on it.
    """
    state = {"tracking_uri": location.uri, "artifact_root": location.artifact_root}
    written = []
    for path in (Path(workdir).expanduser().resolve() / STATE_FILE, user_state_dir() / USER_STATE_FILE):
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_text(json.dumps(state, indent=2) + "\n")
            tmp.replace(path)  # atomic: a reader never sees half a record
            written.append(path)
        except OSError:
            continue
    return written


def find_tracking(workdir: str | Path | None = None, start: str | Path | None = None) -> TrackingLocation:
    """The store a registry-reading command uses (the order is in the module's docstring).

    Raises :class:`RegistryNotFoundError` naming every place looked at and how to point elsewhere.
    """
    looked: list[str] = []
    if uri := os.environ.get("MLFLOW_TRACKING_URI"):
        return _existing(TrackingLocation(uri, None, "MLFLOW_TRACKING_URI"), looked)
    if workdir is not None:
        return _existing(local_store(workdir), looked)
    here = Path(start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        path = folder / STATE_FILE
        if path.is_file():
            return _existing(_read_state(path), looked)
        looked.append(f"{path} (none)")
    path = user_state_dir() / USER_STATE_FILE
    if path.is_file():
        return _existing(_read_state(path), looked)
    looked.append(f"{path} (none)")
    raise _not_found(looked)


def _read_state(path: Path) -> TrackingLocation:
    try:
        state = json.loads(path.read_text())
        return TrackingLocation(str(state["tracking_uri"]), state.get("artifact_root"), str(path))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path}: not a clipforge tracking record ({e}); delete it or set MLFLOW_TRACKING_URI") from None


def _existing(location: TrackingLocation, looked: list[str]) -> TrackingLocation:
    """``location`` unless it is a SQLite file that does not exist (MLflow would create it, empty)."""
    parsed = urlparse(location.uri)
    if parsed.scheme == "sqlite":
        path = Path(location.uri.removeprefix("sqlite:///"))
        if not path.is_absolute():
            path = Path.cwd() / path
        if not path.is_file():
            looked.append(f"{location.uri} from {location.source} (no such file)")
            raise _not_found(looked)
    return location


def _not_found(looked: list[str]) -> RegistryNotFoundError:
    places = "; ".join(looked)
    return RegistryNotFoundError(
        f"no MLflow registry found; looked at: {places}. Run `clipforge demo` or `clipforge run` first, "
        "give the --workdir it used, or set MLFLOW_TRACKING_URI (export MLFLOW_TRACKING_URI=sqlite:////abs/path/mlflow.db "
        "or http://host:5000)"
    )

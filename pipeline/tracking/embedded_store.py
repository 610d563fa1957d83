"""The embedded MLflow store (sqlite in the run directory), created fast.

Creating a sqlite store runs MLflow's ~100 schema migrations, 5-10 s on a small CPU, at every
new run directory. `prepare_embedded_store` does it once per MLflow version, into a cache, and
gives each later store a copy of that empty, migrated database.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
from pathlib import Path

log = logging.getLogger(__name__)


def prepare_embedded_store(db_path: Path, artifact_root: str) -> None:
    """Creating a sqlite store runs MLflow's ~100 schema migrations (5-10 s on a small CPU) —
    once per MLflow version here: later run directories get a copy of an empty, migrated store.
    On any problem MLflow simply creates the store itself."""
    if db_path.exists():
        return
    try:
        import mlflow

        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gapm"
        template = cache / f"mlflow-{mlflow.__version__}-empty.db"
        if not template.exists():
            from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

            cache.mkdir(parents=True, exist_ok=True)
            staging = cache / f".{template.name}.{os.getpid()}.tmp"
            store = SqlAlchemyStore(f"sqlite:///{staging}", default_artifact_root=artifact_root)
            store.engine.dispose()
            os.replace(staging, template)
        db_path.parent.mkdir(parents=True, exist_ok=True)
        staging = db_path.with_name(f".{db_path.name}.{os.getpid()}.tmp")
        shutil.copyfile(template, staging)
        with sqlite3.connect(staging) as connection:  # the Default experiment: this run's store
            connection.execute("UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
                               (f"{artifact_root}/0",))
        connection.close()
        os.replace(staging, db_path)
    except Exception as error:  # noqa: BLE001 - an optimisation only
        log.debug("no template MLflow store (%s); MLflow creates %s itself", error, db_path)

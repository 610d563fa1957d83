"""Experiment matrices: methods × settings × seeds, each trained, evaluated and reported by one
command, resumable element by element.

A matrix file (configs/matrices/*.yaml) lists experiment configs, the seeds to train each with,
optional sweeps of their keys and the `gapm eval` arguments every final checkpoint is scored
with. Expanding it gives a fixed, ordered list of elements — one (config, overrides, seed) each —
so that element i means the same run everywhere: `gapm matrix run` works through all of them
on one machine, a Slurm array task or a Kubernetes Indexed Job pod runs `gapm matrix element
--index i`, and `gapm matrix report` tables whatever has finished.

Every element is a subprocess `gapm train --resume auto` then `gapm eval ... --json`, so an
element that is killed resumes from its last checkpoint, a finished one is skipped, and an
evaluation is redone only when its arguments change. An element's record,
`<run dir>/matrix-element.json`, keeps what it cost (training wall-clock over all launches, the
machine) and which evaluation arguments produced its `eval.json`.

Stopping: SIGTERM and SIGUSR1 sent to `gapm matrix element` / `run` (a Slurm array task's batch
script passes SIGUSR1 on before the time limit; Kubernetes sends SIGTERM to the pod's PID 1) go
to the running subprocess — the training checkpoints and exits 75 — and the element then exits
75 ("resumable") without starting its next step, so that a rerun continues where it stopped.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import platform
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pipeline import checkpoints, console
from pipeline.config import load_config
from pipeline.errors import ConfigError, GapmError
from pipeline.stopping import EXIT_RESUMABLE
from pipeline.typed_settings import from_dict

ELEMENT_RECORD = "matrix-element.json"
EVAL_RECORD = "eval.json"
EXIT_BAD_INPUT = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)  # passed on to the running step (see above)


@dataclass
class MatrixRun:
    config: str  # an experiment YAML, relative to the matrix file's working directory
    name: str | None = None  # the row's name; default: the config's `name`
    set: list[str] = field(default_factory=list)  # `--set` overrides of this row
    # {config key: [values]}: one element per combination (and seed), e.g. a sweep of a weight
    sweep: dict[str, list[Any]] = field(default_factory=dict)


@dataclass
class MatrixConfig:
    name: str  # names the output folder <output_dir>/<name>/ and the MLflow experiment
    runs: list[MatrixRun]
    seeds: list[int] = field(default_factory=lambda: [0])
    output_dir: str = "runs/matrices"
    set: list[str] = field(default_factory=list)  # `--set` overrides of every element
    # `gapm eval` arguments after the checkpoint, e.g. [--stats, NAME, -n, "10000"]; empty: no evaluation
    eval: list[str] = field(default_factory=list)
    threads: int | None = None  # OMP_NUM_THREADS of each element's processes (null: inherited)
    # the report's metric columns, e.g. [eval/fid, eval/test_reconstruction_mse]; empty: every eval/ metric
    report_metrics: list[str] = field(default_factory=list)

    @property
    def directory(self) -> Path:
        return Path(self.output_dir) / self.name


@dataclass(frozen=True)
class Element:
    index: int
    row: str  # the row's name plus its sweep values: what seeds are averaged over
    name: str  # the run's name: row + seed
    config: str
    overrides: tuple[str, ...]
    seed: int
    settings: tuple[tuple[str, Any], ...]  # the swept keys and values of this element


def load_matrix(path: str | Path) -> MatrixConfig:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"matrix file {path} does not exist; pass an existing YAML file (see configs/matrices/)")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as error:
        raise ConfigError(f"matrix file {path} is not valid YAML: {error}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"matrix file {path} must hold a mapping of settings at the top level")
    matrix = from_dict(MatrixConfig, values)
    if not matrix.runs:
        raise ConfigError(f"matrix file {path}: 'runs' lists no experiment config")
    if not matrix.seeds or len(set(matrix.seeds)) != len(matrix.seeds):
        raise ConfigError(f"matrix key 'seeds' must list distinct seeds, got {matrix.seeds}")
    for index, run in enumerate(matrix.runs):
        if not Path(run.config).is_file():
            raise ConfigError(f"matrix key 'runs[{index}].config': {run.config} does not exist")
        for key, options in run.sweep.items():
            if not isinstance(options, list) or not options:
                raise ConfigError(f"matrix key 'runs[{index}].sweep.{key}' must list at least one value")
    elements = expand(matrix)
    names = [element.name for element in elements]
    if len(set(names)) != len(names):
        raise ConfigError("matrix elements share a run name; give the rows distinct `name`s")
    for element in elements:  # a typo in a sweep or override fails now, not hours into the matrix
        try:
            load_config(element.config, list(element.overrides))
        except ConfigError as error:
            raise ConfigError(f"matrix {path}, element {element.index} ({element.name}): {error}") from None
    return matrix


def _value_text(value: Any) -> str:
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def expand(matrix: MatrixConfig) -> list[Element]:
    """Every (row, sweep combination, seed), in file order: the same list on every machine."""
    elements = []
    for run in matrix.runs:
        row_name = run.name or yaml.safe_load(Path(run.config).read_text()).get("name") or Path(run.config).stem
        keys = list(run.sweep)
        for combination in itertools.product(*(run.sweep[key] for key in keys)):
            settings = tuple(zip(keys, combination))
            row = row_name + "".join(f"-{key.rsplit('.', 1)[-1]}={_value_text(value)}" for key, value in settings)
            swept = [f"{key}={_value_text(value)}" for key, value in settings]
            for seed in matrix.seeds:
                name = f"{row}-s{seed}"
                overrides = (*matrix.set, *run.set, *swept, f"seed={seed}", f"name={name}",
                             f"output_dir={matrix.directory}", f"tracking.experiment={matrix.name}")
                elements.append(Element(len(elements), row, name, run.config, overrides, seed, settings))
    return elements


def run_dir(matrix: MatrixConfig, element: Element) -> Path:
    return matrix.directory / element.name


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}


def _write_json(path: Path, values: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_suffix(".json.tmp")
    partial.write_text(json.dumps(values, indent=1, sort_keys=True))
    partial.replace(path)


def eval_fingerprint(matrix: MatrixConfig) -> str:
    return hashlib.sha256(json.dumps(matrix.eval).encode()).hexdigest()[:16]


def is_trained(matrix: MatrixConfig, element: Element) -> bool:
    """Training ended normally: the run wrote its end-of-run metrics."""
    return (run_dir(matrix, element) / "metrics.json").is_file()


def is_evaluated(matrix: MatrixConfig, element: Element) -> bool:
    record = _read_json(run_dir(matrix, element) / ELEMENT_RECORD)
    return (run_dir(matrix, element) / EVAL_RECORD).is_file() and record.get("eval_fingerprint") == eval_fingerprint(matrix)


def final_checkpoint(directory: Path) -> Path:
    """The run's newest complete checkpoint (the checkpoint component decides what is complete)."""
    found = checkpoints.latest_checkpoint(directory / "checkpoints")
    if found is None:
        raise GapmError(f"{directory} finished training but holds no checkpoint; delete the folder and rerun the element")
    return Path(found)


def _environment(matrix: MatrixConfig) -> dict[str, str]:
    environment = dict(os.environ)
    if matrix.threads is not None:
        environment["OMP_NUM_THREADS"] = environment["MKL_NUM_THREADS"] = str(matrix.threads)
    return environment


class ElementSteps:
    """Runs an element's subprocesses one after the other, passing SIGTERM/SIGUSR1 on to the
    running one. Once a stop came, a step that did not finish and every later step count as 75
    (resumable): a step killed by the signal before it could handle it, an evaluation, which
    has nothing to save, and a training that checkpointed alike."""

    def __init__(self, matrix: MatrixConfig) -> None:
        self.environment = _environment(matrix)
        self.process: subprocess.Popen | None = None
        self.stop_signal: int | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> "ElementSteps":
        if threading.current_thread() is threading.main_thread():  # signals only work there
            for sig in STOP_SIGNALS:
                self.previous[sig] = signal.signal(sig, self._forward)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _forward(self, signum: int, frame: object) -> None:
        self.stop_signal = signum
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signum)

    def run(self, command: list[str]) -> int:
        """The step's exit status (128 + N when killed by signal N), or 75 when stopped."""
        if self.stop_signal is not None:
            return EXIT_RESUMABLE
        console.report("$ " + shlex.join(command))
        self.process = subprocess.Popen(command, env=self.environment)
        if self.stop_signal is not None:  # came while the process started: it has not heard it
            self._forward(self.stop_signal, None)
        try:
            status = self.process.wait()
        finally:
            self.process = None
        status = 128 - status if status < 0 else status
        if self.stop_signal is not None and status not in (0, EXIT_BAD_INPUT):
            return EXIT_RESUMABLE
        return status


def run_element(matrix: MatrixConfig, element: Element, steps: ElementSteps | None = None) -> int:
    """Trains (or resumes) and evaluates one element; 0 when both are done, else the exit
    status of the step that stopped (75: start it again to continue). `steps`: the runner of
    the subprocesses, shared by the elements of `run_all` (default: one for this element)."""
    if steps is None:
        with ElementSteps(matrix) as steps:
            return run_element(matrix, element, steps)
    directory = run_dir(matrix, element)
    record_path = directory / ELEMENT_RECORD
    record = _read_json(record_path)
    if not is_trained(matrix, element):
        started = time.monotonic()
        status = steps.run([sys.executable, "-m", "pipeline.cli", "train", "--config", element.config,
                            *itertools.chain.from_iterable(("--set", o) for o in element.overrides),
                            "--resume", "auto"])
        record = _read_json(record_path)  # the run may have rewritten its folder meanwhile
        record["train_seconds"] = record.get("train_seconds", 0.0) + time.monotonic() - started
        record["train_launches"] = record.get("train_launches", 0) + 1
        record.update(machine=platform.node(), processor=platform.processor() or platform.machine(),
                      cpu_count=os.cpu_count(), threads=matrix.threads)
        _write_json(record_path, record)
        if status != 0:
            return status
    if matrix.eval and not is_evaluated(matrix, element):
        checkpoint = final_checkpoint(directory)
        status = steps.run([sys.executable, "-m", "pipeline.cli", "eval", str(checkpoint), *matrix.eval,
                            "--json", str(directory / EVAL_RECORD)])
        if status != 0:
            return status
        record = _read_json(record_path)
        record.update(eval_fingerprint=eval_fingerprint(matrix), evaluated_checkpoint=checkpoint.name)
        _write_json(record_path, record)
    return 0


def status_line(matrix: MatrixConfig, element: Element) -> str:
    state = ("evaluated" if is_evaluated(matrix, element) or (is_trained(matrix, element) and not matrix.eval)
             else "trained" if is_trained(matrix, element)
             else "started" if (run_dir(matrix, element) / "checkpoints").is_dir() else "pending")
    return f"{element.index:3d}  {state:9s}  {element.name}"


def worst_status(statuses: list[int]) -> int:
    """The matrix's exit status: 2 (bad input) over 75 (resumable) over any other failure."""
    failures = [s for s in statuses if s != 0]
    for preferred in (EXIT_BAD_INPUT, EXIT_RESUMABLE):
        if preferred in failures:
            return preferred
    return failures[0] if failures else 0


def run_all(matrix: MatrixConfig, indices: list[int] | None = None, keep_going: bool = False) -> int:
    """Every element in order (or those of `indices`), skipping what is done."""
    elements = expand(matrix)
    chosen = [elements[i] for i in indices] if indices is not None else elements
    statuses = []
    with ElementSteps(matrix) as steps:
        for element in chosen:
            if is_trained(matrix, element) and (not matrix.eval or is_evaluated(matrix, element)):
                continue
            console.report(f"matrix {matrix.name}: element {element.index} of {len(elements)}: {element.name}")
            status = run_element(matrix, element, steps)
            statuses.append(status)
            if status != 0 and (not keep_going or steps.stop_signal is not None):
                break
    return worst_status(statuses)


def element_at(matrix: MatrixConfig, index: int) -> Element:
    elements = expand(matrix)
    if not 0 <= index < len(elements):
        raise GapmError(f"element index {index} is out of range: matrix {matrix.name} has {len(elements)} elements "
                        f"(0-{len(elements) - 1}); size the array to match (`gapm matrix list`)")
    return elements[index]

"""`gapm report`: one table (Markdown and CSV) and one figure grid per MLflow experiment, so
the paper's comparison tables can be reproduced side by side from tracked runs.

Evaluation jobs score image models in one or more feature spaces (pipeline.eval.feature_spaces):
the primary space's metrics (`eval/fid`, its spread `eval/fid_std`, its floor, precision, recall,
density, coverage, memorisation) are columns of the main table; each further space (`eval/LABEL/
fid`, ...) gets a table of its own in the Markdown (the CSV holds every column in one table),
and a note says where the spaces rank the runs differently by FID."""

from __future__ import annotations

import csv
import dataclasses
import io
import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path

import mlflow
import yaml
from mlflow.tracking import MlflowClient
from PIL import Image, ImageDraw

from pipeline.errors import GapmError

log = logging.getLogger(__name__)

# A metric column: metric key, header, format and what the number is (metric_columns.yaml lists
# them); every value is shown as measured (the value MLflow holds). A column appears when some run
# has the metric (FID and KID once an evaluation job has logged them on the runs).
@dataclass(frozen=True)
class MetricColumn:
    key: str
    header: str
    fmt: str
    meaning: str
    better: str = "lower is better"
    spread_key: str | None = None  # shown as "value ± spread" when the run has it

    def cell(self, metrics: dict[str, float]) -> str:
        value = metrics.get(self.key)
        if value is None:
            return ""
        shown = self.fmt.format(value)
        spread = metrics.get(self.spread_key) if self.spread_key else None
        return f"{shown} ± {self.fmt.format(spread)}" if spread is not None else shown


def load_metric_columns(path: Path) -> list[MetricColumn]:
    """The glossary of metric columns, kept as data beside this module (metric_columns.yaml)."""
    return [MetricColumn(key=entry["key"], header=entry["header"], fmt=entry["format"], meaning=entry["meaning"],
                         **{name: entry[name] for name in ("better", "spread_key") if name in entry})
            for entry in yaml.safe_load(path.read_text(encoding="utf-8"))]


METRIC_COLUMNS = load_metric_columns(Path(__file__).with_name("metric_columns.yaml"))
RUN_COLUMNS = [
    ("run", "the MLflow run name (the config's `name`); the newest finished run of each name"),
    ("method", "`model.kind`: gapm or a baseline"),
    ("world size", "processes that trained the run (its `world_size` tag); each step saw world size × batch "
                   "samples"),
    ("batch", "`data.batch_size`, per process"),
    ("steps", "training iterations: stage 1 + stage 2 (the baselines train one stage)"),
]
FIGURE_NAMES = ("figure4.png", "samples.png")


class ReportError(GapmError):
    """No experiment or no finished runs to report on."""


def experiment_runs(client: MlflowClient, experiment: str, run_names: list[str] | None = None) -> list:
    """The newest finished run of each method/config name in `experiment` (only `run_names`, in
    that order, when given)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        raise ReportError(f"MLflow at {mlflow.get_tracking_uri()} has no experiment {experiment!r}; "
                          "check MLFLOW_TRACKING_URI and tracking.experiment in the configs")
    runs = client.search_runs([found.experiment_id], filter_string="attributes.status = 'FINISHED'",
                              order_by=["attributes.start_time DESC"])
    newest: dict[str, object] = {}
    for run in runs:
        newest.setdefault(run.info.run_name or run.info.run_id, run)
    if not newest:
        raise ReportError(f"experiment {experiment!r} has no finished runs yet")
    if run_names:
        missing = [name for name in run_names if name not in newest]
        if missing:
            raise ReportError(f"experiment {experiment!r} has no finished run named {', '.join(missing)}; "
                              f"its runs: {', '.join(sorted(newest))}")
        return [newest[name] for name in run_names]
    return sorted(newest.values(), key=lambda r: (r.data.params.get("model.kind") != "gapm", r.info.run_name))


# the metrics every feature space has (eval/LABEL/fid, ...): the main table's, relabelled
SPACE_METRICS = ("eval/fid", "eval/fid_floor", "eval/precision", "eval/recall", "eval/density", "eval/coverage",
                 "eval/memorisation_ratio")


def space_labels(runs: list) -> list[str]:
    """The labels of further feature spaces the runs were scored in (metrics eval/LABEL/fid)."""
    return sorted({key.split("/")[1] for run in runs for key in run.data.metrics
                   if key.startswith("eval/") and key.endswith("/fid") and key.count("/") == 2})


def space_columns(label: str) -> list[MetricColumn]:
    def relabel(key: str | None) -> str | None:
        return f"eval/{label}/{key.removeprefix('eval/')}" if key else None

    return [dataclasses.replace(c, key=relabel(c.key), header=f"{c.header} [{label}]",
                                spread_key=relabel(c.spread_key), meaning=f"{c.header} in feature space {label}")
            for c in METRIC_COLUMNS if c.key in SPACE_METRICS]


def present_columns(runs: list, columns: list[MetricColumn] | None = None) -> list[MetricColumn]:
    return [c for c in (METRIC_COLUMNS if columns is None else columns) if any(c.key in r.data.metrics for r in runs)]


def all_columns(runs: list) -> list[MetricColumn]:
    """The main table's columns, then each further feature space's."""
    return present_columns(runs) + [c for label in space_labels(runs)
                                    for c in present_columns(runs, space_columns(label))]


def table_rows(runs: list, columns: list[MetricColumn] | None = None) -> tuple[list[str], list[list[str]]]:
    """The run columns and the metric `columns` (default: the main table's present ones)."""
    present = present_columns(runs) if columns is None else columns
    header = [name for name, _ in RUN_COLUMNS] + [c.header for c in present]
    rows = []
    for run in runs:
        params = run.data.params
        steps = int(params.get("stage1.steps", 0)) + (int(params.get("stage2.steps", 0))
                                                       if params.get("model.kind", "gapm") == "gapm" else 0)
        row = [run.info.run_name, params.get("model.kind", "gapm"), run.data.tags.get("world_size", "?"),
               params.get("data.batch_size", "?"), str(steps)]
        rows.append(row + [column.cell(run.data.metrics) for column in present])
    return header, rows


def space_table(runs: list, label: str) -> str:
    """Markdown: the run names and the metrics of feature space `label`."""
    columns = present_columns(runs, space_columns(label))
    header = ["run"] + [c.header for c in columns]
    return markdown_table(header, [[run.info.run_name] + [c.cell(run.data.metrics) for c in columns]
                                   for run in runs])


def ranking_note(runs: list) -> str:
    """Where the feature spaces rank the runs differently by FID (runs scored in both)."""
    notes = []
    for label in space_labels(runs):
        other = f"eval/{label}/fid"
        both = [r for r in runs if "eval/fid" in r.data.metrics and other in r.data.metrics]
        by_primary = [r.info.run_name for r in sorted(both, key=lambda r: r.data.metrics["eval/fid"])]
        by_other = [r.info.run_name for r in sorted(both, key=lambda r: r.data.metrics[other])]
        if by_primary != by_other:
            notes.append(f"- The FID rankings disagree between the feature spaces: by FID {' < '.join(by_primary)}; "
                         f"by FID [{label}] {' < '.join(by_other)}.")
        elif len(both) > 1:
            notes.append(f"- FID and FID [{label}] rank the runs alike: {' < '.join(by_primary)}.")
    return "\n".join(notes) + "\n" if notes else ""


def column_legend(runs: list) -> str:
    """What each column of the tables is (Markdown list)."""
    lines = [f"- **{name}**: {meaning}" for name, meaning in RUN_COLUMNS]
    lines += [f"- **{c.header}** (`{c.key}`): {c.meaning}; {c.better}"
              for c in present_columns(runs)]
    labels = space_labels(runs)
    if labels:
        lines.append(f"- **… [LABEL]** (`eval/LABEL/…`): the same metric in the further feature space LABEL "
                     f"({', '.join(labels)}): other statistics, made with another feature extractor")
    return "Columns:\n\n" + "\n".join(lines) + "\n"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def figure_grid(client: MlflowClient, runs: list, columns: int = 1) -> Image.Image | None:
    """Each run's main figure, stacked with its name above it."""
    panels = []
    with tempfile.TemporaryDirectory() as scratch:
        for run in runs:
            names = {a.path for a in client.list_artifacts(run.info.run_id)}
            name = next((n for n in FIGURE_NAMES if n in names), None)
            if name is None:
                log.warning("run %s has no figure (%s)", run.info.run_name, " or ".join(FIGURE_NAMES))
                continue
            local = client.download_artifacts(run.info.run_id, name, scratch)
            panels.append((run.info.run_name, Image.open(local).convert("RGB")))
    if not panels:
        return None
    width = max(image.width for _, image in panels)
    label = 20
    grid = Image.new("RGB", (width, sum(image.height + label for _, image in panels)), "white")
    draw, top = ImageDraw.Draw(grid), 0
    for title, image in panels:
        draw.text((8, top + 4), title, fill="black")
        grid.paste(image, (0, top + label))
        top += image.height + label
    return grid


def write_report(experiment: str, out_dir: Path, run_names: list[str] | None = None,
                 name: str | None = None) -> dict[str, Path]:
    """Writes OUT/NAME.md, .csv and -figures.png (NAME: the experiment's unless given); returns
    their paths. `run_names` picks runs of the experiment (default: all, newest of each name)."""
    client = MlflowClient()
    runs = experiment_runs(client, experiment, run_names)
    header, rows = table_rows(runs)
    out_dir.mkdir(parents=True, exist_ok=True)
    name = name or experiment
    written = {"markdown": out_dir / f"{name}.md", "csv": out_dir / f"{name}.csv"}
    spaces = "".join(f"\n## Feature space {label}\n\n" + space_table(runs, label) for label in space_labels(runs))
    note = ranking_note(runs)
    written["markdown"].write_text(f"# {name}\n\n" + markdown_table(header, rows) + spaces
                                   + (f"\n{note}" if note else "") + "\n" + column_legend(runs))
    buffer = io.StringIO()
    every_header, every_row = table_rows(runs, all_columns(runs))  # one table, every space
    csv.writer(buffer).writerows([every_header, *every_row])
    written["csv"].write_text(buffer.getvalue())
    grid = figure_grid(client, runs)
    if grid is not None:
        written["figures"] = out_dir / f"{name}-figures.png"
        grid.save(written["figures"])
    return written

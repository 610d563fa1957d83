"""`gapm matrix`: run, run one element of, list and report an experiment matrix (pipeline/matrix.py).

pipeline.matrix loads configs (torch, through gapm): it is imported by the commands, not here,
so that building the `gapm` parser stays light and `gapm train` installs its stop handler before
torch is imported (pipeline/cli.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import console
from pipeline.errors import GapmError


def parse_indices(text: str) -> list[int]:
    """'3', '0,4,5' or '2-6' (inclusive)."""
    indices: list[int] = []
    for part in text.split(","):
        low, _, high = part.strip().partition("-")
        if not low.isdigit() or (high and not high.isdigit()):
            raise argparse.ArgumentTypeError(f"expected indices like 3, 0,4,5 or 2-6, got {text!r}")
        indices.extend(range(int(low), int(high or low) + 1))
    return indices


def command_run(args: argparse.Namespace) -> int:
    from pipeline.matrix import expand, load_matrix, run_all  # deferred

    matrix = load_matrix(args.matrix)
    count = len(expand(matrix))
    if args.elements and max(args.elements) >= count:
        raise GapmError(f"--elements: matrix {matrix.name} has elements 0-{count - 1}")
    status = run_all(matrix, args.elements, keep_going=args.keep_going)
    if status == 0 and not args.no_report:
        return command_report(args)
    return status


def command_element(args: argparse.Namespace) -> int:
    from pipeline.matrix import element_at, load_matrix, run_element  # deferred

    matrix = load_matrix(args.matrix)
    return run_element(matrix, element_at(matrix, args.index))


def command_list(args: argparse.Namespace) -> int:
    from pipeline.matrix import expand, load_matrix, status_line  # deferred

    matrix = load_matrix(args.matrix)
    for element in expand(matrix):
        print(status_line(matrix, element))
    return 0


def command_report(args: argparse.Namespace) -> int:
    from pipeline.matrix import load_matrix  # deferred
    from pipeline.matrix_report import write_matrix_report  # deferred

    matrix = load_matrix(args.matrix)
    out = Path(args.out) if args.out else matrix.directory / "report"
    metrics = [key.strip() for key in args.metrics.split(",")] if args.metrics else matrix.report_metrics or None
    written = write_matrix_report(matrix, metrics, out)
    print(written["markdown"].read_text(), end="")
    console.report("wrote " + ", ".join(str(path) for path in written.values()))
    return 0


def add_matrix_commands(commands: argparse._SubParsersAction) -> None:
    matrix = commands.add_parser(
        "matrix", help="train, evaluate and report a matrix of experiments (methods x settings x seeds)",
        description="An experiment matrix (configs/matrices/*.yaml): every element is one `gapm train --resume "
                    "auto` + `gapm eval`; finished elements are skipped, interrupted ones resume.")
    actions = matrix.add_subparsers(dest="matrix_command", required=True)

    run = actions.add_parser("run", help="every element not yet done, in order, then the report")
    run.add_argument("matrix", help="matrix YAML file")
    run.add_argument("--elements", type=parse_indices, help="only these element indices, e.g. 0-6 or 1,3")
    run.add_argument("--keep-going", action="store_true", help="go on after an element fails")
    run.add_argument("--no-report", action="store_true", help="skip the report at the end")
    run.add_argument("--out", help="report folder (default: OUTPUT_DIR/NAME/report)")
    run.add_argument("--metrics", help="comma-separated metric keys of the report (default: every eval/ metric)")
    run.set_defaults(handler=command_run)

    element = actions.add_parser("element", help="one element (a Slurm array task, an Indexed Job pod)")
    element.add_argument("matrix", help="matrix YAML file")
    element.add_argument("--index", type=int, required=True,
                         help="element index (SLURM_ARRAY_TASK_ID, JOB_COMPLETION_INDEX)")
    element.set_defaults(handler=command_element)

    listing = actions.add_parser("list", help="the elements with their index and state")
    listing.add_argument("matrix", help="matrix YAML file")
    listing.set_defaults(handler=command_list)

    report = actions.add_parser("report", help="mean ± std over seeds of every row, with its compute")
    report.add_argument("matrix", help="matrix YAML file")
    report.add_argument("--out", help="report folder (default: OUTPUT_DIR/NAME/report)")
    report.add_argument("--metrics", help="comma-separated metric keys (default: every eval/ metric)")
    report.set_defaults(handler=command_report)

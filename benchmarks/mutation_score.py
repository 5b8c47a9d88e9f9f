"""Mutation score per module from a finished ``mutmut run`` (``make mutation`` runs both).

Reads mutmut's result files (``mutants/**/*.py.meta``) and prints, per mutated module, how many
mutants the tests killed (a test failed, or it timed out), how many survived, and how many no
selected test reached; the score is killed / all mutants of the module. ``--survivors`` lists the
surviving mutants (``mutmut show NAME`` prints a diff); ``--json PATH`` writes the table.

    .venv/bin/python benchmarks/mutation_score.py [--mutants mutants] [--survivors] [--json PATH]
"""
from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

from panning.cli import OneLineParser, run_guarded

KILLED = {1: "killed", 3: "killed", 36: "timeout", -24: "timeout", 24: "timeout", 152: "timeout", 255: "timeout"}


def status(code: int | None) -> str:
    """mutmut's verdict of an exit code, folded into killed / survived / no tests / not checked / other."""
    if code in KILLED:
        return "killed"
    return {0: "survived", 5: "no tests", 33: "no tests", None: "not checked"}.get(code, "other")


def main() -> None:
    ap = OneLineParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mutants", type=Path, default=Path("mutants"))
    ap.add_argument("--survivors", action="store_true", help="list the surviving mutants")
    ap.add_argument("--json", type=Path, help="write the per-module table here")
    args = ap.parse_args()
    rows, survivors = [], []
    for meta in sorted(args.mutants.rglob("*.py.meta")):
        codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(status(c) for c in codes.values())
        module = str(meta.relative_to(args.mutants))[: -len(".meta")]
        total = sum(counts.values())
        rows.append({"module": module, "mutants": total, "killed": counts["killed"], "survived": counts["survived"],
                     "no_tests": counts["no tests"], "not_checked": counts["not checked"], "other": counts["other"],
                     "score": counts["killed"] / total if total else float("nan")})
        survivors += [k for k, c in codes.items() if status(c) in ("survived", "no tests")]
    print("| module | mutants | killed | survived | no test | not checked | score |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['module']} | {r['mutants']} | {r['killed']} | {r['survived']} | {r['no_tests']} | "
              f"{r['not_checked']} | {100 * r['score']:.1f}% |")
    all_ = sum(r["mutants"] for r in rows)
    print(f"| all | {all_} | {sum(r['killed'] for r in rows)} | {sum(r['survived'] for r in rows)} | "
          f"{sum(r['no_tests'] for r in rows)} | {sum(r['not_checked'] for r in rows)} | "
          f"{100 * sum(r['killed'] for r in rows) / max(all_, 1):.1f}% |")
    if args.survivors:
        print("\nsurviving (or untested) mutants:")
        print("\n".join(survivors))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    # bad flags or files: one line and exit 2, as the panning command does; a bug keeps its traceback
    raise SystemExit(run_guarded(main, Path(__file__).name))

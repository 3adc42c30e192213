"""Summarise a scripts/gpu_check.sh run into DIR/summary.json, check that JSON, print a table.

Reads what gpu_check.sh left in DIR: machine.json (the GPU and versions), steps.tsv (one line per step: name, kind,
exit code, seconds, time limit, command), each step's log, pytest_cuda.xml (JUnit) and runs/<step>/ (train.py's
results.csv and args.json). Per step it decides passed / failed / skipped and extracts the numbers: tests passed,
whether NCCL really started, and for training runs the epoch seconds, images/s, test acc@1 per epoch and the
training seconds until test acc@1 first reached --target. Torch-free. Exit 0 when every step passed, 1 otherwise.

Example:
  python scripts/gpu_check_summary.py --out results/gpu_check
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import statistics
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from utils import cli  # noqa: E402
from utils.io import markdown_table, write_json  # noqa: E402

SCHEMA = 1
KINDS = ("pytest", "torchrun", "train")
STATUSES = ("passed", "failed", "skipped")
MOONSHOT_SECONDS = 10.0


def parse_args(argv=None):
    p = cli.OneLineErrorParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="results/gpu_check", help="the directory gpu_check.sh wrote (default: %(default)s)")
    p.add_argument("--target", type=cli.in_range(0, 1, low_open=True), default=0.93,
                   help="test acc@1 (fraction) for the time-to-target (default: %(default)s)")
    p.add_argument("--budget", type=cli.non_negative(float), default=None, help="the run's time budget in seconds, recorded in the summary")
    return p.parse_args(argv)


def read_steps(out: Path) -> list[dict]:
    """steps.tsv -> [{name, kind, rc, seconds, limit, command, optional}] (rc None for a step that did not run; its
    command column holds the reason)."""
    steps = []
    path = out / "steps.tsv"
    if not path.is_file():
        return steps
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        name, kind, rc, seconds, limit, command, optional = (line.split("\t") + [""] * 7)[:7]
        steps.append({"name": name, "kind": kind, "rc": None if rc in ("", "-") else int(rc),
                      "seconds": float(seconds or 0), "limit": float(limit or 0), "command": command,
                      "optional": optional.strip() == "1"})
    return steps


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def number(value) -> float | None:
    try:
        x = float(value)
    except (TypeError, ValueError):
        return None
    return x if math.isfinite(x) else None


def exit_text(step: dict) -> str:
    """How a step ended: `timeout` exits 124 (137 after its SIGKILL) when the time limit stopped the command."""
    if step["rc"] in (124, 137):
        return f"stopped at its time limit of {step['limit']:g} s"
    return f"exited {step['rc']}"


def pytest_result(step: dict, out: Path) -> dict:
    """Counts, failed test names and recorded properties from the JUnit XML."""
    xml = out / "pytest_cuda.xml"
    result = {"tests": 0, "passed": 0, "failed": 0, "errors": 0, "skipped": 0, "failures": [], "properties": {}}
    if not xml.is_file():
        log = out / f"{step['name']}.log"
        if log.is_file() and "No module named pytest" in log.read_text(errors="replace"):
            reason = "pytest is not installed for this Python: bring its wheels and pass --wheels DIR"
        else:
            reason = f"no {xml.name}: pytest did not finish ({exit_text(step)}; see {step['name']}.log)"
        return dict(result, status="failed", reason=reason)
    for case in ET.parse(xml).getroot().iter("testcase"):
        result["tests"] += 1
        test = f"{case.get('classname', '')}::{case.get('name', '')}"
        if case.find("skipped") is not None:
            result["skipped"] += 1
        elif case.find("failure") is not None or case.find("error") is not None:
            result["failed" if case.find("failure") is not None else "errors"] += 1
            result["failures"].append(test)
        else:
            result["passed"] += 1
        for prop in case.iter("property"):
            value = number(prop.get("value"))
            result["properties"][f"{case.get('name')}.{prop.get('name')}"] = value if value is not None else prop.get("value")
    problems = []
    if step["rc"] != 0:
        problems.append(exit_text(step))
    if result["tests"] == 0:
        problems.append("no test ran")
    if result["failed"] or result["errors"]:
        problems.append(f"{result['failed']} failed, {result['errors']} errors")
    if result["skipped"]:
        problems.append(f"{result['skipped']} skipped (on a GPU machine nothing may be skipped)")
    return dict(result, status="failed" if problems else "passed", reason="; ".join(problems))


def training_run(step: dict, out: Path, target: float, device: str = "cuda") -> dict:
    """The numbers of one train.py run: per epoch seconds, images/s and test acc@1; totals; time to `target`."""
    # the run's own directory, not train.py's <model>-latest link to it
    found = sorted(p for p in (out / "runs" / step["name"]).glob("*/*/results.csv") if not p.parent.is_symlink())
    log = out / f"{step['name']}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    if not found:
        return {"status": "failed", "reason": f"no results.csv under runs/{step['name']}/ (see {log.name})", "epochs": []}
    run_dir = found[0].parent
    rows = read_csv(found[0])
    args = json.loads((run_dir / "args.json").read_text()) if (run_dir / "args.json").is_file() else {}
    images = re.search(r"(\d+) train / (\d+) val images", text)
    train_images = int(images.group(1)) if images else None
    epochs, elapsed, to_target = [], 0.0, None
    for row in rows:
        seconds, acc1 = number(row.get("seconds")), number(row.get("val_acc1"))
        elapsed += seconds or 0.0
        epochs.append({"epoch": int(row["epoch"]), "seconds": seconds, "train_loss": number(row.get("train_loss")),
                       "images_per_s": train_images / seconds if train_images and seconds else None, "test_acc1": acc1})
        if to_target is None and acc1 is not None and acc1 >= target:
            to_target = {"seconds": round(elapsed, 2), "epochs": int(row["epoch"])}
    seconds = [e["seconds"] for e in epochs if e["seconds"]]
    accs = [e["test_acc1"] for e in epochs if e["test_acc1"] is not None]
    shown = re.search(r"^precision: (float16|bfloat16|float32)", text, re.M)  # train.py's start-up line: what really ran
    if shown:
        precision = {"float16": "fp16", "bfloat16": "bf16", "float32": "fp32"}[shown.group(1)]
    else:  # from the flags: --fp16 --amp_dtype auto is float16 on CUDA, bfloat16 on CPU
        amp_dtype = {"bfloat16": "bf16", "float16": "fp16"}.get(args.get("amp_dtype", "auto"), "fp16" if device == "cuda" else "bf16")
        precision = amp_dtype if args.get("fp16") else "fp32"
    result = {
        "model": args.get("model"), "img_size": args.get("img_size"), "batch_size": args.get("batch_size"),
        "precision": precision, "channels_last": bool(args.get("channels_last")), "compile": bool(args.get("compile")),
        "train_images": train_images, "epochs": epochs,
        "train_seconds": round(sum(seconds), 2) if seconds else None,
        "first_epoch_seconds": seconds[0] if seconds else None,
        # epochs after the first: no start-up, cuDNN autotuning or torch.compile compilation in them
        "steady_epoch_seconds": statistics.median(seconds[1:]) if len(seconds) > 1 else None,
        "images_per_s": round(train_images * len(seconds) / sum(seconds), 1) if train_images and seconds else None,
        "test_acc1": accs[-1] if accs else None, "best_test_acc1": max(accs) if accs else None,
        "target_acc1": target, "seconds_to_target": to_target["seconds"] if to_target else None,
        "epochs_to_target": to_target["epochs"] if to_target else None,
    }
    problems = []
    if step["rc"] != 0:
        problems.append(exit_text(step))
    expected = args.get("max_epoch")
    if expected is not None and len(epochs) != expected:
        problems.append(f"{len(epochs)} of {expected} epochs in results.csv")
    if any(e["seconds"] is None or e["train_loss"] is None for e in epochs):
        problems.append("a non-finite loss or time in results.csv")
    if not accs:
        problems.append("no test acc@1 was recorded")
    return dict(result, status="failed" if problems else "passed", reason="; ".join(problems))


def torchrun_result(step: dict, out: Path, target: float, device: str) -> dict:
    """A training run launched by torchrun; on a GPU, NCCL_DEBUG=INFO lines prove the NCCL communicator started."""
    result = training_run(step, out, target, device)
    log = out / f"{step['name']}.log"
    text = log.read_text(errors="replace") if log.is_file() else ""
    version = re.search(r"NCCL version ([0-9.]+\S*)", text)
    result["nccl_version"] = version.group(1) if version else None
    result["nccl_initialised"] = version is not None and "NCCL INFO" in text
    if device == "cuda" and not result["nccl_initialised"]:
        result["status"] = "failed"
        result["reason"] = "; ".join(filter(None, [result["reason"], "no NCCL INFO lines: NCCL never started"]))
    return result


def all_passed(steps: list[dict]) -> bool:
    """Every step passed, except optional ones that were skipped (an optional step that ran and failed counts)."""
    return bool(steps) and all(s.get("status") == "passed" or (s.get("optional") and s.get("status") == "skipped")
                               for s in steps)


def summarise(out: Path, target: float = 0.93, budget: float | None = None) -> dict:
    machine = json.loads((out / "machine.json").read_text()) if (out / "machine.json").is_file() else {}
    device = machine.get("device", "cuda")
    steps = []
    for step in read_steps(out):
        entry = {"name": step["name"], "kind": step["kind"], "optional": step["optional"], "rc": step["rc"],
                 "wall_seconds": step["seconds"], "limit_seconds": step["limit"], "command": step["command"],
                 "log": f"{step['name']}.log"}
        if step["rc"] is None:
            entry.update(status="skipped", reason=step["command"] or "not run")
        elif step["kind"] == "pytest":
            entry.update(pytest_result(step, out))
        elif step["kind"] == "torchrun":
            entry.update(torchrun_result(step, out, target, device))
        else:
            entry.update(training_run(step, out, target, device))
        steps.append(entry)
    reached = [(s["seconds_to_target"], s["name"]) for s in steps if s["kind"] == "train" and s.get("seconds_to_target") is not None]
    fastest = min(reached) if reached else None
    return {
        "schema": SCHEMA, "dry_run": device != "cuda", "machine": machine,
        "ok": all_passed(steps),
        "total_seconds": round(sum(s["wall_seconds"] for s in steps), 1), "budget_seconds": budget,
        "target_acc1": target,
        "fastest_to_target": {"step": fastest[1], "seconds": fastest[0]} if fastest else None,
        "moonshot": {"target_acc1": target, "within_seconds": MOONSHOT_SECONDS,
                     "met": bool(fastest and fastest[0] < MOONSHOT_SECONDS and device == "cuda")},
        "steps": steps,
    }


def check_summary(summary: dict) -> list[str]:
    """What is wrong with a summary (empty when it is complete and consistent)."""
    problems = []
    for key, kind in (("schema", int), ("dry_run", bool), ("machine", dict), ("ok", bool), ("steps", list),
                      ("target_acc1", float), ("moonshot", dict)):
        if not isinstance(summary.get(key), kind):
            problems.append(f"{key}: expected {kind.__name__}, got {type(summary.get(key)).__name__}")
    if problems:
        return problems
    names = [s.get("name") for s in summary["steps"]]
    if len(set(names)) != len(names):
        problems.append(f"step names repeat: {names}")
    for s in summary["steps"]:
        where = s.get("name", "?")
        if s.get("kind") not in KINDS:
            problems.append(f"{where}: unknown kind {s.get('kind')!r}")
        if s.get("status") not in STATUSES:
            problems.append(f"{where}: unknown status {s.get('status')!r}")
        if s.get("status") != "passed" and not s.get("reason"):
            problems.append(f"{where}: {s.get('status')} without a reason")
        if s.get("status") == "skipped":
            continue
        if s.get("kind") == "pytest" and s.get("status") == "passed" and not s.get("passed"):
            problems.append(f"{where}: passed with no passing test")
        if s.get("kind") in ("train", "torchrun") and s.get("status") == "passed":
            for key in ("train_seconds", "images_per_s", "test_acc1"):
                if not isinstance(s.get(key), (int, float)) or not math.isfinite(s[key]) or s[key] < 0:
                    problems.append(f"{where}: {key} missing or not a finite number")
            if isinstance(s.get("test_acc1"), (int, float)) and not 0 <= s["test_acc1"] <= 1:
                problems.append(f"{where}: test_acc1 {s['test_acc1']} is not a fraction")
    if summary["ok"] != all_passed(summary["steps"]):
        problems.append("ok disagrees with the steps' status")
    return problems


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 100 else f"{value:.4g}"
    return str(value)


def table(summary: dict) -> str:
    rows = []
    for s in summary["steps"]:
        if s["kind"] == "pytest":
            detail = f"{s.get('passed', 0)} passed, {s.get('failed', 0)} failed, {s.get('errors', 0)} errors, {s.get('skipped', 0)} skipped"
        elif s["status"] == "skipped" or not s.get("epochs"):
            detail = ""
        else:
            detail = (f"{s['model']} {s['img_size']} px {s['precision']}: {len(s['epochs'])} epochs, {cell(s['train_seconds'])} s "
                      f"({cell(s['images_per_s'])} img/s), test acc@1 {cell(s['test_acc1'])}, "
                      f"{summary['target_acc1']:.0%} after {cell(s['seconds_to_target'])} s")
            if s["kind"] == "torchrun":
                detail += f", NCCL {s.get('nccl_version') or 'not started'}"
        rows.append([s["name"], s["status"], cell(s["wall_seconds"]), detail or s.get("reason", "")])
    return markdown_table(["step", "status", "wall s", "result"], rows)


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    summary = summarise(out, args.target, args.budget)
    path = write_json(out / "summary.json", summary)
    problems = check_summary(json.loads(path.read_text()))
    machine = summary["machine"]
    print(f"GPU check on {machine.get('gpu', machine.get('device', '?'))}, torch {machine.get('torch', '?')}"
          + (" (DRY RUN on the CPU: proves nothing about CUDA)" if summary["dry_run"] else ""))
    print(table(summary))
    fastest = summary["fastest_to_target"]
    print(f"fastest to {summary['target_acc1']:.0%} test acc@1: "
          + (f"{fastest['step']} in {fastest['seconds']} s of training" if fastest else "none reached it"))
    print(f"summary: {path}")
    for problem in problems:
        print(f"error: summary.json: {problem}", file=sys.stderr)
    return 0 if summary["ok"] and not problems else 1


if __name__ == "__main__":
    sys.exit(main())

"""What the benchmark scripts share: configs, the commit measured, JSON, a run's last evaluation, one-line errors."""

from __future__ import annotations

import argparse
import datetime
import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as `python benchmarks/<script>.py` from a checkout without installing
    sys.path.insert(0, str(REPO))

# A tiny network (one block per stage, width 8) for the scripts' CPU checks.
TINY_NETWORK = ("model.stage_blocks=(1,1,1,1),model.width=8,model.aspp_channels=16,model.decoder_channels=16,"
                "model.low_level_channels=8,model.proj_dim=16,model.output_stride=8")


def log(message: str) -> None:
    print(message, flush=True)


def load_config(spec: str, extra_overrides: str = ""):
    """``path.py[:arg]`` → ``get_config(arg)``, as launch.py reads ``--config``; ``extra_overrides`` appended."""
    path, _, arg = spec.partition(":")
    if extra_overrides:
        arg = f"{arg},{extra_overrides}" if arg else extra_overrides
    file = Path(path)
    if not file.is_file() and (REPO / path).is_file():
        file = REPO / path
    if not file.is_file():
        raise FileNotFoundError(f"--config: no such config file {path!r}")
    module_spec = importlib.util.spec_from_file_location(f"_bench_config_{file.stem}", file)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module.get_config(arg or None)


def num_classes_of(config, override: int = 0) -> int:
    if override:
        return override
    if len(config.data.class_names):
        return len(config.data.class_names)
    from stpg_jax.data.palettes import palette_for

    try:  # a named dataset's palette has a colour per class
        return len(palette_for(config.data.dataset))
    except ValueError:
        raise ValueError(f"dataset {config.data.dataset!r}: pass --num_classes") from None


def git_commit(repo: Path = REPO, full: bool = False) -> str:
    """The checkout's commit, with ``-dirty`` when tracked files differ from it; $STPG_COMMIT wins (a device
    machine gets the working tree without its history). A figure measured with uncommitted changes says so."""
    if os.environ.get("STPG_COMMIT"):
        return os.environ["STPG_COMMIT"]
    try:
        out = subprocess.run(["git", "rev-parse", *([] if full else ["--short"]), "HEAD"], cwd=repo,
                             capture_output=True, text=True, timeout=10)
        commit = out.stdout.strip()
        if not commit:
            return "unknown"
        dirty = subprocess.run(["git", "diff", "--quiet", "HEAD", "--"], cwd=repo, capture_output=True, timeout=30)
        return commit + ("-dirty" if dirty.returncode == 1 else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def utc_now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def report_header(script: str, argv) -> dict:
    """Date, commit, host and command of a measurement: what every results file opens with."""
    return {"date": utc_now(), "commit": git_commit(), "host": f"{platform.node()} ({os.cpu_count()} CPUs)",
            "command": f"python benchmarks/{script} " + " ".join(sys.argv[1:] if argv is None else argv)}


def arg_parser(doc: str, config: str) -> argparse.ArgumentParser:
    """A script's parser, with the --config and --out that every benchmark takes."""
    p = argparse.ArgumentParser(description=doc.split("\n")[0])
    p.add_argument("--config", default=config,
                   help="config file, with the split and overrides after ':' (as launch.py takes it)")
    p.add_argument("--out", default="", help="write the results as JSON here")
    return p


def names_of(p: argparse.ArgumentParser, flag: str, text: str, allowed) -> list[str]:
    """The comma-separated names of ``flag``, each one of ``allowed`` (else the parser's error)."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    for n in names:
        if n not in allowed:
            p.error(f"{flag}: unknown {n!r}; choose from {', '.join(allowed)}")
    return names


def ints_of(p: argparse.ArgumentParser, flag: str, text: str) -> list[int]:
    """The distinct comma-separated integers >= 0 of ``flag`` (else the parser's error)."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        values = []
    if not values or min(values) < 0 or len(set(values)) < len(values):
        p.error(f"{flag}: distinct integers >= 0 separated by commas, got {text!r}")
    return values


def finish(report: dict, table: str, out: str = "", where: str = "") -> dict:
    """Prints a measurement's date, commit, host (``where`` after it), command and table; writes its JSON to
    ``out`` when given."""
    log(f"\n{report['date']} | commit {report['commit']} | host {report['host']}{where}\n"
        f"command: {report['command']}\n\n{table}")
    if out:
        write_json(out, report)
        log(f"wrote {out}")
    return report


def write_json(path: str, data: dict) -> None:
    """Writes ``data`` to ``path`` whole or not at all (a run stopped meanwhile leaves the previous file)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(f"{path}.tmp", "w") as f:
        json.dump(data, f, indent=1)
    os.replace(f"{path}.tmp", path)


def split_digest(workdir) -> str:
    """SHA-256 (16 hex digits) of the labelled ids a run trained on (its ``split_labeled.txt``)."""
    return hashlib.sha256((Path(workdir) / "split_labeled.txt").read_bytes()).hexdigest()[:16]


def last_eval(workdir: str) -> dict:
    """The run's ``eval_<step>.json`` (stpg_jax.train writes one per evaluation) with the highest step."""
    found = sorted((int(p.stem[len("eval_"):]), p) for p in Path(workdir).glob("eval_*.json")
                   if p.stem[len("eval_"):].isdigit())
    if not found:
        raise FileNotFoundError(f"{workdir}: no eval_<step>.json (the run did not finish its evaluation)")
    return json.loads(found[-1][1].read_text())


def start(argv: list[str], log_path: str, env: dict | None = None) -> subprocess.Popen:
    """``argv`` run from the repository root in its own process group (stopping the group stops a training run's
    loader workers too), its output into ``log_path``."""
    os.makedirs(os.path.dirname(log_path), exist_ok=True)
    with open(log_path, "w") as log:
        return subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def run_cli(main, *errors) -> None:
    """Runs a script's ``main``: a bad config, a missing file or one of ``errors`` ends it with one ``error:`` line
    and exit status 2; an integer that ``main`` returns is the exit status."""
    from stpg_jax.config import ConfigError

    try:
        code = main()
    except (ConfigError, FileNotFoundError, *errors) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)

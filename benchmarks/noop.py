"""A rerun on unchanged inputs against the cold run it repeats: `tokenmill run` end to end.

The cold run starts from an empty state dir (tokenizer, shards, training, evaluation, a new
registered version); each rerun finds every stage's verified output and registers nothing.
Both run as a user runs them, as `tokenmill run` processes with the embedded services, so
the figures include interpreter start-up, imports and the Prefect API. Next to them: what a
rerun cannot avoid, each measured alone in a fresh process: importing the modules a run
imports, and starting the embedded Prefect API on an existing database until it answers
(a run overlaps the two).

    .venv/bin/python benchmarks/noop.py                       # python-stdlib, default preset
    .venv/bin/python benchmarks/noop.py --preset tiny --reruns 3 --json noop.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BIN = Path(sys.executable).parent
IMPORTS = "import flows.pipeline, tasks.preprocess.stage, tasks.train.stage, tasks.evaluate.stage, tasks.registry"
START_API = (
    "from tokenmill import runtime; runtime.configure(); "
    "from tokenmill.embedded import start_embedded_services; start_embedded_services()()"
)


def timed(cmd: list[str], env: dict) -> tuple[float, str]:
    started = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")
    return seconds, done.stdout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--corpus", default="python-stdlib")
    p.add_argument("--preset", default="default")
    p.add_argument("--reruns", type=int, default=3)
    p.add_argument("--json", type=Path, default=None, help="Write the figures here as JSON.")
    args = p.parse_args()

    home = Path(tempfile.mkdtemp(prefix="tokenmill-noop-"))
    env = {**os.environ, "TOKENMILL_HOME": str(home), "TOKENMILL_PROGRESS": "0"}
    for name in ("PREFECT_API_URL", "MLFLOW_TRACKING_URI", "TOKENMILL_DASK_ADDRESS", "PREFECT_HOME"):
        env.pop(name, None)
    run = [str(BIN / "tokenmill"), "run", args.corpus, "--preset", args.preset, "--json"]

    cold, out = timed(run, env)
    first = json.loads(out.strip().splitlines()[-1])
    reruns = []
    for _ in range(args.reruns):
        seconds, out = timed(run, env)
        again = json.loads(out.strip().splitlines()[-1])
        assert again["model_version"] == first["model_version"], "a rerun registered a new version"
        reruns.append(seconds)
    imports = [timed([sys.executable, "-c", IMPORTS], env)[0] for _ in range(3)]
    api = [timed([sys.executable, "-c", START_API], env)[0] for _ in range(3)]

    best = min(reruns)
    report = {
        "date": time.strftime("%Y-%m-%d"),
        "machine": f"{platform.machine()} {os.cpu_count()} cores, {platform.processor() or platform.system()}",
        "command": " ".join(run[1:]),
        "cold_s": round(cold, 1),
        "rerun_s": [round(s, 1) for s in reruns],
        "rerun_over_cold": round(best / cold, 3),
        "imports_s": round(min(imports), 1),
        "embedded_api_start_s": round(min(api), 1),
        "model_version": first["model_version"],
        "state_dir": str(home),
    }
    print(json.dumps(report, indent=2))
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()

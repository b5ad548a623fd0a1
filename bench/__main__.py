"""`python -m bench [--quick] [--json PATH] [--only SCENARIO ...]`: run the scenarios, report.

Exit status: 0 when every sanity check holds (and, with `--strict`, every target), 1 when one
fails, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
import tempfile
import time
from pathlib import Path

from bench import env
from bench.fleet import fairness, fleet
from bench.payload import SECRET
from bench.procs import receiver_process
from bench.publisher import publisher
from bench.receiver import run
from bench.report import render_table, summary, write_json
from bench.retention import history, retention
from bench.scenarios import FULL, OPT_IN, QUICK, ROUNDED, SCENARIOS, Bench, Results, Sizes, topology
from engine.store.db import create_pool

__all__ = ["main"]

RECEIVER_ENDPOINTS = {"ok": 16, "fail": 2, "hang": 10}
SCENARIOS.update(retention=retention, history=history, fleet=fleet, fairness=fairness)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description="Benchmark the CargoLint Webhooks worker against this machine's limit.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes for CI, under a minute")
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the JSON summary here")
    parser.add_argument(
        "--only",
        nargs="+",
        choices=list(SCENARIOS),
        metavar="SCENARIO",
        help=f"run only these scenarios ({', '.join(SCENARIOS)})",
    )
    parser.add_argument(
        "--concurrency", type=int, help="in-flight requests for the limit client and the worker"
    )
    parser.add_argument(
        "--log-level", default="INFO", help="the worker's CARGOLINT_LOG_LEVEL [INFO, its default]"
    )
    parser.add_argument(
        "--rate", type=float, help="paced scenarios' events/s [half of measured throughput]"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="sample each worker with py-spy into DIR/<scenario>.txt (collapsed stacks)",
    )
    parser.add_argument("--keep-logs", action="store_true", help="keep the worker logs folder")
    parser.add_argument("--strict", action="store_true", help="also exit 1 when a target fails")
    return parser


async def _run(args: argparse.Namespace, sizes: Sizes, workdir: Path) -> Results:
    # This process stamps the paced messages: a full collection of its garbage (57 to 68 ms seen
    # here) in the middle of a tick would be counted as the engine's latency. It collects
    # between scenarios instead (`_scenario`).
    gc.disable()
    try:
        return await _scenarios(args, sizes, workdir)
    finally:
        gc.enable()


async def _scenarios(args: argparse.Namespace, sizes: Sizes, workdir: Path) -> Results:
    results = Results()
    certs = env.certificates(workdir)
    async with (
        env.database() as database_url,
        env.vhost() as amqp_url,
        receiver_process(certs.cert, certs.key, SECRET, **RECEIVER_ENDPOINTS) as receiver,
        publisher(amqp_url) as pub,
    ):
        pool = await create_pool(database_url, min_size=1, max_size=4)
        try:
            bench = Bench(
                sizes=sizes,
                certs=certs,
                database_url=database_url,
                amqp_url=amqp_url,
                pool=pool,
                receiver=receiver,
                publisher=pub,
                workdir=workdir,
                log_level=args.log_level,
                rate=args.rate,
                profile=args.profile,
                results=results,
            )
            await topology(bench)
            chosen = (
                [n for n in SCENARIOS if n in args.only]
                if args.only
                else [n for n in SCENARIOS if n not in OPT_IN]
            )
            rounded = [name for name in chosen if name in ROUNDED]
            for round_ in range(sizes.rounds):
                bench.round = round_
                for name in rounded:
                    await _scenario(bench, name)
            for name in chosen:
                if name not in ROUNDED:
                    await _scenario(bench, name)
        finally:
            await pool.close()
    return results


async def _scenario(bench: Bench, name: str) -> None:
    results = bench.results
    started = time.perf_counter()
    rounds = f" (round {bench.round + 1} of {bench.sizes.rounds})" if name in ROUNDED else ""
    print(f"· {name}{rounds} …", file=sys.stderr, flush=True)
    gc.collect()
    try:
        await SCENARIOS[name](bench)
    except Exception as exc:  # one broken scenario must not hide the others
        results.check(f"{name}: ran", False, f"{type(exc).__name__}: {exc}")
        with contextlib.suppress(Exception):
            await bench.after_worker()
    spent = results.extra.get(f"{name}_scenario_s", 0.0) + time.perf_counter() - started
    results.extra[f"{name}_scenario_s"] = round(spent, 2)


async def _main(args: argparse.Namespace, sizes: Sizes, workdir: Path) -> Results:
    # SIGTERM cancels the run like Ctrl-C does, so every cleanup step still runs.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    return await _run(args, sizes, workdir)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["--"]:  # `cargolint-webhooks bench -- --quick` passes the separator on
        argv = argv[1:]
    args = _parser().parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.concurrency:
        sizes = Sizes(**{**sizes.__dict__, "concurrency": args.concurrency})
    logging.basicConfig(level=logging.WARNING)
    started = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="cargolint-bench-"))
    if args.profile is not None:
        args.profile.mkdir(parents=True, exist_ok=True)
    try:
        results = run(_main(args, sizes, workdir))
    except KeyboardInterrupt:
        return 130
    finally:
        if not args.keep_logs:
            for path in workdir.iterdir():
                path.unlink()
            workdir.rmdir()
        else:
            print(f"worker logs kept in {workdir}", file=sys.stderr)
    body = summary(results, sizes, args.quick, time.perf_counter() - started)
    print(render_table(results, args.quick))
    if args.json:
        write_json(args.json, body)
    if not body["sanity_ok"]:
        return 1
    if args.strict and not all(t["pass"] for t in body["targets"].values()):
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Scale-out benchmark (issue 20): 1, 2 and 4 `batchgen run` processes on one PostgreSQL store
and one simulator account, and the store's cost per job on PostgreSQL beside SQLite.

    python tests/perf/scaleout.py            # 2,000 jobs of 1 s, account cap 200, -c 50 each
    python tests/perf/scaleout.py --quick    # tiny sizes: checks the script works, proves nothing

The account allows 200 jobs at once and each runner at most 50 (`--concurrency 50`): one runner
is the limit, so N runners should finish in about ceil(jobs / min(200, 50 N)) x 1 s. Prints each
makespan over that bound beside its target (4 runners <= 1.15, 2 runners <= 1.15), the most jobs
the simulator saw in flight for the account, and the store's cost per job (claim, submitted,
result with its files) on both backends, measured in one process with 50 jobs at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import resource
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]

from bench import SimProcess, batchgen_cmd, bench_env, write_manifest  # noqa: E402
from pgserver import PgServer, _bindir  # noqa: E402

TARGETS = {2: 1.15, 4: 1.15}


def run_fleet(pg: PgServer, scratch: Path, runners: int, jobs: int, duration: float, account: int,
              per_runner: int) -> tuple[float, float, int]:
    """(makespan, bound, most in flight at the simulator) of ``runners`` processes on one store."""
    url = pg.new_database()
    with SimProcess(duration=duration, concurrency=account) as sim:
        work = scratch / f"fleet{runners}"
        work.mkdir(parents=True)
        manifest = work / "bench.yaml"
        write_manifest(manifest, sim.images[0], jobs)
        # Recorded once before the clock starts: each runner would record the same rows again.
        subprocess.run(batchgen_cmd("--store", url, "run", str(manifest), "--api-url", sim.base_url,
                                    "-w", str(work / "w"), "--max-jobs", "0", "-q"),
                       env=bench_env(), capture_output=True, check=False)
        start = time.time()
        cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sim_cpu0 = sim.cpu()
        procs = [subprocess.Popen(batchgen_cmd(
            "--store", url, "--outputs", str(work / "out"), "--account-concurrency", str(account),
            "run", "--api-url", sim.base_url, "-w", str(work / f"w{i}"),
            "-c", str(per_runner), "--downloads", str(per_runner), "--rate", "0", "-q"),
            env=bench_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for i in range(runners)]
        for p in procs:
            out, _ = p.communicate()
            if p.returncode != 0:
                raise SystemExit(f"batchgen run failed ({p.returncode}):\n{out}")
        makespan = time.time() - start
        cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        runners_cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
        sim_cpu = sim.cpu() - sim_cpu0
        with urllib.request.urlopen(sim.root_url + "/_sim/stats", timeout=60) as resp:
            stats = json.loads(resp.read())
        reqs = sim.requests()["requests"]
        first = min(r["submitted_at"] for r in reqs) - start
        last = start + makespan - max(r["finished_at"] or 0 for r in reqs)
        print(f"  first submit {first:.2f} s after the start; last job finished {last:.2f} s before the end; "
              f"CPU: runners {runners_cpu:.1f} s, simulator {sim_cpu:.1f} s (2 cores: {2 * makespan:.0f} s)",
              flush=True)
    bound = math.ceil(jobs / min(account, per_runner * runners)) * duration
    return makespan, bound, max(stats["max_in_flight"].values())


async def store_cost(where: str | Path, jobs: int) -> float:
    """Seconds of store work per job: add, claim, submitted, result with its file, 50 at a time."""
    sys.path.insert(0, str(HERE.parent))
    from conftest import Spec, add_jobs

    from batchgen.store import IN_QUEUE, Output, Store

    async with await Store.open(where, api="bench") as store:
        await store.upsert_batch("b", "m/x", None, {})
        start = time.perf_counter()
        await add_jobs(store, "b", [Spec(f"k{i}", i) for i in range(jobs)])

        async def one(job) -> None:
            await store.transition(job, IN_QUEUE, expect=("submitting",), request_id=f"r{job.id}",
                                   submitted_at=time.time())
            await store.record_downloaded(job, [Output(job.id, 0, "video", "http://x/v.mp4", f"b/{job.key}.mp4",
                                                       1000, "0" * 64)], cost=0.1, finished_at=time.time())

        while claimed := await store.claim_many(["b"], time.time(), 50):
            await asyncio.gather(*(one(j) for j in claimed))
        return (time.perf_counter() - start) / jobs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--fleets", default="1,2,4")
    a = ap.parse_args()
    jobs, duration = (200, 0.2) if a.quick else (2000, 1.0)
    pg = PgServer(_bindir())
    pg.start()
    try:
        with tempfile.TemporaryDirectory(prefix="batchgen-scaleout-") as tmp:
            scratch = Path(tmp)
            for n in (int(x) for x in a.fleets.split(",")):
                makespan, bound, most = run_fleet(pg, scratch, n, jobs, duration, 200, 50)
                target = TARGETS.get(n)
                met = target is not None and makespan / bound <= target
                verdict = "" if target is None else f"target <= {target}: {'met' if met else 'MISSED'}"
                print(f"{n} runner(s), {jobs} jobs of {duration:g} s, -c 50 each, account 200: makespan "
                      f"{makespan:.1f} s / bound {bound:.1f} s = {makespan / bound:.3f}  {verdict}  "
                      f"(most in flight at the simulator: {most})", flush=True)
            n = 500 if a.quick else 5000
            pg_cost = asyncio.run(store_cost(pg.new_database(), n))
            lite_cost = asyncio.run(store_cost(scratch / "s.sqlite3", n))
            print(f"store cost per job ({n} jobs, 50 at a time): PostgreSQL {pg_cost * 1e3:.2f} ms, "
                  f"SQLite {lite_cost * 1e3:.2f} ms ({pg_cost / lite_cost:.1f}x)")
    finally:
        pg.stop()


if __name__ == "__main__":
    main()

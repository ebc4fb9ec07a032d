"""Reports and galleries of a 100,000-job batch (issue 18): each figure beside its target.

    python tests/perf/scale.py             # 100,000 jobs
    python tests/perf/scale.py --jobs 2000 # smaller: checks the script works, proves little

The batch is the quick start run for real under --simulate (6 jobs, real MP4 outputs), then grown
in SQLite to N jobs (every tenth failed, the others sharing the real outputs), which takes
seconds instead of the hours a real run of 100,000 jobs would. Then the real `batchgen report` and
`batchgen gallery` commands run in processes of their own: wall time and peak RSS (os.wait4).
Last, the page in a real headless Chromium over the DevTools protocol (the CI test's client):
navigate to the load event, and a search and a state filter applied, timed inside the page.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))
from bench import ROOT, Report, batchgen_cmd, bench_env, run_measured, section  # noqa: E402
from bigbatch import grow_batch  # noqa: E402


def grow(work: Path, n: int) -> Path:
    """The quick start under --simulate, grown to ``n`` jobs; the store's path."""
    use = run_measured([*batchgen_cmd("run", str(ROOT / "sample_manifests" / "quickstart.yaml"), "--simulate",
                                      "--workdir", str(work), "-q")], env=bench_env())
    if use.rc != 0:
        raise SystemExit(f"batchgen run failed ({use.rc}):\n{use.output}")
    db = work / "simulated" / "batchgen.sqlite3"
    grow_batch(db, n)
    return db


def measure(rep: Report, label: str, cmd: list[str], wall: float, rss: float) -> None:
    use = run_measured(cmd, env=bench_env())
    if use.rc != 0:
        raise SystemExit(f"{label} failed ({use.rc}):\n{use.output}")
    rep.target(f"{label}: wall time, s", use.wall, wall, ".2f")
    rep.target(f"{label}: peak RSS, MB", use.maxrss_mb, rss, ".0f")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--jobs", type=int, default=100_000)
    p.add_argument("--only", default="report,gallery,browser")
    p.add_argument("--scratch", default=None)
    args = p.parse_args()
    only = set(args.only.split(","))
    work = Path(tempfile.mkdtemp(prefix="batchgen-scale-", dir=args.scratch))
    rep = Report()
    try:
        started = time.monotonic()
        grow(work / "w", args.jobs)
        print(f"a batch of {args.jobs} jobs made in {time.monotonic() - started:.1f}s")
        wd = ["--workdir", str(work / "w")]
        if "report" in only:
            section(f"report of {args.jobs} jobs")
            for ext in ("csv", "jsonl", "parquet"):
                measure(rep, f"batchgen report -o r.{ext}",
                        [*batchgen_cmd("report", "quickstart", "-o", str(work / f"r.{ext}"), *wd)], 5.0, 250)
        if "gallery" in only or "browser" in only:
            section(f"gallery of {args.jobs} jobs")
            measure(rep, "batchgen gallery", [*batchgen_cmd("gallery", "quickstart", *wd)], 5.0, 250)
            page = work / "w" / "simulated" / "quickstart" / "gallery.html"
            sizes = sum(f.stat().st_size for f in page.parent.glob("gallery*"))
            rep.figure("gallery page and data files", f"{sizes / 1e6:.1f} MB")
        if "browser" in only:
            section("the page in headless Chromium (DevTools protocol)")
            asyncio.run(browse(rep, page, work / "profile"))
        print(f"\n{'all targets met' if not rep.missed else 'MISSED: ' + ', '.join(rep.missed)}")
        return 1 if rep.missed else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


async def browse(rep: Report, page_path: Path, profile: Path) -> None:
    from test_gallery import chromium, open_page

    async with chromium(profile) as cdp:
        started = time.monotonic()
        page = await open_page(cdp, page_path.as_uri())
        rep.target("navigate to load event, s", time.monotonic() - started, 2.0, ".2f")
        await page.wait_for("document.querySelectorAll('.card').length > 0", "the first cards")
        rep.figure("cards in the DOM", str(await page.evaluate("document.querySelectorAll('.card').length")))
        for label, script in (
            ("search 'scene 4242'", "document.getElementById('search').value = 'scene 4242';"
                                    "document.getElementById('search').dispatchEvent(new Event('input'))"),
            ("filter failed", "document.querySelector('button[data-filter=\"failed\"]').click()"),
            ("filter all, search cleared", "document.getElementById('search').value = '';"
                                           "document.getElementById('search').dispatchEvent(new Event('input'));"
                                           "document.querySelector('button[data-filter=\"all\"]').click()"),
        ):
            # Timed in the page, up to the next frame painted: the work of the search, not the
            # round trips of the protocol.
            ms = await page.evaluate(f"new Promise(done => {{ const t = performance.now(); {script};"
                                     " requestAnimationFrame(() => setTimeout(() => done(performance.now() - t)));"
                                     " })")
            rep.target(f"{label}, ms", ms, 200, ".0f")
        assert page.errors() == [], page.errors()


if __name__ == "__main__":
    sys.exit(main())

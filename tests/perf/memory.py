"""Peak memory of a run whose local images go inline as data: URIs (issue 15).

    python tests/perf/memory.py            # 200 distinct 4.5 MB images at --concurrency 50
    python tests/perf/memory.py --quick    # 10 images at --concurrency 5: checks the script works

The real `batchgen run` command runs against `batchgen simulate` (a process of its own, which
decodes every data: URI and checks it, as the service would); the figure is the peak RSS of the
batchgen process alone (os.wait4). Beside it, the same run over one small image (13 KB): what
batchgen holds for the jobs themselves. Target: 150 MB + 2 x concurrency x 6 MB (two
base64 copies of a Dreamina-sized image per submit in flight); streaming from the file holds
about one 1 MiB chunk per submit instead.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from bench import MODEL, ROOT, batchgen_cmd, bench_env, run_measured  # noqa: E402

SIDE = 1224  # 1224 x 1224 RGB noise: a 4.5 MB PNG that no compressor can shrink, under 4.7 MB


def make_images(folder: Path, n: int) -> list[Path]:
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = folder / f"img{i:04d}.png"
        Image.frombytes("RGB", (SIDE, SIDE), os.urandom(SIDE * SIDE * 3)).save(path, compress_level=1)
        paths.append(path)
    return paths


def measure(work: Path, images: list[str], concurrency: int, label: str) -> float:
    import yaml

    sim = subprocess.Popen([*batchgen_cmd("simulate", "--port", "0", "--duration", "1",
                                          "--concurrency", str(concurrency))],
                           env=bench_env(), stderr=subprocess.PIPE, text=True)
    try:
        assert sim.stderr is not None
        line = sim.stderr.readline()
        if "listening on" not in line:
            raise SystemExit(f"the simulator did not start: {line}{sim.stderr.read()}")
        api_url = line.split("listening on ", 1)[1].split()[0]
        manifest = work / f"{label}.yaml"
        manifest.write_text(yaml.safe_dump({
            "name": label, "model": MODEL,
            "jobs": [{"prompt": f"memory job {i}", "image": img, "seed": i} for i, img in enumerate(images)],
        }))
        use = run_measured([*batchgen_cmd("run", str(manifest), "--api-url", api_url,
                                          "--workdir", str(work / f"jobs-{label}"), "--concurrency",
                                          str(concurrency), "--rate", "0", "-q")], env=bench_env())
        if use.rc != 0:
            raise SystemExit(f"batchgen run failed ({use.rc}):\n{use.output}")
        print(f"  {label:<8} {len(images)} jobs in {use.wall:5.1f}s, CPU {use.cpu:5.1f}s, "
              f"peak RSS {use.maxrss_mb:6.0f} MB")
        return use.maxrss_mb
    finally:
        sim.terminate()
        sim.communicate(timeout=10)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--scratch", default=None, help="folder for the images and work directories")
    args = p.parse_args()
    n, concurrency = (10, 5) if args.quick else (200, 50)
    work = Path(tempfile.mkdtemp(prefix="batchgen-mem-", dir=args.scratch))
    try:
        started = time.monotonic()
        images = make_images(work / "images", n)
        size = sum(p.stat().st_size for p in images) / len(images)
        print(f"{n} distinct images of {size / 1e6:.2f} MB each, --concurrency {concurrency} "
              f"(made in {time.monotonic() - started:.0f}s)")
        small = shutil.copy(ROOT / "sample_manifests" / "images" / "street.jpg", work / "street.jpg")
        measure(work, [str(small)] * n, concurrency, "small")
        inline = measure(work, [str(p) for p in images], concurrency, "inline")
        target = 150 + 2 * concurrency * 6
        verdict = "met" if inline < target else "MISSED"
        print(f"peak RSS with {n} local images inline: {inline:.0f} MB (target {target} MB: {verdict})")
        return 0 if inline < target else 1
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

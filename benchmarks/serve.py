"""`dinoseek serve` against the Python API it wraps, on one synthetic library.

    python benchmarks/serve.py                                   # 20,000 vectors, 10,000 groups, ~1 min
    python benchmarks/serve.py --n 200000 --groups 10000 --clients 1 4 16 --keep /tmp/bench-serve

1. Search by an indexed image's id under N concurrent clients (threads): the in-process Python API
   (`row_vector` + `search`, what the endpoint runs) vs HTTP (`GET /api/search?id=`, one httpx
   client per thread) to the real app on uvicorn in this process. Requests/s, p50/p99 latency, and
   the HTTP/API ratios (the cost of the server layer: routing, JSON, the loopback socket, and the GIL
   the clients share with the server).
2. The review page with `--groups` duplicate groups (planted near-copy pairs, cosine ~0.98):
   `find_duplicates` in process, then the groups API cold (candidate pairs + grouping), warm (a
   cached plan), on the last page, and at another threshold (regrouped from the cached pairs); then,
   where Playwright and Debian's `chromium` are installed, the page itself in headless Chromium:
   time from navigation until the first page of groups is on screen, and for "next".
Peak RSS after each part (the server runs in this process, so it counts it all).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import socket
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from dinoseek.indexer.library import Library  # noqa: E402
from dinoseek.retrieval.api import LibrarySearch  # noqa: E402
from dinoseek.retrieval.dedup import find_duplicates  # noqa: E402
from synthetic_library import build  # noqa: E402


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def percentile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q)) * 1000  # ms


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RunningServer:
    """The real app on uvicorn in a background thread, as `dinoseek serve` runs it."""

    def __init__(self, root: Path):
        import uvicorn
        from dinoseek.retrieval.server import create_app

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        app = create_app(root, host="127.0.0.1", port=port)
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> RunningServer:
        self.thread.start()
        while not self.server.started:
            if not self.thread.is_alive():
                raise SystemExit("the server did not start")
            time.sleep(0.05)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)


def concurrent(call, ids: list[int], clients: int) -> tuple[float, list[float]]:
    """Run call(client_state, id) for every id, spread over `clients` threads: (seconds, latencies)."""
    chunks = [ids[i::clients] for i in range(clients)]
    latencies: list[list[float]] = [[] for _ in range(clients)]

    def worker(index: int) -> None:
        state = call.setup() if hasattr(call, "setup") else None
        try:
            for row_id in chunks[index]:
                start = time.perf_counter()
                call(state, row_id)
                latencies[index].append(time.perf_counter() - start)
        finally:
            if state is not None:
                state.close()

    start = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(worker, range(clients)))
    return time.perf_counter() - start, [x for part in latencies for x in part]


def search_benchmark(root: Path, url: str, n: int, clients_list: list[int], requests: int, k: int) -> None:
    rng = np.random.default_rng(3)
    print(f"\n## search by id, k={k}, {requests} requests per row")
    print(f"{'clients':>8}{'API req/s':>12}{'HTTP req/s':>12}{'ratio':>8}{'API p50':>10}{'API p99':>10}"
          f"{'HTTP p50':>10}{'HTTP p99':>10}{'p50 ratio':>11}")
    with Library.open(root) as library, LibrarySearch(library) as lib:
        lib.search(lib.row_vector(1, "cls")[1], k=k)  # warm: indexes loaded

        def python_api(_, row_id):
            _, vector = lib.row_vector(row_id, "cls")
            hits = lib.search(vector, k=k)
            assert hits[0].id == row_id or hits[0].score >= 0.999

        def http(client, row_id):
            response = client.get(f"{url}/api/search", params={"id": row_id, "k": k})
            response.raise_for_status()
            hits = response.json()["hits"]
            assert hits[0]["id"] == row_id or hits[0]["score"] >= 0.999

        http.setup = lambda: httpx.Client(timeout=60)
        http(http.setup(), 1)  # warm: the server's reader opened
        for clients in clients_list:
            ids = [int(i) for i in rng.integers(1, n + 1, requests)]
            api_s, api_lat = concurrent(python_api, ids, clients)
            http_s, http_lat = concurrent(http, ids, clients)
            api_rps, http_rps = requests / api_s, requests / http_s
            print(f"{clients:>8}{api_rps:>12.0f}{http_rps:>12.0f}{http_rps / api_rps:>7.2f}x"
                  f"{percentile(api_lat, 50):>8.1f}ms{percentile(api_lat, 99):>8.1f}ms"
                  f"{percentile(http_lat, 50):>8.1f}ms{percentile(http_lat, 99):>8.1f}ms"
                  f"{percentile(http_lat, 50) / percentile(api_lat, 50):>10.1f}x")
    print(f"# peak RSS {rss_mb():.0f} MB")


def timed_get(client: httpx.Client, url: str, **params) -> tuple[float, dict]:
    start = time.perf_counter()
    response = client.get(url, params=params)
    response.raise_for_status()
    return time.perf_counter() - start, response.json()


def review_benchmark(root: Path, url: str, threshold: float, expected_groups: int) -> None:
    print(f"\n## review page, threshold {threshold}")
    rows = []
    start = time.perf_counter()
    with Library.open(root) as library:
        groups = find_duplicates(library, threshold=threshold)
    reference = time.perf_counter() - start
    rows.append(("find_duplicates (Python API, whole plan)", reference, len(groups)))
    with httpx.Client(timeout=600) as client:
        api = f"{url}/api/groups"
        cold, data = timed_get(client, api, threshold=threshold, offset=0, limit=50)
        rows.append(("GET /api/groups cold (pairs + grouping)", cold, data["total_groups"]))
        warm, first = timed_get(client, api, threshold=threshold, offset=0, limit=50)
        rows.append(("GET /api/groups warm, first page", warm, len(first["groups"])))
        last = max(0, data["total_groups"] - 50)
        tail, page = timed_get(client, api, threshold=threshold, offset=last, limit=50)
        rows.append((f"GET /api/groups warm, offset {last}", tail, len(page["groups"])))
        other, regrouped = timed_get(client, api, threshold=round(threshold + 0.01, 3), offset=0, limit=50)
        rows.append((f"GET /api/groups threshold {threshold + 0.01:.2f} (cached pairs)", other, regrouped["total_groups"]))
    if data["total_groups"] != len(groups):
        print(f"# MISMATCH: the API has {data['total_groups']} groups, find_duplicates {len(groups)}")
    if len(groups) != expected_groups:
        print(f"# note: {len(groups)} groups found, {expected_groups} planted")
    rows += browser_rows(url, threshold)
    print(f"{'step':<52}{'seconds':>9}{'vs Python':>11}{'groups':>9}")
    for name, seconds, count in rows:
        ratio = "" if seconds is None else f"{seconds / reference:.2f}x"
        shown = "skipped" if seconds is None else f"{seconds:.3f}"
        print(f"{name:<52}{shown:>9}{ratio:>11}{count if count is not None else '':>9}")
    print(f"# peak RSS {rss_mb():.0f} MB")


def browser_rows(url: str, threshold: float) -> list[tuple]:
    executable = shutil.which("chromium")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        executable = None
    if executable is None:
        return [("review page in Chromium (needs playwright + chromium)", None, None)]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=executable, headless=True)
        page = browser.new_page(viewport={"width": 1200, "height": 800})
        page.route("**/thumb/**", lambda route: route.fulfill(status=404, body=""))  # synthetic rows have no files
        start = time.perf_counter()
        page.goto(f"{url}/?threshold={threshold}")
        page.wait_for_selector(".group:nth-child(50)")
        first = time.perf_counter() - start
        rendered = page.locator(".group").count()
        title = page.locator(".group .title").first
        start = time.perf_counter()
        page.locator("#pager-top .next").click()
        while not title.inner_text().startswith("Group 51 "):
            time.sleep(0.005)
        following = time.perf_counter() - start
        browser.close()
    return [("review page in Chromium: first page on screen", first, rendered),
            ("review page in Chromium: next page", following, rendered)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=20_000, help="Vectors in the library.")
    parser.add_argument("--groups", type=int, default=10_000, help="Planted near-duplicate pairs (<= n/2).")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--requests", type=int, default=400, help="Search requests per row of the table.")
    parser.add_argument("-k", type=int, default=10)
    parser.add_argument("--threshold", type=float, default=0.95)
    parser.add_argument("--keep", type=Path, help="Build the library here once and reuse it.")
    args = parser.parse_args()
    if not 0 < args.groups <= args.n // 2:
        parser.error(f"--groups must be in 1..{args.n // 2} (n/2), got {args.groups}")
    folder = args.keep or Path(tempfile.mkdtemp(prefix="dinoseek-serve-"))
    print(f"# {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"{args.n:,} x {args.dim} unit vectors, {args.groups:,} planted pairs")
    root = build(folder, args.n, args.dim, duplicates=args.groups / args.n)
    print(f"# peak RSS {rss_mb():.0f} MB after building")
    with RunningServer(root) as server:
        search_benchmark(root, server.url, args.n, args.clients, args.requests, args.k)
        review_benchmark(root, server.url, args.threshold, args.groups)
    if args.keep is None:
        shutil.rmtree(folder, ignore_errors=True)
    else:
        print(f"# library kept in {folder}")


if __name__ == "__main__":
    main()

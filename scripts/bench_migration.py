"""Live migration benchmark: the pause a streaming client sees when its session moves.

Two real vLLM servers of the same model, fastvllm's router in front. By default they are
what a fastvllm fleet runs: two snapshots taken (`fastvllm.snapshot`: launch, warm up,
canary, checkpoint) from servers on two ports, then both restored (`fastvllm.restore`;
CRIU gives a restored server its original port, so one snapshot cannot serve twice on one
host). `--cold` measures two freshly launched servers instead.

Each repetition streams one greedy completion through the router, migrates it to the other
server after `--after` tokens, and checks the client's tokens against an unmigrated run
(identical, none lost or repeated). Repetitions go on until `--switches` migrations have
switched (a stream can end on its source before the catch-up does) or `--max-reps` ran.
Reported: the pause at the switch (last token from the source to the first from the target,
at the router), next to the mean gap between tokens of the same stream, and the catch-up
rounds. Each repetition also streams once through the router without a migration. That
stream's largest gap between chunks is the yardstick: on a host short of cores, vLLM's own
stream can stall too. Medians go to JSON and a PNG chart.

    python -m fastvllm.scripts.bench_migration --switches 10 --out results/migration
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
from fastvllm.runtime import instances, proctree, system, vllm_server
from fastvllm.runtime.tiny_model import resolve_model
from fastvllm.scheduler.router import MIGRATE_AFTER_HEADER, SESSION_HEADER

import fastvllm

PROMPT = "The history of the lighthouse keeper begins"


def _stream(url: str, body: dict[str, Any], after: int = 0) -> tuple[list[int], str, float]:
    """(token ids, session id, largest gap in seconds between two chunks as this client got
    them) of a streamed completion; `after`: the router migrates it then."""
    got: list[int] = []
    headers = {MIGRATE_AFTER_HEADER: str(after)} if after else {}
    last, gap = None, 0.0
    with httpx.stream(
        "POST", f"{url}/v1/completions", json=body | {"stream": True}, headers=headers, timeout=300
    ) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                now = time.perf_counter()
                gap = max(gap, now - last) if last is not None else gap
                last = now
                got.extend(json.loads(line[6:])["choices"][0].get("token_ids") or [])
        return got, r.headers.get(SESSION_HEADER, ""), gap


class _RunningWatch:
    """Polls the servers' /metrics while a migrated stream runs and keeps, per server, the last
    moment it was still running a request: how long the source goes on generating after the
    router closed its stream (vLLM aborts a request once its API server notices the disconnect)."""

    def __init__(self, base_urls: list[str]) -> None:
        self.urls = base_urls
        self.last_running: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=5) as c:
            while not self._stop.is_set():
                for url in self.urls:
                    t = time.perf_counter()
                    with contextlib.suppress(httpx.HTTPError):
                        for line in c.get(f"{url}/metrics").text.splitlines():
                            if line.startswith("vllm:num_requests_running") and float(line.split()[-1]) >= 1:
                                self.last_running[url] = t
                self._stop.wait(0.02)

    def __enter__(self) -> _RunningWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _launch(model: str, port: int, log: Path, dtype: str) -> vllm_server.Server:
    s = vllm_server.launch(vllm_server.LaunchSpec(model, port, extra_args=["--dtype", dtype]), log)
    vllm_server.wait_healthy(s, 900.0, alive=lambda: proctree.alive(s.pid))
    return s


def _restored(model: str, ports: tuple[int, int], work: Path, dtype: str) -> list[vllm_server.Server]:
    """Snapshot a server on each port (two cold starts at once), then restore both. Each gets
    cores of its own where the host has enough (vLLM's CPU backend binds its worker's threads;
    left to `auto`, two servers on a 2-core host both bind core 0, and the target's catch-up
    prefill then waits behind the source's decoding: the two stand in for two hosts)."""
    snaps = [work / f"snap-{p}" for p in ports]
    with ThreadPoolExecutor(2) as ex:
        futs = [
            ex.submit(
                fastvllm.snapshot,
                model,
                out=snap,
                port=p,
                vllm_args=["--dtype", dtype],
                env=vllm_server.cpu_bind_env(i, len(ports)),
            )
            for i, (snap, p) in enumerate(zip(snaps, ports, strict=True))
        ]
        for f in futs:
            f.result()
    out = []
    for snap in snaps:
        res = fastvllm.restore(snap, keep_affinity=True)
        assert isinstance(res, fastvllm.RestoreResult) and res.canary_ok
        out.append(res.server)
    return out


def run(
    model: str,
    switches: int,
    max_reps: int,
    after: int,
    max_tokens: int,
    ports: tuple[int, int],
    out: Path | None,
    dtype: str,
    cold: bool = False,
) -> dict[str, Any]:
    system.ensure_io_uring_disabled()
    proctree.adopt_orphans()
    path = resolve_model(model)
    work = Path(tempfile.mkdtemp(prefix="fastvllm-bench-migration-"))
    servers: list[vllm_server.Server] = []
    router: subprocess.Popen[str] | None = None
    unmigrated: list[float] = []  # the largest gap of a stream no one migrates, same path
    try:
        if cold:
            with ThreadPoolExecutor(2) as ex:
                futs = [ex.submit(_launch, path, p, work / f"server-{p}.log", dtype) for p in ports]
                for f in futs:
                    servers.append(f.result())
        else:
            servers = _restored(str(path), ports, work, dtype)
        name = vllm_server.served_model_name(servers[0])
        # the router in its own process, as in the Ray runtime (an actor): a client in the same
        # interpreter would share its GIL and slow it
        rport = ports[0] + 50
        argv = [sys.executable, "-m", "fastvllm.scheduler.router", "--port", str(rport)]
        argv += [a for s in servers for a in ("--instance", f"{s.base_url}={name}")]
        router = subprocess.Popen(argv, stdout=subprocess.PIPE, text=True)
        assert router.stdout is not None and router.stdout.readline().startswith("router at")
        url = f"http://127.0.0.1:{rport}"
        body = {"model": name, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0.0}
        body |= {"ignore_eos": True, "return_token_ids": True}
        reference = _stream(servers[0].base_url, body)[0]
        assert _stream(servers[1].base_url, body)[0] == reference, "the two servers disagree"
        runs: list[dict[str, Any]] = []
        for i in range(max_reps):
            if sum(r.get("outcome") == "switched" for r in runs) >= switches:
                break
            # The yardstick for the pause: a vLLM stream can stall by itself on a host short of
            # cores (before runtime.cpu_share, for seconds), so each rep also streams once
            # through the router without a migration and keeps that stream's largest gap.
            plain, _, plain_gap = _stream(url, body)
            assert plain == reference, "an unmigrated stream through the router differs"
            unmigrated.append(plain_gap)
            # the router starts the migration itself (MIGRATE_AFTER_HEADER): the tiny model
            # streams ~1,000 tokens/s, faster than a request from outside can react
            with _RunningWatch([sv.base_url for sv in servers]) as watch:
                got, sid, gap = _stream(url, body, after)
            recent = httpx.get(f"{url}/fastvllm/sessions").json()["recent_migrations"]
            mig: dict[str, Any] = next((m for m in recent if m["session"] == sid), {"outcome": "not started"})
            ok = got == reference
            runs.append(mig | {"identical": ok, "tokens": len(got), "largest_gap_s": gap})
            busy = watch.last_running.get(mig.get("from", ""))
            if "last_source_token_at" in mig and busy is not None:
                # perf_counter is CLOCK_MONOTONIC: the router's and this process's agree
                runs[-1]["source_busy_after_switch_s"] = busy - mig["last_source_token_at"]
            print(
                f"{i + 1}: {mig.get('outcome')}, "
                f"pause {mig.get('pause_s', float('nan')) * 1000:.1f} ms, "
                f"token gap {(mig.get('mean_token_gap_s') or float('nan')) * 1000:.1f} ms, "
                f"largest gap of an unmigrated stream {plain_gap * 1000:.1f} ms, source busy "
                f"{runs[-1].get('source_busy_after_switch_s', float('nan')) * 1000:.0f} ms after the switch, "
                f"{len(mig.get('rounds', []))} round(s), identical {ok}, pause parts (ms) "
                f"{ {k: round(v * 1000, 1) for k, v in mig.get('pause_parts_s', {}).items()} }",
                flush=True,
            )
    finally:
        if router is not None:
            router.terminate()
            router.wait(30)
        for s in servers:
            tree = proctree.session_pids(s.pid)
            instances.stop(s.pid)
            if s.proc is not None:
                s.proc.wait()
            proctree.wait_gone(tree, 30.0, reaped=True)
        shutil.rmtree(work, ignore_errors=True)  # snapshots hold process memory: not left in /tmp
    switched = [r for r in runs if r.get("outcome") == "switched"]
    pauses = [r["pause_s"] for r in switched]
    gaps = [r["mean_token_gap_s"] for r in switched if r.get("mean_token_gap_s")]
    res: dict[str, Any] = {
        "benchmark": "migration",
        "model": model,
        "servers": "cold-started" if cold else "restored from snapshots",
        "reps": len(runs),
        "after_tokens": after,
        "max_tokens": max_tokens,
        "dtype": dtype,
        "switched": len(switched),
        "all_identical": all(r["identical"] for r in runs),
        "pause_ms_median": statistics.median(pauses) * 1000 if pauses else None,
        "pause_ms_max": max(pauses) * 1000 if pauses else None,
        "pause_ms_all": [round(p * 1000, 1) for p in pauses],
        "token_gap_ms_median": statistics.median(gaps) * 1000 if gaps else None,
        "unmigrated_largest_gap_ms_all": [round(g * 1000, 1) for g in unmigrated],
        "unmigrated_largest_gap_ms_median": statistics.median(unmigrated) * 1000 if unmigrated else None,
        "pauses_over_100ms": sum(p > 0.1 for p in pauses),
        "source_busy_after_switch_ms_all": [
            round(r["source_busy_after_switch_s"] * 1000, 1)
            for r in switched
            if "source_busy_after_switch_s" in r
        ],
        "unmigrated_streams_with_a_gap_over_100ms": sum(g > 0.1 for g in unmigrated),
        "rounds_median": statistics.median(len(r["rounds"]) for r in switched) if switched else None,
        "runs": runs,
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "load": os.getloadavg()},
        "date": time.strftime("%Y-%m-%d"),
    }
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        (out / "migration.json").write_text(json.dumps(res, indent=1) + "\n")
        _chart(res, out / "migration.png")
    return res


def _chart(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    reps = list(enumerate(res["runs"], 1))
    sw = [(i, r) for i, r in reps if r.get("outcome") == "switched"]
    ax.plot([i for i, _ in sw], [r["pause_s"] * 1000 for _, r in sw], "o", label="pause at the switch")
    ax.plot(
        [i for i, _ in sw],
        [(r["mean_token_gap_s"] or 0) * 1000 for _, r in sw],
        "s",
        ms=4,
        label="mean gap between tokens",
    )
    plain = res.get("unmigrated_largest_gap_ms_all") or []
    if plain:
        ax.plot(range(1, len(plain) + 1), plain, "x", label="largest gap, unmigrated stream (same rep)")
    ax.axhline(100, color="grey", lw=0.8, ls=":", label="100 ms target")
    ax.set_yscale("log")
    ax.set_xlabel("repetition")
    ax.set_ylabel("ms (log)")
    ax.set_title(f"live migration, {res['model']} model (median pause {res['pause_ms_median']:.1f} ms)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="tiny")
    ap.add_argument("--switches", type=int, default=10, help="repeat until this many migrations switched")
    ap.add_argument("--max-reps", type=int, default=30, help="... or this many streams ran")
    ap.add_argument("--cold", action="store_true", help="freshly launched servers instead of restored ones")
    ap.add_argument("--after", type=int, default=20, help="tokens streamed before the migration starts")
    ap.add_argument("--max-tokens", type=int, default=900)
    ap.add_argument("--ports", default="18910,18911")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument(
        "--dtype",
        default="float32",
        help="the servers' dtype; in bfloat16 on a CPU, prefill and decode round differently and "
        "the tiny model's near-tie greedy tokens can flip after any re-prefill (see tests/test_cluster.py)",
    )
    a = ap.parse_args(argv)
    p0, p1 = (int(p) for p in a.ports.split(","))
    res = run(a.model, a.switches, a.max_reps, a.after, a.max_tokens, (p0, p1), a.out, a.dtype, a.cold)
    if res["switched"]:
        print(
            f"{res['switched']} of {res['reps']} switched: median pause {res['pause_ms_median']:.1f} ms "
            f"(max {res['pause_ms_max']:.1f}), median token gap {res['token_gap_ms_median']:.1f} ms, "
            f"all identical: {res['all_identical']}"
        )
    else:
        print(f"none of {res['reps']} switched; all identical: {res['all_identical']}")


if __name__ == "__main__":
    main()

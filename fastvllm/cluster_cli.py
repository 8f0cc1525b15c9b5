"""`fastvllm cluster`: placement by snapshot locality, the router, live migration and drain.

Kept apart from cli.py so the front door stays one screen per concern. One host needs no Ray
(`--snapshots DIR`: an agent over that directory, in this process); a fleet is reached
through its Ray cluster (`--ray ADDRESS`: the controller actor `fastvllm cluster serve
--ray` started). Migration and drain talk to the router over HTTP (`--router URL`).
"""

from __future__ import annotations

import functools
import json
import time
from pathlib import Path
from typing import Annotated, Any

import typer

# httpx, rich tables and the scheduler are imported by the commands that use them: this
# module is imported by every `fastvllm` command, to register the sub-app.
from fastvllm import ui
from fastvllm.runtime import signals
from fastvllm.runtime.errors import ServerError, UsageError

cluster_app = typer.Typer(
    help="Place models where their snapshot restores fastest (page cache > local disk > peer), "
    "route requests to the instances, and move live sessions between them.\n\n"
    "Typical use:  fastvllm cluster place tiny-llama --snapshots /srv/snaps  or  "
    "fastvllm cluster serve --snapshots /srv/snaps --start tiny-llama  then  "
    "fastvllm cluster migrate SESSION",
    no_args_is_help=True,
)
JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
SnapsOpt = Annotated[
    Path | None,
    typer.Option(help="This host's snapshot directory (one snapshot per subdirectory): no Ray needed."),
]
RayOpt = Annotated[
    str, typer.Option("--ray", help="Address of a Ray cluster running 'fastvllm cluster serve --ray'.")
]
RouterOpt = Annotated[str, typer.Option(help="The router's URL ('fastvllm cluster serve' prints it).")]
DEFAULT_ROUTER = "http://127.0.0.1:8100"


_guard = ui.guard


def _emit(doc: Any) -> None:
    print(json.dumps(doc, indent=2, default=str))


class _Embedded:
    """One agent over a local directory, and a controller around it (no Ray)."""

    def __init__(self, snapshots: Path, slots: int | None = None) -> None:
        from fastvllm import api

        self.c = api.cluster(snapshots, slots=slots)

    def call(self, method: str, *args: Any) -> Any:
        out = getattr(self.c, method)(*args)
        return out.as_dict() if hasattr(out, "as_dict") else out


def _ray_controller(address: str) -> Any:
    from fastvllm.scheduler import ray_runtime

    ray = ray_runtime._ray()
    ray.init(address=address, namespace=ray_runtime.NAMESPACE, log_to_driver=False)
    try:
        return ray_runtime.ControllerHandle(ray.get_actor(ray_runtime.CONTROLLER_NAME))
    except ValueError:
        raise UsageError(
            f"no fastvllm controller runs on the Ray cluster at {address}",
            hint="start one: fastvllm cluster serve --ray " + address + " --snapshots DIR",
        ) from None


def _controller(snapshots: Path | None, ray_address: str) -> Any:
    if bool(snapshots) == bool(ray_address):
        raise UsageError(
            "give either --snapshots DIR (this host) or --ray ADDRESS (a fleet)", hint="see --help"
        )
    if ray_address:
        return _ray_controller(ray_address)
    assert snapshots is not None  # one of the two, checked above
    return _Embedded(snapshots)


def _gbps(x: float) -> str:
    return f"{x / 1e9:.2f}" if x else "-"


@cluster_app.command("status")
def status(snapshots: SnapsOpt = None, ray_address: RayOpt = "", as_json: JsonOpt = False) -> None:
    """Each host's snapshots, page-cache share, free slots, queue, instances and bandwidths.

    Bandwidths are the ones its agent measured at start-up (disk, page cache, network to its
    peers; host-to-device where a GPU is present)."""
    from rich.table import Table

    st = _guard(lambda: _controller(snapshots, ray_address).call("status"))
    if as_json:
        _emit(st)
        return
    t = Table(title="hosts", title_justify="left")
    for col in ("host", "slots free", "queue s", "disk GB/s", "page cache GB/s", "network GB/s", "snapshots"):
        t.add_column(col, justify="left" if col in ("host", "snapshots") else "right")
    for h in st["hosts"]:
        snaps = ", ".join(
            f"{Path(s['model']).name} {ui.human_bytes(s['bytes'])} "
            f"({s['resident_bytes'] / max(s['bytes'], 1):.0%} cached)"
            for s in h["snapshots"]
        )
        bw = h["bw"]
        t.add_row(
            h["name"],
            f"{h['free_slots']}/{h['slots']}",
            f"{h['queue_s']:.1f}",
            _gbps(bw["disk"]),
            _gbps(bw["memory"]),
            _gbps(bw["network"]),
            snaps or "-",
        )
    ui.out.print(t)
    for i in st["instances"]:
        ui.out.print(f"instance {i['url']} on {i['host']}: {i['model']} (pid {i['pid']})")
    if st["dead"]:
        ui.out.print(f"[red]down[/]: {', '.join(st['dead'])}")


@cluster_app.command("place")
def place_cmd(
    model: Annotated[
        str, typer.Argument(help="The served model name (or its last path part, e.g. tiny-llama).")
    ],
    snapshots: SnapsOpt = None,
    ray_address: RayOpt = "",
    as_json: JsonOpt = False,
) -> None:
    """Where MODEL would restore fastest, and the estimate for every host that could take it.

    Estimate = queue wait + cached bytes / page-cache bandwidth + other local bytes / disk
    bandwidth (+ GPU bytes / host-to-device bandwidth), with each host's measured figures. A
    host without the snapshot (when the controller fetches) is charged its size / network
    bandwidth instead of the local terms."""
    from rich.table import Table

    d = _guard(lambda: _controller(snapshots, ray_address).call("place", model))
    if as_json:
        _emit(d)
        return
    t = Table(title=f"placing {model}", title_justify="left")
    for col in ("option", "host", "estimate s"):
        t.add_column(col)
    for o in d["options"]:
        what = o["kind"] + (f" ({o['session']} to {o['session_to']})" if o.get("session") else "")
        t.add_row(what, o["host"], f"{o['seconds']:.3f}")
    ui.out.print(t)
    b = d["best"]
    ui.console.print(f"[green]best[/]: {b['kind']} on [bold]{b['host']}[/], ready in ~{b['seconds']:.2f} s")


def _post(router: str, path: str, body: dict[str, Any]) -> dict[str, Any]:
    import httpx  # a router may be on another host: the full client

    try:
        r = httpx.post(router.rstrip("/") + path, json=body, timeout=600)
    except httpx.HTTPError as e:
        raise ServerError(
            f"the router at {router} did not answer: {e}", hint="is 'fastvllm cluster serve' running?"
        ) from e
    doc = r.json()
    if r.status_code != 200:
        msg = doc.get("error", {}).get("message", r.text)
        hint = (
            "'fastvllm cluster status' lists the hosts and their instances"
            if path.endswith("drain")
            else "'fastvllm cluster sessions' lists the running sessions"
        )
        raise UsageError(msg, hint=hint)
    return doc


@cluster_app.command("sessions")
def sessions(router: RouterOpt = DEFAULT_ROUTER, as_json: JsonOpt = False) -> None:
    """The streamed completions running through the router (the ones migrate can move)."""

    def get() -> dict[str, Any]:
        import httpx

        try:
            return httpx.get(router.rstrip("/") + "/fastvllm/sessions", timeout=30).json()
        except httpx.HTTPError as e:
            raise ServerError(f"the router at {router} did not answer: {e}", hint="is it running?") from e

    doc = _guard(get)
    if as_json:
        _emit(doc)
        return
    for s in doc["sessions"]:
        ui.out.print(f"{s['id']}  {s['backend']}  {s['generated']}/{s['max_tokens']} tokens")
    if not doc["sessions"]:
        ui.out.print("no sessions")


@cluster_app.command("migrate")
def migrate(
    session: Annotated[str, typer.Argument(help="Session id from 'fastvllm cluster sessions'.")],
    to: Annotated[
        str, typer.Option(help="Target instance URL (default: another instance of the model).")
    ] = "",
    router: RouterOpt = DEFAULT_ROUTER,
    as_json: JsonOpt = False,
) -> None:
    """Move a running streamed completion to another instance without a gap in its stream.

    The target re-prefills prompt + tokens so far in rounds while the source keeps
    generating, then the stream switches; prints the pause at the switch."""
    doc = _guard(lambda: _post(router, "/fastvllm/migrate", {"session": session, "to": to or None}))
    if as_json:
        _emit(doc)
        return
    if doc.get("outcome") != "switched":
        ui.console.print(f"[yellow]not moved[/]: {doc.get('outcome')}")
        return
    ui.console.print(
        f"[green]moved[/] {session} from {doc['from']} to {doc['to']} "
        f"after {doc['tokens_at_switch']} tokens, "
        f"{len(doc['rounds'])} catch-up round(s); pause at the switch [bold]{doc['pause_s'] * 1000:.1f} ms[/]"
    )


@cluster_app.command("drain")
def drain(
    target: Annotated[str, typer.Argument(help="A host name ('cluster status') or an instance URL.")],
    router: RouterOpt = DEFAULT_ROUTER,
    as_json: JsonOpt = False,
) -> None:
    """Stop routing to a host (or one instance) and migrate every session off it."""
    body = {"backend": target} if "://" in target else {"host": target}
    doc = _guard(lambda: _post(router, "/fastvllm/drain", body))
    if as_json:
        _emit(doc)
        return
    moved = [m for m in doc["migrations"] if m.get("outcome") == "switched"]
    pauses = ", ".join(f"{m['pause_s'] * 1000:.0f} ms" for m in moved)
    ui.console.print(
        f"[green]drained[/] {target}: {len(moved)} session(s) moved"
        + (f" (pauses {pauses})" if moved else "")
    )


@cluster_app.command("serve", epilog="e.g.  fastvllm cluster serve --snapshots /srv/snaps --start tiny-llama")
def serve(
    snapshots: Annotated[Path, typer.Option(help="Snapshot directory (the same path on every Ray node).")],
    port: Annotated[int, typer.Option(min=1, max=65535, help="The router's port.")] = 8100,
    host: Annotated[str, typer.Option(help="The router's address.")] = "127.0.0.1",
    start: Annotated[list[str], typer.Option(help="Model to place and restore at start (repeatable).")] = [],  # noqa: B006
    slots: Annotated[int, typer.Option(min=0, help="Servers per host (0: its GPUs, or 1).")] = 0,
    fetch: Annotated[
        bool,
        typer.Option(
            help="Let placement pick a host without the snapshot, which copies it from a peer first "
            "(--no-fetch where several Ray nodes share one machine: a copy restored beside its running "
            "original needs the same PIDs and port)."
        ),
    ] = True,
    ray_address: RayOpt = "",
) -> None:
    """Run the controller and the OpenAI-compatible router in the foreground.

    Embedded on this host, or with --ray on every node of a Ray cluster (an agent actor
    pinned to each). Ctrl-C stops them and the instances they started."""
    from fastvllm.scheduler.router import Router

    def up() -> Any:
        if not ray_address:
            return _Embedded(snapshots, slots or None)
        from fastvllm.scheduler import ray_runtime

        ray = ray_runtime._ray()
        ray.init(address=ray_address, namespace=ray_runtime.NAMESPACE, log_to_driver=False)
        handle, _ = ray_runtime.start(str(snapshots), slots=slots or None, fetch=fetch)
        return ray_runtime.ControllerHandle(handle)

    ctl = _guard(up)

    class _B:
        def instances(self) -> list[dict[str, str]]:
            return list(ctl.call("instance_list"))

        def failed(self, url: str) -> None:
            ctl.call("backend_failed", url)

    served = _guard(lambda: _serve(Router(_B()), host, port))
    try:
        for m in start:
            got = _guard(functools.partial(ctl.call, "start", m))
            got = got if isinstance(got, dict) else got.__dict__
            ui.console.print(
                f"[green]serving[/] {m} at {got['url']} on {got['host']} ({got['restore_s']:.2f} s)"
            )
        ui.console.print(f"router at [bold]{served.url}[/] (OpenAI API); Ctrl-C stops")
        signals.install()  # (the CLI did already) SIGTERM and SIGHUP stop it as Ctrl-C does
        while True:
            time.sleep(0.5)
    except KeyboardInterrupt:  # Ctrl-C, SIGTERM, SIGHUP: the exit status says which
        pass
    finally:
        served.stop()
        ctl.call("stop_all")


def _serve(router: Any, host: str, port: int) -> Any:
    from fastvllm.scheduler.router import Served

    try:
        return Served(router, host, port)
    except RuntimeError as e:
        raise UsageError(str(e), hint="pick another --port") from e

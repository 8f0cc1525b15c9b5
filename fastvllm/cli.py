"""The `fastvllm` command line: a thin typer + rich layer over fastvllm.api.

Human output goes to stderr (a live phase timeline, tables); `--json` prints one JSON
document on stdout. Errors print one line naming the problem and the fix, and exit with the
error's own code (runtime/errors.py); Ctrl-C exits 130 after the pipeline cleaned up.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

# Only what every command needs is imported here: typer, the light ui (rich's console) and
# the error types. Each command imports its own heavy parts (the pipelines through api, rich
# tables, numpy, Docker, the scheduler) so that `fastvllm --help`, `ps` or a restore pay
# for nothing they do not use (tests/test_startup.py keeps it so).
from fastvllm import ui
from fastvllm.cluster_cli import cluster_app
from fastvllm.runtime.errors import FastVLLMError, UsageError
from fastvllm.runtime.modes import CriuRestoreMode, LoadMode
from fastvllm.runtime.timeline import Timeline


def _unset_flags_cost_nothing() -> None:
    """typer 0.29 coerces every parameter's value through a pydantic TypeAdapter, building it
    (and importing pydantic, ~90 ms) even for the --help flag every command has, whose value is
    None when not given. An unset bool flag needs no coercion: it goes straight to its callback,
    as typer's own code would hand it on. Other parameters are typer's as before; a typer
    without this class or method is left alone."""
    param = getattr(getattr(typer, "core", None), "_TyperParameter", None)
    original = getattr(param, "process_value", None)
    if param is None or original is None:
        return

    def process_value(self: Any, ctx: Any, value: Any) -> Any:
        desc = getattr(self, "type_descriptor", None)
        if value is None and getattr(desc, "annotation", None) is bool and not self.required:
            return self.callback(ctx, self, value) if self.callback is not None else value
        return original(self, ctx, value)

    param.process_value = process_value


_unset_flags_cost_nothing()

app = typer.Typer(
    help="Cold start of a vLLM server in about a second: snapshot a warmed-up server with CRIU, "
    "restore it on demand.\n\nTypical use:  fastvllm snapshot tiny --out /srv/snap  then  "
    "fastvllm restore /srv/snap",
    no_args_is_help=True,
    add_completion=False,
    rich_markup_mode="rich",
)
model_app = typer.Typer(help="The built-in tiny model.", no_args_is_help=True)
app.add_typer(model_app, name="model")
weights_app = typer.Typer(help="Flat weight files (written by sleeping snapshots).", no_args_is_help=True)
app.add_typer(weights_app, name="weights")
prefetch_app = typer.Typer(
    help="The page cache, file by file (like vmtouch): see how much of a snapshot or model is in "
    "RAM, read it in ahead of a restore, drop it for a cold-start test, or pin it.\n\n"
    "Typical use:  fastvllm prefetch status /srv/snap  then  fastvllm prefetch warm /srv/snap",
    no_args_is_help=True,
)
app.add_typer(prefetch_app, name="prefetch")
app.add_typer(cluster_app, name="cluster")  # fastvllm/cluster_cli.py


JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]


def _positive(value: float | None) -> float | None:
    """Option check for seconds and counts that must be more than zero."""
    if value is not None and not value > 0:
        raise typer.BadParameter(f"{value:g} is not more than 0")
    return value


def _port(value: int | None) -> int | None:
    """Option check for a server's port: fixed (a restore binds it again), 1 to 65535."""
    if value is not None:
        from fastvllm.runtime import vllm_server

        try:
            vllm_server.check_port(value, what="")  # typer names the option itself
        except FastVLLMError as e:
            raise typer.BadParameter(e.one_line().strip()) from None
    return value


PortOpt = Annotated[
    int | None,
    typer.Option(
        callback=_port,
        help="Port the server listens on (default 8000); a restore gets it back. vLLM's own "
        "--port after -- is taken too.",
        show_default=False,
    ),
]
HostOpt = Annotated[
    str | None,
    typer.Option(
        help="Address the server binds (default 127.0.0.1; 0.0.0.0: every address). vLLM's own "
        "--host after -- is taken too.",
        show_default=False,
    ),
]


_guard = ui.guard


def _fail(e: FastVLLMError) -> NoReturn:
    ui.print_error(e)
    raise typer.Exit(e.exit_code)


def _emit_json(doc: Any) -> None:
    ui.out.print_json(json.dumps(doc))


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog="Arguments after `--` go to vLLM, e.g.  "
    "fastvllm snapshot ./llama --out s -- --max-model-len 4096 --port 9000  "
    "(vLLM's own --port/--host are taken as fastvllm's).",
)
def snapshot(
    ctx: typer.Context,
    model: Annotated[
        str | None,
        typer.Argument(help="Local model directory, or 'tiny' for the built-in model. Omit with --pid."),
    ] = None,
    out: Annotated[
        Path, typer.Option("--out", "-o", help="Snapshot directory to create (must not exist).")
    ] = Path(),
    pid: Annotated[
        int | None,
        typer.Option(
            help="Snapshot a running tree instead of launching one: a vLLM server fastvllm launched or "
            "restored (see 'fastvllm ps'), or any other process tree (plain process mode: GPU state "
            "through the CUDA checkpoint API, no vLLM steps)."
        ),
    ] = None,
    lock_timeout: Annotated[
        float,
        typer.Option(callback=_positive, help="Plain process mode: seconds to wait for the CUDA lock."),
    ] = 30.0,
    port: PortOpt = None,
    host: HostOpt = None,
    leave_running: Annotated[bool, typer.Option(help="Keep the server serving after the snapshot.")] = False,
    learn: Annotated[
        bool,
        typer.Option(
            help="After writing it, restore the snapshot once with its page images out of the page "
            "cache, to learn what a restore reads (the first restore on this host then reads it "
            "ahead) and to prove it restores; then stop that server. Not with --leave-running. "
            "--no-learn skips it (the first restore learns instead)."
        ),
    ] = True,
    sleep: Annotated[
        bool,
        typer.Option(
            help="Release weights and KV cache before the dump (small image; reloaded on restore). "
            "--no-sleep keeps them in the image."
        ),
    ] = True,
    sleep_level: Annotated[
        int,
        typer.Option(
            min=0,
            max=2,
            help="GPU: vLLM's sleep level before the CUDA checkpoint. 2 discards weights and KV cache "
            "(reloaded by fastvllm's loader), 1 offloads the weights to host memory (into the "
            "image), 0 keeps everything in the image.",
        ),
    ] = 2,
    timeout: Annotated[
        float, typer.Option(callback=_positive, help="Seconds to wait for the server to become healthy.")
    ] = 900.0,
    as_json: JsonOpt = False,
) -> None:
    """Launch vLLM on MODEL, warm it up, record a canary, and CRIU-dump it into --out.

    On a GPU the server sleeps (--sleep-level) and every process holding a CUDA context is
    checkpointed through the CUDA driver before the dump."""
    from fastvllm import api

    if out == Path():
        ui.print_error(FastVLLMError("--out is required", hint="e.g. --out /srv/snapshots/tiny"))
        raise typer.Exit(2)
    tl = Timeline()
    live = ui.LiveTimeline(tl, enabled=not as_json)
    if pid is not None and model is None and (port is not None or host is not None or ctx.args):
        _fail(
            UsageError(
                "--port, --host and vLLM arguments do not apply with --pid: the running tree keeps "
                "the address and arguments it has",
                hint="drop them",
            )
        )
    if pid is not None and model is None and not api.is_fastvllm_server(pid):
        with live.running():
            pres = _guard(
                lambda: api.snapshot_process(
                    pid, out, leave_running=leave_running, lock_timeout_s=lock_timeout, timeline=tl
                )
            )
        if as_json:
            _emit_json(pres.as_dict())
            return
        ui.console.print(ui.phase_table(tl, f"snapshot {pres.path} (plain process tree)"))
        gpu = f", {len(pres.manifest.cuda_pids)} GPU processes" if pres.manifest.cuda_pids else ""
        ui.console.print(
            f"{len(pres.manifest.tree_pids)} processes{gpu}, image "
            f"{ui.human_bytes(pres.manifest.image_bytes)}, written to [bold]{pres.path}[/]"
        )
        return

    def run() -> Any:
        with live.running():
            return api.snapshot(
                model,
                out,
                pid=pid,
                port=port,
                host=host,
                vllm_args=ctx.args,
                leave_running=leave_running,
                sleep=sleep,
                learn=learn,
                sleep_level=sleep_level,
                health_timeout=timeout,
                timeline=tl,
                on_bytes=live.on_bytes,
            )

    res = _guard(run)
    if as_json:
        _emit_json(res.as_dict())
        return
    ui.console.print(ui.phase_table(tl, f"snapshot {res.path}"))
    cold = f"cold start to first completion {res.cold_start_s:.2f} s, " if res.cold_start_s else ""
    ui.console.print(
        f"{cold}image {ui.human_bytes(res.manifest.image_bytes)}, written to [bold]{res.path}[/]"
    )
    if res.trial:
        hot = res.trial.get("hot_set_bytes") or 0
        learned = "no hot set learned"
        if res.trial.get("hot_set_learned"):
            learned = f"hot set learned ({ui.human_bytes(int(hot))})"
        ui.console.print(
            f"trial restore: canary matched, first completion in "
            f"{res.trial['time_to_first_completion_s']:.2f} s from evicted page images; {learned}"
        )
    if res.server:
        ui.console.print(f"server still serving at {ui.address(res.server)} (pid {res.server.pid})")


@app.command()
def restore(
    snapshot_dir: Annotated[Path, typer.Argument(metavar="DIR", help="Snapshot directory.")],
    verify: Annotated[
        bool, typer.Option(help="Check every file's checksum; the server is not declared serving before.")
    ] = True,
    reverify: Annotated[
        bool,
        typer.Option(
            "--reverify",
            help="Hash every file again. By default a file this host already checked (at snapshot "
            "time or by an earlier restore) and that has not changed since (same inode, size, "
            "mtime and ctime) is trusted.",
        ),
    ] = False,
    keep_affinity: Annotated[
        bool,
        typer.Option(
            "--keep-affinity",
            help="Bind the server's threads to the CPU cores they were bound to when the snapshot "
            "was taken (CRIU leaves them unbound). Off by default: vLLM's CPU backend binds every "
            "server on a host to the same cores unless VLLM_CPU_OMP_THREADS_BIND says otherwise.",
        ),
    ] = False,
    prefetch: Annotated[
        bool,
        typer.Option(
            help="Read the snapshot's files ahead, in the order the restore needs them, while CRIU "
            "restores (checksums are checked on the way). --no-prefetch checks them all first, "
            "then restores: slower from a cold page cache, kept for comparison."
        ),
    ] = True,
    prefetch_threads: Annotated[
        int, typer.Option(min=0, help="Read-ahead threads (0: the measured default).")
    ] = 0,
    timeout: Annotated[
        float,
        typer.Option(callback=_positive, help="Seconds to wait for the restored server to be healthy."),
    ] = 120.0,
    criu_restore: Annotated[
        CriuRestoreMode,
        typer.Option(
            "--criu-restore",
            case_sensitive=False,
            help="How CRIU fills the tree's memory. mmap: maps the page images copy-on-write "
            "(fastvllm's patched CRIU; restore time independent of image size; the snapshot must "
            "stay in place and unchanged while the server runs). copy: reads every page (stock "
            "CRIU). lazy: CRIU's userfaultfd restore (pages served on first touch by a "
            "'criu lazy-pages' daemon). auto: mmap where the CRIU supports it, else copy. "
            "'fastvllm doctor' lists what this host has.",
        ),
    ] = CriuRestoreMode.AUTO,
    container: Annotated[
        str | None,
        typer.Option(
            metavar="IMAGE",
            help="Restore inside a new container of IMAGE (built from Dockerfile.criu; Docker SDK): "
            "DIR's parent is mounted as its /snapshots volume and its entrypoint restores DIR, "
            "while this host reads DIR's files into the shared page cache. DIR must have been "
            "taken by that image's entrypoint.",
        ),
    ] = None,
    container_name: Annotated[
        str | None, typer.Option(help="Name for the container (with --container).")
    ] = None,
    gpus: Annotated[
        str | None,
        typer.Option(
            metavar="LIST",
            help="GPU snapshots: restore onto these GPUs of this host instead of the snapshotted "
            "ones, by index or UUID as nvidia-smi -L lists them, one per GPU the snapshot used, "
            "in its workers' order (e.g. --gpus 1, or --gpus 2,3 for tensor-parallel 2). Same "
            "GPU model and driver only; needs driver 580 or later.",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Restore a snapshot, prove it with the canary, and leave it serving.

    The timeline shows the read-ahead running beside CRIU's restore. With --container IMAGE the
    restore runs in a new container (its own PID and network namespace: one snapshot can be
    restored in several containers at once)."""
    if container is not None:
        if gpus is not None:
            _fail(UsageError("--gpus does not apply with --container", hint="give the container its GPUs"))
        _restore_in_container(snapshot_dir, container, container_name, prefetch, as_json)
        return
    from fastvllm import restore_command  # the launcher runs it without typer (it says why)

    restore_command.run(
        snapshot_dir,
        verify=verify,
        reverify=reverify,
        keep_affinity=keep_affinity,
        prefetch=prefetch,
        prefetch_threads=prefetch_threads,
        timeout=timeout,
        criu_restore=criu_restore,
        gpus=gpus,
        as_json=as_json,
    )


def _restore_in_container(
    snapshot_dir: Path, image: str, name: str | None, prefetch: bool, as_json: bool
) -> None:
    from fastvllm import container

    def run() -> Any:
        if as_json:
            return container.restore(image, snapshot_dir, name=name, prefetch=prefetch)
        with ui.console.status(f"restoring {snapshot_dir} in a container of {image}", spinner="dots"):
            return container.restore(image, snapshot_dir, name=name, prefetch=prefetch)

    res = _guard(run)
    if as_json:
        _emit_json(res.as_dict())
        return
    if res.how != "restored":
        ui.console.print(f"[yellow]the container did not restore the snapshot: {res.set_aside}[/]")
    pf = res.prefetch
    read = ""
    if "bytes" in pf:
        read = f"; host read-ahead {ui.human_bytes(int(pf['bytes']))} in {float(pf['seconds']):.2f} s"
    ui.console.print(
        f"container [bold]{res.container_name}[/] {res.how}, serving at [bold]{res.url}[/] "
        f"[bold green]{res.seconds:.2f} s[/] after it was started{read}; stop it with "
        f"'docker stop {res.container_name}'"
    )


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    epilog='e.g. in a Dockerfile:  ENTRYPOINT ["fastvllm", "entrypoint", "/models/llama", '
    '"--snapshots", "/snapshots", "--", "--max-model-len", "4096"]',
)
def entrypoint(
    ctx: typer.Context,
    model: Annotated[str, typer.Argument(help="Local model directory, or 'tiny'.")],
    snapshots: Annotated[
        Path, typer.Option(help="Directory (a mounted volume) that keeps this model's snapshot.")
    ] = Path("/snapshots"),
    port: PortOpt = None,
    host: Annotated[
        str | None,
        typer.Option(
            help="Address the server binds (default 127.0.0.1; 0.0.0.0 in a container). vLLM's own "
            "--host after -- is taken too.",
            show_default=False,
        ),
    ] = None,
    name: Annotated[
        str | None,
        typer.Option(
            help="Snapshot directory name under --snapshots (default: derived from the model, the "
            "vLLM arguments and the image, so each configuration has its own)."
        ),
    ] = None,
) -> None:
    """Serve MODEL the fastest way there is: restore its snapshot from --snapshots, or cold-start
    vLLM and snapshot it for next time. Foreground until SIGTERM (a container's entrypoint).

    Prints one JSON line on stdout once the server has answered: {"event": "serving", "how":
    "restored" | "cold-start", ...}. A snapshot that cannot be restored is moved aside and
    reported, and a cold start follows."""
    from fastvllm import entrypoint as ep

    raise typer.Exit(ep.main(model, snapshots, port, host, list(ctx.args), name))


def _secrets(snapshot_dir: Path, names: list[str] | None) -> tuple[str, list[str]]:
    """inspect's 'secrets' row and its warnings: which credentials the image holds (by the
    names of the environment variables, recorded at snapshot time), and files others may read."""
    warnings = []
    if names:
        row = ", ".join(names)
        warnings.append(
            f"this snapshot holds the memory of its processes, and so the values of {row}: whoever can "
            "read its files has them (keep it private: root's, files 0600; see docs/operations.md)"
        )
    elif names is None:
        row = "not recorded (an older snapshot): its memory may hold credentials all the same"
    else:
        row = "no credential-looking environment variables (its memory may hold others)"
    from fastvllm.runtime import private

    loose = private.loose(snapshot_dir)
    if loose:
        warnings.append(
            f"{len(loose)} of its files and directories can be read by other users (e.g. {loose[0]})"
            f": chmod -R go-rwx {snapshot_dir}"
        )
    return row, warnings


def _devices_row(recorded: dict[str, Any]) -> str:
    """Where the snapshot's workers ran, as `inspect` shows it ('-': not recorded, older)."""
    if not recorded:
        return "-"
    if recorded.get("kind") != "cuda":
        return "CPU"
    return f"{recorded['count']} x {recorded['model']}, driver {recorded['driver']}"


@app.command()
def inspect(
    snapshot_dir: Annotated[Path, typer.Argument(metavar="DIR", help="Snapshot directory.")],
    as_json: JsonOpt = False,
) -> None:
    """Show a snapshot's manifest: identity, server, timings, files, and which running
    processes map its page images (restored in mmap mode: the snapshot is in use)."""
    from rich.table import Table

    from fastvllm.runtime import credentials, manifest, mapped, vllm_server

    users = mapped.snapshot_mappers(snapshot_dir)
    in_use = (
        ", ".join(f"pid {u.pid} ({u.name}, {ui.human_bytes(u.mapped_bytes)})" for u in users)
        if users
        else "-"
    )
    if _guard(lambda: manifest.kind(snapshot_dir)) == "process":
        pm = _guard(lambda: manifest.load_process(snapshot_dir))
        secrets_row, warnings = _secrets(snapshot_dir, pm.secret_env)
        if as_json:
            doc = json.loads(pm.to_json())
            _emit_json({**doc, "mapped_by": [u.as_dict() for u in users], "warnings": warnings})
            return
        for w in warnings:
            ui.console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
        title = f"snapshot {snapshot_dir} (plain process tree)"
        pt = Table(title=title, show_header=False, title_justify="left")
        pt.add_column(style="bold")
        pt.add_column()
        gpu = f"{pm.gpu['model']}, driver {pm.gpu['driver']}" if pm.gpu else "-"
        for k, v in [
            ("created", pm.created_at),
            ("command", " ".join(pm.cmdline)[:100]),
            ("processes", f"{len(pm.tree_pids)} (root {pm.root_pid}), GPU: {pm.cuda_pids or '-'}"),
            ("GPU", gpu),
            ("CRIU", pm.identity.criu),
            ("kernel", pm.identity.kernel),
            ("image", f"{ui.human_bytes(pm.image_bytes)} in {len(pm.files)} files"),
            ("mapped by", in_use),
            ("secrets", secrets_row),
            *((f"timing {k}", f"{v:.2f} s") for k, v in pm.timings.items()),
        ]:
            pt.add_row(k, v)
        ui.out.print(pt)
        return
    m = _guard(lambda: manifest.load(snapshot_dir))
    secrets_row, warnings = _secrets(snapshot_dir, m.secret_env)
    if as_json:
        doc = json.loads(m.to_json())
        doc["server"]["control_token"] = "(set)" if m.server.control_token else ""  # a secret: not shown
        doc["server"]["env"] = credentials.redact_env(m.server.env)
        doc["server"]["vllm_args"] = vllm_server.redact_args(m.server.vllm_args)
        _emit_json({**doc, "mapped_by": [u.as_dict() for u in users], "warnings": warnings})
        return
    for w in warnings:
        ui.console.print(f"[yellow]warning:[/] {w}", highlight=False, soft_wrap=True)
    t = Table(title=f"snapshot {snapshot_dir}", show_header=False, title_justify="left")
    t.add_column(style="bold")
    t.add_column()
    rows = [
        ("created", m.created_at),
        ("model", f"{m.model.path} ({ui.human_bytes(m.model.bytes)}, xxh3 {m.model.content_hash[:16]})"),
        ("vLLM", m.identity.vllm),
        ("CRIU", m.identity.criu),
        ("kernel", m.identity.kernel),
        ("Python", m.identity.python),
        ("server", f"{ui.address_of(m.server.host, m.server.port)}, served as {m.server.served_model_name}"),
        ("vLLM args", " ".join(vllm_server.redact_args(m.server.vllm_args)) or "(none)"),
        ("parallel", f"tensor-parallel {m.tensor_parallel_size}, {m.world_size} worker(s)"),
        ("devices", _devices_row(m.devices)),
        ("image", f"{ui.human_bytes(m.image_bytes)} in {len(m.files)} files"),
        ("canary", f"{len(m.canary.token_ids)} tokens: {m.canary.text[:60]!r}"),
        ("from snapshot", m.source_snapshot or "-"),
        ("mapped by", in_use),
        ("secrets", secrets_row),
    ]
    rows += [(f"timing {k}", f"{v:.2f} s") for k, v in m.timings.items()]
    for k, v in rows:
        t.add_row(k, v)
    ui.out.print(t)


agent_app = typer.Typer()  # its help is agent_cmd's docstring
app.add_typer(agent_app, name="agent")
AgentSocketOpt = Annotated[
    Path | None,
    typer.Option(
        "--socket",
        metavar="PATH",
        help="The agent's Unix socket (default: agent.sock in the run directory, FASTVLLM_RUN_DIR; "
        "'fastvllm restore' looks there).",
        show_default=False,
    ),
]


@agent_app.callback(invoke_without_command=True)
def agent_cmd(
    ctx: typer.Context,
    socket_path: AgentSocketOpt = None,
    foreground: Annotated[
        bool,
        typer.Option(
            "--foreground",
            help="Stay in the foreground (the default and only mode: let systemd or your supervisor "
            "keep it running and collect its log).",
        ),
    ] = True,
    hold: Annotated[
        list[Path] | None,
        typer.Option(
            "--hold",
            metavar="SNAPSHOT",
            help="Keep this GPU snapshot's weights in pinned host memory (repeatable): each restore "
            "of it through the agent copies them to the GPU at the bus's speed instead of reading "
            "the file. Costs host memory the size of the weights, pinned, for as long as the agent runs.",
            show_default=False,
        ),
    ] = None,
) -> None:
    """Run the resident restore agent ('fastvllm restore' hands its restores to it while it runs).

    A warm process, in the foreground until SIGTERM or Ctrl-C, that restores snapshots on
    request over a local Unix socket (under systemd: docs/operations.md). It imports the
    restore stack and checks CRIU once, prints one line when ready, then restores what clients
    ask for, one at a time (later requests wait their turn), streaming the phases back: a
    restore through it pays no interpreter start or import. The socket is its owner's alone
    (0600; clients of another user are refused). A client's Ctrl-C undoes its restore as in the
    CLI; SIGTERM to the agent undoes the restore running, removes the socket and exits 143.
    FASTVLLM_AGENT=0 makes 'fastvllm restore' ignore it.

    With --hold SNAPSHOT it first reads that snapshot's weights into pinned host memory, checks
    them, and hands that memory to every worker it restores from the snapshot: the weight load
    then moves each byte once, by DMA (docs/decisions/pinned-pool.md).

    Typical use:  fastvllm agent [--hold /srv/snap]  then  fastvllm restore /srv/snap  as usual;
    fastvllm agent status"""
    if ctx.invoked_subcommand is not None:
        return
    from fastvllm import resident

    _recover()
    code = _guard(lambda: resident.run(socket_path, hold=[p.expanduser().absolute() for p in hold or []]))
    raise typer.Exit(code)


@agent_app.command("status")
def agent_status(socket_path: AgentSocketOpt = None, as_json: JsonOpt = False) -> None:
    """Whether an agent answers on the socket: its PID, what it restores now, how many restores
    it ran. Exit 1 when none answers."""
    from fastvllm import resident, resident_client

    where = (socket_path or resident.default_socket()).expanduser().absolute()
    doc = resident_client.ping(str(where))
    if as_json:
        _emit_json(doc or {"event": "none", "socket": str(where)})
    elif doc is None:
        ui.console.print(f"no fastvllm agent answers on {where} (start one: fastvllm agent)", highlight=False)
    else:
        now = f"restoring {doc['restoring']}" if doc.get("busy") else "idle"
        ui.console.print(
            f"fastvllm agent pid {doc['pid']} on {where}: {now}, {doc.get('queued', 0)} queued, "
            f"{doc.get('restores', 0)} restores since it started",
            highlight=False,
        )
    if doc is None:
        raise typer.Exit(1)


@app.command(name="doctor")
def doctor_cmd(
    skip_vllm: Annotated[
        bool, typer.Option("--skip-vllm", help="Do not import vLLM (it takes seconds).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Check this host: CRIU, privileges, io_uring, vLLM, CUDA checkpoint, leftovers of
    interrupted operations. Failing lines say how to fix."""
    from rich.table import Table

    from fastvllm import doctor

    _recover()
    checks = doctor.run_checks(import_vllm=not skip_vllm)
    bad = [c for c in checks if c.required and not c.ok]
    if as_json:
        _emit_json({"ok": not bad, "checks": [c.as_dict() for c in checks]})
    else:
        t = Table(title="fastvllm doctor", title_justify="left")
        for col in ("", "check", "detail", "fix"):
            t.add_column(col)
        for c in checks:
            mark = "[green]✓[/]" if c.ok else ("[red]✗[/]" if c.required else "[yellow]![/]")
            t.add_row(mark, c.name, c.detail, c.fix)
        ui.out.print(t)
    if bad:
        raise typer.Exit(9)


@app.command()
def ps(as_json: JsonOpt = False) -> None:
    """List vLLM servers fastvllm launched or restored that still run, with their status.

    Status: serving; not answering (its /health does not answer 200); root dead (its root
    process was killed and the rest of its tree runs on: 'fastvllm stop PID' stops it)."""
    from rich.table import Table

    from fastvllm import api

    _recover()
    known = api.servers()
    if as_json:
        # The control token is a secret: whether one is set, not its value.
        _emit_json(
            [
                {**i.__dict__, "control_token": "(set)" if i.control_token else "", "status": str(h)}
                for i, h in known
            ]
        )
        return
    t = Table(title="running servers", title_justify="left")
    for col in ("pid", "status", "url", "model", "snapshot"):
        t.add_column(col)
    for i, h in known:
        # a mmap restore keeps its snapshot's page images mapped: the snapshot is in use
        snap = f"{i.snapshot} (mapped)" if i.snapshot and i.criu_restore == "mmap" else i.snapshot
        status = str(h) if h == "serving" else f"[red]{h}[/]"
        t.add_row(str(i.pid), status, ui.address_of(i.host, i.port), i.model, snap or "-")
    ui.out.print(t)


def _recover() -> None:
    """Clean up after operations whose process was killed (runtime.journal), saying what."""
    from fastvllm.runtime import journal

    _guard(lambda: journal.recover(say=lambda line: ui.console.print(line, highlight=False, soft_wrap=True)))


@app.command()
def stop(
    pid: Annotated[int, typer.Argument(help="Root PID from 'fastvllm ps' (or any PID of its tree).")],
) -> None:
    """Stop a server fastvllm launched or restored (its whole process session), also one whose
    root process died while the rest of its tree runs on."""
    from fastvllm import api

    _recover()
    inst = _guard(lambda: api.find_server(pid))
    _guard(lambda: api.stop(inst.pid))
    ui.console.print(f"stopped {inst.pid}")


@app.command(name="rm")
def rm_cmd(
    snapshot_dir: Annotated[Path, typer.Argument(metavar="DIR", help="Snapshot directory.")],
) -> None:
    """Delete a snapshot; refused while a server restored from it in mmap mode still maps its
    page images ('fastvllm inspect DIR' shows who). Also deletes a partial one (a hidden
    `.NAME.partial-*` directory) that no running snapshot writes any more."""
    existed = snapshot_dir.exists()
    _recover()
    if existed and not snapshot_dir.exists():  # it was what an interrupted snapshot left
        ui.console.print(f"removed {snapshot_dir}")
        return
    from fastvllm import api

    _guard(lambda: api.remove(snapshot_dir))
    ui.console.print(f"removed {snapshot_dir}")


@app.command(name="gc")
def gc_cmd(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            metavar="[DIR]...",
            help="Directories to look in for partial snapshots (hidden `.NAME.partial-*`) as well: "
            "those that no running snapshot writes are removed (e.g. after a reboot).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Clean up what interrupted snapshots and restores left behind.

    Server trees are stopped, partial snapshot directories and /dev/shm files removed. Every
    command that changes state does this for operations whose process was killed; gc does it
    on demand, says what it cleaned, and also removes the /dev/shm files of vLLM or CRIU that
    no process holds."""
    from fastvllm import api

    lines = _guard(lambda: api.gc(paths or []))
    if as_json:
        _emit_json({"cleaned": lines})
        return
    for line in lines:
        ui.console.print(line, highlight=False, soft_wrap=True)
    if not lines:
        ui.console.print("nothing to clean up")


@model_app.command("make-tiny")
def make_tiny(
    out: Annotated[
        Path | None, typer.Argument(help="Directory to write (default: the per-user cache).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Rewrite it even if it is there.")] = False,
    size: Annotated[
        str, typer.Option(help="tiny (13 MB), small (190 MB) or 3b (Llama-3.2-3B layer shapes, 5.6 GB).")
    ] = "tiny",
) -> None:
    """Write the built-in tiny Llama (seeded random weights, locally trained tokenizer).

    The sizes are also accepted as MODEL by 'snapshot' and 'bench' ('tiny', 'small', '3b')."""
    from fastvllm.runtime import tiny_model

    if size not in tiny_model.SIZES:
        _fail(UsageError(f"unknown size {size!r}", hint=f"use one of {', '.join(tiny_model.SIZES)}"))
    path = _guard(lambda: tiny_model.make_tiny(out, force=force, size=size))
    ui.out.print(str(path))


@weights_app.command("verify")
def weights_verify(
    path: Annotated[Path, typer.Argument(help="A weight file, e.g. SNAPSHOT/weights/model.fvw.")],
    as_json: JsonOpt = False,
) -> None:
    """Check every tensor and the whole file against their checksums."""
    from fastvllm.weights import fileformat

    idx0 = _guard(lambda: fileformat.read_index(path))
    bar, advance = ui.bytes_bar(idx0.file_size - idx0.data_offset, "verify", not as_json)
    with bar:
        idx = _guard(lambda: fileformat.verify(path, on_bytes=advance))
    n = sum(e.nbytes for e in idx.tensors)
    if as_json:
        _emit_json({"path": str(path), "ok": True, "tensors": len(idx.tensors), "bytes": n})
    else:
        ui.console.print(f"[green]ok[/]: {len(idx.tensors)} tensors, {ui.human_bytes(n)}, checksums match")


@weights_app.command("dump")
def weights_dump(
    source: Annotated[
        str,
        typer.Argument(
            help="Root PID of a running server (from 'fastvllm ps'; the weights as vLLM post-processed "
            "them) or a safetensors checkpoint (directory or file)."
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Weight file to write (must not exist).")],
    share: Annotated[
        bool, typer.Option(help="Hard-link it into the content-addressed store (one copy per model).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a flat weight file: 4 KiB-aligned tensors, an index with checksums."""
    from fastvllm import api

    doc = _guard(lambda: api.dump_weights(source, out, share=share))
    if as_json:
        _emit_json(doc)
    else:
        ui.console.print(
            f"[green]wrote[/] {out}: {doc['tensors']} tensors, {ui.human_bytes(int(doc['bytes']))} "
            f"(key {str(doc['key'])[:12]}…)"
        )


@weights_app.command("load")
def weights_load(
    path: Annotated[Path, typer.Argument(help="A weight file.")],
    device: Annotated[str, typer.Option(help="'cpu' or 'cuda' (pinned double-buffered copies).")] = "cpu",
    threads: Annotated[int, typer.Option(min=0, help="Reader threads (0: the measured default).")] = 0,
    chunk_mib: Annotated[int, typer.Option(min=0, help="Read size in MiB (0: default).")] = 0,
    buffers: Annotated[
        int, typer.Option(min=0, help="Pinned buffers for GPU loads (0: default, min 2).")
    ] = 0,
    direct: Annotated[
        str, typer.Option(help="'auto' (O_DIRECT when the file is cold), 'on' or 'off'.")
    ] = "auto",
    verify: Annotated[bool, typer.Option(help="Check every checksum before loading.")] = False,
    mode: Annotated[
        LoadMode,
        typer.Option(
            case_sensitive=False,
            help="'auto' (map on CPU, copy on GPU), 'map' (CPU tensors are copy-on-write views of "
            "the file, faulted in by parallel threads) or 'copy' (read into private memory).",
        ),
    ] = LoadMode.AUTO,
    as_json: JsonOpt = False,
) -> None:
    """Load a weight file into fresh tensors and report the throughput (a quick speed test)."""
    from fastvllm import api
    from fastvllm.weights import fileformat

    modes = {"auto": None, "on": True, "off": False}
    if direct not in modes:
        _fail(UsageError(f"--direct {direct!r} is not auto, on or off", hint="use --direct auto"))
    idx = _guard(lambda: fileformat.read_index(path))
    bar, advance = ui.bytes_bar(sum(e.nbytes for e in idx.tensors if e.alias_of is None), "load", not as_json)
    with bar:
        _, stats = _guard(
            lambda: api.load_weights(
                path,
                device,
                threads=threads or None,
                chunk=(chunk_mib << 20) or None,
                buffers=buffers or None,
                direct=modes[direct],
                verify=verify,
                on_bytes=advance,
                mode=mode,
            )
        )
    doc = {
        "path": str(path),
        "device": stats.device,
        "bytes": stats.bytes,
        "seconds": stats.seconds,
        "gbps": stats.gbps,
        "direct": stats.direct,
        "mapped": stats.mapped,
        "tensors": stats.tensors,
    }
    if as_json:
        _emit_json(doc)
    else:
        ui.console.print(
            f"[green]loaded[/] {doc['tensors']} tensors, {ui.human_bytes(stats.bytes)} in "
            f"{stats.seconds:.3f} s: {stats.gbps:.2f} GB/s on {stats.device}"
            f"{' (O_DIRECT)' if stats.direct else ''}{' (mapped)' if stats.mapped else ''}"
        )


@weights_app.command(
    "bench",
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True, "help_option_names": []},
)
def weights_bench(ctx: typer.Context) -> None:
    """Our loader against safetensors, fastsafetensors, runai-model-streamer, tensorizer and
    instanttensor, cold and warm page cache (fastvllm.weights.bench; '--help' lists its options)."""
    from fastvllm.weights import bench as bench_weights

    raise typer.Exit(bench_weights.main(list(ctx.args)))


@app.command()
def bench(
    model: Annotated[str, typer.Option(help="Model directory or 'tiny'.")] = "tiny",
    reps: Annotated[int, typer.Option(min=1, help="Repetitions of each column (medians are reported).")] = 5,
    out: Annotated[Path, typer.Option(help="Where the JSON and PNG go.")] = Path("results/coldstart"),
    port: Annotated[int, typer.Option(callback=_port, help="Port for the servers.")] = 8000,
    agent: Annotated[
        bool, typer.Option(help="Time restores through 'fastvllm agent' too, where it exists.")
    ] = True,
    container: Annotated[
        bool,
        typer.Option(help="Time 'docker run' of the CPU image too, where Docker and the image are there."),
    ] = True,
    cold_starts: Annotated[
        bool, typer.Option(help="Time vLLM's own cold start (--no-cold-starts: restores only).")
    ] = True,
    columns: Annotated[
        str,
        typer.Option(
            metavar="LIST",
            help="Only these columns, comma-separated: names (command_warm, agent_cold, ...) or groups "
            "(vllm, command, in_process, agent, container; cold, warm), e.g. --columns agent,command_warm. "
            "Default: all.",
        ),
    ] = "",
    as_json: JsonOpt = False,
) -> None:
    """What a user waits: from 'fastvllm restore' (or 'docker run') to the first completion a
    separate client gets, beside vLLM's cold start and the in-process figure; page cache warm
    and cold (dropped)."""
    from fastvllm import benchmark

    chosen = _guard(lambda: benchmark.select_columns(columns))
    plan = benchmark.Plan(model, reps, out, port, as_json, agent, container, cold_starts, chosen)
    res = _guard(lambda: benchmark.run(plan))
    if as_json:
        _emit_json(res)


@app.command()
def demo(
    port: Annotated[int, typer.Option(callback=_port, help="Port for the server.")] = 8000,
    keep: Annotated[bool, typer.Option(help="Keep the restored server serving and the snapshot.")] = False,
) -> None:
    """Snapshot the built-in tiny model, restore it, and print cold vs restored time to first completion."""
    import shutil
    import tempfile

    from rich.table import Table

    from fastvllm import api

    work = Path(tempfile.mkdtemp(prefix="fastvllm-demo-"))
    snap = work / "tiny-snapshot"
    try:
        tl = Timeline()
        ui.console.rule("1. cold start of vLLM on the tiny model, then snapshot")
        with ui.LiveTimeline(tl).running():
            s = _guard(lambda: api.snapshot("tiny", snap, port=port, timeline=tl))
        ui.console.rule("2. restore from the snapshot")
        tl2 = Timeline()
        with ui.LiveTimeline(tl2).running():
            r = _guard(lambda: api.restore(snap, timeline=tl2))
        cold, warm = s.cold_start_s or 0.0, r.time_to_first_completion_s
        t = Table(title="time to first completion", title_justify="left")
        t.add_column("start")
        t.add_column("seconds", justify="right")
        t.add_row("cold (launch vLLM)", f"{cold:.2f}")
        t.add_row("restored (fastvllm restore)", f"{warm:.2f}")
        t.add_row("speed-up", f"{cold / warm:.1f}x")
        ui.out.print(t)
        print(f"cold start {cold:.2f} s, restored {warm:.2f} s, {cold / warm:.1f}x faster", flush=True)
        if keep:
            ui.console.print(f"serving at {ui.address(r.server)} (pid {r.server.pid}); snapshot in {snap}")
        else:
            api.stop(r.server.pid)
    finally:
        if not keep:
            shutil.rmtree(work, ignore_errors=True)


PathsArg = Annotated[
    list[Path],
    typer.Argument(
        metavar="PATH",
        help="Files or directories (every regular file below them, in name order).",
        readable=False,  # checked by prefetch.files, which says which path and how to fix it
    ),
]


def _prefetch_files(paths: list[Path]) -> list[Path]:
    from fastvllm.prefetch import files

    return _guard(lambda: files.expand(paths))


@prefetch_app.command("status")
def prefetch_status(paths: PathsArg, as_json: JsonOpt = False) -> None:
    """How much of each file is in the page cache, per file and in total.

    Pages are counted as vmtouch counts them: the file's size in pages (a partial last page
    counts), resident when mincore says so."""
    import mmap

    from rich.table import Table

    from fastvllm.prefetch import residency

    res = _guard(lambda: residency.of_files(_prefetch_files(paths)))
    resident, pages, nbytes = (sum(getattr(r, k) for r in res) for k in ("resident_pages", "pages", "bytes"))
    total = {"files": len(res), "bytes": nbytes, "resident_pages": resident, "pages": pages}
    total["fraction"] = resident / pages if pages else 1.0
    if as_json:
        _emit_json({"page_size": mmap.PAGESIZE, "files": [r.as_dict() for r in res], "total": total})
        return
    t = Table(title="page cache residency", title_justify="left")
    t.add_column("file")
    t.add_column("size", justify="right")
    t.add_column("resident pages", justify="right")
    t.add_column("%", justify="right")
    for r in res:
        t.add_row(str(r.path), ui.human_bytes(r.bytes), f"{r.resident_pages}/{r.pages}", f"{r.fraction:.0%}")
    t.add_section()
    t.add_row(
        f"[bold]total[/] ({len(res)} files)",
        ui.human_bytes(nbytes),
        f"{resident}/{pages}",
        f"[bold]{total['fraction']:.0%}[/]",
    )
    ui.out.print(t)


@prefetch_app.command("warm", epilog="e.g.  fastvllm prefetch warm /srv/snap --threads 8")
def prefetch_warm(
    paths: PathsArg,
    method: Annotated[
        str,
        typer.Option(
            help="'read' (pread into a buffer), 'populate' (map the file and MADV_POPULATE_READ: no "
            "copy), 'fadvise' or 'readahead' (submit the chunk's I/O at once, then wait by reading). "
            "Default: the one measured fastest (see prefetch/warm.py)."
        ),
    ] = "",
    threads: Annotated[int, typer.Option(min=0, help="Reader threads (0: the measured default).")] = 0,
    chunk_mib: Annotated[
        int, typer.Option(min=0, help="MiB each thread reads at a time (0: the default).")
    ] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Read files into the page cache, earlier files first (--threads reads in parallel).

    The next reader (a restore, the weight loader) then finds them in RAM. Shows bytes and GB/s;
    with --json, also how much is resident afterwards."""
    from fastvllm.prefetch import residency, warm

    if method and method not in warm.METHODS:
        _fail(
            UsageError(
                f"--method {method!r} is not one of {', '.join(warm.METHODS)}", hint="omit it for the default"
            )
        )
    fs = _prefetch_files(paths)
    sizes = _guard(lambda: [p.stat().st_size for p in fs])
    bar, advance = ui.bytes_bar(sum(sizes), "warm", not as_json)
    with bar:
        st = _guard(
            lambda: warm.warm(
                fs, method=method or None, threads=threads or None, chunk=chunk_mib << 20, on_bytes=advance
            )
        )
    res = _guard(lambda: residency.of_files(fs))
    resident, pages = sum(r.resident_pages for r in res), sum(r.pages for r in res)
    frac = resident / pages if pages else 1.0
    if as_json:
        _emit_json(st.as_dict() | {"resident_pages": resident, "pages": pages, "resident_fraction": frac})
        return
    ui.console.print(
        f"[green]warmed[/] {ui.human_bytes(st.bytes)} of {len(fs)} files in {st.seconds:.2f} s: "
        f"[bold]{st.gbps:.2f} GB/s[/] ({st.method}, {st.threads} thread{'s' * (st.threads > 1)}, "
        f"{st.chunk >> 20} MiB chunks); "
        f"{frac:.0%} resident now"
    )


@prefetch_app.command("evict")
def prefetch_evict(paths: PathsArg, as_json: JsonOpt = False) -> None:
    """Drop files from the page cache, e.g. to time a cold start of just these files.

    posix_fadvise(DONTNEED) per file, after writing back dirty pages. Pages a running process
    maps or locks stay, and are reported."""
    from fastvllm.prefetch import residency, warm

    fs = _prefetch_files(paths)
    n = _guard(lambda: warm.evict(fs))
    res = _guard(lambda: residency.of_files(fs))
    resident = sum(r.resident_pages for r in res)
    if as_json:
        _emit_json({"files": len(fs), "evicted_bytes": n, "resident_pages": resident})
        return
    left = f"; {resident} pages still resident (mapped by a process?)" if resident else ""
    ui.console.print(f"[green]evicted[/] {ui.human_bytes(n)} from {len(fs)} files{left}")


@prefetch_app.command(
    "lock", epilog="e.g.  fastvllm prefetch lock /srv/snap/weights --budget 8G   (Ctrl-C unlocks)"
)
def prefetch_lock(
    paths: PathsArg,
    budget: Annotated[
        str,
        typer.Option(
            help="Most memory to lock, like 4G or 512M; more is refused before anything is locked. "
            "Empty: half of the memory available now."
        ),
    ] = "",
    as_json: JsonOpt = False,
) -> None:
    """Read files in and lock them in RAM until Ctrl-C or SIGTERM, like vmtouch -l.

    mmap + mlock: the kernel will not evict them whatever else runs. The total must fit in
    --budget, checked before anything is read; mlock beyond RLIMIT_MEMLOCK needs root."""
    import os
    import signal

    from fastvllm.prefetch import warm
    from fastvllm.runtime import units

    limit = _guard(lambda: units.parse_size(budget)) if budget else warm.default_budget()
    fs = _prefetch_files(paths)
    total = _guard(lambda: warm.check_budget(fs, limit))
    bar, advance = ui.bytes_bar(total, "read in", not as_json)
    with bar:  # parallel reads first: mlock alone faults a cold file in with one thread
        _guard(lambda: warm.warm(fs, on_bytes=advance))
    locked = _guard(lambda: warm.lock(fs, limit))
    got: list[int] = []
    old = signal.signal(signal.SIGTERM, lambda signum, _frame: got.append(signum))
    try:
        if as_json:
            _emit_json({"files": len(fs), "bytes": locked.bytes, "budget": limit, "pid": os.getpid()})
        else:
            ui.console.print(
                f"[green]locked[/] {ui.human_bytes(locked.bytes)} in {len(fs)} files (budget "
                f"{ui.human_bytes(limit)}); pid {os.getpid()}, Ctrl-C or SIGTERM unlocks"
            )
        while not got:
            signal.pause()
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGTERM, old)
        locked.close()
    if not as_json:
        ui.console.print("unlocked")


def _restore_parsed(opts: dict[str, Any]) -> NoReturn:
    """`fastvllm restore` whose arguments the launcher has parsed already (the agent's parser,
    resident_client.parse_restore: plain options only, each checked as the command checks it;
    anything else goes through typer). The same command, without typer's parsing, which imports
    pydantic to check option values (~60 ms before a restore can start). The launcher itself
    runs such a restore through restore_command.main, without importing this module."""
    from fastvllm import restore_command

    kwargs = restore_command.keywords(opts)
    if kwargs is None:  # a parser newer than this
        app()
        sys.exit(0)
    try:
        restore_command.run(**kwargs)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    sys.exit(0)


def main(parsed_restore: dict[str, Any] | None = None) -> None:
    """The CLI. `parsed_restore`: the options of a `fastvllm restore` the launcher parsed."""
    from fastvllm import command_exit  # signals, closed pipes and bugs: how the command ends

    if parsed_restore is None:
        command_exit.run(app)
    else:
        command_exit.run(lambda: _restore_parsed(parsed_restore))


if __name__ == "__main__":
    main()

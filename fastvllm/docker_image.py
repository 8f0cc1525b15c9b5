"""Build the CPU variant of Dockerfile.criu on a host with no registry: start dockerd when none
answers, make the base image offline (debootstrap minbase + `docker import`, the result cached
as a tarball under .deps/docker/), then build the image with Docker's layer cache. The Docker
tests and the container benchmark use it; a second run takes seconds.

    python -m fastvllm.docker_image            # base + image, prints the timings
"""

from __future__ import annotations

import argparse
import configparser
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastvllm import container
from fastvllm.runtime import config
from fastvllm.runtime.errors import EnvironmentNotReadyError

ROOT = Path(__file__).resolve().parent.parent
DEPS = config.DEPS.get()
BASE_IMAGE = "fastvllm-test-base:bookworm"
CPU_IMAGE = "fastvllm-test-cpu:latest"
SUITE = "bookworm"


def _say(msg: str) -> None:
    print(f"docker_image: {msg}", flush=True)


def client(timeout: int = 600) -> Any:
    return container.docker_client(timeout)


def daemon_answers() -> bool:
    import docker  # noqa: F401  (a missing SDK is an error of its own, not "no engine")

    try:
        container.docker_client(10)
    except EnvironmentNotReadyError:
        return False
    return True


@dataclass
class Daemon:
    """The Docker engine in use; `pid` is set only when we started it (then we stop it)."""

    pid: int | None
    log: Path | None

    def stop(self) -> None:
        if self.pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(self.pid, 15)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                done, _ = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:
                break
            if done:
                break
            time.sleep(0.2)
        self.pid = None


def why_no_daemon() -> str | None:
    """None when a Docker engine answers or can be started here; else the reason."""
    if daemon_answers():
        return None
    if os.geteuid() != 0:
        return "no Docker engine answers and starting dockerd needs root"
    if shutil.which("dockerd") is None:
        return "no Docker engine answers and dockerd is not installed (scripts/setup.sh installs docker.io)"
    return None


def ensure_daemon(timeout: float = 90.0) -> Daemon:
    """Use the running engine, or start Debian's dockerd. It is started without iptables rules:
    nothing here needs NAT (the host reaches containers on the bridge directly, and image builds
    use the host's network), and the host's firewall is left as it was."""
    if daemon_answers():
        return Daemon(None, None)
    reason = why_no_daemon()
    if reason:
        raise EnvironmentNotReadyError(reason, hint="install docker.io (scripts/setup.sh) and run as root")
    log = DEPS / "docker" / "dockerd.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            ["dockerd", "--iptables=false", "--ip-masq=false"],
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    daemon = Daemon(proc.pid, log)
    deadline = time.monotonic() + timeout
    while not daemon_answers():
        if proc.poll() is not None or time.monotonic() > deadline:
            daemon.stop()
            tail = log.read_text(errors="replace").splitlines()[-5:]
            raise EnvironmentNotReadyError("dockerd did not start", hint=f"see {log}", detail="\n".join(tail))
        time.sleep(0.5)
    return daemon


def _apt_mirror() -> str:
    """The Debian archive this machine's apt uses (never a hard-coded host)."""
    sources = sorted(Path("/etc/apt/sources.list.d").glob("*.sources"))
    for f in sources:
        for line in f.read_text().splitlines():
            if line.startswith("URIs:"):
                for uri in line.split()[1:]:
                    if "debian" in uri and "security" not in uri:
                        return uri
    listing = Path("/etc/apt/sources.list")
    if listing.is_file():
        for line in listing.read_text().splitlines():
            parts = line.split()
            if parts[:1] == ["deb"]:
                for p in parts[1:]:
                    if "://" in p and "security" not in p:
                        return p
    raise EnvironmentNotReadyError(
        "cannot find a Debian archive in /etc/apt", hint="build the base image yourself and pass --base"
    )


def base_tarball() -> Path:
    return DEPS / "docker" / f"debian-{SUITE}-minbase.tar"


def ensure_base_image(dc: Any, name: str = BASE_IMAGE) -> float:
    """The base image, imported from the cached debootstrap tarball (made once). Returns seconds."""
    import docker

    t0 = time.perf_counter()
    with contextlib.suppress(docker.errors.ImageNotFound):
        dc.images.get(name)
        return 0.0
    tar = base_tarball()
    if not tar.is_file():
        if shutil.which("debootstrap") is None:
            raise EnvironmentNotReadyError(
                "debootstrap is not installed", hint="run scripts/setup.sh (it installs debootstrap)"
            )
        tar.parent.mkdir(parents=True, exist_ok=True)
        rootfs = Path(tempfile.mkdtemp(prefix="fastvllm-rootfs-"))
        try:
            _say(f"debootstrap --variant=minbase {SUITE} (about a minute)")
            r = subprocess.run(
                ["debootstrap", "--variant=minbase", SUITE, str(rootfs), _apt_mirror()],
                capture_output=True,
                text=True,
                check=False,
            )
            if r.returncode != 0:
                raise EnvironmentNotReadyError(
                    "debootstrap failed", hint="see its output", detail=(r.stdout + r.stderr)[-2000:]
                )
            partial = tar.with_suffix(".tar.partial")
            subprocess.run(["tar", "-C", str(rootfs), "-cf", str(partial), "."], check=True)
            os.replace(partial, tar)
        finally:
            shutil.rmtree(rootfs, ignore_errors=True)
    repo, tag = name.rsplit(":", 1)
    _say(f"docker import {tar.name} as {name}")
    with open(tar, "rb") as f:
        dc.api.import_image_from_data(f, repository=repo, tag=tag)
    return time.perf_counter() - t0


def _pip_setting(env: str, key: str) -> list[str]:
    """A pip setting from the environment and pip's config files, as pip reads them."""
    found: list[str] = os.environ.get(env, "").split()
    for conf in (Path("/etc/pip.conf"), Path.home() / ".config/pip/pip.conf", Path.home() / ".pip/pip.conf"):
        if conf.is_file():
            cp = configparser.ConfigParser()
            with contextlib.suppress(configparser.Error):
                cp.read(conf)
                found += cp.get("global", key, fallback="").split()
    return found


def _pip_find_links() -> list[Path]:
    """Local wheel directories pip is configured with: a wheel that exists only on this host
    (the CPU torch) goes into the build context from there."""
    dirs = []
    for f in _pip_setting("PIP_FIND_LINKS", "find-links"):
        p = Path(f.removeprefix("file://"))
        if p.is_dir() and p not in dirs:
            dirs.append(p)
    return dirs


def _index_build_args() -> dict[str, str]:
    """pip's network indexes, passed to the build (file:// ones do not exist inside it)."""
    args = {}
    for key in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL"):
        urls = [u for u in os.environ.get(key, "").split() if u.startswith(("http://", "https://"))]
        if urls:
            args[key] = " ".join(urls)
    return args


def prepare_context() -> None:
    """Put the CRIU source tarball, the local wheels and pip's CA bundle where Dockerfile.criu
    looks for them (the bundle: a network that intercepts TLS has its own CA, which the base
    image does not trust)."""
    # The context is the repository root: whatever FASTVLLM_DEPS says, the Dockerfile reads them
    # from <root>/.deps/ (hard links, or copies across filesystems).
    tarballs = sorted((DEPS / "criu-src").glob("criu_*.orig.tar.*"))
    if not tarballs:
        raise EnvironmentNotReadyError(
            f"no CRIU source tarball in {DEPS / 'criu-src'}",
            hint="run scripts/setup.sh (it fetches criu_*.orig.tar.xz there)",
        )
    context_deps = ROOT / ".deps"
    for t in tarballs:
        _link(t, context_deps / "criu-src" / t.name)
    extra = context_deps / "docker-build"
    wheels = extra / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    certs = [Path(c) for c in _pip_setting("PIP_CERT", "cert") if Path(c).is_file()]
    if certs:
        shutil.copyfile(certs[0], extra / "pip-cert.pem")
    for d in _pip_find_links():
        for whl in d.glob("*.whl"):
            _link(whl, wheels / whl.name)


def _link(src: Path, dest: Path) -> None:
    if dest.exists():
        return
    dest.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.link(src, dest)
    except OSError:
        shutil.copy2(src, dest)


def build_image(
    dc: Any,
    tag: str = CPU_IMAGE,
    base: str = BASE_IMAGE,
    flavour: str = "cpu",
    log: Path | None = None,
    on_line: Callable[[str], None] | None = None,
) -> float:
    """docker build -f Dockerfile.criu (layer cache on); returns seconds. The build uses the
    host's network: the engine runs without NAT, and pip may need the package index."""
    prepare_context()
    log = log or DEPS / "docker" / "build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    args = {"BASE_IMAGE": base, "VLLM_FLAVOUR": flavour, "CRIU_SOURCE": "tarball", **_index_build_args()}
    old = None
    with contextlib.suppress(Exception):
        old = dc.images.get(tag).id
    t0 = time.perf_counter()
    error = None
    with open(log, "w") as out:
        for chunk in dc.api.build(
            path=str(ROOT),
            dockerfile="Dockerfile.criu",
            tag=tag,
            buildargs=args,
            network_mode="host",
            rm=True,
            forcerm=True,
            decode=True,
        ):
            text = chunk.get("stream") or chunk.get("status") or ""
            if text:
                out.write(text if text.endswith("\n") else text + "\n")
                out.flush()
                if on_line and text.strip():
                    on_line(text.rstrip())
            if "error" in chunk:
                error = chunk["error"]
                out.write(f"ERROR: {error}\n")
    if error:
        tail = log.read_text(errors="replace").splitlines()[-25:]
        raise EnvironmentNotReadyError(
            f"docker build of {tag} failed: {error.strip()[:300]}",
            hint=f"full log: {log}",
            detail="\n".join(tail),
        )
    seconds = time.perf_counter() - t0
    if old and dc.images.get(tag).id != old:
        # The previous build of this tag is now untagged: drop it (4.7 GB when its vLLM layer
        # differs) unless a container still uses it.
        with contextlib.suppress(Exception):
            dc.images.remove(old)
    return seconds


@contextlib.contextmanager
def ready_image(tag: str = CPU_IMAGE) -> Iterator[tuple[Any, dict[str, float]]]:
    """A Docker engine (started if needed, stopped afterwards if we started it) and the built
    CPU image; yields (client, {base_s, build_s})."""
    daemon = ensure_daemon()
    try:
        dc = client()
        base_s = ensure_base_image(dc)
        build_s = build_image(dc, tag)
        yield dc, {"base_s": round(base_s, 2), "build_s": round(build_s, 2)}
    finally:
        daemon.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tag", default=CPU_IMAGE)
    ap.add_argument("--keep-daemon", action="store_true", help="leave a dockerd we started running")
    a = ap.parse_args()
    daemon = ensure_daemon()
    try:
        dc = client()
        base_s = ensure_base_image(dc)
        build_s = build_image(dc, a.tag, on_line=lambda s: print(s, flush=True))
        image = dc.images.get(a.tag)
        doc = {
            "tag": a.tag,
            "base_s": round(base_s, 2),
            "build_s": round(build_s, 2),
            "size": image.attrs["Size"],
        }
        print(json.dumps(doc))
    finally:
        if not a.keep_daemon:
            daemon.stop()


if __name__ == "__main__":
    main()

"""`make images-smoke`: build every image in containers/ and start each one's entrypoint on a tiny job.

Engines: `docker` where a daemon answers (Cloud Build), else `podman` (Debian's package). Podman
builds with `--isolation chroot`, and since no OCI runtime can start containers on the machines
this project is developed on, a program of an image runs with `podman create` + `podman mount`
+ `chroot --userspec=UID:GID`, as the image's user, with the image's environment.

Base images that cannot be pulled get stand-ins, reported as such:
- `python:3.11.10-slim-bookworm`: a bookworm root filesystem from `debootstrap` with Debian's
  Python 3.11 (3.11.2), this machine's CA bundle and pip settings (the builds reach the package
  registries through it), and, where download.pytorch.org is out of reach, a local index holding
  the CPU torch wheel (`--torch-wheels`).
- `apache/beam_python3.11_sdk:2.77.0`: that stand-in plus a stub `/opt/apache/beam/boot` that
  says it is one. The worker checks then show the entrypoint, the imports and the environment
  step, but running Beam's real boot program as the image's user is left to Cloud Build.

Checks: base (`visrec --help`, `visrec compile` as its user), serving (`visrec serve` on a tiny
release built in the image answers `/healthz` and a similar-items query over HTTP), the beam and
trainer worker images (boot entrypoint, the SDK worker module and visrec import as the image's
user, the boot's environment step), trainer (`import torch`, a CUDA build, `visrec train --help`,
`--device gpu` failing fast without a GPU).
Prints a table; exit status 1 if any check failed.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import http.server
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from visrec.core.servers import free_port, get_json, stop_process, wait_healthy
from visrec.core.tables import format_table

ROOT = Path(__file__).resolve().parents[1]
PYTHON_BASE = "python:3.11.10-slim-bookworm"
BEAM_SDK = "apache/beam_python3.11_sdk:2.77.0"
STUB_MARK = "visrec image smoke test: STAND-IN boot"
STANDIN_MARK = "visrec image smoke test: STAND-IN debootstrap bookworm with Debian's Python 3.11"
CACHE = Path(os.environ.get("VISREC_SMOKE_CACHE", "/var/tmp/visrec-smoke"))


@dataclass
class Result:
    image: str
    check: str
    status: str  # PASS | FAIL | NOT HERE
    detail: str = ""


@dataclass
class Report:
    results: list[Result] = field(default_factory=list)

    def add(self, image: str, check: str, ok: bool | None, detail: str = "") -> None:
        status = "NOT HERE" if ok is None else "PASS" if ok else "FAIL"
        self.results.append(Result(image, check, status, detail))
        print(f"[{status}] {image}: {check}{' - ' + detail if detail else ''}", flush=True)

    def table(self) -> str:
        return format_table([("image", "check", "result", "detail")]
                            + [(r.image, r.check, r.status, r.detail[:90]) for r in self.results])


def sh(*argv: str, check: bool = True, capture: bool = True, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=check, text=True,
                          stdout=subprocess.PIPE if capture else None, stderr=subprocess.STDOUT if capture else None,
                          **kw)


# ---- engines ------------------------------------------------------------------------------------


@dataclass
class ImageConfig:
    user: str
    entrypoint: list[str]
    env: dict[str, str]
    workdir: str


class Engine:
    name = ""

    def build(self, dockerfile: str, tag: str, build_args: dict[str, str]) -> None:
        args = [f"--build-arg={k}={v}" for k, v in build_args.items()]
        sh(self.name, "build", *self.build_flags, "-f", dockerfile, "-t", tag, *args, str(ROOT), capture=False)

    build_flags: tuple[str, ...] = ()

    def config(self, image: str) -> ImageConfig:
        [info] = json.loads(sh(self.name, "image", "inspect", image).stdout)
        cfg = info.get("Config") or {}
        env = dict(item.split("=", 1) for item in cfg.get("Env") or [])
        return ImageConfig(cfg.get("User") or "root", cfg.get("Entrypoint") or [], env, cfg.get("WorkingDir") or "/")

    def exists(self, image: str) -> bool:
        return sh(self.name, "image", "inspect", image, check=False).returncode == 0

    def pull(self, image: str) -> bool:
        return sh(self.name, "pull", image, check=False).returncode == 0


class Docker(Engine):
    """The real thing: containers started by the daemon (Cloud Build). Each program runs in a
    container of its own; they share `/smoke`, a directory under `volume_root` that the daemon
    can mount (in Cloud Build: under /workspace, which build steps and the daemon both see)."""

    name = "docker"

    def __init__(self, network: str, volume_root: Path | None):
        self.network, self.volume_root = network, volume_root

    @contextlib.contextmanager
    def container(self, image: str) -> Iterator["DockerContainer"]:
        if self.volume_root:
            self.volume_root.mkdir(parents=True, exist_ok=True)
        volume = Path(tempfile.mkdtemp(prefix="visrec-smoke-", dir=self.volume_root))
        os.chmod(volume, 0o1777)  # the image's user writes there too
        try:
            yield DockerContainer(self, image, volume)
        finally:
            shutil.rmtree(volume, ignore_errors=True)


@dataclass
class DockerContainer:
    engine: Docker
    image: str
    volume: Path
    name: str = ""

    def put(self, local: Path, path: str) -> None:
        shutil.copy2(local, self.volume / Path(path).name)

    def run(self, argv: list[str], user: str | None = None, background: bool = False) -> subprocess.CompletedProcess:
        self.name = f"visrec-smoke-{os.getpid()}-{time.monotonic_ns()}"
        flags = ["--rm", "--name", self.name, f"--network={self.engine.network}", "-v", f"{self.volume}:/smoke"]
        flags += ["-d"] if background else []
        flags += ["--user", user] if user else []
        return sh("docker", "run", *flags, "--entrypoint", argv[0], self.image, *argv[1:], check=False)

    def host(self, _started) -> str:
        # On a user-defined network (Cloud Build's `cloudbuild`) a container is reached by its name.
        return "127.0.0.1" if self.engine.network == "host" else self.name


class Podman(Engine):
    """Builds with chroot isolation; runs a program of an image with chroot into its mounted rootfs."""

    name = "podman"
    build_flags = ("--isolation", "chroot")

    @contextlib.contextmanager
    def container(self, image: str) -> Iterator["PodmanContainer"]:
        cid = sh("podman", "create", image).stdout.strip().splitlines()[-1]
        root = Path(sh("podman", "mount", cid).stdout.strip())
        mounted = []
        try:
            for path in ("proc", "sys", "dev"):
                (root / path).mkdir(exist_ok=True)
                if sh("mount", "--rbind", f"/{path}", str(root / path), check=False).returncode == 0:
                    mounted.append(root / path)
            (root / "smoke").mkdir(exist_ok=True)
            os.chmod(root / "smoke", 0o1777)
            yield PodmanContainer(self.config(image), root)
        finally:
            for path in reversed(mounted):
                sh("umount", "-R", "-l", str(path), check=False)
            sh("podman", "umount", cid, check=False)
            sh("podman", "rm", "-f", cid, check=False)


@dataclass
class PodmanContainer:
    config: ImageConfig
    root: Path

    def put(self, local: Path, path: str) -> None:
        shutil.copy2(local, self.root / "smoke" / Path(path).name)

    def _command(self, argv: list[str], user: str | None) -> list[str]:
        who = user or self.config.user
        uid = "0:0" if who in ("root", "0") else f"{who}:{who}" if ":" not in who else who
        env = {"HOME": "/root" if uid.startswith("0:") else "/tmp", **self.config.env}
        return ["chroot", f"--userspec={uid}", str(self.root), "/usr/bin/env", "-i",
                f"--chdir={self.config.workdir}", *[f"{k}={v}" for k, v in env.items()], *argv]

    def run(self, argv: list[str], user: str | None = None, background: bool = False):
        if background:
            return subprocess.Popen(self._command(argv, user), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                    text=True)
        return sh(*self._command(argv, user), check=False)

    def host(self, _process) -> str:
        return "127.0.0.1"  # chroot shares this machine's network


# ---- stand-ins for base images that cannot be pulled (podman only) ------------------------------


def python_standin(engine: Podman) -> None:
    rootfs = CACHE / "rootfs"
    if not (rootfs / "usr" / "bin" / "python3").exists():
        print("debootstrap: a bookworm root filesystem with python3 (one minute) ...", flush=True)
        sh("debootstrap", "--variant=minbase", "--include=python3,python3-pip,python3-venv,ca-certificates",
           "bookworm", str(rootfs), "http://deb.debian.org/debian", capture=False)
    # Like python:slim: `python` and `pip` on PATH, pip allowed to install, and this machine's
    # CA bundle and pip settings so builds reach the package registries from inside.
    (rootfs / "usr/local/bin").mkdir(parents=True, exist_ok=True)
    for name, target in (("python", "/usr/bin/python3"), ("pip", "/usr/bin/pip3")):
        link = rootfs / "usr/local/bin" / name
        link.unlink(missing_ok=True)
        link.symlink_to(target)
    for managed in rootfs.glob("usr/lib/python3*/EXTERNALLY-MANAGED"):
        managed.unlink()
    shutil.copy2("/etc/ssl/certs/ca-certificates.crt", rootfs / "etc/ssl/certs/ca-certificates.crt")
    (rootfs / "etc/pip.conf").write_text("[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n"
                                         "trusted-host = 127.0.0.1\n")
    for name in ("resolv.conf", "hosts"):
        shutil.copy2(f"/etc/{name}", rootfs / "etc" / name)
    archive = CACHE / "python-standin.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(rootfs, arcname=".")
    sh("podman", "import", "--change", "ENV PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
       "--change", "ENV LANG=C.UTF-8", "--change", f'LABEL visrec.smoke="{STANDIN_MARK}"',
       "--change", 'CMD ["python3"]', str(archive), PYTHON_BASE)
    archive.unlink()


def standin_note(engine: Engine, image: str) -> str | None:
    """What a local stand-in of `image` is, or None when it is the real image."""
    [info] = json.loads(sh(engine.name, "image", "inspect", image).stdout)
    return ((info.get("Config") or {}).get("Labels") or {}).get("visrec.smoke")


def beam_standin(engine: Podman) -> None:
    stub = CACHE / "beam-standin"
    stub.mkdir(parents=True, exist_ok=True)
    (stub / "boot").write_text(f"#!/bin/sh\necho '{STUB_MARK}: Beam's boot program is not in this image'\n")
    os.chmod(stub / "boot", 0o755)
    (stub / "Containerfile").write_text(f"FROM {PYTHON_BASE}\nCOPY boot /opt/apache/beam/boot\n"
                                        f'LABEL visrec.smoke="{STUB_MARK}"\nENTRYPOINT ["/opt/apache/beam/boot"]\n')
    sh("podman", "build", "--isolation", "chroot", "-t", BEAM_SDK, str(stub), capture=False)


class TorchIndex:
    """A local PEP 503 index holding the CPU torch wheel, for builds that cannot reach download.pytorch.org."""

    def __init__(self, wheels: Path):
        self.dir = Path(tempfile.mkdtemp(prefix="visrec-torch-index-"))
        (self.dir / "simple" / "torch").mkdir(parents=True)
        links = []
        for wheel in sorted(wheels.glob("torch-*.whl")):
            (self.dir / wheel.name).symlink_to(wheel)
            links.append(f'<a href="../../{wheel.name.replace("+", "%2B")}">{wheel.name}</a>')
        if not links:
            raise SystemExit(f"no torch-*.whl in {wheels}")
        (self.dir / "simple" / "torch" / "index.html").write_text("<html><body>" + "".join(links) + "</body></html>")
        handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(self.dir))
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/simple"


# ---- checks ------------------------------------------------------------------------------------


def ok(result) -> tuple[bool, str]:
    tail = (result.stdout or "").strip().splitlines()[-1:] or [""]
    return result.returncode == 0, tail[0]


def check_base(engine: Engine, image: str, report: Report) -> None:
    cfg = engine.config(image)
    report.add(image, f"entrypoint {cfg.entrypoint}, user {cfg.user}", cfg.entrypoint == ["visrec"] and cfg.user == "1000")
    with engine.container(image) as box:
        report.add(image, "visrec --help as its user", *ok(box.run(["visrec", "--help"])))
        report.add(image, "visrec compile as its user", *ok(box.run(["visrec", "compile", "--out", "/tmp/p.yaml"])))


def check_serving(engine: Engine, image: str, report: Report) -> None:
    cfg = engine.config(image)
    report.add(image, f"entrypoint {cfg.entrypoint}, user {cfg.user}",
               cfg.entrypoint == ["visrec", "serve"] and cfg.user == "1000")
    with engine.container(image) as box:
        box.put(ROOT / "containers" / "smoke_release.py", "/smoke/smoke_release.py")
        built = box.run(["python", "/smoke/smoke_release.py", "/smoke/release"])
        report.add(image, "a tiny release built by the image's own visrec", *ok(built))
        if built.returncode:
            print(built.stdout[-3000:])
            return
        port = free_port()
        server = box.run(["visrec", "serve", "--release", "/smoke/release/registry", "--host", "0.0.0.0",
                          "--port", str(port)], background=True)
        host = box.host(server.stdout if isinstance(server, subprocess.CompletedProcess) else server)
        try:
            try:
                health = wait_healthy(f"http://{host}:{port}/healthz", timeout=180)
            except TimeoutError:
                health = None
            report.add(image, "visrec serve: GET /healthz over HTTP", health is not None,
                       json.dumps(health)[:90] if health else "no answer in 180 s")
            query = read_smoke_file(box, "release/query.txt")
            answer = get_json(f"http://{host}:{port}/v1/items/{query}/similar?k=3", timeout=5) if health else None
            good = bool(answer and answer.get("items"))
            report.add(image, "visrec serve: GET /v1/items/ID/similar over HTTP", good,
                       f"{len(answer['items'])} items from release {answer['release']}" if good else str(answer))
        finally:
            stop(engine, server)


def read_smoke_file(box, name: str) -> str:
    if isinstance(box, PodmanContainer):
        return (box.root / "smoke" / name).read_text().strip()
    return (box.volume / name).read_text().strip()


def stop(engine: Engine, server) -> None:
    if isinstance(server, subprocess.Popen):
        stop_process(server)
    else:
        sh("docker", "rm", "-f", server.stdout.strip(), check=False)


WORKER_IMPORTS = "import apache_beam.runners.worker.sdk_worker_main, visrec.stages.embed, visrec.stages.prepare; print('imports ok')"
VENV_STEP = ("python -m venv --system-site-packages /opt/apache/beam-venv && /opt/apache/beam-venv/bin/python -c "
             "'import visrec, torch, apache_beam; print(\"venv ok\")' && rm -rf /opt/apache/beam-venv")


def check_worker(engine: Engine, image: str, report: Report, standin_boot: bool) -> None:
    cfg = engine.config(image)
    report.add(image, f"entrypoint is Beam's boot ({cfg.entrypoint}), user {cfg.user}",
               cfg.entrypoint == ["/opt/apache/beam/boot"])
    report.add(image, "RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT=1 (the boot uses this image's Python)",
               cfg.env.get("RUN_PYTHON_SDK_IN_DEFAULT_ENVIRONMENT") == "1")
    with engine.container(image) as box:
        report.add(image, "SDK worker module and visrec import as the image's user",
                   *ok(box.run(["python", "-c", WORKER_IMPORTS])))
        report.add(image, "the boot's venv step (--system-site-packages) works as the image's user",
                   *ok(box.run(["sh", "-c", VENV_STEP])))
        boot = box.run(["/opt/apache/beam/boot", "--help"])
        if standin_boot:
            report.add(image, "Beam's real boot program as the image's user", None,
                       "stand-in boot here; Cloud Build runs this check against the real SDK image")
        else:
            real = STUB_MARK not in (boot.stdout or "")
            report.add(image, "Beam's real boot program is installed and starts", real and "boot" in (boot.stdout or ""),
                       (boot.stdout or "").strip().splitlines()[0][:90] if boot.stdout else "")


def check_trainer(engine: Engine, image: str, report: Report) -> None:
    with engine.container(image) as box:
        torch = box.run(["python", "-c", "import torch; assert torch.version.cuda, 'CPU build'; "
                                         "print('torch', torch.__version__, 'CUDA', torch.version.cuda, "
                                         "'GPU here:', torch.cuda.is_available())"])
        report.add(image, "import torch (a CUDA build; no GPU needed to check)", *ok(torch))
        report.add(image, "visrec train --help", *ok(box.run(["visrec", "train", "--help"])))
        # A GPU that CUDA cannot use (none here) must stop the run at once, not train on the CPU.
        gpu = box.run(["visrec", "train", "--data", "/nonexistent", "--out", "/tmp/smoke-train", "--device", "gpu"])
        message = (gpu.stdout or "").strip().splitlines()[-1:] or [""]
        report.add(image, "visrec train --device gpu without a usable GPU fails at once, naming the driver",
                   gpu.returncode == 2 and "CUDA is not usable" in message[0], message[0][:160])


# ---- main ------------------------------------------------------------------------------------


def docker_available() -> bool:
    return shutil.which("docker") is not None and sh("docker", "info", check=False).returncode == 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("auto", "docker", "podman"), default="auto")
    parser.add_argument("--registry", default="localhost/visrec-smoke", help="image name prefix")
    parser.add_argument("--tag", default="smoke")
    parser.add_argument("--no-build", action="store_true", help="check images already built under --registry/--tag")
    parser.add_argument("--skip", action="append", default=[], help="image to skip (base, beam, trainer, serving)")
    parser.add_argument("--docker-network", default="host",
                        help="docker network the checked containers join (Cloud Build: cloudbuild)")
    parser.add_argument("--docker-volume-root", type=Path,
                        help="where the files shared with docker containers go (Cloud Build: /workspace/smoke)")
    parser.add_argument("--torch-wheels", type=Path, default=Path("/opt/wheels"),
                        help="a directory with the CPU torch wheel, when download.pytorch.org is out of reach")
    args = parser.parse_args(argv)

    engine: Engine = (Docker(args.docker_network, args.docker_volume_root) if args.engine == "docker" or
                      (args.engine == "auto" and docker_available()) else Podman())
    report = Report()
    started = time.monotonic()
    print(f"engine: {engine.name}", flush=True)
    build_args: dict[str, str] = {}
    if isinstance(engine, Podman) and not args.no_build:
        if not (engine.exists(PYTHON_BASE) or engine.pull(PYTHON_BASE)):
            python_standin(engine)
        if not (engine.exists(BEAM_SDK) or engine.pull(BEAM_SDK)):
            beam_standin(engine)
        if get_json("https://download.pytorch.org/whl/cpu/", timeout=5) is None and args.torch_wheels.is_dir():
            torch_index = TorchIndex(args.torch_wheels)
            build_args["TORCH_INDEX_URL"] = torch_index.url
            report.add("base", "CPU torch from a local index", None,
                       f"download.pytorch.org is out of reach here; wheels from {args.torch_wheels}")
    for base in (PYTHON_BASE, BEAM_SDK):
        note = standin_note(engine, base) if engine.exists(base) else None
        if note:
            report.add(base, "base image", None, note)
    standin_boot = engine.exists(BEAM_SDK) and standin_note(engine, BEAM_SDK) == STUB_MARK

    def tag(name: str) -> str:
        return f"{args.registry}/{name}:{args.tag}"

    plan = [("base", "containers/base/Dockerfile", build_args),
            ("beam", "containers/beam/Dockerfile", {"BASE_IMAGE": tag("base")}),
            ("trainer", "containers/trainer/Dockerfile", {}),
            ("serving", "containers/serving/Dockerfile", {"BASE_IMAGE": tag("base")})]
    for name, dockerfile, extra in plan:
        if name in args.skip:
            report.add(tag(name), "build", None, "skipped (--skip)")
            continue
        if not args.no_build:
            began = time.monotonic()
            try:
                engine.build(dockerfile, tag(name), extra)
            except subprocess.CalledProcessError as exc:
                report.add(tag(name), "build", False, f"exit {exc.returncode}")
                continue
            report.add(tag(name), "build", True, f"{time.monotonic() - began:.0f} s")
        check = {"base": check_base, "serving": check_serving, "trainer": check_trainer}.get(name)
        if name in ("beam", "trainer"):
            check_worker(engine, tag(name), report, standin_boot)
        if check:
            check(engine, tag(name), report)
    print(f"\nimage smoke test ({engine.name}), {time.monotonic() - started:.0f} s\n{report.table()}")
    return 1 if any(r.status == "FAIL" for r in report.results) else 0


if __name__ == "__main__":
    sys.exit(main())

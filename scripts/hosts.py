"""The ComfyUI releases the tests run against: one virtualenv each, then tier 1 once and tiers 2-3 per release.

    python scripts/hosts.py setup          # called by scripts/setup.sh, after .venv exists
    python scripts/hosts.py test [ARGS]    # scripts/test.py: the README's test command (ARGS go to pytest)

Hosts: the checkout ``COMFYUI_PATH`` names when it is set, else every release folder under
``../shared/comfyui`` (``COMPARTMENTS_RELEASES`` overrides that folder). Each host gets
``.venv-comfyui/<name>``, a virtualenv that layers the release's own ``requirements.txt`` over
``.venv`` (torch, the pack and the test tools are installed once, there, and seen through a
``.pth`` line; what the release pins differently, such as its frontend package, lands in the
host's venv and wins). Shared releases are read-only where CI runs, so each test run copies
the tree to a temporary folder first.

A host that is not a checkout, is older than the pack supports, or whose requirements fail
to install is named in one line and the others still run; only the unsupported one leaves
the run green.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BASE_VENV = ROOT / ".venv"
HOST_VENVS = ROOT / ".venv-comfyui"
STATUS = "compartments-host.json"

# Run with .venv's interpreter, where the pack is installed (editable) as ``compartments``.
from compartments.cli.client import MIN_COMFYUI, comfyui_version, is_comfyui, is_supported  # noqa: E402


@dataclass
class Host:
    name: str
    path: Path
    shared: bool  # a release under ../shared/comfyui (read-only in CI: copied before use)
    problem: str = ""  # why it cannot run; empty when it can
    unsupported: bool = False

    @property
    def version(self) -> str:
        return comfyui_version(self.path)

    @property
    def venv(self) -> Path:
        return HOST_VENVS / self.name

    @property
    def python(self) -> Path:
        return self.venv / "bin" / "python"


def releases_dir() -> Path:
    return Path(os.environ.get("COMPARTMENTS_RELEASES") or ROOT.parent / "shared" / "comfyui")


def hosts() -> list[Host]:
    """The hosts of this run, each with its problem (if any) already named."""
    found: list[Host] = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        host = Host(f"path-{path.name}", path, shared=False)
        if not is_comfyui(path):
            host.problem = (f"COMFYUI_PATH={env} is not a ComfyUI checkout (no main.py and comfy/ there): "
                            "point it at the folder holding ComfyUI's main.py, or unset it to test every release "
                            f"under {releases_dir()}")
        found.append(host)
        if not host.problem:
            return _check_supported(found)
    rel = releases_dir()
    if rel.is_dir():
        for path in sorted(p for p in rel.iterdir() if p.is_dir()):
            host = Host(path.name, path.resolve(), shared=True)
            if not is_comfyui(path):
                host.problem = f"{path} is not a ComfyUI checkout (no main.py and comfy/): remove it from {rel}"
            found.append(host)
    return _check_supported(found)


def _check_supported(found: list[Host]) -> list[Host]:
    for host in found:
        if not host.problem and not is_supported(host.version):
            host.problem = (f"ComfyUI {host.version} at {host.path} is older than the oldest release the pack "
                            f"supports ({MIN_COMFYUI}, pyproject [tool.comfy] requires-comfyui): skipped; "
                            "update that ComfyUI")
            host.unsupported = True
    return found


def say(msg: str) -> None:
    print(f"hosts: {msg}", flush=True)


# ---------------------------------------------------------------- setup
def _site_packages(venv: Path) -> Path:
    rel = Path(sysconfig.get_path("purelib", vars={"base": "", "platbase": ""}).lstrip("/"))
    return venv / rel


def setup() -> int:
    """Build ``.venv-comfyui/<name>`` for every host; exit 0 even when one fails (the test run reports it)."""
    if not (BASE_VENV / "bin" / "python").is_file():
        say(f"{BASE_VENV} is missing: run scripts/setup.sh (it builds .venv first)")
        return 2
    all_hosts = hosts()
    if not all_hosts:
        say(f"no ComfyUI release under {releases_dir()} and COMFYUI_PATH unset: tiers 2-3 will not run")
    keep = {h.name for h in all_hosts}
    if HOST_VENVS.is_dir():
        for old in HOST_VENVS.iterdir():
            if old.name not in keep:
                shutil.rmtree(old, ignore_errors=True)
    for host in all_hosts:
        if host.problem:
            say(host.problem)
            continue
        t0 = time.monotonic()
        ok, detail = _build_venv(host)
        status = {"name": host.name, "path": str(host.path), "version": host.version, "ok": ok, "error": detail}
        if host.venv.is_dir():
            (host.venv / STATUS).write_text(json.dumps(status, indent=2))
        if ok:
            say(f"ComfyUI {host.version} ({host.name}): virtualenv {host.venv} ready in {time.monotonic() - t0:.0f} s")
        else:
            say(f"ComfyUI {host.version} ({host.name}): its requirements failed to install: {detail} "
                f"(the other releases still run; fix the requirement or pin it, then rerun scripts/setup.sh)")
    return 0


def _build_venv(host: Host) -> tuple[bool, str]:
    shutil.rmtree(host.venv, ignore_errors=True)
    HOST_VENVS.mkdir(exist_ok=True)
    res = subprocess.run([str(BASE_VENV / "bin" / "python"), "-m", "venv", "--without-pip", str(host.venv)],
                         capture_output=True, text=True)
    if res.returncode:
        return False, f"python -m venv failed: {res.stderr.strip()[-300:]}"
    site = _site_packages(host.venv)
    # The base venv's site-packages joins this one *after* it (addsitedir also runs its .pth files,
    # so the editable install of the pack works): what the release installs here wins.
    (site / "_compartments_base.pth").write_text(f"import site; site.addsitedir({str(_site_packages(BASE_VENV))!r})\n")
    req = host.path / "requirements.txt"
    if not req.is_file():
        return False, f"{req} is missing"
    # pip itself comes from the base venv, run with this venv's interpreter so it installs here.
    log = host.venv / "pip-install.log"
    with open(log, "w") as out:
        res = subprocess.run([str(host.python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                              "-r", str(req)], stdout=out, stderr=subprocess.STDOUT)
    if res.returncode:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-3:]
        return False, f"pip exit {res.returncode}: {' | '.join(tail)[-400:]} (full log: {log})"
    probe = subprocess.run([str(host.python), "-c", "import torch, compartments, pytest; print(torch.__version__)"],
                           capture_output=True, text=True)
    if probe.returncode:
        return False, f"the venv cannot import torch/compartments/pytest: {probe.stderr.strip()[-300:]}"
    return True, ""


# ---------------------------------------------------------------- test
@dataclass
class Result:
    label: str
    tiers: str
    counts: dict[str, int] = field(default_factory=dict)
    note: str = ""
    red: bool = False
    seconds: float = 0.0
    slowest: list[str] = field(default_factory=list)

    def line(self) -> str:
        c = self.counts
        body = (f"{c.get('passed', 0)} passed, {c.get('failed', 0)} failed, {c.get('skipped', 0)} skipped"
                if c else "did not run")
        return f"{self.label:<28} {self.tiers:<24} {body}{'  ' + self.note if self.note else ''}"


# Per release: in-process nodes, the server's HTTP API, and the editor in headless Chromium.
TIERS_2_3 = "comfy, e2e, browser"
# Two processes per release: the in-process ComfyUI of tier 2 holds its models (about 13 GB at the end)
# until its process exits, and the servers of tier 3 and the browser tier need that memory.
PHASES_2_3 = ("comfy", "e2e or browser")
SLOWEST = 15  # tests named in the summary with their time, slowest first


def _start(python: Path, marker: str, args: list[str], env: dict[str, str],
           title: str = "") -> tuple[subprocess.Popen, Path, Path, str]:
    """Start pytest in the background; its output goes to a log printed whole when it ends (runs
    overlap, and interleaved lines of two pytest sessions would be unreadable)."""
    fd, xml = tempfile.mkstemp(prefix="compartments-junit-", suffix=".xml")
    os.close(fd)
    fd, log = tempfile.mkstemp(prefix="compartments-pytest-", suffix=".log")
    with os.fdopen(fd, "w") as out:
        proc = subprocess.Popen([str(python), "-m", "pytest", "-p", "no:cacheprovider", "-m", marker,
                                 f"--junitxml={xml}", *args], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    return proc, Path(xml), Path(log), title or marker


def _finish(started: tuple[subprocess.Popen, Path, Path, str],
            times: list[tuple[float, str]] | None = None) -> tuple[int, dict[str, int]]:
    proc, xml, log, title = started
    try:
        code = proc.wait()
        print(f"----- {title} (exit {code}) -----", flush=True)
        sys.stdout.write(log.read_text(errors="replace"))
        sys.stdout.flush()
        counts = _junit_counts(xml)
        if times is not None:
            times += _junit_times(xml)
    finally:
        xml.unlink(missing_ok=True)
        log.unlink(missing_ok=True)
    return code, counts


def _junit_times(xml: Path) -> list[tuple[float, str]]:
    """(seconds, test id) of every test case of a junit file (setup + call + teardown)."""
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError):
        return []
    return [(float(case.get("time", 0)), f"{case.get('classname', '')}::{case.get('name', '')}")
            for case in root.iter("testcase")]


def _junit_counts(xml: Path) -> dict[str, int]:
    try:
        root = ET.parse(xml).getroot()
    except (ET.ParseError, OSError):
        return {}
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    tot = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = tot["failures"] + tot["errors"]
    return {"passed": tot["tests"] - failed - tot["skipped"], "failed": failed, "skipped": tot["skipped"]}


def test(args: list[str]) -> int:
    t_all = time.monotonic()
    results: list[Result] = []
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    base_py = BASE_VENV / "bin" / "python"
    if not base_py.is_file():
        say(f"{BASE_VENV} is missing: run scripts/setup.sh first")
        return 2
    # Schedule, for 2 cores and 24 GB: tier 1 beside the first release's tier 2 (in-process, about 13 GB;
    # it waits on disk and single-threaded work about half the time), then the next releases' tier 2, then
    # each release's server tiers in turn (measured 2026-12-03: running two releases' server tiers at once
    # took 23+ minutes against about 17 in turn: both are CPU-bound there).
    runs: list[_Run] = []
    for host in hosts():
        label = f"ComfyUI {host.version} ({host.name})"
        if host.problem:
            say(host.problem)
            results.append(Result(label, TIERS_2_3, note="UNSUPPORTED, skipped" if host.unsupported else
                                  "NOT RUN: " + host.problem, red=not host.unsupported))
            continue
        status = _status(host)
        if not status.get("ok"):
            why = status.get("error") or f"no virtualenv at {host.venv}: run scripts/setup.sh"
            say(f"{label}: {why}")
            results.append(Result(label, TIERS_2_3, note="NOT RUN: " + why, red=True))
            continue
        runs.append(_Run(host, label))
    try:
        for run in runs:
            run.prepare()
        unit = _Phase("tier 1 (no ComfyUI)", "unit", _start(base_py, "unit", args, env, "tier 1"))
        for run in runs:  # the first one beside tier 1
            run.start(PHASES_2_3[0], args, env)
            run.wait()
        unit_result = unit.result()
        for run in runs:  # one at a time: two releases' server tiers at once took 1.5x longer than in turn
            run.start(PHASES_2_3[1], args, env)
            run.wait()
        results.insert(0, unit_result)
        results += [run.result() for run in runs]
    finally:
        for run in runs:
            run.cleanup()
    return _summary(results, time.monotonic() - t_all)


@dataclass
class _Phase:
    """One pytest process running in the background."""

    label: str
    tiers: str
    started: tuple
    t0: float = field(default_factory=time.monotonic)

    def result(self) -> Result:
        times: list[tuple[float, str]] = []
        code, counts = _finish(self.started, times)
        return Result(self.label, self.tiers, counts, red=code not in (0, 5), seconds=time.monotonic() - self.t0,
                      slowest=[f"{t:.0f} s {name}" for t, name in sorted(times, reverse=True)[:SLOWEST]])


@dataclass
class _Run:
    """Tiers 2-3 of one release: its own copy of a shared checkout, then one pytest process per phase."""

    host: Host
    label: str
    path: Path | None = None
    copy: Path | None = None
    counts: dict[str, int] = field(default_factory=dict)
    red: bool = False
    seconds: float = 0.0
    times: list[tuple[float, str]] = field(default_factory=list)
    current: tuple | None = None
    t0: float = 0.0

    def prepare(self) -> None:
        self.path = self.host.path
        if self.host.shared:
            self.copy = Path(tempfile.mkdtemp(prefix=f"compartments-{self.host.name}-"))
            self.path = self.copy / "ComfyUI"
            shutil.copytree(self.host.path, self.path, ignore=shutil.ignore_patterns(".git", "__pycache__"))
        say(f"{self.label}: tiers 2-3 in {self.host.venv} against {self.path}")

    def start(self, marker: str, args: list[str], env: dict[str, str]) -> None:
        self.t0 = time.monotonic()
        self.current = _start(self.host.python, marker, args, dict(env, COMFYUI_PATH=str(self.path)),
                              f"{self.label}: {marker}")

    def wait(self) -> None:
        code, got = _finish(self.current, self.times)
        self.seconds += time.monotonic() - self.t0
        self.red |= code not in (0, 5)
        self.counts = {k: self.counts.get(k, 0) + got.get(k, 0) for k in ("passed", "failed", "skipped")}

    def result(self) -> Result:
        return Result(self.label, TIERS_2_3, self.counts, red=self.red, seconds=self.seconds,
                      slowest=[f"{t:.0f} s {name}" for t, name in sorted(self.times, reverse=True)[:SLOWEST]])

    def cleanup(self) -> None:
        if self.current is not None and self.current[0].poll() is None:
            self.current[0].kill()
        if self.copy is not None:
            shutil.rmtree(self.copy, ignore_errors=True)


def _status(host: Host) -> dict:
    try:
        return json.loads((host.venv / STATUS).read_text())
    except (OSError, ValueError):
        return {}


def _summary(results: list[Result], seconds: float) -> int:
    print("\n===== compartments: tests per ComfyUI release =====")
    for r in results:
        print(r.line() + (f"  ({r.seconds:.0f} s)" if r.seconds else ""))
    for r in results:  # where the time goes (CI has a 30-minute budget)
        if r.slowest:
            print(f"slowest in {r.label}: " + "; ".join(r.slowest[:8]))
    red = [r.label for r in results if r.red or r.counts.get("failed")]
    total = {k: sum(r.counts.get(k, 0) for r in results) for k in ("passed", "failed", "skipped")}
    if not total["passed"] + total["failed"]:
        red.append("no test ran")
    out = Path(os.environ.get("COMPARTMENTS_TEST_SUMMARY") or Path(tempfile.gettempdir()) / "compartments-test-summary.json")
    out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "seconds": round(seconds),
                               "runs": [r.__dict__ for r in results], "red": red}, indent=2))
    print(f"summary written to {out}; {seconds:.0f} s in all")
    if red:
        print(f"RED: {', '.join(red)}")
    print(f"total: {total['passed']} passed, {total['failed']} failed, {total['skipped']} skipped")
    return 1 if red else 0


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("setup", "test"):
        print(__doc__)
        return 2
    return setup() if argv[0] == "setup" else test(argv[1:])


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""A small client for ComfyUI's HTTP + websocket API, and a way to start a headless server.

Plain standard library plus ``websocket-client``: it imports nothing from ComfyUI, so the
command line can drive a server on another machine.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ComfyError(RuntimeError):
    """A failure reported by (or about) the ComfyUI server, worded for a person."""


# The pack folder (this module is in its cli/ package); unresolved, so a custom_nodes/ link is seen.
PACK = Path(__file__).absolute().parent.parent

# The oldest ComfyUI release the pack is tested with; pyproject's [tool.comfy] says the same
# (a unit test keeps the two equal). Older releases lack parts of the V3 API the nodes use.
MIN_COMFYUI = "0.3.64"


def is_comfyui(path: str | Path) -> bool:
    """Does ``path`` hold a ComfyUI checkout (``main.py`` beside ``comfy/``)?"""
    p = Path(path).expanduser()
    return (p / "main.py").is_file() and (p / "comfy").is_dir()


def comfyui_version(path: str | Path) -> str:
    """The release a checkout says it is, from ``comfyui_version.py`` (read, never imported)."""
    try:
        text = (Path(path).expanduser() / "comfyui_version.py").read_text()
    except OSError:
        return "unknown"
    m = re.search(r"""__version__\s*=\s*["']([^"']+)["']""", text)
    return m.group(1) if m else "unknown"


def version_tuple(version: str) -> tuple[int, ...]:
    """``"0.3.64"`` -> ``(0, 3, 64)``; anything unreadable sorts as ``()`` (older than every release)."""
    parts = re.findall(r"\d+", version.split("+")[0])
    return tuple(int(p) for p in parts[:3]) if parts else ()


def is_supported(version: str) -> bool:
    return version_tuple(version) >= version_tuple(MIN_COMFYUI)


def find_comfyui(explicit: str | None = None) -> tuple[Path, str] | None:
    """The ComfyUI to use and why: ``explicit``, else the checkout this pack is installed in
    (``<ComfyUI>/custom_nodes/<pack>``), else ``COMFYUI_PATH``, else ``~/ComfyUI``.

    Raises :class:`ComfyError` when an explicit path or ``COMFYUI_PATH`` is not a checkout
    (a typo should not silently fall through to another ComfyUI); returns None when nothing is found.
    """
    if explicit:
        if not is_comfyui(explicit):
            raise ComfyError(f"--comfyui {explicit} is not a ComfyUI checkout (no main.py and comfy/ there)")
        return Path(explicit).expanduser().resolve(), "--comfyui"
    pack = PACK.resolve()
    for link in (PACK, pack):
        if link.parent.name == "custom_nodes" and is_comfyui(link.parent.parent):
            return link.parent.parent.resolve(), "the ComfyUI this pack is installed in"
    env = os.environ.get("COMFYUI_PATH")
    if env:
        if not is_comfyui(env):
            raise ComfyError(f"COMFYUI_PATH={env} is not a ComfyUI checkout (no main.py and comfy/ there): "
                             "point it at the folder that holds ComfyUI's main.py")
        return Path(env).expanduser().resolve(), "COMFYUI_PATH"
    home = Path.home() / "ComfyUI"
    if is_comfyui(home):
        return home.resolve(), "~/ComfyUI"
    return None


def _format_node_errors(payload: dict) -> str:
    lines = []
    err = payload.get("error")
    if isinstance(err, dict):
        lines.append(f"{err.get('message', 'error')}: {err.get('details', '')}".rstrip(": "))
    elif err:
        lines.append(str(err))
    for node_id, info in (payload.get("node_errors") or {}).items():
        ctype = info.get("class_type", "?")
        for e in info.get("errors", []):
            detail = e.get("details") or ""
            lines.append(f"node {node_id} ({ctype}): {e.get('message', '')} {detail}".rstrip())
    return "\n".join(lines) or json.dumps(payload)


@dataclass
class ComfyClient:
    url: str
    client_id: str = field(default_factory=lambda: uuid.uuid4().hex)

    # -- HTTP -------------------------------------------------------------------------------
    def _request(self, path: str, data: dict | None = None, timeout: float = 30) -> Any:
        body = None if data is None else json.dumps(data).encode()
        req = urllib.request.Request(self.url.rstrip("/") + path, data=body,
                                     headers={"Content-Type": "application/json"} if body else {})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                raise ComfyError(f"ComfyUI answered HTTP {e.code} on {path}: {raw[:300]!r}") from None
            raise ComfyError(_format_node_errors(payload)) from None
        except (urllib.error.URLError, OSError) as e:
            reason = getattr(e, "reason", e)
            raise ComfyError(f"cannot reach ComfyUI at {self.url}: {reason}") from None
        return json.loads(raw) if raw else None

    def alive(self) -> bool:
        try:
            self._request("/system_stats", timeout=3)
            return True
        except ComfyError:
            return False

    def object_info(self) -> dict:
        return self._request("/object_info", timeout=120)

    def queue(self, workflow: dict) -> str:
        out = self._request("/prompt", {"prompt": workflow, "client_id": self.client_id})
        return out["prompt_id"]

    def history(self, prompt_id: str) -> dict:
        return self._request(f"/history/{prompt_id}").get(prompt_id, {})

    def download(self, item: dict, dest: Path) -> Path:
        """Fetch one file output into ``dest``; the name the server reports is used as a plain file name
        (never a path: a server or node must not be able to write outside ``dest``)."""
        query = urllib.parse.urlencode({k: item.get(k, "") for k in ("filename", "subfolder", "type")})
        target = dest / safe_name(str(item.get("filename", "")))
        dest.mkdir(parents=True, exist_ok=True)
        with urllib.request.urlopen(f"{self.url.rstrip('/')}/view?{query}", timeout=60) as resp:
            target.write_bytes(resp.read())
        return target

    # -- a whole run --------------------------------------------------------------------------
    def run(self, workflow: dict, timeout: float = 1800, progress: bool = False) -> dict:
        """Queue ``workflow``, follow it on the websocket, return ``{node_id: outputs}``.

        Raises :class:`ComfyError` with the server's node errors on validation or execution failure.
        """
        import websocket  # websocket-client

        ws_url = self.url.replace("http://", "ws://").replace("https://", "wss://").rstrip("/")
        try:
            ws = websocket.create_connection(f"{ws_url}/ws?clientId={self.client_id}", timeout=timeout)
        except (OSError, websocket.WebSocketException) as e:
            raise ComfyError(f"cannot reach ComfyUI at {self.url}: {e}") from None
        bar = None
        try:
            prompt_id = self.queue(workflow)
            deadline = time.monotonic() + timeout
            while True:
                ws.settimeout(max(1.0, deadline - time.monotonic()))
                try:
                    raw = ws.recv()
                except websocket.WebSocketTimeoutException:
                    raise ComfyError(f"workflow did not finish within {timeout:.0f} s") from None
                if not isinstance(raw, str):
                    continue  # binary previews
                msg = json.loads(raw)
                kind, data = msg.get("type"), msg.get("data", {})
                if data.get("prompt_id") not in (None, prompt_id):
                    continue
                if kind == "progress" and progress:
                    bar = _bar(bar, data)
                elif kind == "executing" and progress and data.get("node") is not None:
                    ctype = workflow.get(str(data["node"]), {}).get("class_type", "")
                    print(f"running node {data['node']} {ctype}", file=sys.stderr)
                elif kind == "execution_error":
                    raise ComfyError(
                        f"node {data.get('node_id')} ({data.get('node_type')}): "
                        f"{data.get('exception_type', '')}: {data.get('exception_message', '').strip()}")
                elif kind == "execution_interrupted":
                    raise ComfyError(f"interrupted at node {data.get('node_id')} ({data.get('node_type')})")
                elif kind == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                    # Sent after the history is written; "execution_success" comes before it.
                    break
        finally:
            if bar is not None:
                bar.close()
            ws.close()
        hist = self.history(prompt_id)
        for _ in range(20):  # a server that answers out of order: give the history a moment
            if hist:
                break
            time.sleep(0.25)
            hist = self.history(prompt_id)
        status = hist.get("status", {})
        if status.get("status_str") == "error":
            raise ComfyError(f"workflow failed: {json.dumps(status.get('messages', []))[:2000]}")
        return hist.get("outputs", {})


def safe_name(name: str) -> str:
    """``name`` when it is a plain file name; :class:`ComfyError` for anything that is a path."""
    if (not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name
            or Path(name).is_absolute() or ":" in name[:2]):
        raise ComfyError(f"the server reported an output named {name!r}, which is not a plain file name: "
                         "refused (outputs are only written inside --out)")
    return name


def _bar(bar, data):
    from tqdm import tqdm

    if bar is None or bar.total != data["max"] or data["value"] < bar.n:
        if bar is not None:
            bar.close()
        bar = tqdm(total=data["max"], desc=f"node {data.get('node')}", file=sys.stderr, leave=False)
    bar.update(data["value"] - bar.n)
    return bar


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def has_gpu(python: str) -> bool:
    probe = "import torch,sys; sys.exit(0 if torch.cuda.is_available() else 1)"
    try:
        return subprocess.run([python, "-c", probe], capture_output=True, timeout=120).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@dataclass
class ComfyServer:
    """A ComfyUI server started headless from a checkout, with its own base directory."""

    process: subprocess.Popen
    url: str
    base_dir: Path
    log_file: Path
    owns_base: bool = False

    @property
    def client(self) -> ComfyClient:
        return ComfyClient(self.url)

    @classmethod
    def start(cls, comfyui: Path, base_dir: Path | None = None, *, log_file: Path | None = None,
              python: str | None = None, cpu: bool | None = None, timeout: float = 300,
              link_from_comfyui: bool = False) -> ComfyServer:
        """Start ``main.py`` on a free loopback port; wait until it answers.

        ``base_dir`` holds models/, input/, output/, custom_nodes/ (a temporary one is made
        when None). With ``link_from_comfyui`` the checkout's own models/, input/ and
        custom_nodes/ entries are linked into it, so a user's files are found while outputs,
        temp and user data stay in the temporary folder.
        """
        comfyui = Path(comfyui).expanduser().resolve()
        if not (comfyui / "main.py").is_file():
            raise ComfyError(f"{comfyui} is not a ComfyUI checkout (no main.py)")
        python = python or sys.executable
        owns = base_dir is None
        base = Path(base_dir or tempfile.mkdtemp(prefix="compartments-comfy-"))
        for sub in ("models", "input", "output", "temp", "user", "custom_nodes"):
            if link_from_comfyui and sub in ("models", "input") and not (base / sub).exists():
                os.symlink(comfyui / sub, base / sub, target_is_directory=True)
            (base / sub).mkdir(exist_ok=True)
        _link_custom_nodes(comfyui / "custom_nodes" if link_from_comfyui else None, base / "custom_nodes")
        if cpu is None:
            cpu = not has_gpu(python)
        port = free_port()
        cmd = [python, "main.py", "--listen", "127.0.0.1", "--port", str(port), "--base-directory", str(base),
               "--disable-auto-launch", "--dont-print-server"]
        if cpu:
            cmd.append("--cpu")
        log_file = Path(log_file or base / "server.log")
        log = open(log_file, "wb")  # noqa: SIM115 - kept open for the server's lifetime
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        proc = subprocess.Popen(cmd, cwd=comfyui, stdout=log, stderr=subprocess.STDOUT, env=env)
        server = cls(proc, f"http://127.0.0.1:{port}", base, log_file, owns)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                tail = log_file.read_text(errors="replace")[-3000:]
                raise ComfyError(f"ComfyUI exited with code {proc.returncode} while starting:\n{tail}")
            if server.client.alive():
                return server
            time.sleep(0.5)
        server.stop()
        raise ComfyError(f"ComfyUI did not answer within {timeout:.0f} s (log: {log_file})")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self.owns_base:
            shutil.rmtree(self.base_dir, ignore_errors=True)


def _link_custom_nodes(src: Path | None, dst: Path) -> None:
    """Link the checkout's custom nodes (when ``src``) and this pack into ``dst``, each once."""
    pack = PACK.resolve()
    names = set()
    if src is not None and src.is_dir():
        for entry in src.iterdir():
            if not (dst / entry.name).exists():
                os.symlink(entry, dst / entry.name, target_is_directory=entry.is_dir())
            try:
                if entry.resolve() == pack:
                    names.add("pack")
            except OSError:
                pass
    if "pack" not in names and not (dst / "compartments").exists():
        os.symlink(pack, dst / "compartments", target_is_directory=True)

"""``python -m compartments``: run shared workflows headless, and the embedded demo.

    python -m compartments run WORKFLOW.json --url http://127.0.0.1:8188
    python -m compartments run WORKFLOW.json --comfyui ~/ComfyUI --out ./outputs
    python -m compartments demo --comfyui ~/ComfyUI

Each capability's subcommands (``soup``, ``store``, ``train-temporal``, ``validate``...) live in
``cli/<capability>.py`` and register themselves through ``register(subparsers)``. This package is
the pack's tooling: the command line, the HTTP client (:mod:`.client`) and the workflow-format
converter (:mod:`.workflow_ui`); the rooms never import it.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

from ..atomic import write_text
from ..errors import CompartmentsError
from .client import ComfyClient, ComfyError, ComfyServer, comfyui_version, find_comfyui, safe_name

PACK = Path(__file__).resolve().parent.parent
WORKFLOWS = PACK / "workflows"
COMMANDS = ("soup", "retrieval", "temporal", "validation", "vlm", "node_docs", "templates")


def _fail(msg: str, code: int = 2) -> int:
    print(f"compartments: {msg}", file=sys.stderr)
    return code


def _load_workflow(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ComfyError(f"workflow file not found: {path}")
    try:
        wf = json.loads(p.read_text())
    except ValueError as e:
        raise ComfyError(f"{path} is not JSON: {e}") from None
    if not isinstance(wf, dict) or "nodes" in wf or not all(isinstance(v, dict) and "class_type" in v for v in wf.values()):
        raise ComfyError(f"{path} is not an API-format workflow (export it with 'Export (API)'; "
                         "UI-format files with 'nodes' and 'links' cannot be queued)")
    return wf


def _which_comfyui(explicit: str | None) -> Path:
    """The checkout to start (see :func:`client.find_comfyui`), announced on stderr."""
    found = find_comfyui(explicit)
    if found is None:
        raise ComfyError("no ComfyUI found: give --url of a running server or --comfyui PATH of a checkout "
                         "(looked in: the ComfyUI this pack is installed in, COMFYUI_PATH, ~/ComfyUI)")
    path, why = found
    print(f"using ComfyUI {comfyui_version(path)} at {path} ({why})", file=sys.stderr)
    return path


def save_outputs(client: ComfyClient, outputs: dict, out_dir: Path) -> list[Path]:
    """Download every file output and write every text output of a finished prompt."""
    written: list[Path] = []
    for node_id, node_out in outputs.items():
        for key, items in node_out.items():
            if not isinstance(items, list):
                continue
            for i, item in enumerate(items):
                if isinstance(item, dict) and "filename" in item:
                    written.append(client.download(item, out_dir))
                elif isinstance(item, str):
                    target = out_dir / safe_name(f"node{node_id}_{key}_{i}.txt")
                    out_dir.mkdir(parents=True, exist_ok=True)
                    target.write_text(item)
                    written.append(target)
    return written


def run_workflows(paths: list[str], url: str | None, comfyui: str | None, out: Path, timeout: float,
                  base_dir: Path | None = None, link: bool = True) -> int:
    workflows = [(p, _load_workflow(p)) for p in paths]
    server = None
    if url is None:
        path = _which_comfyui(comfyui)
        print(f"starting ComfyUI from {path} ...", file=sys.stderr)
        server = ComfyServer.start(path, base_dir, link_from_comfyui=link)
        url = server.url
        print(f"ComfyUI is up at {url} (log: {server.log_file})", file=sys.stderr)
    client = ComfyClient(url)
    failures = 0
    try:
        for path, wf in workflows:
            name = Path(path).stem
            t0 = time.monotonic()
            try:
                outputs = client.run(wf, timeout=timeout, progress=True)
            except ComfyError as e:
                if "cannot reach" in str(e):
                    raise
                failures += 1
                print(f"FAILED {name}:\n{e}", file=sys.stderr)
                continue
            files = save_outputs(client, outputs, out / name)
            print(f"ok {name}: {len(files)} output(s) in {out / name} ({time.monotonic() - t0:.1f} s)")
    finally:
        if server is not None:
            server.stop()
    return 1 if failures else 0


def cmd_run(args: argparse.Namespace) -> int:
    return run_workflows(args.workflow, args.url, args.comfyui, Path(args.out), args.timeout)


def cmd_demo(args: argparse.Namespace) -> int:
    from ..tiny import prepare_all

    comfyui = None if args.url else str(_which_comfyui(args.comfyui))
    base = Path(tempfile.mkdtemp(prefix="compartments-demo-"))
    print(f"building tiny models in the real formats under {base} ...", file=sys.stderr)
    t0 = time.monotonic()
    (base / "models").mkdir()
    (base / "input").mkdir()
    prepare_all(base / "models", base / "input")
    print(f"models ready in {time.monotonic() - t0:.0f} s", file=sys.stderr)
    paths = sorted(str(p) for p in (WORKFLOWS / "api").glob("*.json"))
    if args.only:
        paths = [p for p in paths if any(s in Path(p).stem for s in args.only)]
    out = Path(args.out or base / "outputs")
    code = run_workflows(paths, args.url, comfyui, out, args.timeout, base_dir=base, link=False)
    print(f"demo outputs: {out}")
    return code


def cmd_ui_workflow(args: argparse.Namespace) -> int:
    from .workflow_ui import api_to_ui

    if args.object_info:
        info = json.loads(Path(args.object_info).read_text())
    else:
        info = ComfyClient(args.url).object_info()
    for path in args.workflow:
        api = _load_workflow(path)
        ui = api_to_ui(api, info)
        target = Path(args.out_dir or WORKFLOWS) / Path(path).name
        write_text(target, json.dumps(ui, indent=2) + "\n")
        print(f"wrote {target}")
    return 0


def cmd_node_list(args: argparse.Namespace) -> int:
    """Write node_list.json (node id -> display name, the map ComfyUI-Manager reads) from a live server."""
    info = ComfyClient(args.url).object_info()
    ours = {k: v.get("display_name") or k for k, v in sorted(info.items()) if k.startswith("Compartments")}
    if not ours:
        raise ComfyError(f"no Compartments nodes on {args.url}: is the pack in its custom_nodes?")
    target = PACK / "node_list.json"
    write_text(target, json.dumps(ours, indent=2) + "\n")
    print(f"wrote {target} ({len(ours)} nodes)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="compartments", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="execute API-format workflows on a ComfyUI server")
    p.add_argument("workflow", nargs="+", help="API-format workflow JSON file(s)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", help="a running ComfyUI, e.g. http://127.0.0.1:8188")
    where.add_argument("--comfyui", help="a ComfyUI checkout to start headless (temp base dir, --cpu without GPU; "
                       "default: the one the pack is installed in, else COMFYUI_PATH, else ~/ComfyUI)")
    p.add_argument("--out", default="outputs", help="folder for the outputs (default: ./outputs)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds per workflow")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("demo", help="build tiny models and run every shipped workflow on the CPU")
    p.add_argument("--comfyui", help="ComfyUI checkout (default: the one the pack is installed in, "
                   "else COMFYUI_PATH, else ~/ComfyUI)")
    p.add_argument("--url", help="use a running server instead (its models folder must hold the tiny models)")
    p.add_argument("--out", help="folder for the outputs (default: a temp folder, printed at the end)")
    p.add_argument("--only", nargs="*", help="run only workflows whose name contains one of these")
    p.add_argument("--timeout", type=float, default=900)
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("ui-workflow", help="write the UI-format twin of API-format workflows")
    p.add_argument("workflow", nargs="+")
    p.add_argument("--url", default="http://127.0.0.1:8188", help="server to read /object_info from")
    p.add_argument("--object-info", help="a saved /object_info JSON instead of --url")
    p.add_argument("--out-dir", help="default: the pack's workflows/")
    p.set_defaults(func=cmd_ui_workflow)

    p = sub.add_parser("node-list", help="regenerate node_list.json from a running server")
    p.add_argument("--url", default="http://127.0.0.1:8188")
    p.set_defaults(func=cmd_node_list)

    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command: a user's error is one line on stderr and exit 2; a bug says it is one."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ComfyError, CompartmentsError) as e:
        where = f"{e.field}: " if isinstance(e, CompartmentsError) and e.field and e.field not in str(e) else ""
        return _fail(where + " ".join(str(e).split()))
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except Exception as e:  # noqa: BLE001 - the last line of defence: a bug, reported as one
        fd, log = tempfile.mkstemp(prefix="compartments-error-", suffix=".log")
        with os.fdopen(fd, "w") as fh:
            traceback.print_exc(file=fh)
        return _fail(f"internal error (a bug in Compartments, not your input): {type(e).__name__}: "
                     f"{' '.join(str(e).split())[:300]}. Traceback: {log}", 70)


if __name__ == "__main__":
    raise SystemExit(main())

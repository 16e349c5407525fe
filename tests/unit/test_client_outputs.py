"""``compartments run`` writes outputs only inside --out, whatever names the server reports."""

from __future__ import annotations

import http.server
import threading

import pytest

from compartments.cli import save_outputs
from compartments.cli.client import ComfyClient, ComfyError, safe_name


@pytest.fixture()
def server():
    """A real HTTP server on loopback that answers /view with a few bytes (ComfyUI's file endpoint)."""

    class View(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server's name
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"PNG bytes")

        def log_message(self, *args):
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), View)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


@pytest.mark.parametrize("name", ["../escape.png", "/tmp/abs.png", "a/b.png", "..", "", "x\\..\\y.png", "C:evil"])
def test_unsafe_output_names_are_refused(server, tmp_path, name):
    out = tmp_path / "out"
    outputs = {"9": {"images": [{"filename": name, "subfolder": "", "type": "output"}]}}
    with pytest.raises(ComfyError, match="not a plain file name"):
        save_outputs(ComfyClient(server), outputs, out)
    assert not any(p.is_file() for p in tmp_path.rglob("*")), list(tmp_path.rglob("*"))


def test_text_outputs_with_hostile_node_ids_are_refused(server, tmp_path):
    with pytest.raises(ComfyError):
        save_outputs(ComfyClient(server), {"/../../x": {"text": ["hello"]}}, tmp_path / "out")
    assert not list(tmp_path.rglob("*.txt"))


def test_plain_names_are_written_inside_out(server, tmp_path):
    out = tmp_path / "out"
    outputs = {"9": {"images": [{"filename": "soup_00001_.png", "subfolder": "sub", "type": "output"}],
                     "text": ["a caption"]}}
    written = save_outputs(ComfyClient(server), outputs, out)
    assert sorted(p.name for p in written) == ["node9_text_0.txt", "soup_00001_.png"]
    assert all(p.parent == out for p in written)
    assert (out / "soup_00001_.png").read_bytes() == b"PNG bytes"
    assert safe_name("ok.webp") == "ok.webp"

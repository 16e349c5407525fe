"""Tier 3: two ComfyUI servers and the command line on one PostgreSQL store at the same time.

Server A builds the store and retrieves from it, server B forgets what it lists, the command line
queries and forgets too, all at once (threads driving three processes). Bounded: a few rounds each.
At the end the store is consistent (every row has its vector and its copy, nothing else is left) and
no query that started after a forget committed returned the forgotten item.
"""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time

from compartments.retrieval import PgImageStore
from compartments.tiny import retrieval as tiny_retrieval

STORE = "e2e_shared"
ROUNDS = 2  # six images: two rounds of two forgetters leave k = 2 answerable


def _config(base, url: str) -> None:
    (base / "models" / "retrieval_stores").mkdir(parents=True, exist_ok=True)
    (base / "models" / "retrieval_stores" / f"{STORE}.pgstore.json").write_text(json.dumps({"url": url}))


def _build_and_retrieve(text: str) -> dict:
    return {
        "1": {"class_type": "CompartmentsRetrievalBuildStore", "inputs": {
            "store_name": STORE, "folder": tiny_retrieval.INPUT_FOLDER, "weights": tiny_retrieval.WEIGHTS_NAME,
            "model_config": "auto", "visibility": "private", "owner": "studio"}},
        "2": {"class_type": "CompartmentsRetrievalRetrieve", "inputs": {
            "store": ["1", 0], "text": text, "k": 2, "visibility": "all"}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


def _forget(ids: str) -> dict:
    return {
        "1": {"class_type": "CompartmentsRetrievalLoadStore", "inputs": {
            "store": f"{STORE}.pgstore.json", "weights": "(recorded)"}},
        "2": {"class_type": "CompartmentsRetrievalForget", "inputs": {"store": ["1", 0], "ids": ids}},
        "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 1]}},
    }


def test_two_servers_and_the_cli_share_one_postgresql_store(comfy_server, start_server, pg_server, tmp_path_factory):
    url = pg_server.url
    if PgImageStore.exists(url, STORE):
        PgImageStore(url, STORE).drop()
    _config(comfy_server.base_dir, url)
    weights = str(tiny_retrieval.clip_weights())
    log: dict[str, list] = {"retrieved": [], "forgot": [], "cli": []}
    errors: list[str] = []
    first = comfy_server.run(_build_and_retrieve("a gradient"), timeout=600)  # creates the store
    assert json.loads(first["3"]["text"][0])["items"]
    base_b = tmp_path_factory.mktemp("comfy_server_b")
    with start_server(base_b) as server_b:
        _config(base_b, url)

        def server_a() -> None:
            for i in range(ROUNDS):
                started = time.monotonic()
                out = comfy_server.run(_build_and_retrieve(f"a picture {i}"), timeout=600)
                log["retrieved"].append((started, [it["id"] for it in json.loads(out["3"]["text"][0])["items"]]))

        def server_b_forgets() -> None:
            with PgImageStore(url, STORE) as store:
                for _ in range(ROUNDS):
                    victim = store.list()[-1].id
                    out = server_b.run(_forget(str(victim)), timeout=600)
                    done = time.monotonic()  # the prompt finished: its forget committed before this
                    log["forgot"] += [(done, f["id"]) for f in json.loads(out["3"]["text"][0])["forgotten"]]

        def cli() -> None:
            for _ in range(ROUNDS):
                base = [sys.executable, "-m", "compartments", "store"]
                started = time.monotonic()
                q = subprocess.run([*base, "query", STORE, "--db", url, "--text", "x", "--k", "2", "--visibility",
                                    "all", "--weights", weights], capture_output=True, text=True, timeout=300)
                if q.returncode:
                    errors.append(q.stderr)
                    continue
                ids = [json.loads(line)["id"] for line in q.stdout.splitlines()]
                log["cli"].append((started, ids))
                f = subprocess.run([*base, "forget", STORE, str(ids[0]), "--db", url], capture_output=True,
                                   text=True, timeout=300)
                if f.returncode and "no item with id" not in f.stderr:  # raced with server B: fine
                    errors.append(f.stderr)
                elif not f.returncode:
                    log["forgot"] += [(time.monotonic(), g["id"]) for g in json.loads(f.stdout)["forgotten"]]

        def guarded(fn):
            def run() -> None:
                try:
                    fn()
                except Exception as exc:  # noqa: BLE001 - reported by the assertion below
                    errors.append(f"{fn.__name__}: {type(exc).__name__}: {exc}")
            return run

        threads = [threading.Thread(target=guarded(f)) for f in (server_a, server_b_forgets, cli)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=900)
    assert not errors, errors
    forgot = dict((i, t) for t, i in log["forgot"])
    assert len(forgot) >= ROUNDS and log["retrieved"] and log["cli"]
    for started, ids in log["retrieved"] + log["cli"]:  # nothing forgotten before a query began came back
        assert not [i for i in ids if i in forgot and started > forgot[i]], (started, ids, forgot)
    with PgImageStore(url, STORE) as store:
        live = {it.id for it in store.list()}
        assert not live & set(forgot)
        rows, vectors = store.conn.execute(f"SELECT count(*), count(embedding) FROM {store.schema}.items").fetchone()
        copies = store.conn.execute(f"SELECT count(*) FROM {store.schema}.images").fetchone()[0]
        assert rows == vectors == copies == len(live) == tiny_retrieval.IMAGE_COUNT - len(forgot)
        store.drop()
    (comfy_server.base_dir / "models" / "retrieval_stores" / f"{STORE}.pgstore.json").unlink()

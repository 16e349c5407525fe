"""Tier 1: ``python -m compartments store ...`` subcommands, in-process."""

from __future__ import annotations

import argparse
import json

from compartments.cli import retrieval as cli
from compartments.tiny import retrieval as tiny_retrieval


def _run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="cmd", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_build_query_forget_list(tmp_path, capsys):
    weights, folder = str(tiny_retrieval.clip_weights()), str(tiny_retrieval.images_folder())
    store = str(tmp_path / "s")
    assert _run(["store", "build", store, "--folder", folder, "--weights", weights, "--owner", "cli"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["created"] and len(built["added"]) == tiny_retrieval.IMAGE_COUNT and len(built["skipped"]) == 2
    assert _run(["store", "query", store, "--image", f"{folder}/img_04.png", "--k", "1", "--weights", weights]) == 0
    top = json.loads(capsys.readouterr().out)
    assert top["source"].endswith("img_04.png") and top["score"] > 0.999
    assert _run(["store", "forget", store, top["sha256"]]) == 0
    assert json.loads(capsys.readouterr().out)["items_left"] == tiny_retrieval.IMAGE_COUNT - 1
    assert _run(["store", "visibility", store, "public", "1"]) == 0
    capsys.readouterr()
    assert _run(["store", "list", store, "--visibility", "public"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert json.loads(lines[0])["public"] == 1 and [json.loads(x)["id"] for x in lines[1:]] == [1]
    # k beyond the store: a one-line error and exit code 2, no traceback
    assert _run(["store", "query", store, "--text", "x", "--k", "99", "--weights", weights]) == 2
    err = capsys.readouterr().err
    assert "k=99" in err and "Traceback" not in err


def test_every_store_subcommand_takes_a_postgresql_url(pg_server, tmp_path, capsys):
    """The same commands with --db: STORE names a store in the database; no password is printed."""
    weights, folder = str(tiny_retrieval.clip_weights()), str(tiny_retrieval.images_folder())
    db = ["--db", pg_server.url]
    assert _run(["store", "build", "cli_pg", "--folder", folder, "--weights", weights, "--owner", "cli", *db]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["created"] and len(built["added"]) == tiny_retrieval.IMAGE_COUNT
    assert built["summary"]["backend"] == "postgresql"
    assert _run(["store", "query", "cli_pg", "--image", f"{folder}/img_04.png", "--k", "1", "--weights", weights,
                 *db]) == 0
    top = json.loads(capsys.readouterr().out)
    assert top["source"].endswith("img_04.png") and top["score"] > 0.999
    assert _run(["store", "forget", "cli_pg", top["sha256"], "--compact", *db]) == 0
    assert json.loads(capsys.readouterr().out)["items_left"] == tiny_retrieval.IMAGE_COUNT - 1
    assert _run(["store", "visibility", "cli_pg", "public", str(built["added"][0]), *db]) == 0
    capsys.readouterr()
    assert _run(["store", "list", "cli_pg", "--visibility", "public", *db]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["public"] == 1
    assert _run(["store", "compact", "cli_pg", *db]) == 0
    capsys.readouterr()
    # the same store through a .pgstore.json config; one with a password in it is refused, unprinted
    cfg = tmp_path / "cli_pg.pgstore.json"
    cfg.write_text(json.dumps({"url": pg_server.url}))
    assert _run(["store", "list", str(cfg)]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["items"] == tiny_retrieval.IMAGE_COUNT - 1
    cfg.write_text(json.dumps({"url": "postgresql://me:sekrit@127.0.0.1:1/x"}))
    assert _run(["store", "list", str(cfg)]) == 2
    err = capsys.readouterr().err
    assert "password" in err and "sekrit" not in err
    assert _run(["store", "list", "cli_pg", "--db", "postgresql://me:sekrit@127.0.0.1:1/x"]) == 2
    err = capsys.readouterr().err
    assert "cannot connect" in err and "sekrit" not in err
    from compartments.retrieval import PgImageStore

    PgImageStore(pg_server.url, "cli_pg").drop()


def test_a_store_with_its_copies_in_a_shared_folder(pg_server, tmp_path, capsys):
    """--images-folder: built with it, opened with it by every later command; cleanup reports."""
    weights, folder = str(tiny_retrieval.clip_weights()), str(tiny_retrieval.images_folder())
    copies = tmp_path / "shared" / "cli-copies"
    db = ["--db", pg_server.url, "--images-folder", str(copies)]
    assert _run(["store", "build", "cli_shared", "--folder", folder, "--weights", weights, *db]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["summary"]["copies"] == str(copies) and built["summary"]["copies_to_delete"] == 0
    assert len([p for p in copies.iterdir() if not p.name.startswith(".")]) == tiny_retrieval.IMAGE_COUNT
    assert _run(["store", "forget", "cli_shared", str(built["added"][0]), *db]) == 0
    capsys.readouterr()
    assert len([p for p in copies.iterdir() if not p.name.startswith(".")]) == tiny_retrieval.IMAGE_COUNT - 1
    assert _run(["store", "cleanup", "cli_shared", *db]) == 0
    assert json.loads(capsys.readouterr().out) == {"cleanup": "cli_shared", "pending": 0, "orphans": 0}
    assert _run(["store", "list", "cli_shared", "--db", pg_server.url]) == 2  # without its folder: refused
    assert "--images-folder" in capsys.readouterr().err
    assert _run(["store", "list", str(tmp_path / "folder-store"), "--images-folder", str(copies)]) == 2
    assert "for a store in PostgreSQL" in capsys.readouterr().err
    from compartments.retrieval import PgImageStore

    PgImageStore(pg_server.url, "cli_shared", images_folder=copies).drop()

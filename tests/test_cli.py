"""lmdbfs/cli/ (parser.py, main.py): argument parsing and the one-line error contract,
run in-process on real small DBs (the end-to-end commands are in test_pack.py and
test_mount.py)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from lmdbfs.cli import main as cli
from lmdbfs.cli.parser import build_parser
from lmdbfs.errors import EXIT_NOT_FOUND, EXIT_OK, EXIT_USAGE
from lmdbfs.pack.packer import PackOptions, pack


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = tmp_path_factory.mktemp("cli") / "src"
    (src / "d").mkdir(parents=True)
    (src / "d" / "f.txt").write_bytes(b"hello\n")
    out = src.parent / "c.lmdb"
    pack(str(src), str(out), PackOptions(progress=False))
    return out


def test_every_command_of_the_parser_is_known_to_main() -> None:
    """main() sends `lmdbfs SOURCE MNT -o OPTS` (mount(8)'s form) to the mount helper
    unless the first word is a command; a command missing from that list would be sent."""
    listed = re.findall(r"^    (\w+) ", build_parser().format_help(), re.M)
    assert sorted(listed) == sorted(cli._COMMANDS)


def test_a_command_with_o_is_parsed_as_that_command(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as exit_:
        cli.main(["adopt", "nothing.lmdb", "-o", "ro"])
    assert exit_.value.code == EXIT_USAGE and "unrecognized arguments: -o" in capsys.readouterr().err


def test_options_parse_to_what_the_commands_use() -> None:
    args = build_parser().parse_args(["pack", "a", "b", "out.lmdb", "-j", "3", "--exclude", "*.bak", "--exclude", "x"])
    assert args.sources == ["a", "b"] and args.db == "out.lmdb" and args.workers == 3
    assert args.exclude == ["*.bak", "x"]
    with pytest.raises(SystemExit):
        build_parser().parse_args(["pack", "a", "out.lmdb", "-j", "0"])


def test_db_words_are_told_from_paths_inside_the_tree(db: Path, tmp_path: Path) -> None:
    plain = tmp_path / "plain.txt"
    plain.write_bytes(b"x" * 40)
    assert cli._is_db_arg(str(db)) and cli._is_db_arg(f"name={db}")
    assert not cli._is_db_arg(str(plain)) and not cli._is_db_arg("d/f.txt")
    assert cli._split_dbs([str(db), f"n={db}", "d", "d/f.txt"]) == ([str(db), f"n={db}"], ["d", "d/f.txt"])


def test_commands_print_and_return_their_exit_codes(db: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli.main(["ls", str(db), "d"]) == EXIT_OK
    assert capsys.readouterr().out.split() == ["f.txt"]
    assert cli.main(["cat", str(db), "d/missing"]) == EXIT_NOT_FOUND
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("lmdbfs: error: d/missing")
    # `verify --against SRC DB`: the DB after the sources is taken as the DB to verify
    assert cli.main(["verify", "--against", str(db.parent / "src"), str(db)]) == EXIT_OK
    assert "1 files" in capsys.readouterr().out
    (db.parent / "src" / "d" / "f.txt").write_bytes(b"changed")
    assert cli.main(["verify", "--against", str(db.parent / "src"), str(db)]) != EXIT_OK

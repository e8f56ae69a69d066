"""The liveness journal (liveness.py, STATE/liveness.journal): readers that use the snapshot plus
the journal's lines since get exactly what reading every record gives.

- differential (hypothesis): random sequences of real host-up/host-down script runs, reads,
  serve refreshes, compactions (the journal set aside) and torn last lines; after each step a
  reader's result == the records read one by one;
- a script that opened the journal before serve set it aside appends to the old inode: a reader
  of the snapshot before the rename finishes the old file first (and does not read the records);
- fallbacks to the records: a journal older than the records' last change (an earlier init's
  scripts ran), a bad line, more unread journal than the cap, a symlink or FIFO planted as the
  journal (never followed, never hangs);
- the scripts: one write(2) per line (strace), hostile names/addresses.
"""

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Dict

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub_fixtures import event_scripts, read_one_by_one, run_event
from tinc_hub import liveness
from tinc_hub.liveness import (JOURNAL_ASIDE_NAME, JOURNAL_NAME, MAX_JOURNAL_DELTA_BYTES, SNAPSHOT_NAME, Seen,
                               liveness_dir, parse_journal, read_liveness, refresh_snapshot)




def replace_record(root: Path, node: str, text: str) -> None:
    """A record replaced the scripts' way (temp file + rename), without the journal line."""
    temp = liveness_dir(root) / f".{node}.test"
    temp.write_text(text)
    os.rename(temp, liveness_dir(root) / node)


def append(root: Path, data: bytes, name: str = JOURNAL_NAME) -> None:
    fd = os.open(root / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)


def snapshot_magic(root: Path) -> str:
    return (root / SNAPSHOT_NAME).read_text().split("\n", 1)[0].rsplit(" ", 6)[0]


NODES = ["n1", "n2", "n3", "fresh"]
steps = st.one_of(
    st.tuples(st.just("event"), st.sampled_from(["up", "down"]), st.sampled_from(NODES),
              st.sampled_from(["192.0.2.1", "2001:db8::1", "", "bad addr\nx up 1 y"])),
    st.tuples(st.just("read")), st.tuples(st.just("serve")), st.tuples(st.just("compact")),
    st.tuples(st.just("torn"), st.sampled_from(NODES)))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(st.sampled_from(NODES + ["old_only"]), st.sampled_from(["up 5 192.0.2.9\n", "down 6\n"]),
                       max_size=4),
       st.lists(steps, min_size=1, max_size=20))
def test_the_journal_path_gives_what_the_records_give(tmp_path_factory, records: Dict[str, str], plan: list) -> None:
    base = tmp_path_factory.mktemp("journal")
    scripts, root = event_scripts(base), base / "state"
    liveness_dir(root).mkdir(parents=True)
    for name, text in records.items():  # left by an earlier init's scripts: no journal lines
        (liveness_dir(root) / name).write_text(text)
    for step in plan:
        kind = step[0]
        if kind == "event":
            run_event(scripts[step[1]], step[2], step[3])
        elif kind == "serve":
            refresh_snapshot(root, compact_bytes=1 << 30, full_read_seconds=1e9)
        elif kind == "compact":
            refresh_snapshot(root, compact_bytes=0)
        elif kind == "torn":  # a script between its record and the end of its line
            before = read_liveness(root)
            replace_record(root, step[1], "up 77 192.0.2.77\n")
            append(root, f"{step[1]} up 7".encode())
            seen = read_liveness(root)  # the record's new state, or the last one: never a torn one
            assert seen.get(step[1]) in (before.get(step[1]), Seen(True, 77, "192.0.2.77"))
            assert {k: v for k, v in seen.items() if k != step[1]} == \
                   {k: v for k, v in read_one_by_one(root).items() if k != step[1]}
            append(root, b"7 192.0.2.77\n")
        assert read_liveness(root) == read_one_by_one(root), step
    if (root / JOURNAL_NAME).exists() and (root / SNAPSHOT_NAME).exists():
        refresh_snapshot(root, compact_bytes=1 << 30, full_read_seconds=1e9)
        assert snapshot_magic(root) == liveness.JOURNAL_SNAPSHOT_MAGIC
        assert read_liveness(root) == read_one_by_one(root)


def test_a_reader_finishes_the_journal_set_aside_before_the_new_one(tmp_path: Path) -> None:
    scripts, root = event_scripts(tmp_path), tmp_path / "state"
    for node in ("n1", "n2"):
        run_event(scripts["up"], node, "192.0.2.1")
    refresh_snapshot(root)
    before_rename = (root / SNAPSHOT_NAME).read_bytes()
    # n1's script replaced its record and opened the journal, then serve set it aside, then the
    # script wrote its line (n2's script ran meanwhile: the journal is newer than the records)
    replace_record(root, "n1", "down 9 192.0.2.1\n")
    run_event(scripts["up"], "n2", "192.0.2.1")
    late = os.open(root / JOURNAL_NAME, os.O_WRONLY | os.O_APPEND)
    assert refresh_snapshot(root, compact_bytes=0)  # set aside: every record read once
    os.write(late, b"n1 down 9 192.0.2.1\n")
    os.close(late)
    run_event(scripts["down"], "n2", "192.0.2.2")  # the scripts create the next journal
    assert (root / JOURNAL_ASIDE_NAME).exists() and (root / JOURNAL_NAME).exists()
    # a reader whose snapshot predates the rename (serve died before writing the next one)
    (root / SNAPSHOT_NAME).write_bytes(before_rename)
    truth = read_one_by_one(root)
    (liveness_dir(root) / "n2").write_text("up 1234\n")  # in place: seen only by a read of the records
    seen = read_liveness(root)
    assert seen == truth and seen["n1"] == Seen(False, 9, "192.0.2.1") and not seen["n2"].up


def test_records_are_read_when_the_journal_does_not_speak_for_them(tmp_path: Path) -> None:
    scripts, old_scripts, root = event_scripts(tmp_path), event_scripts(tmp_path, journal=False), tmp_path / "state"
    run_event(scripts["up"], "n1", "192.0.2.1")
    refresh_snapshot(root)
    assert snapshot_magic(root) == liveness.JOURNAL_SNAPSHOT_MAGIC
    # an earlier init's scripts ran after the journal's last line
    run_event(old_scripts["down"], "n1", "192.0.2.1")
    assert read_liveness(root)["n1"].up is False
    # a bad line in the middle (a write a full disk cut short, then the next script's)
    run_event(scripts["up"], "n2", "192.0.2.2")
    refresh_snapshot(root)
    append(root, b"n2 do")
    run_event(scripts["down"], "n2", "192.0.2.2")
    assert read_liveness(root)["n2"].up is False
    # more unread journal than the cap
    refresh_snapshot(root)
    replace_record(root, "n3", "up 3 192.0.2.3\n")
    append(root, b"n9 up 1 192.0.2.9\n" * (MAX_JOURNAL_DELTA_BYTES // 18 + 1) + b"n3 up 3 192.0.2.3\n")
    assert read_liveness(root) == read_one_by_one(root)


@pytest.mark.parametrize("kind", ["symlink", "fifo"])
def test_a_planted_journal_is_never_followed_nor_waited_on(tmp_path: Path, kind: str) -> None:
    root = tmp_path / "state"
    liveness_dir(root).mkdir(parents=True)
    (liveness_dir(root) / "n1").write_text("up 1 192.0.2.1\n")
    lie = tmp_path / "lie"
    lie.write_text("n1 down 2 192.0.2.2\nghost up 3 x\n")
    if kind == "symlink":
        (root / JOURNAL_NAME).symlink_to(lie)
    else:
        os.mkfifo(root / JOURNAL_NAME)
    result: list = []
    reader = threading.Thread(target=lambda: result.append(read_liveness(root)), daemon=True)
    reader.start()
    reader.join(10)
    assert result == [{"n1": Seen(True, 1, "192.0.2.1")}]
    assert refresh_snapshot(root, compact_bytes=0) is not None
    assert (root / JOURNAL_NAME).is_symlink() or (root / JOURNAL_NAME).is_fifo()  # not renamed


def test_journal_lines_are_parsed_strictly() -> None:
    assert parse_journal(b"") == {}
    assert parse_journal(b"a up 1 192.0.2.1\na down 2 \nb up 0 ::1\n") == {
        "a": Seen(False, 2, ""), "b": Seen(True, 0, "::1")}
    for bad in (b"a up 1\n", b"a up 01 x\n", b"a-b up 1 x\n", b"a UP 1 x\n", b"a up 1 x y\n", b"a up 1 x\r\n",
                b"a up 1 \xc3\xa9\n", b"\n", b"a up 1 x\nb up", "é up 1 x\n".encode(), b"a" * 65 + b" up 1 x\n"):
        assert parse_journal(bad) is None, bad


def test_the_scripts_write_one_line_per_event_with_one_write(tmp_path: Path) -> None:
    scripts, root = event_scripts(tmp_path), tmp_path / "state"
    run_event(scripts["up"], "n" * 65, "192.0.2.1")  # no reader takes the name: no line
    run_event(scripts["up"], "n1", "192.0.2.1\nn2 up 1 x")  # not an address: none recorded
    run_event(scripts["down"], "n1", "2001:db8::1")
    lines = (root / JOURNAL_NAME).read_text().splitlines()
    assert [line.split()[:2] for line in lines] == [["n1", "up"], ["n1", "down"]]
    assert lines[0].endswith(" ") and lines[1].endswith(" 2001:db8::1")
    assert shutil.which("strace"), "strace is needed for the one-write check (tests/setup-env installs it)"
    trace = subprocess.run(["strace", "-f", "-e", "trace=write", "-o", str(tmp_path / "trace"),
                            str(scripts["up"])], env={"PATH": "/usr/bin:/bin", "NODE": "n2",
                                                      "REMOTEADDRESS": "192.0.2.2"}, timeout=10)
    assert trace.returncode == 0
    writes = [line for line in (tmp_path / "trace").read_text().splitlines() if '"n2 up ' in line]
    assert len(writes) == 1 and '\\n"' in writes[0]


def test_a_change_the_journal_hides_is_seen_after_serves_next_full_read(tmp_path: Path) -> None:
    """An admin's rm of a record, then a journaled event: the journal looks complete, the
    snapshot still holds the removed record (the known blind spot) until serve's periodic full
    read of the records."""
    scripts, root = event_scripts(tmp_path), tmp_path / "state"
    for node in ("n1", "n2"):
        run_event(scripts["up"], node, "192.0.2.1")
    refresh_snapshot(root)
    (liveness_dir(root) / "n1").unlink()
    assert read_liveness(root) == read_one_by_one(root)  # the last change is not journaled: records
    run_event(scripts["down"], "n2", "192.0.2.2")
    assert "n1" in read_liveness(root)  # hidden
    assert refresh_snapshot(root, full_read_seconds=1e9) is False  # lines only
    assert refresh_snapshot(root, full_read_seconds=0)  # the periodic full read
    assert read_liveness(root) == read_one_by_one(root) and "n1" not in read_one_by_one(root)

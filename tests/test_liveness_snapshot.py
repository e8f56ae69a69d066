"""The liveness snapshot (liveness.py, STATE/liveness.snapshot): readers get exactly what reading
every record gives, with or without a snapshot.

- a snapshot is parsed strictly: it round-trips, and any text but what render_snapshot writes
  (torn, mutated, of another stamp) is refused (hypothesis);
- random record sets, then real host-up/host-down script runs after the snapshot: the records
  as read one by one, every time, and a changed record is seen at once (hypothesis);
- odd snapshot files (symlink, FIFO, directory, oversized, not UTF-8) are ignored, never hang;
- the margin rule: no snapshot for a directory changed less than SNAPSHOT_MARGIN_NS ago, one
  (with the records' mode) once it settled, used until a record is replaced; none written for a
  directory another user owns; serve's refresh_snapshot writes one once, then reads nothing.
"""

import os
import time
from pathlib import Path
from typing import Dict, Tuple

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub_fixtures import event_scripts, read_one_by_one, run_event
from tinc_hub.liveness import (MAX_SNAPSHOT_BYTES, SNAPSHOT_MARGIN_NS, SNAPSHOT_NAME,
                               STALE_TEMP_SECONDS, Seen,
                               liveness_dir, parse_snapshot, read_liveness,
                               refresh_snapshot, render_snapshot)

Stamp = Tuple[int, int, int, int]
STAMP: Stamp = (2049, 1234567, 1750000000123456789, 1750000000123456789)
TICK_NS = 50_000_000  # more than a coarse kernel clock tick (1-10 ms)

names = st.from_regex(r"[A-Za-z0-9_]{1,64}", fullmatch=True)
addresses = st.one_of(st.just(""), st.sampled_from(["192.0.2.1", "2001:db8::7"]),
                      st.text(min_size=1, max_size=20).filter(lambda a: a.split() == [a]))
seens = st.builds(Seen, st.booleans(), st.integers(min_value=0, max_value=2**64), addresses)
record_sets = st.dictionaries(names, seens, max_size=12)


def stamp_of(root: Path) -> Stamp:
    st_ = os.stat(liveness_dir(root))
    return (st_.st_dev, st_.st_ino, st_.st_mtime_ns, st_.st_ctime_ns)




def leave_snapshot(root: Path, seen: Dict[str, Seen]) -> None:
    """A snapshot of ``seen`` stamped with the directory as it is now, as a reader leaves it."""
    (root / SNAPSHOT_NAME).write_text(render_snapshot(stamp_of(root), seen))


def wait_until_ns(deadline_ns: int) -> None:
    """Sleeps until the wall clock reaches ``deadline_ns`` (bounded by the caller's value)."""
    while time.time_ns() < deadline_ns:
        time.sleep(max(0.001, (deadline_ns - time.time_ns()) / 1e9))


# -- the snapshot text ---------------------------------------------------------------------------

@given(record_sets)
def test_a_snapshot_round_trips_for_its_stamp_only(seen: Dict[str, Seen]) -> None:
    text = render_snapshot(STAMP, seen)
    assert parse_snapshot(text, STAMP) == seen
    assert parse_snapshot(text, (STAMP[0], STAMP[1], STAMP[2] + 1, STAMP[3])) is None
    assert parse_snapshot(text, (STAMP[0], STAMP[1] + 1, STAMP[2], STAMP[3])) is None


@given(record_sets, st.data())
def test_a_torn_snapshot_is_refused(seen: Dict[str, Seen], data) -> None:
    text = render_snapshot(STAMP, seen)
    cut = data.draw(st.integers(min_value=0, max_value=len(text) - 1))
    assert parse_snapshot(text[:cut], STAMP) is None


@given(record_sets, st.data())
def test_only_what_render_writes_is_accepted(seen: Dict[str, Seen], data) -> None:
    """Any edit of a snapshot (a character replaced, inserted or removed, a line added) is
    refused, or gives records that render back to exactly the edited text."""
    text = render_snapshot(STAMP, seen)
    at = data.draw(st.integers(min_value=0, max_value=len(text)))
    piece = data.draw(st.one_of(st.text(max_size=3), st.sampled_from(
        [" ", "\n", "\r", "0", "9", "-", "up", "down", "\u00b2", "\u2028", "x y\n", "a up 1\n", "a up 01\n"])))
    drop = data.draw(st.integers(min_value=0, max_value=2))
    edited = text[:at] + piece + text[at + drop:]
    parsed = parse_snapshot(edited, STAMP)
    assert parsed is None or render_snapshot(STAMP, parsed) == edited


H1 = "tinc-hub liveness snapshot 3 2049 1234567 1750000000123456789 1750000000123456789 1\n"


@pytest.mark.parametrize("text", [
    "", "\n", "tinc-hub liveness snapshot 3 2049 1234567 1750000000123456789 1750000000123456789 0",
    "tinc-hub liveness snapshot 3 2049 1234567 1750000000123456789 1750000000123456789 0\n",
    "tinc-hub liveness snapshot 3 2049 1234567 1750000000123456789 1750000000123456789 0\n[[],[],[]]\n",
    "tinc-hub liveness snapshot 3 2049 1234567 1750000000123456789 1750000000123456789 2\n"
    '[["a","a"],[true,true],[1,1],["",""]]\n',  # a name twice
    "tinc-hub liveness snapshot 3 2049 1234567 1750000000123456789 1750000000123456789 01\n"
    '[["a"],[true],[1],[""]]\n',
    H1 + "a up 1\n",  # the line-per-record format of snapshot 1
    "tinc-hub liveness snapshot 1 2049 1234567 1750000000123456789 1750000000123456789 1\na up 1\n",
    H1 + '[["bad-name"],[true],[1],[""]]\n',
    H1 + '[["a\\nb"],[true],[1],[""]]\n',
    H1 + '[[1],[true],[1],[""]]\n',
    H1 + '[["a"],[1],[1],[""]]\n',  # up as 1, not true
    H1 + '[["a"],[true],[1.0],[""]]\n',
    H1 + '[["a"],[true],[true],[""]]\n',
    H1 + '[["a"],[true],[-1],[""]]\n',
    H1 + '[["a"],[true],[-0],[""]]\n',
    H1 + '[["a"],[true],[1],["x y"]]\n',
    H1 + '[["a"],[true],[1],["x\\ny"]]\n',
    H1 + '[["a"],[true],[1],["x\\u2028"]]\n',  # Unicode whitespace
    H1 + '[["a"],[true],[1],["\\ud800"]]\n',  # a lone surrogate: no UTF-8 record gives one
    H1 + '[["a"],[true],[1],[null]]\n',
    H1 + '[["a"],[true],[1],["\\u0078"]]\n',  # "x" escaped: not how render writes it
    H1 + '[["a"], [true], [1], [""]]\n',  # other spacing
    H1 + '[["a"],[true],[1],[""]]\t\n',
    H1 + '[["a"],[true],\n[1],[""]]',  # a newline, but not at the end
    H1 + '[["a"],[true],[1],["x\x7f"]]\n',  # render escapes DEL
    H1 + '[["a"],[true],[1],["\u00e9"]]\n',  # render escapes non-ASCII
    H1 + '[["a"],[true],[1],["\\u00E9"]]\n',  # ... in lower case
    H1 + '[["a"],[true],[1],["\\/"]]\n',
    H1 + '[["a"],[true],[1],[""]]',  # no newline
    H1 + '[["a"],[true],[1],[""]]\n\n',
    H1 + '[["a"],[true],[1],[""],[]]\n',
    H1 + '{"a":[true,1,""]}\n',
    H1 + "[" * 100000 + "]" * 100000 + "\n",
    "tinc-hub liveness snapshot 4 2049 1234567 1750000000123456789 1750000000123456789 0\n[[],[],[],[]]\n",
])
def test_odd_snapshot_texts_are_refused(text: str) -> None:
    assert parse_snapshot(text, STAMP) is None


def test_the_snapshot_text_is_one_line_of_columns() -> None:
    seen = {"a": Seen(True, 1, "192.0.2.1"), "b_2": Seen(False, 0, ""), "c": Seen(True, 7, "\u00b2")}
    text = render_snapshot(STAMP, seen)
    assert text == (f"{H1[:-2]}3\n" '[["a","b_2","c"],[true,false,true],[1,0,7],["192.0.2.1","","\\u00b2"]]\n')
    assert parse_snapshot(text, STAMP) == seen
    assert render_snapshot(STAMP, {}) == f"{H1[:-2]}0\n[[],[],[],[]]\n"
    assert parse_snapshot(render_snapshot(STAMP, {}), STAMP) == {}


# -- against the records, with real script runs ----------------------------------------------------

record_texts = st.one_of(seens.map(lambda s: f"{'up' if s.up else 'down'} {s.at} {s.remote}\n"),
                         st.sampled_from(["garbage\n", "down 123 x y z\n", "up 07 x\n", ""]), st.text(max_size=12))
file_names = st.one_of(names, st.sampled_from([".hidden", "bad-name", ".a.123"]))
events = st.tuples(st.sampled_from(["up", "down"]), st.sampled_from(["n1", "n2", "fresh"]),
                   st.sampled_from(["192.0.2.1", "2001:db8::1", ""]))


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.dictionaries(file_names, record_texts, max_size=6), st.lists(events, max_size=3))
def test_readers_get_the_records_with_a_snapshot_and_after_changes(tmp_path_factory, records: Dict[str, str],
                                                                    changes: list) -> None:
    base = tmp_path_factory.mktemp("snap")
    scripts, root = event_scripts(base), base / "state"
    liveness_dir(root).mkdir(parents=True)
    for name, text in records.items():
        (liveness_dir(root) / name).write_text(text)
    truth = read_one_by_one(root)
    leave_snapshot(root, truth)
    assert read_liveness(root) == truth
    stamp = stamp_of(root)
    wait_until_ns(max(stamp[2], stamp[3]) + TICK_NS)  # what the margin guarantees a real snapshot
    before = time.time()
    for event, node, remote in changes:
        run_event(scripts[event], node, remote)
    assert (stamp_of(root) != stamp) == bool(changes)
    seen = read_liveness(root)
    assert seen == read_one_by_one(root)
    for event, node, remote in changes[-1:]:  # the last change, seen at once
        assert seen[node].up == (event == "up") and seen[node].remote == remote
        assert before - 1 <= seen[node].at <= time.time()


# -- odd snapshot files ----------------------------------------------------------------------------

def make_odd(path: Path, kind: str, text: str) -> None:
    if kind == "symlink":
        (path.parent / "elsewhere").write_text(text)
        path.symlink_to(path.parent / "elsewhere")
    elif kind == "fifo":
        os.mkfifo(path)  # no writer: a blocking open would hang
    elif kind == "directory":
        path.mkdir()
    elif kind == "oversized":
        path.write_text(text)
        os.truncate(path, MAX_SNAPSHOT_BYTES + 1)
    elif kind == "latin1":
        path.write_bytes(text.encode() + b"\xe9\n")
    else:
        path.write_text(text)


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory", "oversized", "latin1", "regular"])
def test_odd_snapshot_files_are_ignored(tmp_path: Path, kind: str) -> None:
    liveness_dir(tmp_path).mkdir()
    (liveness_dir(tmp_path) / "real").write_text("up 1750000000 192.0.2.1\n")
    # a snapshot of the right stamp that lies: used only as a regular file
    lie = render_snapshot(stamp_of(tmp_path), {"ghost": Seen(True, 1, "x")})
    make_odd(tmp_path / SNAPSHOT_NAME, kind, lie)
    expected = {"ghost": Seen(True, 1, "x")} if kind == "regular" else {"real": Seen(True, 1750000000, "192.0.2.1")}
    assert read_liveness(tmp_path) == expected


# -- the margin rule -------------------------------------------------------------------------------

def test_a_snapshot_is_left_only_for_a_settled_directory_and_serves_until_a_record_is_replaced(
        tmp_path: Path) -> None:
    # the margin rule is the path of an earlier init's scripts (no journal: see test_liveness_journal)
    scripts, root = event_scripts(tmp_path, journal=False), tmp_path / "state"
    others = tmp_path / "others"  # a records directory another user owns
    for node in ("n1", "n2"):
        run_event(scripts["up"], node, "192.0.2.1")
    liveness_dir(root).chmod(0o750)
    liveness_dir(others).mkdir(parents=True)
    (liveness_dir(others) / "n1").write_text("up 1 192.0.2.1\n")
    if os.geteuid() == 0:
        os.chown(liveness_dir(others), 65534, 65534)
    served = tmp_path / "served"  # refreshed by serve's refresh_snapshot
    liveness_dir(served).mkdir(parents=True)
    (liveness_dir(served) / "n3").write_text("down 7\n")
    truth = read_one_by_one(root)
    assert read_liveness(root) == truth and set(truth) == {"n1", "n2"}
    assert not (root / SNAPSHOT_NAME).exists()  # changed just now: no snapshot
    assert not refresh_snapshot(served) and not (served / SNAPSHOT_NAME).exists()

    stamp = stamp_of(root)
    wait_until_ns(max(stamp[2], stamp[3], *stamp_of(others)[2:], *stamp_of(served)[2:]) + SNAPSHOT_MARGIN_NS)
    assert refresh_snapshot(served)
    assert (served / SNAPSHOT_NAME).read_text() == render_snapshot(stamp_of(served), {"n3": Seen(False, 7, "")})
    assert not refresh_snapshot(served)  # up to date: not read again
    assert read_liveness(root) == truth
    snapshot = root / SNAPSHOT_NAME
    assert snapshot.read_text() == render_snapshot(stamp, truth)
    assert snapshot.stat().st_mode & 0o777 == 0o640  # the records' mode (the directory's, no x)
    if os.geteuid() == 0:
        assert read_liveness(others) == {"n1": Seen(True, 1, "192.0.2.1")}
        assert not (others / SNAPSHOT_NAME).exists()

    # a record rewritten in place (never how records change) leaves the stamp: served from it
    (liveness_dir(root) / "n1").write_text("down 5 192.0.2.9\n")
    assert stamp_of(root) == stamp
    assert read_liveness(root) == truth
    # a record replaced the scripts' way: every record is read again at once
    run_event(scripts["down"], "n2", "192.0.2.2")
    seen = read_liveness(root)
    assert seen == read_one_by_one(root)
    assert seen["n1"] == Seen(False, 5, "192.0.2.9") and not seen["n2"].up
    assert snapshot.read_text() == render_snapshot(stamp, truth)  # the directory is fresh again


def test_a_dead_writers_temp_file_is_removed_by_the_next_write_a_live_ones_is_not(tmp_path: Path) -> None:
    root = tmp_path / "state"
    liveness_dir(root).mkdir(parents=True)
    (liveness_dir(root) / "n1").write_text("up 1 192.0.2.1\n")
    dead = root / f".{SNAPSHOT_NAME}.4242.77.tmp"  # a writer killed mid-write, long ago
    live = root / f".{SNAPSHOT_NAME}.4243.78.tmp"  # one being written right now
    other = root / "keep.tmp"  # not a snapshot temp file
    for path in (dead, live, other):
        path.write_text("partial")
    old = time.time() - STALE_TEMP_SECONDS - 60
    for path in (dead, other):
        os.utime(path, (old, old))
    stamp = stamp_of(root)
    wait_until_ns(max(stamp[2], stamp[3]) + SNAPSHOT_MARGIN_NS)
    assert read_liveness(root) == {"n1": Seen(True, 1, "192.0.2.1")}
    assert (root / SNAPSHOT_NAME).exists()  # a snapshot was written ...
    assert not dead.exists()  # ... and the dead writer's temp file went with it
    assert live.read_text() == "partial" and other.read_text() == "partial"

"""Ephemeral nodes, the pure parts and the registry side: durations, the removal decision,
the conditional DELETE with its tombstone (on a real SQLite registry), the 410 a removed
machine gets from the real sync handler, the other hubs' host files, and the CLI.
The real thing (tincd, serve's reaper) is tests/test_ephemeral_netlab.py."""

import json
from pathlib import Path

import pytest

from hub_fixtures import HubEnv, init_hub, rsa_public_pem
from tinc_hub.cli import main
from tinc_hub.ephemeral import (describe_duration, expiry, online_names, reap_in_transaction,
                                refusal_message, removal_due)
from tinc_hub.tokens import MAX_DURATION, parse_duration
from tinc_hub.errors import HubError
from tinc_hub.hostfiles import reconcile_host_files
from tinc_hub.liveness import Seen
from tinc_hub.node_sync import SyncHandler
from tinc_hub.registry import NodeRow, Tombstone
from tinc_hub.tokens import create_token
from tinc_hub.tls import pin_of_cert_file


@pytest.mark.parametrize("text, seconds", [("10", 10), ("90s", 90), ("30m", 1800), ("2h", 7200),
                                           ("7d", 604800), ("30d", MAX_DURATION), ("1w", 604800)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds
    assert parse_duration(describe_duration(seconds)) == seconds


@pytest.mark.parametrize("text", ["9s", "0", "31d", "5w", "", "1.5h", "-10", "10 x", "1e3", "10s;rm"])
def test_durations_out_of_bounds_or_malformed_are_refused(text: str) -> None:
    with pytest.raises(HubError, match="--ephemeral"):
        parse_duration(text)


def node(last_seen=1000, duration=60, revoked=None) -> NodeRow:
    return NodeRow("n1", "10.77.0.2", 2, "KEY", "t" * 64, 900, 900, revoked,
                   ephemeral_seconds=duration, last_seen_at=last_seen)


def test_removal_due_only_offline_long_enough_and_with_the_hubs_tincd_up_long_enough() -> None:
    started = 0.0  # the hub's tincd has run for long
    assert removal_due(node(), False, started, 1060)
    assert not removal_due(node(), False, started, 1059)  # not yet
    assert not removal_due(node(), True, started, 5000)  # never while online
    assert not removal_due(node(duration=None), False, started, 5000)  # not ephemeral
    assert not removal_due(node(revoked=950), False, started, 5000)  # the admin's: kept as revoked
    assert not removal_due(node(), False, None, 5000)  # the hub's tincd is down: cannot tell
    assert not removal_due(node(), False, 4950.0, 5000)  # up for 50 s < 60 s: cannot tell yet
    assert removal_due(node(), False, 4940.0, 5000)


def test_online_names_count_only_records_of_the_running_tincd() -> None:
    seen = {"a": Seen(True, 100, ""), "b": Seen(True, 99, ""), "c": Seen(False, 150, "")}
    assert online_names(seen, 100.5) == {"a"}  # b's "up" came from an earlier tincd
    assert online_names(seen, None) == set()


def test_expiry_shown_by_nodes() -> None:
    assert expiry(node(duration=None), False, 0.0, 2000) is None
    assert expiry(node(), True, 0.0, 2000) == "online"
    assert expiry(node(), False, None, 2000) == "paused"
    assert expiry(node(last_seen=1000), False, 0.0, 2000) == "1970-01-01T00:17:40Z"  # 1060
    assert expiry(node(last_seen=1000), False, 1500.0, 2000) == "1970-01-01T00:26:00Z"  # 1560


def ephemeral_hub(tmp_path: Path, duration: int = 30) -> "tuple[HubEnv, str]":
    env = init_hub(tmp_path)
    issued = create_token(env.config, env.registry, pin_of_cert_file(env.state.cert_file), uses=5,
                          ephemeral_seconds=duration)
    return env, issued.token


def test_enrolment_copies_the_duration_and_the_reaper_deletes_only_what_is_still_due(tmp_path: Path) -> None:
    env, token = ephemeral_hub(tmp_path)
    status, answer = env.enroll(token, "n1", rsa_public_pem(1))
    assert status == 200
    assert env.enroll(token, "n2", rsa_public_pem(2))[0] == 200
    with env.registry.reading() as view:
        n1, n2 = view.get_node("n1"), view.get_node("n2")
        generation = view.generation()
    assert n1.ephemeral_seconds == 30 and n1.last_seen_at == n1.enrolled_at
    now = n1.last_seen_at + 30
    # another hub saw n2 meanwhile: its row no longer says "offline too long", the DELETE skips it
    with env.registry.exclusive(), env.registry.transaction(bump=False) as tx:
        tx.mark_seen(["n2"], now - 1)
    with env.registry.reading() as view:
        assert view.generation() == generation  # last-seen writes are followed by no hub
    with env.registry.exclusive(), env.registry.transaction() as tx:
        removed = reap_in_transaction(tx, [n1, n2], now)
    assert [n.name for n in removed] == ["n1"]
    with env.registry.reading() as view:
        assert [n.name for n in view.list_nodes()] == ["n2"]
        stone = view.tombstone_for(n1.credential_sha256)
    assert stone == Tombstone("n1", n1.credential_sha256, now, 30)
    # a second reaper (another hub) racing it removes nothing more
    with env.registry.exclusive(), env.registry.transaction() as tx:
        assert reap_in_transaction(tx, [n1, n2], now) == []
    # the name and the address are free again
    status, again = env.enroll(token, "n3", rsa_public_pem(3))
    assert (status, again["address"]) == (200, answer["address"])


def test_a_removed_machine_gets_410_with_the_reason_and_others_still_401(tmp_path: Path) -> None:
    env, token = ephemeral_hub(tmp_path)
    status, answer = env.enroll(token, "n1", rsa_public_pem(1))
    with env.registry.reading() as view:
        n1 = view.get_node("n1")
    with env.registry.exclusive(), env.registry.transaction() as tx:
        reap_in_transaction(tx, [n1], n1.last_seen_at + 45)
    handler = SyncHandler(env.config, env.registry)
    outcome = handler.process(json.dumps({"name": "n1", "credential": answer["credential"]}).encode())
    assert outcome.status == 410
    assert "node 'n1' was removed" in outcome.body["error"] and "45 s offline (ephemeral)" in outcome.body["error"]
    wrong = handler.process(json.dumps({"name": "n1", "credential": "0" * 64}).encode())
    assert wrong.status == 401  # only the holder of that credential learns of the removal


def test_refusal_message_of_an_admin_release() -> None:
    text = refusal_message(Tombstone("web_1", None, 0, None))
    assert "removed by the hub's admin" in text and "revoke --release" in text


def test_other_hubs_remove_the_host_file_of_a_tombstoned_name_and_keep_a_taken_one(tmp_path: Path) -> None:
    env, token = ephemeral_hub(tmp_path)
    env.enroll(token, "n1", rsa_public_pem(1))
    env.enroll(token, "n2", rsa_public_pem(2))
    with env.registry.reading() as view:
        n1, n2 = view.get_node("n1"), view.get_node("n2")
    with env.registry.exclusive(), env.registry.transaction() as tx:
        # from the later of the two: on a slow machine n2 may enrol a second after n1
        reap_in_transaction(tx, [n1, n2], max(n1.last_seen_at, n2.last_seen_at) + 30)
    foreign = env.config.hosts_dir / "stranger"  # a file tinc-hub never wrote
    foreign.write_text("Subnet = 10.77.0.99/32\n")
    done = reconcile_host_files(env.config, env.registry)  # what another hub's follower runs
    assert sorted(done["removed"]) == ["n1", "n2"] and not (env.config.hosts_dir / "n1").exists()
    assert env.enroll(token, "n2", rsa_public_pem(5))[0] == 200  # the name taken again
    assert reconcile_host_files(env.config, env.registry)["removed"] == []
    assert (env.config.hosts_dir / "n2").exists() and foreign.exists()


def test_revoke_release_leaves_a_tombstone(tmp_path: Path, capsys) -> None:
    env, token = ephemeral_hub(tmp_path)
    status, answer = env.enroll(token, "n1", rsa_public_pem(1))
    assert main(["--state-dir", str(env.state.root), "revoke", "n1", "--release"]) == 0
    outcome = SyncHandler(env.config, env.registry).process(
        json.dumps({"name": "n1", "credential": answer["credential"]}).encode())
    assert outcome.status == 410 and "revoke --release" in outcome.body["error"]


def test_cli_token_create_list_and_nodes_show_ephemeral(tmp_path: Path, capsys) -> None:
    env = init_hub(tmp_path)
    sd = ["--state-dir", str(env.state.root)]
    assert main(sd + ["token", "create", "--ephemeral", "9s"]) == 2
    assert "--ephemeral" in capsys.readouterr().err
    assert main(sd + ["token", "create", "--uses", "100", "--ephemeral", "30m", "--cloud-init"]) == 0
    user_data = capsys.readouterr().out
    assert user_data.startswith("#cloud-config")
    assert main(sd + ["token", "create", "--ephemeral", "2h"]) == 0
    assert "removed after 2h offline" in capsys.readouterr().out
    assert main(sd + ["token", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert sorted(t["ephemeral"] for t in listed) == [1800, 7200]
    fleet = next(t for t in listed if t["ephemeral"] == 1800)
    assert fleet["uses_total"] == 100  # the cloud-init one
    assert main(sd + ["token", "list"]) == 0
    assert "30m" in capsys.readouterr().out
    # a node of the cloud-init token: ephemeral; with no hub tincd here its removal is paused
    import re
    token = re.search(r'"(tinc1\.[A-Za-z0-9_-]+)"', user_data).group(1)
    assert env.enroll(token, "web_1", rsa_public_pem(1))[0] == 200
    assert main(sd + ["nodes", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)[0]
    assert (row["name"], row["ephemeral"], row["expires"]) == ("web_1", 1800, "paused")
    assert main(sd + ["nodes"]) == 0
    assert "paused (hub tincd down)" in capsys.readouterr().out


def test_last_seen_is_rewritten_every_round_for_short_durations_seldom_for_long_ones() -> None:
    from tinc_hub.ephemeral import refresh_due

    assert refresh_due(node(last_seen=1000, duration=15), 1005)
    assert not refresh_due(node(last_seen=1000, duration=15), 1004)
    assert not refresh_due(node(last_seen=1000, duration=3600), 1299)
    assert refresh_due(node(last_seen=1000, duration=3600), 1300)  # at most every 300 s
    assert refresh_due(node(last_seen=None), 1000)


def test_a_node_back_online_under_the_lock_is_not_removed(tmp_path: Path) -> None:
    env, token = ephemeral_hub(tmp_path)
    env.enroll(token, "n1", rsa_public_pem(1))
    with env.registry.reading() as view:
        n1 = view.get_node("n1")
    with env.registry.exclusive(), env.registry.transaction() as tx:
        assert reap_in_transaction(tx, [n1], n1.last_seen_at + 60, lambda: {"n1"}) == []
    with env.registry.reading() as view:
        assert view.get_node("n1") is not None


def test_the_guard_knows_its_own_event_scripts(tmp_path: Path) -> None:
    from tinc_hub.ephemeral import scripts_are_ours

    env = init_hub(tmp_path)
    assert scripts_are_ours(env.config, env.state.root)
    (env.config.net_dir / "host-down").write_text("#!/bin/sh\nexit 0\n")  # an older or hand-made one
    assert not scripts_are_ours(env.config, env.state.root)
    (env.config.net_dir / "host-down").unlink()
    assert not scripts_are_ours(env.config, env.state.root)


def test_seen_here_uses_the_leave_time_of_the_running_tincd() -> None:
    from tinc_hub.ephemeral import last_seen_writes, seen_here

    rows = [NodeRow(name, "10.77.0.%d" % i, i, "K", "t" * 64, 0, 0, None, ephemeral_seconds=15,
                    last_seen_at=990) for i, name in enumerate(["up", "left", "old", "quiet", "synced"], 2)]
    records = {"up": Seen(True, 995, ""), "left": Seen(False, 997, ""), "old": Seen(False, 400, ""),
               "synced": Seen(False, 400, "")}
    times = seen_here(rows, records, 500.0, {"synced"}, 1000)
    # online now; left at 997 (not at the last round); "old" left under an earlier tincd; no record
    assert times == {"up": 1000, "left": 997, "synced": 1000}
    assert seen_here(rows, records, None, set(), 1000) == {}  # no tincd: nothing known
    assert last_seen_writes(rows, times, 1000) == {"up": 1000, "left": 997, "synced": 1000}
    fresh = [NodeRow("up", "10.77.0.2", 2, "K", "t" * 64, 0, 0, None, ephemeral_seconds=3600,
                     last_seen_at=999)]
    assert last_seen_writes(fresh, {"up": 1000}, 1000) == {}  # a long duration: written seldom
    assert last_seen_writes(fresh, {"up": 998}, 1000) == {}  # never backwards

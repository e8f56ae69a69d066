"""--registry URL parsing (registry_url.RegistryURL): the accepted forms, and every hostile or
malformed one refused with one line that never echoes a password (the command line's refusal
is in test_registry_postgres.py, against a real hub)."""

import pytest

from tinc_hub.errors import HubError
from tinc_hub.registry_url import RegistryURL, read_password_file

SECRET = "hunter2-Zq9"


@pytest.mark.parametrize("text, display", [
    ("postgresql://hub@db.example.org/tinc", "postgresql://hub@db.example.org/tinc"),
    ("postgresql+psycopg://hub@10.0.0.5:6432/tinc_reg", "postgresql://hub@10.0.0.5:6432/tinc_reg"),
    ("postgres://hub@[2001:db8::1]:5432/tinc", "postgresql://hub@[2001:db8::1]:5432/tinc"),
    ("postgresql://hub@db/tinc?sslmode=verify-full&sslrootcert=/etc/ssl/pg.pem",
     "postgresql://hub@db/tinc?sslmode=verify-full&sslrootcert=/etc/ssl/pg.pem"),
    ("postgresql://hub@:5433/tinc?host=/run/postgresql", "postgresql://hub@:5433/tinc?host=/run/postgresql"),
    ("sqlite:////var/lib/tinc-hub/other.sqlite3", "sqlite:////var/lib/tinc-hub/other.sqlite3"),
])
def test_accepted_forms_and_their_display(text: str, display: str) -> None:
    url = RegistryURL.parse(text, password=SECRET)
    assert url.display() == display
    assert RegistryURL.parse(display).display() == display  # hub.json's value parses back
    assert SECRET not in repr(url) and SECRET not in url.display()
    if url.dialect == "postgresql":
        assert SECRET not in str(url.sqlalchemy_url()) and url.connect_args() == {"password": SECRET}


@pytest.mark.parametrize("text, words", [
    (f"postgresql://hub:{SECRET}@db/tinc", "contains a password"),
    (f"postgresql://hub:{SECRET}@db:5432/tinc", "contains a password"),
    (f"postgresql://hub@db/tinc?password={SECRET}", "contains a password"),
    ("postgresql://db/tinc", "names no database user"),
    ("postgresql://hub@db/", "names no valid database"),
    ("postgresql://hub@db/tinc;drop", "names no valid database"),
    ("postgresql://hub@/tinc", "names no host"),
    ("postgresql://hub@db:99999/tinc", "invalid port"),
    ("postgresql://hub@db/tinc?service=evil", "unsupported or invalid registry URL parameter"),
    ("postgresql://hub@db/tinc?sslmode=require%27%20host%3Devil", "unsupported or invalid"),
    ("postgresql://hub@db/tinc#frag", "no #fragment"),
    ("postgresql://h'ub@db/tinc", "invalid database user name"),
    (f"postgresql://hub%3A{SECRET}@db/tinc", "invalid database user name"),
    ("postgresql://hub@db_$x/tinc", "invalid host"),
    ("mysql://hub@db/tinc", "unsupported registry URL scheme"),
    ("sqlite:///relative.sqlite3", "sqlite:////ABSOLUTE/PATH"),
    ("sqlite:////tmp/x.sqlite3?mode=ro", "sqlite:////ABSOLUTE/PATH"),
    ("db.example.org/tinc", "has no scheme"),
    (f"hub:{SECRET}@db/tinc", "has no scheme"),
])
def test_refused_forms(text: str, words: str) -> None:
    with pytest.raises(HubError) as caught:
        RegistryURL.parse(text)
    message = str(caught.value)
    assert words in message and "\n" not in message and SECRET not in message
    assert caught.value.hint


def test_password_file(tmp_path) -> None:
    path = tmp_path / "pw"
    path.write_text(SECRET + "\nsecond line ignored\n")
    path.chmod(0o640)
    with pytest.raises(HubError, match="accessible to other users") as caught:
        read_password_file(str(path))
    assert SECRET not in str(caught.value)
    path.chmod(0o600)
    assert read_password_file(str(path)) == SECRET
    path.write_text("\n")
    with pytest.raises(HubError, match="is empty"):
        read_password_file(str(path))
    with pytest.raises(HubError, match="cannot read the registry password file"):
        read_password_file(str(tmp_path / "missing"))

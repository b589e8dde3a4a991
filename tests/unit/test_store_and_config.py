"""The node's store and settings."""

from __future__ import annotations

import sqlite3
import stat

import pytest

from kiyot_py.config import ConfigError, load_settings
from kiyot_py.model import Cell, CellFacts, Container, Credentials, Image, Sandbox, new_id
from kiyot_py.store import Store, StoreError


def test_records_round_trip(tmp_path):
    store = Store(tmp_path / "state.db")
    sb = Sandbox(id=new_id(), name="p", namespace="n", uid="u", attempt=1, labels={"a": "b"},
                 config=b"\x00\x01", cell=Cell(id="c1", sandbox_id="x", address="10.0.0.2",
                                               agent_url="https://10.0.0.2:1", server_name="c.cells.kiyot"))
    c = Container(id=new_id(), sandbox_id=sb.id, name="c", attempt=0, image="i", image_id="sha256:1",
                  image_ref="r@sha256:2", config=b"\xff")
    img = Image(id="sha256:" + "1" * 64, repo_tags=["a:1"])
    for record in (sb, c, img):
        store.put(record)
    store.close()
    again = Store(tmp_path / "state.db")
    assert again.load(Sandbox) == [sb]
    assert again.load(Container) == [c]
    assert again.load(Image) == [img]
    again.delete(Container, c.id)
    assert again.load(Container) == []
    # Secrets live here: the file is the owner's only.
    assert stat.S_IMODE((tmp_path / "state.db").stat().st_mode) == 0o600
    assert "token" not in repr(sb.cell)
    assert "s3cr3t" not in repr(Credentials("u", "s3cr3t", "registry.example"))


def test_newer_schema_is_refused(tmp_path):
    Store(tmp_path / "state.db").close()
    db = sqlite3.connect(tmp_path / "state.db")
    db.execute("PRAGMA user_version=99")
    db.close()
    with pytest.raises(StoreError, match="newer"):
        Store(tmp_path / "state.db")


def test_settings_layering(tmp_path):
    conf = tmp_path / "k.toml"
    conf.write_text('state_dir = "/from/file"\nsocket = "/file.sock"\n[local]\nsubnet = "10.1.0.0/24"\n')
    env = {"KIYOT_SOCKET": "/env.sock", "KIYOT_LOCAL_BRIDGE": "br9", "PATH": "/bin"}
    s = load_settings(conf, env, {"state_dir": "/from/flag"})
    assert str(s.state_dir) == "/from/flag"
    assert str(s.socket) == "/env.sock"
    assert s.local.subnet == "10.1.0.0/24" and s.local.bridge == "br9"


@pytest.mark.parametrize("text,message", [
    ("nope = 1", "unknown setting 'nope'"),
    ('[local]\nsubnet = "banana"', "local.subnet"),
    ('provider = "gcp"', "not one of 'local', 'aws'"),
    ("[local]\nagent_port = 'x'", "not a valid int"),
    ("= broken", "k.toml"),
])
def test_bad_settings_are_clear(tmp_path, text, message):
    conf = tmp_path / "k.toml"
    conf.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_settings(conf, {}, {})


def test_a_boolean_setting_from_toml_environment_and_flags(tmp_path):
    from kiyot_py.config import ConfigError, load_settings

    conf = tmp_path / "c.toml"
    conf.write_text("[local]\nallow_privileged = true\n")
    assert load_settings(conf, {}, {}).local.allow_privileged is True
    assert load_settings(None, {}, {}).local.allow_privileged is False
    assert load_settings(conf, {"KIYOT_LOCAL_ALLOW_PRIVILEGED": "no"}, {}).local.allow_privileged is False
    import pytest

    with pytest.raises(ConfigError, match="allow_privileged"):
        load_settings(None, {"KIYOT_LOCAL_ALLOW_PRIVILEGED": "maybe"}, {})


def test_the_example_config_names_only_real_settings():
    from pathlib import Path

    example = Path(__file__).resolve().parents[2] / "packaging" / "config.example.toml"
    settings = load_settings(example, {}, {})
    assert settings.local.allow_privileged is False and settings.local.deny_egress == ""


def test_credentials_an_older_version_kept_are_scrubbed_from_the_file(tmp_path):
    """Schema 1 (before the content store) kept an image's last pull's password in clear;
    opening such a database moves it to schema 2, which keeps none."""
    import json

    from kiyot_py.model import to_json

    db = sqlite3.connect(tmp_path / "state.db")  # a database as schema 1 wrote it
    db.execute("CREATE TABLE images (id TEXT PRIMARY KEY, data TEXT NOT NULL)")
    old = to_json(Image(id="sha256:" + "1" * 64, repo_tags=["a:1"]))
    old["auth"] = {"a": {"username": "u", "password": "old-s3cr3t-in-clear"}}
    db.execute("INSERT INTO images (id, data) VALUES (?, ?)", (old["id"], json.dumps(old)))
    db.execute("PRAGMA user_version=1")
    db.commit()
    db.close()
    Store(tmp_path / "state.db").close()  # the migration, then a checkpoint: the WAL lands in the file
    raw = b"".join(p.read_bytes() for p in tmp_path.glob("state.db*"))
    assert b"old-s3cr3t-in-clear" not in raw
    assert Store(tmp_path / "state.db").load(Image)[0].repo_tags == ["a:1"]


def _facts(kernel: str) -> CellFacts:
    profile = {"defaultAction": "SCMP_ACT_ERRNO", "syscalls": [{"names": [f"call{i}" for i in range(800)],
                                                                "action": "SCMP_ACT_ALLOW"}]}
    return CellFacts(kernel=kernel, capabilities=["CAP_CHOWN"], seccomp_profile=profile)


def _sandbox_with_facts(facts: CellFacts) -> Sandbox:
    return Sandbox(id=new_id(), name="p", namespace="n", uid="u", attempt=0,
                   cell=Cell(id="c1", sandbox_id="x", address="10.0.0.2", agent_url="https://10.0.0.2:1",
                             facts=facts))


def _row_bytes(path, table: str) -> int:
    db = sqlite3.connect(path)
    try:
        return sum(n for (n,) in db.execute(f"SELECT length(data) FROM {table}"))  # noqa: S608 - a test's table
    finally:
        db.close()


def test_cell_facts_are_written_once_apart_from_the_sandbox(tmp_path):
    store = Store(tmp_path / "state.db")
    sb = _sandbox_with_facts(_facts("6.1.0"))
    store.put(sb)
    assert _row_bytes(tmp_path / "state.db", "sandboxes") < 1000 < _row_bytes(tmp_path / "state.db", "cell_facts")
    sb.state = "SANDBOX_READY"
    store.put(sb)  # a save of the sandbox: the facts are not written again
    sb.cell.facts = _facts("6.2.0")  # facts learned anew: written again
    store.put(sb)
    store.close()
    again = Store(tmp_path / "state.db")
    (loaded,) = again.load(Sandbox)
    assert loaded == sb and loaded.cell.facts.kernel == "6.2.0" and loaded.state == "SANDBOX_READY"
    assert loaded.cell.facts.seccomp_profile == sb.cell.facts.seccomp_profile
    again.delete(Sandbox, sb.id)
    assert again.load(Sandbox) == [] and _row_bytes(tmp_path / "state.db", "cell_facts") == 0


def test_schema_2_sandboxes_have_their_facts_moved_apart(tmp_path):
    import json

    from kiyot_py.model import to_json

    sb = _sandbox_with_facts(_facts("6.1.0"))
    db = sqlite3.connect(tmp_path / "state.db")  # a database as schema 2 wrote it: facts in the sandbox
    for table in ("sandboxes", "containers", "images"):
        db.execute(f"CREATE TABLE {table} (id TEXT PRIMARY KEY, data TEXT NOT NULL)")
    db.execute("INSERT INTO sandboxes (id, data) VALUES (?, ?)", (sb.id, json.dumps(to_json(sb))))
    db.execute("PRAGMA user_version=2")
    db.commit()
    db.close()
    store = Store(tmp_path / "state.db")
    assert store.load(Sandbox) == [sb]
    assert _row_bytes(tmp_path / "state.db", "sandboxes") < 1000

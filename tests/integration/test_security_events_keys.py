"""Key maintenance is a security event: `python -m services.kit.keys rotate` and `rewrap`, run as an
operator would, leave `key_rotated` in the database of the service whose keys changed (its outbox,
which the service's relay publishes), one per agency changed, naming the operator, never a key."""

from __future__ import annotations

import base64
import getpass
import os
import socket

from services.kit.crypto import KeyRing, PhiCipher
from tests.integration.test_key_commands import run
from tests.integration.test_security_events_http import recorded


def b64(key: bytes) -> str:
    return base64.b64encode(key).decode()


def test_rotate_and_rewrap_each_leave_key_rotated_in_the_services_database(mongo_uri, mongo_client, db_name, tmp_path):
    old, new = os.urandom(32), os.urandom(32)
    prefix = f"{db_name}_"
    inbox_db, directory_db = mongo_client[f"{prefix}inbox"], mongo_client[f"{prefix}directory"]
    for agency in ("agy_a", "agy_b"):
        PhiCipher(KeyRing(inbox_db, {"old": old}, "old")).seal(agency, "msg_1", "body", "sealed before rotation")
    env = {
        **os.environ,
        "CLINIC_RUN_DIR": str(tmp_path),
        "MONGO_URI": mongo_uri,
        "MONGO_DB_PREFIX": prefix,
        "PHI_MASTER_KEYS": f"new:{b64(new)},old:{b64(old)}",
        "PHI_MASTER_KEY_ID": "new",
    }
    try:
        assert run(["rotate", "--service", "inbox", "--agency", "agy_a"], env)["key_id"] == "agy_a:2"
        [rotated] = recorded(inbox_db)
        assert (rotated.kind, rotated.reason, rotated.outcome) == ("key_rotated", "data_key_rotated", "succeeded")
        assert (rotated.agency_id, rotated.target_type, rotated.target_id) == ("agy_a", "agency", "agy_a")
        assert (rotated.actor_kind, rotated.actor_id, rotated.source) == ("operator", getpass.getuser(),
                                                                          socket.gethostname())
        assert rotated.service == "inbox"

        assert run(["rewrap", "--service", "inbox"], env)["rewrapped"] == 2  # agy_a:1 and agy_b:1
        rewrapped = [e for e in recorded(inbox_db) if e.reason == "master_key_rewrapped"]
        assert sorted((e.kind, e.agency_id, e.target_id) for e in rewrapped) == [
            ("key_rotated", "agy_a", "agy_a"),
            ("key_rotated", "agy_b", "agy_b"),
        ]
        # Nothing left to re-wrap: nothing recorded; another service's database is untouched.
        assert run(["rewrap", "--service", "inbox"], env)["rewrapped"] == 0
        assert len(recorded(inbox_db)) == 3
        assert recorded(directory_db) == []
        text = " ".join(str(e) for e in recorded(inbox_db))
        assert b64(new) not in text and b64(old) not in text and "agy_a:2" not in text
    finally:
        mongo_client.drop_database(inbox_db.name)

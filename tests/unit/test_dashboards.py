"""The dashboards' pure parts: buckets and percentiles, unread ages by arrival hour, the moves of the
unread aggregates, the consumer bindings and CSV cells (services/inbox/dashboards.py)."""

from __future__ import annotations

import pytest

from services.inbox import dashboards as d


def test_buckets_are_fixed_and_log_scaled():
    assert d.bucket_of(0) == 0
    assert d.bucket_of(59.9) == 0
    assert d.bucket_of(60) == 1
    assert d.bucket_of(3599) == d.BOUNDS_S.index(3600)
    assert d.bucket_of(10**9) == len(d.BOUNDS_S)


def test_a_percentile_is_the_upper_bound_of_its_bucket():
    assert d.percentile({}, 0.5) is None
    buckets = {0: 5, 6: 4, 11: 1}  # 5 under a minute, 4 under an hour, 1 under a day
    assert d.percentile(buckets, 0.5) == 60
    assert d.percentile(buckets, 0.9) == 3600
    assert d.percentile(buckets, 1.0) == 86_400
    assert d.percentile({len(d.BOUNDS_S): 3}, 0.5) == d.BOUNDS_S[-1]  # the open bucket
    assert d.percentile({0: 0, 3: -1}, 0.5) is None  # nothing left after reads


def test_unread_ages_come_from_arrival_hours():
    now = 100 * d.HOUR_MS
    assert d.age_percentiles({}, now)["oldest_unread_at"] is None
    ages = d.age_percentiles({99: 8, 90: 1, 80: 1, 70: 0}, now)
    assert ages["unread_age_p50_s"] == 1800  # the newest hour's middle
    assert ages["unread_age_p90_s"] == (10 * 3600 - 1800)
    assert ages["oldest_unread_at"] == "1970-01-04T08:00:00Z"  # hour 80


def item(owner: str, at_ms: int, folder: str = "messages") -> dict:
    return {"agency_id": "agy_a", "owner_id": owner, "folder": folder, "sort_key": f"{at_ms:013d}.itm_x"}


def test_unread_moves_follow_the_counter_deltas():
    moves = d.unread_moves(
        [
            (item("stf_1", 2 * d.HOUR_MS + 5), {"u_messages": 1, "t_messages": 1}),
            (item("stf_1", 2 * d.HOUR_MS + 9), {"u_messages": 1}),
            (item("stf_2", 5 * d.HOUR_MS), {"u_messages": -1, "u_archive": 1, "t_archive": 1}),
            (item("stf_3", 5 * d.HOUR_MS), {"t_messages": 1}),  # read already: no unread move
            (item("stf_1", 2 * d.HOUR_MS), {}),
        ]
    )
    assert moves == {
        "agy_a|stf_1": {"h:messages:2": 2},
        "agy_a|stf_2": {"h:messages:5": -1, "h:archive:5": 1},
    }


def test_consumer_bindings():
    assert d.parse_consumers("") == {}
    assert d.parse_consumers("internal-dashboard=agy_a+agy_b, ops=agy_c") == {
        "internal-dashboard": frozenset({"agy_a", "agy_b"}),
        "ops": frozenset({"agy_c"}),
    }
    for bad in ("internal-dashboard", "=agy_a", "x=agy a", "x y=agy_a"):
        with pytest.raises(ValueError, match="INBOX_DASHBOARD_CONSUMERS"):
            d.parse_consumers(bad)


def test_csv_cells_never_run_as_formulas():
    assert d.csv_cell("=HYPERLINK(1)") == "'=HYPERLINK(1)"
    assert d.csv_cell("-1") == "'-1"
    assert d.csv_cell("Dana Thompson") == "Dana Thompson"
    assert d.csv_cell(None) == ""
    assert d.csv_cell(12) == "12"


def test_counts_are_read_from_flat_fields():
    doc = {"_id": "x", "n": 3, "a:0": 2, "a:4": 1, "s:stf_1:n": 2, "s:stf_1:0": 2, "h:messages:7": 1}
    assert d.prefixed(doc, "a:") == {0: 2, 4: 1}
    assert d.prefixed(doc, "s:stf_1:") == {0: 2}
    assert d.prefixed(doc, "h:messages:") == {7: 1}
    assert d.merge_days([(1, doc), (2, {"a:0": 1})], None) == {0: 3, 4: 1}


def test_a_lab_feed_day_counts_types_and_ack_codes():
    from services.notifications import dashboards as lab

    assert lab.field_part("ORU_R01") == "ORU_R01"
    assert lab.field_part("a.b$c:d") == "a_b_c_d"
    assert lab.field_part("") == "unknown"
    point = lab.day_point(
        20_000,
        {
            "_id": "agy_a|20000",
            "n": 6,
            "mllp:ORU_R01:AA": 3,
            "mllp:ORU_R01:AE": 1,
            "mllp:SIU_S12:AA": 1,
            "fhir:accepted": 1,
        },
    )
    assert point == {
        "date": "2024-10-04",
        "mllp_messages": 5,
        "lab_results": 4,
        "by_type": {"ORU_R01": 4, "SIU_S12": 1},
        "ack_codes": {"AA": 4, "AE": 1},
        "fhir_accepted": 1,
        "fhir_refused": 0,
    }

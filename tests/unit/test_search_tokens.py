"""Blind search tokens: normalisation, tokens keyed per agency, no plaintext, pseudo-terms."""

from __future__ import annotations

import os

import pytest

from services.inbox import search
from services.kit.errors import InvalidInput


def test_words_are_folded_stripped_and_deduplicated():
    assert search.words("Café RÉSUMÉ, résumé! Straße") == ["cafe", "resume", "strasse"]


def test_one_letter_words_stop_words_and_punctuation_are_dropped():
    assert search.words("Re: Fwd: a note to the team about O'Brien's follow-up") == [
        "note",
        "team",
        "about",
        "brien",
        "follow",
        "up",
    ]


def test_words_keep_digits_and_other_scripts_and_skip_very_long_runs():
    assert search.words("MRN 00123 Ωmega") == ["mrn", "00123", "ωmega"]
    assert search.words("x" * 41 + " ok") == ["ok"]


def test_underscores_and_operators_split_words():
    assert search.words('{"$gt": ""} pat_001') == ["gt", "pat", "001"]


def test_tokens_are_keyed_per_agency_and_stable():
    one, other = os.urandom(32), os.urandom(32)
    assert search.token(one, "insulin") == search.token(one, "insulin")
    assert search.token(one, "insulin") != search.token(other, "insulin")
    assert search.token(one, "insulin") != search.token(one, "insuline")
    assert len(search.token(one, "insulin")) == 16


def test_a_token_holds_no_plaintext():
    key = os.urandom(32)
    tok = search.token(key, "lopez")
    assert "lopez" not in tok.lower()
    assert search.posting_key("agy_a", "stf_a", tok).split("|")[2] == tok


def test_pseudo_terms_never_equal_words_of_a_text():
    key = os.urandom(32)
    # "patient Smith": the patient's name words are apart from every text's words.
    assert search.patient_terms("María Smith") == ["p:maria", "p:smith"]
    assert search.token(key, "p:smith") != search.token(key, "smith")
    # A text cannot produce a pseudo-term: words hold letters and digits only.
    assert all(":" not in w for w in search.words("from:stf_kim p:smith pid:pat_1"))
    assert search.sender_term("stf_kim") == "from:stf_kim"
    assert search.patient_id_term("PAT_1") == "pid:pat_1"


def test_an_item_s_terms_are_its_words_sender_and_patient():
    terms = search.Terms(("insulin", "dose"), "stf_kim", "pat_1", "Ana Lopez").all()
    assert terms == ["insulin", "dose", "from:stf_kim", "pid:pat_1", "p:ana", "p:lopez"]
    assert search.Terms().all() == []


def test_posting_documents_are_keyed_by_owner_token_and_bucket():
    sort_key = "1700000000123.itm_abc"
    ms, item_id = search.split_sort_key(sort_key)
    assert (ms, item_id) == (1700000000123, "itm_abc")
    assert search.bucket(ms) == 17000
    assert search.doc_id("agy|stf|tok", 17000) == "agy|stf|tok|17000"
    assert search.entries({"_id": "x", "pk": "p", "bk": 1, "i_itm_abc": ms}) == {"itm_abc": ms}


def test_cursors_round_trip_and_refuse_anything_else():
    for key in ("1700000000123.itm_abc", "1700000000000."):
        assert search.decode_cursor(search.encode_cursor(key)) == key
    for bad in (
        "!!",
        search.encode_cursor("17.itm"),
        search.encode_cursor("1700000000123"),
        search.encode_cursor('1700000000123.{"$gt": ""}'),
    ):
        with pytest.raises(InvalidInput) as refused:
            search.decode_cursor(bad)
        assert refused.value.code == "invalid_cursor"


def test_rarity_prefers_a_term_known_whole_then_the_sparsest():
    few = [{"bk": 10, "i_a": 1}]
    dense = [{"bk": 10 - n, **{f"i_{n}_{k}": 1 for k in range(20)}} for n in range(search.PROBE_DOCS)]
    sparse = [{"bk": 100 - 10 * n, "i_x": 1} for n in range(search.PROBE_DOCS)]
    assert search._rarity(few) < search._rarity(sparse) < search._rarity(dense)

"""DoseSpot single sign-on, checked against DoseSpot's own description of it (RESTful API V2
Authentication Guide, 1.6.1 "Invoking DoseSpot UI"), reimplemented here step by step:

Creating the Encrypted ClinicId (SingleSignOnCode):
  2. an alpha-numeric random phrase 32 characters long; 3. append the ClinicKey (phrase THEN key);
  4-5. SHA512 of the UTF-8 bytes; 6. Base64, and if there are two '=' at the end, remove them;
  7. prepend the same phrase; 8. URL-encode the entire code in a query string.
Creating the Encrypted UserId (SingleSignOnUserIdVerify):
  1. the first 22 characters of the phrase; 2. UserId THEN those 22 characters; 3. THEN the
  ClinicKey; 4-6. SHA512, Base64, two trailing '=' removed; 7. URL-encode it.
Query: SingleSignOnClinicId, SingleSignOnUserId, [PatientId], SingleSignOnPhraseLength=32,
SingleSignOnCode, SingleSignOnUserIdVerify, [RefillsErrors=1].
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import logging
import string
import urllib.parse

import pytest

from services.erx_bridge.vendors.base import (
    SSO_HOME,
    SSO_NOTIFICATIONS,
    SSO_PATIENT,
    PracticeCredentials,
    VendorRejected,
)
from services.erx_bridge.vendors.dosespot import DoseSpotAdapter, sso_code, sso_user_id_verify

PHRASE = "SimPhrase007AbCdEfGhIjKlMnOpQrSt"  # chosen so both values contain '+' and '/'
CLINIC_KEY = "Test-Clinic-Key-7Q2"
CLINIC_ID = "1001"
USER_ID = "2001"
# Known answers, computed outside Python:
#   printf '%s' "$PHRASE$KEY" | openssl dgst -sha512 -binary | base64 -w0
#   printf '%s' "2001${PHRASE:0:22}$KEY" | openssl dgst -sha512 -binary | base64 -w0
OPENSSL_CODE_HASH = "3Wc5HeL+yHWnvS6TiCVjJloaGyAD3pEzuttpOJ0c6V9v/xm+2GWbwDy2MrX4Q3F5t8AxkdFEyCYkfZkbhfjlVw=="
OPENSSL_VERIFY_HASH = "DHw6CveC+WYqHPIb9TJiaClYGmBScmt12mEnMmhj6/6hzybqRwpPNvB19Jb7n53NWELtaTMRCqbloZ/MAtvJLQ=="
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)
ALPHANUMERIC = string.ascii_uppercase + string.ascii_lowercase + string.digits


def documented_code(phrase: str, clinic_key: str) -> str:
    digest = hashlib.sha512((phrase + clinic_key).encode("utf-8")).digest()
    encoded = base64.b64encode(digest).decode("ascii")
    if encoded[-2:] == "==":
        encoded = encoded[:-2]
    return phrase + encoded


def documented_verify(phrase: str, user_id: str, clinic_key: str) -> str:
    digest = hashlib.sha512((user_id + phrase[0:22] + clinic_key).encode("utf-8")).digest()
    encoded = base64.b64encode(digest).decode("ascii")
    if encoded[-2:] == "==":
        encoded = encoded[:-2]
    return encoded


def scripted(phrase: str):
    """A random source that draws `phrase`, character by character (and checks the alphabet)."""
    characters = iter(phrase)

    def choice(alphabet: str) -> str:
        character = next(characters)
        assert character in alphabet
        return character

    return choice


class NoHttp:
    """A session that fails the test if anything is sent: sso() is pure."""

    def request(self, *args, **kwargs):
        raise AssertionError("sso() must not call the vendor")

    def close(self):
        pass


def practice(**overrides) -> PracticeCredentials:
    values = {
        "vendor": "dosespot",
        "base_url": "https://vendor.invalid/webapi/v2",
        "clinic_id": CLINIC_ID,
        "clinic_key": CLINIC_KEY,
        "admin_user_id": "9999",
        "sso_url": "https://my.staging.dosespot.invalid/LoginSingleSignOn.aspx",
    }
    return PracticeCredentials(**(values | overrides))


def adapter(phrase: str = PHRASE) -> DoseSpotAdapter:
    return DoseSpotAdapter(session=NoHttp(), choice=scripted(phrase), now=lambda: NOW)


def query_of(url: str) -> list[tuple[str, str]]:
    return urllib.parse.parse_qsl(urllib.parse.urlsplit(url).query, keep_blank_values=True, strict_parsing=True)


def test_the_reference_reimplementation_agrees_with_openssl():
    assert documented_code(PHRASE, CLINIC_KEY) == PHRASE + OPENSSL_CODE_HASH[:-2]
    assert documented_verify(PHRASE, USER_ID, CLINIC_KEY) == OPENSSL_VERIFY_HASH[:-2]


def test_code_and_user_id_verify_follow_the_documented_steps():
    assert sso_code(PHRASE, CLINIC_KEY) == PHRASE + OPENSSL_CODE_HASH[:-2]
    assert sso_user_id_verify(PHRASE, USER_ID, CLINIC_KEY) == OPENSSL_VERIFY_HASH[:-2]
    # The user id comes first, then 22 characters of the phrase: not the other way round.
    swapped = base64.b64encode(hashlib.sha512((PHRASE[:22] + USER_ID + CLINIC_KEY).encode()).digest()).decode()
    assert sso_user_id_verify(PHRASE, USER_ID, CLINIC_KEY) != swapped[:-2]


def test_a_notifications_link_opens_refills_and_errors():
    link = adapter().sso(practice(), USER_ID, SSO_NOTIFICATIONS)
    assert link.url.startswith("https://my.staging.dosespot.invalid/LoginSingleSignOn.aspx?")
    assert query_of(link.url) == [
        ("SingleSignOnClinicId", CLINIC_ID),
        ("SingleSignOnUserId", USER_ID),
        ("SingleSignOnPhraseLength", "32"),
        ("SingleSignOnCode", documented_code(PHRASE, CLINIC_KEY)),
        ("SingleSignOnUserIdVerify", documented_verify(PHRASE, USER_ID, CLINIC_KEY)),
        ("RefillsErrors", "1"),
    ]


def test_a_patient_link_names_the_patient_and_not_the_notifications():
    link = adapter().sso(practice(), USER_ID, SSO_PATIENT, patient_id="50017")
    assert query_of(link.url) == [
        ("SingleSignOnClinicId", CLINIC_ID),
        ("SingleSignOnUserId", USER_ID),
        ("PatientId", "50017"),
        ("SingleSignOnPhraseLength", "32"),
        ("SingleSignOnCode", documented_code(PHRASE, CLINIC_KEY)),
        ("SingleSignOnUserIdVerify", documented_verify(PHRASE, USER_ID, CLINIC_KEY)),
    ]


def test_a_home_link_has_only_the_sign_on_values():
    names = [name for name, _ in query_of(adapter().sso(practice(), USER_ID, SSO_HOME).url)]
    assert names == [
        "SingleSignOnClinicId",
        "SingleSignOnUserId",
        "SingleSignOnPhraseLength",
        "SingleSignOnCode",
        "SingleSignOnUserIdVerify",
    ]


def test_every_value_is_url_encoded_base64_and_unpadded():
    url = adapter().sso(practice(), USER_ID, SSO_NOTIFICATIONS).url
    raw_query = urllib.parse.urlsplit(url).query
    raw = dict(pair.split("=", 1) for pair in raw_query.split("&"))
    code = documented_code(PHRASE, CLINIC_KEY)
    verify = documented_verify(PHRASE, USER_ID, CLINIC_KEY)
    assert "+" in code and "/" in code and "+" in verify and "/" in verify  # the vectors exercise encoding
    for name, value in (("SingleSignOnCode", code), ("SingleSignOnUserIdVerify", verify)):
        assert raw[name] == value.replace("+", "%2B").replace("/", "%2F")
        assert not value.endswith("=")
    assert len(code) == 32 + 86 and len(verify) == 86  # 64-byte SHA-512 in Base64 is 88, less "=="


def test_a_patient_link_needs_a_patient_and_contexts_are_known():
    with pytest.raises(ValueError):
        adapter().sso(practice(), USER_ID, SSO_PATIENT)
    with pytest.raises(ValueError):
        adapter().sso(practice(), USER_ID, "prescriptions")


def test_patient_ids_are_encoded_too():
    link = adapter().sso(practice(), USER_ID, SSO_PATIENT, patient_id="50 17&x=1")
    assert ("PatientId", "50 17&x=1") in query_of(link.url)
    assert "x=1" not in urllib.parse.urlsplit(link.url).query.split("&")


def test_the_link_is_short_lived_and_hidden_from_repr():
    link = adapter().sso(practice(), USER_ID, SSO_NOTIFICATIONS)
    assert link.expires_at == NOW + dt.timedelta(minutes=5)
    assert "SingleSignOn" not in repr(link) and CLINIC_KEY not in repr(link)


def test_the_phrase_is_32_fresh_alphanumeric_characters():
    real = DoseSpotAdapter(session=NoHttp())
    phrases = set()
    for _ in range(50):
        code = dict(query_of(real.sso(practice(), USER_ID, SSO_HOME).url))["SingleSignOnCode"]
        phrase = code[:32]
        assert len(phrase) == 32 and set(phrase) <= set(ALPHANUMERIC)
        assert code == documented_code(phrase, CLINIC_KEY)
        phrases.add(phrase)
    assert len(phrases) == 50


def test_nothing_is_logged_and_the_vendor_is_not_called(caplog):
    caplog.set_level(logging.DEBUG)
    link = adapter().sso(practice(), USER_ID, SSO_NOTIFICATIONS)
    code = dict(query_of(link.url))["SingleSignOnCode"]
    for record in caplog.records:
        text = record.getMessage() + repr(record.__dict__)
        assert code not in text and CLINIC_KEY not in text and "SingleSignOn" not in text


def test_an_sso_address_with_a_query_of_its_own_keeps_it():
    link = adapter().sso(practice(sso_url="https://portal.invalid/LoginSingleSignOn.aspx?b=1"), USER_ID, SSO_HOME)
    assert query_of(link.url)[0] == ("b", "1")
    assert query_of(link.url)[1] == ("SingleSignOnClinicId", CLINIC_ID)


def test_a_practice_without_an_sso_address_is_refused():
    with pytest.raises(VendorRejected):
        adapter().sso(practice(sso_url=""), USER_ID, SSO_NOTIFICATIONS)
    with pytest.raises(VendorRejected):
        adapter().sso(practice(), "", SSO_NOTIFICATIONS)

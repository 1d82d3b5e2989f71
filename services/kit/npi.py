"""National Provider Identifiers (NPI): ten digits, the last a Luhn check digit computed over the
health-industry card prefix 80840 followed by the first nine. Directory checks them when an admin
sets one; HL7 interfaces check them when a message names a provider by NPI."""

from __future__ import annotations

import re

NPI_PATTERN = re.compile(r"^[0-9]{10}$")
NPI_CARD_PREFIX = "80840"
# The NPI's assigning authority as an ISO OID (CMS's National Provider Identifier).
NPI_OID = "2.16.840.1.113883.4.6"


def npi_check_digit(first_nine: str) -> int:
    """The tenth digit of an NPI whose first nine digits are `first_nine`."""
    total = 0
    for position, char in enumerate(reversed(NPI_CARD_PREFIX + first_nine)):
        digit = int(char) * (2 if position % 2 == 0 else 1)
        total += digit - 9 if digit > 9 else digit
    return (10 - total % 10) % 10


def is_valid_npi(value: object) -> bool:
    """Ten digits whose last is the check digit of the other nine."""
    return isinstance(value, str) and NPI_PATTERN.fullmatch(value) is not None and (
        npi_check_digit(value[:9]) == int(value[9])
    )

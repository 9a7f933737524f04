"""PII redaction as FineWeb does it (datatrove 0.10.x `PIIFormatter`, used in the FineWeb pipeline):
email addresses and public IP addresses are replaced, in turn, by fixed placeholder values.

The placeholders are datatrove's: example.com/.org addresses (reserved for examples, RFC 2606) and IPs
that did not answer pings when its list was made. Private, loopback and reserved IPs are kept (they
identify nobody), as datatrove's `only_remove_public_ips=True` default does.
"""

from __future__ import annotations

import ipaddress
import re

EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*@(?:(?:[A-Za-z0-9](?:["
    r"A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?|\[(?:(?:25[0-5]|2[0-4][0-9]|["
    r"01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?|[A-Za-z0-9-]*[A-Za-z0-9]:)])"
)
IPV4 = re.compile(
    r"(?:(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)\.){3}(?:25[0-5]|2[0-4][0-9]|[01]?[0-9][0-9]?)"
)
EMAIL_REPLACEMENTS = ("email@example.com", "firstname.lastname@example.org")
IP_REPLACEMENTS = (
    "22.214.171.124",
    "126.96.36.199",
    "188.8.131.52",
    "184.108.40.206",
    "220.127.116.11",
    "18.104.22.168",
)


def _is_public_ip(text: str) -> bool:
    try:
        return ipaddress.ip_address(text).is_global
    except ValueError:
        return False


class PIIRedactor:
    """Replaces emails and/or public IPs; the placeholders rotate per replacement, across documents, as in
    datatrove (so a redactor's output depends on the documents it saw before: one redactor per shard)."""

    def __init__(self, *, emails: bool = True, ips: bool = True) -> None:
        self.emails = emails
        self.ips = ips
        self._email_i = 0
        self._ip_i = 0
        self.counts = {"emails": 0, "ips": 0}

    def _email(self, m: re.Match) -> str:
        out = EMAIL_REPLACEMENTS[self._email_i]
        self._email_i = (self._email_i + 1) % len(EMAIL_REPLACEMENTS)
        self.counts["emails"] += 1
        return out

    def _ip(self, m: re.Match) -> str:
        if not _is_public_ip(m.group(0)):
            return m.group(0)
        out = IP_REPLACEMENTS[self._ip_i]
        self._ip_i = (self._ip_i + 1) % len(IP_REPLACEMENTS)
        self.counts["ips"] += 1
        return out

    def __call__(self, text: str) -> str:
        if self.emails and "@" in text:
            text = EMAIL.sub(self._email, text)
        if self.ips and "." in text:
            text = IPV4.sub(self._ip, text)
        return text

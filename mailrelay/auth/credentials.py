"""
What a client presents when it logs in, SMTP AUTH and HTTP Basic alike.

The user name ``App`` means "the password is an API key" (SPEC §1); every other user name is an
account name with its password. :func:`credentialsFor` is the one place that makes that choice.
"""

from __future__ import annotations

from dataclasses import dataclass

from twisted.cred.credentials import ICredentials, IUsernamePassword, UsernamePassword
from zope.interface import Attribute, implementer

from mailrelay.model import API_KEY_USER


class IAPIKey(ICredentials):
    """An API key presented with the user name ``App``."""

    key = Attribute("The API key as the client sent it (str).")


@implementer(IAPIKey)
class APIKeyCredentials:
    def __init__(self, key: str) -> None:
        self.key = key

    def __repr__(self) -> str:
        return "<APIKeyCredentials (hidden)>"


def credentialsFor(username: str, password: str) -> IAPIKey | IUsernamePassword:
    """The credentials object for a user name / password pair."""
    if username == API_KEY_USER:
        return APIKeyCredentials(password)
    return UsernamePassword(username.encode("utf-8"), password.encode("utf-8"))


@dataclass(frozen=True)
class APIKeyLogin:
    """The avatar id an API-key login gives the realm: the account, and which key (by its
    hash) it used, so that an open session can find the key revoked."""

    account: str
    keyHash: str

"""A container holding secrets or volumes never runs as a host account's uid
(runner/fleet.py check_private_uid): that account could read them through /proc."""

from __future__ import annotations

import pwd

import pytest

from runner.bundle import BundleError
from runner.fleet import check_private_uid


def test_a_host_accounts_uid_is_refused_naming_it_and_the_fix():
    account = next(p for p in pwd.getpwall() if p.pw_uid not in (0, 65534))
    with pytest.raises(BundleError) as err:
        check_private_uid("fib", account.pw_uid)
    text = str(err.value)
    assert f"uid {account.pw_uid}" in text and repr(account.pw_name) in text
    assert "fib" in text and "USER" in text


def test_root_nobody_and_a_uid_no_account_has_pass():
    taken = {p.pw_uid for p in pwd.getpwall()}
    free = next(u for u in range(10001, 70000) if u not in taken)
    for uid in (0, 65534, free):
        check_private_uid("fib", uid)

"""Admission's pure core and the key store: exact limits on a hand-driven clock."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from serving.frontend.admission import WINDOW_S, KeyRateLimiter, ModelAdmission, Overloaded
from serving.frontend.auth import (
    AuthError,
    KeysFile,
    KeysFileError,
    KeyStore,
    hash_key,
    load_keys_file,
)


def test_model_limits_in_flight_and_queued_tokens() -> None:
    admission = ModelAdmission(max_inflight_requests=2, max_queued_prompt_tokens=100)
    admission.admit(60)
    with pytest.raises(Overloaded) as queued:
        admission.admit(50)  # 60 + 50 > 100 prompt tokens waiting
    assert queued.value.reason == "queued_tokens_limit" and queued.value.retry_after_s == 1
    admission.first_token(60)  # the first request is decoding: its prompt left the queue
    admission.admit(50)
    with pytest.raises(Overloaded) as inflight:
        admission.admit(1)
    assert inflight.value.reason == "inflight_limit" and inflight.value.status_code == 429
    admission.finish()
    admission.admit(1)
    assert (admission.num_inflight, admission.num_queued_prompt_tokens) == (2, 51)


def test_a_prompt_larger_than_the_token_limit_runs_alone() -> None:
    admission = ModelAdmission(max_queued_prompt_tokens=100)
    admission.admit(500)  # nothing else queued: it could never run otherwise
    with pytest.raises(Overloaded):
        admission.admit(1)


def test_requests_per_minute_with_retry_after() -> None:
    limiter = KeyRateLimiter()
    for i in range(3):
        limiter.admit("a", 10, 100.0 + i, requests_per_minute=3, tokens_per_minute=None)
    with pytest.raises(Overloaded) as refused:
        limiter.admit("a", 10, 110.0, requests_per_minute=3, tokens_per_minute=None)
    # The oldest request (t=100) leaves the window at t=160: 50 s from now.
    assert refused.value.retry_after_s == 50 and refused.value.reason == "key_requests_per_minute"
    limiter.admit("b", 10, 110.0, requests_per_minute=3, tokens_per_minute=None)  # own window
    limiter.admit("a", 10, 160.0, requests_per_minute=3, tokens_per_minute=None)


def test_tokens_are_charged_at_admission_and_settled_at_the_end() -> None:
    limiter = KeyRateLimiter()
    charge = limiter.admit("a", 1000, 0.0, requests_per_minute=None, tokens_per_minute=1500)
    with pytest.raises(Overloaded) as refused:
        limiter.admit("a", 600, 1.0, requests_per_minute=None, tokens_per_minute=1500)
    assert refused.value.reason == "key_tokens_per_minute" and refused.value.retry_after_s == 59
    assert charge is not None
    limiter.settle(charge, 300)  # it stopped early: 300 tokens really used
    limiter.admit("a", 600, 2.0, requests_per_minute=None, tokens_per_minute=1500)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tokens_per_minute_hold_within_5_percent_at_3x_the_rate(seed: int) -> None:
    """Ten simulated minutes of requests at three times the key's token budget: no 60 s
    window exceeds the limit, and the key gets at least 95% of it each minute."""
    rng = random.Random(seed)
    limit = 20_000
    limiter = KeyRateLimiter()
    admitted: list[tuple[float, int]] = []
    now = 0.0
    while now < 600.0:
        num_tokens = rng.randint(100, 900)
        try:
            limiter.admit("k", num_tokens, now, requests_per_minute=None, tokens_per_minute=limit)
            admitted.append((now, num_tokens))
        except Overloaded:
            pass
        now += rng.expovariate(3 * limit / 500 / WINDOW_S)  # 3x the budget on average
    for start, _ in admitted:
        in_window = sum(n for t, n in admitted if start <= t < start + WINDOW_S)
        assert in_window <= limit
    for minute in range(1, 10):
        used = sum(n for t, n in admitted if minute * 60 <= t < (minute + 1) * 60)
        assert used >= 0.95 * limit, (minute, used)


def test_key_store_roles_and_hashes(tmp_path: Path) -> None:
    inference, admin = "sk-inference", "sk-admin"
    store = KeyStore(keys_file=KeysFile.model_validate({"keys": [
        {"name": "team", "sha256": hash_key(inference), "requests_per_minute": 5},
        {"name": "ops", "sha256": hash_key(admin), "role": "admin"},
    ]}))  # fmt: skip
    team = store.authenticate(f"Bearer {inference}", admin=False)
    assert (team.name, team.role, team.requests_per_minute) == ("team", "inference", 5)
    assert store.authenticate(f"Bearer {admin}", admin=True).name == "ops"
    for header, admin_api, status in ((f"Bearer {inference}", True, 403),
                                      (f"Bearer {admin}", False, 403),
                                      ("Bearer nope", False, 401), (None, True, 401)):  # fmt: skip
        with pytest.raises(AuthError) as refused:
            store.authenticate(header, admin=admin_api)
        assert refused.value.status_code == status
    # No admin credential while inference keys exist: the admin API is closed.
    closed = KeyStore(api_key="k")
    with pytest.raises(AuthError) as refused:
        closed.authenticate("Bearer k", admin=True)
    assert refused.value.status_code == 403
    assert KeyStore().authenticate(None, admin=True).name == "anonymous"  # nothing configured


def test_keys_file_errors_name_the_field(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("keys:\n  - {name: a, sha256: abc}\n")
    with pytest.raises(KeysFileError, match=r"keys\.0\.sha256"):
        load_keys_file(path)
    digest = hash_key("x")
    path.write_text(
        f"keys:\n  - {{name: a, sha256: {digest}}}\n  - {{name: a, sha256: {digest}}}\n"
    )
    with pytest.raises(KeysFileError, match="duplicate key name: a"):
        load_keys_file(path)
    path.write_text("keys: []\nmodels: {m: {max_inflight_requests: 2, typo: 1}}\n")
    with pytest.raises(KeysFileError, match=r"models\.m\.typo"):
        load_keys_file(path)


def test_refusals_asked_first_charge_nothing() -> None:
    admission = ModelAdmission(max_inflight_requests=1)
    assert admission.inflight_refusal() is None
    admission.admit(10)
    refusal = admission.inflight_refusal()
    assert refusal is not None and refusal.reason == "inflight_limit"
    assert (admission.num_inflight, admission.num_queued_prompt_tokens) == (1, 10)
    limiter = KeyRateLimiter()
    assert limiter.request_refusal("a", 0.0, requests_per_minute=None) is None
    for i in range(2):
        assert limiter.request_refusal("a", float(i), requests_per_minute=2) is None
        limiter.admit("a", 5, float(i), requests_per_minute=2, tokens_per_minute=None)
    asked = limiter.request_refusal("a", 30.0, requests_per_minute=2)
    assert asked is not None and asked.reason == "key_requests_per_minute"
    assert asked.retry_after_s == 30  # the request at t=0 leaves the window at t=60
    # Asking did not charge: once the first request ages out, exactly one more fits.
    limiter.admit("a", 5, 60.0, requests_per_minute=2, tokens_per_minute=None)
    assert limiter.request_refusal("a", 60.0, requests_per_minute=2) is not None

"""Authentication: API keys (configured and stored), and JWT bearer tokens."""

from __future__ import annotations

import hashlib
import hmac
import math
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from starlette.requests import HTTPConnection

from relay import connection
from relay.apikeys import StoredKeys
from relay.gateway.app import create_app
from relay.keys import Keys
from relay.pipeline.authenticate import Authenticator, Credential
from relay.settings import Settings
from tests.conftest import ROOT, assert_problem, client_for, process_env, with_settings

SECRET = "test-jwt-secret-that-is-long-enough-for-hs256"
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC_KEY = ec.generate_private_key(ec.SECP256R1())


def public_pem(key: Any) -> str:
    pem: bytes = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return pem.decode()


def token(key: Any, algorithm: str, **claims: Any) -> str:
    payload = {"sub": "carol", "exp": int(time.time()) + 300, **claims}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, key,
                      algorithm=algorithm)


@pytest.fixture
async def jwt_app(settings: Settings) -> AsyncIterator[Any]:
    application = create_app(with_settings(settings, jwt_secret=SECRET,
                                           jwt_public_key=public_pem(RSA_KEY)))
    async with application.router.lifespan_context(application):
        yield application


async def whoami(app: Any, headers: dict[str, str]) -> httpx.Response:
    """A request that needs credentials and answers something that depends on the principal:
    the module list works for any principal, so its status tells whether they were accepted."""
    async with client_for(app, None) as client:
        return await client.get("/modules", headers=headers)


@pytest.mark.parametrize("algorithm", ["HS256", "RS256"])
async def test_valid_bearer_token_is_accepted(jwt_app: Any, algorithm: str) -> None:
    key = SECRET if algorithm == "HS256" else RSA_KEY
    response = await whoami(jwt_app, {"Authorization": f"Bearer {token(key, algorithm)}"})
    assert response.status_code == 200, response.text


async def test_es256_token_verified_with_an_ec_public_key(settings: Settings) -> None:
    application = create_app(with_settings(settings, jwt_public_key=public_pem(EC_KEY)))
    async with application.router.lifespan_context(application):
        response = await whoami(application,
                                {"Authorization": f"Bearer {token(EC_KEY, 'ES256')}"})
    assert response.status_code == 200, response.text


def forged_hs256() -> str:
    return token("another-secret-entirely-and-long-enough", "HS256")


def alg_none() -> str:
    return jwt.encode({"sub": "carol", "exp": int(time.time()) + 300}, None, algorithm="none")


def hs256_signed_with_the_public_key() -> str:
    # The classic confusion attack: an HMAC keyed with the (public) RSA key.
    header = jwt.utils.base64url_encode(b'{"alg":"HS256","typ":"JWT"}')
    body = jwt.utils.base64url_encode(
        f'{{"sub":"carol","exp":{int(time.time()) + 300}}}'.encode())
    signature = hmac.new(public_pem(RSA_KEY).encode(), header + b"." + body,
                         hashlib.sha256).digest()
    return (header + b"." + body + b"." + jwt.utils.base64url_encode(signature)).decode()


@pytest.mark.parametrize(
    "make_token",
    [
        lambda: token(SECRET, "HS256", exp=int(time.time()) - 10),  # expired
        forged_hs256,
        alg_none,
        lambda: token(SECRET, "HS256", exp=None),  # no exp
        lambda: token(SECRET, "HS256", sub=None),  # no subject
        lambda: "not.a.jwt",
        lambda: token(RSA_KEY, "RS256")[:-4] + "AAAA",  # tampered signature
    ],
    ids=["expired", "forged", "alg-none", "no-exp", "no-sub", "malformed", "tampered"],
)
async def test_bad_bearer_tokens_are_401(jwt_app: Any, make_token: Any) -> None:
    response = await whoami(jwt_app, {"Authorization": f"Bearer {make_token()}"})
    assert_problem(response, 401, "unauthenticated")
    assert response.headers["www-authenticate"]


async def test_hmac_keyed_with_the_public_key_is_refused(settings: Settings) -> None:
    application = create_app(with_settings(settings, jwt_public_key=public_pem(RSA_KEY)))
    async with application.router.lifespan_context(application):
        response = await whoami(application,
                                {"Authorization": f"Bearer {hs256_signed_with_the_public_key()}"})
    assert_problem(response, 401, "unauthenticated")


async def test_audience_is_checked_when_configured(settings: Settings) -> None:
    application = create_app(with_settings(settings, jwt_secret=SECRET, jwt_audience="relay"))
    async with application.router.lifespan_context(application):
        right = await whoami(application, {
            "Authorization": f"Bearer {token(SECRET, 'HS256', aud='relay')}"})
        wrong = await whoami(application, {
            "Authorization": f"Bearer {token(SECRET, 'HS256', aud='elsewhere')}"})
        missing = await whoami(application, {"Authorization": f"Bearer {token(SECRET, 'HS256')}"})
    assert right.status_code == 200
    assert_problem(wrong, 401, "unauthenticated")
    assert_problem(missing, 401, "unauthenticated")


async def test_bearer_token_without_configured_key_is_401(app: Any) -> None:
    response = await whoami(app, {"Authorization": f"Bearer {token(SECRET, 'HS256')}"})
    assert_problem(response, 401, "unauthenticated")


async def test_token_subject_is_the_principal(jwt_app: Any) -> None:
    async with client_for(jwt_app, None) as client:
        headers = {"Authorization": f"Bearer {token(SECRET, 'HS256', sub='dave')}"}
        uploaded = await client.post("/modules", content=b"(module)", headers=headers)
        assert uploaded.status_code in (200, 201)
        other = {"Authorization": f"Bearer {token(SECRET, 'HS256', sub='erin')}"}
        # Only the owner (dave) may delete it: erin is someone else.
        cid = uploaded.json()["cid"]
        assert (await client.delete(f"/modules/{cid}", headers=other)).status_code == 403
        assert (await client.delete(f"/modules/{cid}", headers=headers)).status_code == 204


@pytest.mark.parametrize("subject", ["has space", "team:alice", "x" * 129])
async def test_a_subject_that_is_no_principal_name_is_401(jwt_app: Any, subject: str) -> None:
    async with client_for(jwt_app, None) as client:
        headers = {"Authorization": f"Bearer {token(SECRET, 'HS256', sub=subject)}"}
        refused = await client.get("/modules", headers=headers)
    assert refused.status_code == 401
    assert "principal name" in refused.json()["detail"]


async def test_stored_key_works_until_revoked(settings: Settings) -> None:
    assert settings.redis_url is not None
    client = connection.connect(settings.redis_url)
    stored = StoredKeys(client, Keys(settings.prefix))
    new = await stored.create("frank")
    application = create_app(with_settings(settings, stored_key_cache_ms=0))
    async with application.router.lifespan_context(application):
        assert (await whoami(application, {"X-API-Key": new.key})).status_code == 200
        assert await stored.revoke(new.id) is not None
        assert_problem(await whoami(application, {"X-API-Key": new.key}), 401,
                       "unauthenticated")
    raw = await client.hgetall(Keys(settings.prefix).api_keys)
    assert new.key.encode() not in b"".join([*raw.keys(), *raw.values()])
    await client.aclose()


async def test_a_credential_says_what_ends_it(settings: Settings) -> None:
    """What an event stream needs to end with its credential: a stored key's digest (it may be
    revoked), a JWT's `exp`; a configured key has neither."""
    assert settings.redis_url is not None
    client = connection.connect(settings.redis_url)
    stored = StoredKeys(client, Keys(settings.prefix))
    new = await stored.create("frank")
    authenticate = Authenticator(with_settings(settings, jwt_secret=SECRET), stored)
    exp = int(time.time()) + 60

    async def credential(headers: dict[str, str]) -> Credential:
        scope = {"type": "http", "headers": [(k.lower().encode(), v.encode())
                                             for k, v in headers.items()]}
        return await authenticate.credential(HTTPConnection(scope))

    assert await credential({"X-API-Key": "alice-secret-key"}) == Credential("alice")
    frank = await credential({"X-API-Key": new.key})
    assert frank.principal == "frank" and frank.stored_key == hashlib.sha256(
        new.key.encode()).digest() and frank.expires_at == math.inf
    bearer = await credential({"Authorization": f"Bearer {token(SECRET, 'HS256', exp=exp)}"})
    assert bearer == Credential("carol", expires_at=exp)
    assert all(c.controls for c in (frank, bearer))
    assert await stored.kept([frank.stored_key or b"", b"\0" * 32]) == {frank.stored_key}
    await client.aclose()


def test_keys_cli_creates_lists_and_revokes(settings: Settings) -> None:
    env = process_env(settings)

    def relay(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "relay", "keys", *args], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=60, check=True)
        return done.stdout

    created = relay("create", "grace")
    key = created.splitlines()[0]
    assert key.startswith("relay_")
    listing = relay("list")
    assert "grace" in listing and key not in listing
    key_id = listing.split()[0]
    assert f"revoked key {key_id}" in relay("revoke", key_id)
    assert "grace" not in relay("list")

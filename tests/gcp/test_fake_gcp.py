#!/usr/bin/env python3
"""Self-test of fake_gcp.py: starts it as a subprocess and drives every
behaviour over HTTP with urllib, signing JWTs with `cryptography`.

Run: python3 tests/gcp/test_fake_gcp.py
"""

import base64
import http.client
import importlib.util
import itertools
import json
import os
import subprocess
import sys
import time
import unittest
import urllib.error
import urllib.parse
import urllib.request

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa

FAKE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fake_gcp.py")
PROJECT = "demo-project"
ADMIN_TOKEN = "test-admin-token"
SCOPE = "https://www.googleapis.com/auth/cloud-platform"


def b64url(data):
    return base64.urlsafe_b64encode(data).decode().rstrip("=")


class FakeServer:
    """One fake_gcp process and a small urllib client for it."""

    def __init__(self, *extra_args):
        self.proc = subprocess.Popen(
            [sys.executable, FAKE, "--port", "0", "--project", PROJECT, "--admin-token", ADMIN_TOKEN,
             *extra_args], stdout=subprocess.PIPE, text=True)
        line = self.proc.stdout.readline()
        if not line.startswith("listening http://127.0.0.1:"):
            self.proc.kill()
            raise RuntimeError(f"fake_gcp did not start: {line!r}")
        self.url = line.split()[1]

    def stop(self):
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.proc.stdout.close()

    def request(self, method, path, body=None, *, token=ADMIN_TOKEN, raw=None,
                content_type="application/json"):
        """Returns (status, parsed JSON body, headers) without raising on HTTP errors."""
        data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", content_type)
        if token is not None:
            req.add_header("Authorization", f"Bearer {token}")
        try:
            with urllib.request.urlopen(req, timeout=30) as resp:
                return resp.status, json.loads(resp.read()), resp.headers
        except urllib.error.HTTPError as e:
            payload = e.read()
            e.close()
            return e.code, json.loads(payload), e.headers

    # IAM / CRM / fake helpers --------------------------------------------

    def iam(self, method, path, body=None, **kw):
        return self.request(method, f"/iam/v1/{path}", body, **kw)

    def crm(self, verb, body=None, **kw):
        return self.request("POST", f"/crm/v1/projects/{PROJECT}:{verb}", body, **kw)

    def fake(self, method, what, body=None):
        status, payload, _ = self.request(method, f"/_fake/{what}", body, token=None)
        assert status == 200, (status, payload)
        return payload

    def create_account(self, account_id, **fields):
        status, sa, _ = self.iam("POST", f"projects/{PROJECT}/serviceAccounts",
                                 {"accountId": account_id, "serviceAccount": fields})
        assert status == 200, (status, sa)
        return sa

    def create_key(self, email, body=None):
        status, key, _ = self.iam("POST", f"projects/{PROJECT}/serviceAccounts/{email}/keys",
                                  body if body is not None else {
                                      "privateKeyType": "TYPE_GOOGLE_CREDENTIALS_FILE",
                                      "keyAlgorithm": "KEY_ALG_RSA_2048"})
        assert status == 200, (status, key)
        return key

    def exchange(self, assertion, grant_type="urn:ietf:params:oauth:grant-type:jwt-bearer"):
        form = urllib.parse.urlencode({"grant_type": grant_type, "assertion": assertion}).encode()
        status, payload, _ = self.request("POST", "/token", raw=form, token=None,
                                          content_type="application/x-www-form-urlencoded")
        return status, payload


def key_file_of(key):
    return json.loads(base64.b64decode(key["privateKeyData"]))


def signed_jwt(key_file, private_key=None, header=None, **claims):
    """A JWT-bearer assertion as Google's client libraries build it."""
    now = int(time.time())
    body = {"iss": key_file["client_email"], "scope": SCOPE, "aud": key_file["token_uri"],
            "iat": now, "exp": now + 3600}
    body.update(claims)
    body = {k: v for k, v in body.items() if v is not None}
    head = header or {"alg": "RS256", "typ": "JWT", "kid": key_file["private_key_id"]}
    signing_input = f"{b64url(json.dumps(head).encode())}.{b64url(json.dumps(body).encode())}"
    signer = private_key or serialization.load_pem_private_key(key_file["private_key"].encode(), None)
    signature = signer.sign(signing_input.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input}.{b64url(signature)}"


class FakeTestCase(unittest.TestCase):
    """Starts one fake per test class; by default the class must leave no
    contract violation behind."""

    server_args = ()
    expect_no_violations = True

    @classmethod
    def setUpClass(cls):
        cls.gcp = FakeServer(*cls.server_args)

    @classmethod
    def tearDownClass(cls):
        try:
            if cls.expect_no_violations:
                violations = cls.gcp.fake("GET", "violations")
                assert violations == [], violations
        finally:
            cls.gcp.stop()

    def assertError(self, response, code, status, message=None):
        got_code, payload, _ = response
        self.assertEqual(got_code, code, payload)
        self.assertEqual(set(payload), {"error"}, payload)
        self.assertEqual(payload["error"]["code"], code)
        self.assertEqual(payload["error"]["status"], status)
        if message is not None:
            self.assertIn(message, payload["error"]["message"])
        return payload["error"]


class ServiceAccountTests(FakeTestCase):
    def test_create_and_get(self):
        sa = self.gcp.create_account("sa-create", displayName="Create", description="d")
        email = f"sa-create@{PROJECT}.iam.gserviceaccount.com"
        self.assertEqual(sa["email"], email)
        self.assertEqual(sa["name"], f"projects/{PROJECT}/serviceAccounts/{email}")
        self.assertEqual(sa["projectId"], PROJECT)
        self.assertRegex(sa["uniqueId"], r"^\d{21}$")
        self.assertEqual(sa["oauth2ClientId"], sa["uniqueId"])
        self.assertEqual((sa["displayName"], sa["description"]), ("Create", "d"))
        self.assertIn("etag", sa)
        self.assertNotIn("disabled", sa)  # Google omits false booleans
        for ident in (email, sa["uniqueId"]):
            for project in (PROJECT, "-"):
                status, got, _ = self.gcp.iam("GET", f"projects/{project}/serviceAccounts/{ident}")
                self.assertEqual((status, got), (200, sa))

    def test_bad_account_ids(self):
        for bad in ("short", "x" * 31, "Upper-case1", "trailing-", "1starts-digit", "under_score"):
            self.assertError(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts", {"accountId": bad}),
                             400, "INVALID_ARGUMENT", "accountId")

    def test_duplicate_and_unknown_project(self):
        self.gcp.create_account("sa-duplicate")
        self.assertError(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts", {"accountId": "sa-duplicate"}),
                         409, "ALREADY_EXISTS", "already exists")
        self.assertError(self.gcp.iam("POST", "projects/other-project/serviceAccounts", {"accountId": "sa-other"}),
                         403, "PERMISSION_DENIED")
        self.assertError(self.gcp.iam("GET", f"projects/{PROJECT}/serviceAccounts/nobody@{PROJECT}.iam.gserviceaccount.com"),
                         404, "NOT_FOUND", "Unknown service account")

    def test_patch(self):
        sa = self.gcp.create_account("sa-patch", displayName="Old", description="keep")
        status, got, _ = self.gcp.iam("PATCH", f"projects/-/serviceAccounts/{sa['uniqueId']}",
                                      {"serviceAccount": {"displayName": "New", "description": "ignored"},
                                       "updateMask": "displayName"})
        self.assertEqual(status, 200, got)
        self.assertEqual((got["displayName"], got["description"]), ("New", "keep"))
        self.assertError(self.gcp.iam("PATCH", f"projects/-/serviceAccounts/{sa['uniqueId']}",
                                      {"serviceAccount": {"displayName": "X"}}), 400, "INVALID_ARGUMENT")
        self.assertError(self.gcp.iam("PATCH", f"projects/-/serviceAccounts/{sa['uniqueId']}",
                                      {"serviceAccount": {"email": "x@y"}, "updateMask": "email"}),
                         400, "INVALID_ARGUMENT")

    def test_list_pagination(self):
        made = {self.gcp.create_account(f"sa-page-{i}")["email"] for i in range(5)}
        seen, token, pages = [], None, 0
        while True:
            path = f"projects/{PROJECT}/serviceAccounts?pageSize=2" + (f"&pageToken={token}" if token else "")
            status, page, _ = self.gcp.iam("GET", path)
            self.assertEqual(status, 200, page)
            self.assertLessEqual(len(page.get("accounts", [])), 2)
            seen += [a["email"] for a in page.get("accounts", [])]
            pages += 1
            token = page.get("nextPageToken")
            if not token:
                break
        self.assertEqual(len(seen), len(set(seen)))
        self.assertTrue(made <= set(seen))
        self.assertGreaterEqual(pages, 3)
        self.assertError(self.gcp.iam("GET", f"projects/{PROJECT}/serviceAccounts?pageToken=!!"),
                         400, "INVALID_ARGUMENT")

    def test_disable_enable(self):
        sa = self.gcp.create_account("sa-disable")
        path = f"projects/{PROJECT}/serviceAccounts/{sa['email']}"
        self.assertEqual(self.gcp.iam("POST", f"{path}:disable", {})[:2], (200, {}))
        self.assertIs(self.gcp.iam("GET", path)[1]["disabled"], True)
        self.assertEqual(self.gcp.iam("POST", f"{path}:enable")[:2], (200, {}))  # empty body allowed
        self.assertNotIn("disabled", self.gcp.iam("GET", path)[1])

    def test_delete_undelete_recreate(self):
        sa = self.gcp.create_account("sa-undelete", displayName="Orig")
        path = f"projects/{PROJECT}/serviceAccounts/{sa['email']}"
        self.assertEqual(self.gcp.iam("DELETE", path)[:2], (200, {}))
        self.assertError(self.gcp.iam("GET", path), 404, "NOT_FOUND")
        self.assertNotIn(sa["email"], [a["email"] for a in self.gcp.iam(
            "GET", f"projects/{PROJECT}/serviceAccounts?pageSize=100")[1].get("accounts", [])])
        # Undelete works by unique ID only.
        self.assertError(self.gcp.iam("POST", f"{path}:undelete"), 400, "INVALID_ARGUMENT")
        status, restored, _ = self.gcp.iam("POST", f"projects/-/serviceAccounts/{sa['uniqueId']}:undelete", {})
        self.assertEqual(status, 200, restored)
        self.assertEqual(restored, {"restoredAccount": sa})
        self.assertEqual(self.gcp.iam("GET", path)[1], sa)
        self.assertError(self.gcp.iam("POST", f"projects/-/serviceAccounts/{sa['uniqueId']}:undelete"),
                         400, "FAILED_PRECONDITION")
        # A recreated accountId gets a new unique ID; the old account can then not come back.
        self.gcp.iam("DELETE", path)
        again = self.gcp.create_account("sa-undelete")
        self.assertEqual(again["email"], sa["email"])
        self.assertNotEqual(again["uniqueId"], sa["uniqueId"])
        self.assertError(self.gcp.iam("POST", f"projects/-/serviceAccounts/{sa['uniqueId']}:undelete"),
                         409, "ALREADY_EXISTS")

    def test_undelete_window(self):
        sa = self.gcp.create_account("sa-expired")
        self.gcp.iam("DELETE", f"projects/{PROJECT}/serviceAccounts/{sa['email']}")
        self.gcp.fake("POST", "config", {"deleted_retention_seconds": 0})
        try:
            time.sleep(0.05)
            self.assertError(self.gcp.iam("POST", f"projects/-/serviceAccounts/{sa['uniqueId']}:undelete"),
                             404, "NOT_FOUND")
        finally:
            self.gcp.fake("POST", "config", {"deleted_retention_seconds": 30 * 24 * 3600})

    def test_eventual_consistency(self):
        self.gcp.fake("POST", "config", {"consistency_delay": 1.0})
        try:
            sa = self.gcp.create_account("sa-lagging")
        finally:
            self.gcp.fake("POST", "config", {"consistency_delay": 0})
        path = f"projects/{PROJECT}/serviceAccounts/{sa['email']}"
        self.assertError(self.gcp.iam("GET", path), 404, "NOT_FOUND")
        self.assertError(self.gcp.iam("POST", f"{path}/keys", {}), 404, "NOT_FOUND")
        listed = self.gcp.iam("GET", f"projects/{PROJECT}/serviceAccounts?pageSize=100")[1]
        self.assertNotIn(sa["email"], [a["email"] for a in listed.get("accounts", [])])
        # Invisible, but it exists: creating it again conflicts.
        self.assertError(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts", {"accountId": "sa-lagging"}),
                         409, "ALREADY_EXISTS")
        time.sleep(1.1)
        self.assertEqual(self.gcp.iam("GET", path)[:2], (200, sa))

    def test_consistency_delay_flag(self):
        gcp = FakeServer("--consistency-delay", "30")
        try:
            self.assertEqual(gcp.fake("GET", "config")["consistency_delay"], 30)
            sa = gcp.create_account("sa-flagged")
            self.assertError(gcp.iam("GET", f"projects/-/serviceAccounts/{sa['uniqueId']}"), 404, "NOT_FOUND")
            self.assertEqual([a["visible"] for a in gcp.fake("GET", "service-accounts")], [False])
        finally:
            gcp.stop()

    def test_authentication(self):
        path = f"projects/{PROJECT}/serviceAccounts"
        status, payload, headers = self.gcp.iam("GET", path, token=None)
        self.assertError((status, payload, headers), 401, "UNAUTHENTICATED", "missing required authentication")
        self.assertIn("Bearer", headers["WWW-Authenticate"])
        self.assertError(self.gcp.iam("GET", path, token="wrong"), 401, "UNAUTHENTICATED", "invalid authentication")

    def test_quota_exhaustion(self):
        path = f"projects/{PROJECT}/serviceAccounts"
        self.gcp.fake("POST", "config", {"quota_exhausted_next": 2})
        for _ in range(2):
            status, payload, headers = self.gcp.iam("GET", path)
            self.assertError((status, payload, headers), 429, "RESOURCE_EXHAUSTED", "Quota exceeded")
            self.assertIsNone(headers.get("Retry-After"))
        self.assertEqual(self.gcp.iam("GET", path)[0], 200)
        self.assertEqual(self.gcp.fake("GET", "config")["quota_exhausted_next"], 0)

    def test_chunked_body_and_keep_alive(self):
        conn = http.client.HTTPConnection("127.0.0.1", urllib.parse.urlsplit(self.gcp.url).port, timeout=30)
        try:
            auth = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
            conn.request("POST", f"/iam/v1/projects/{PROJECT}/serviceAccounts",
                         body=iter([b'{"accountId":', b' "sa-chunked"}']), encode_chunked=True,
                         headers={**auth, "Content-Type": "application/json"})
            response = conn.getresponse()
            created = json.loads(response.read())
            self.assertEqual(response.status, 200, created)
            email = created["email"]
            conn.request("GET", f"/iam/v1/projects/{PROJECT}/serviceAccounts/{email}", headers=auth)
            response = conn.getresponse()  # same connection: HTTP/1.1 keep-alive
            self.assertEqual((response.status, json.loads(response.read())["email"]), (200, email))
        finally:
            conn.close()

    def test_config_rejects_unknown_keys(self):
        status, payload, _ = self.gcp.request("POST", "/_fake/config", {"no_such_knob": 1}, token=None)
        self.assertEqual(status, 400, payload)
        status, payload, _ = self.gcp.request("POST", "/_fake/config", {"quota_exhausted_next": True}, token=None)
        self.assertEqual(status, 400, payload)


class KeyTests(FakeTestCase):
    def test_create_key_and_key_file(self):
        sa = self.gcp.create_account("sa-keyfile")
        key = self.gcp.create_key(sa["email"])
        key_id = key["name"].rsplit("/", 1)[1]
        self.assertRegex(key_id, r"^[0-9a-f]{40}$")
        self.assertEqual(key["name"], f"{sa['name']}/keys/{key_id}")
        self.assertEqual(key["privateKeyType"], "TYPE_GOOGLE_CREDENTIALS_FILE")
        self.assertEqual(key["keyAlgorithm"], "KEY_ALG_RSA_2048")
        self.assertEqual((key["keyOrigin"], key["keyType"]), ("GOOGLE_PROVIDED", "USER_MANAGED"))
        self.assertEqual(key["validBeforeTime"], "9999-12-31T23:59:59Z")
        self.assertRegex(key["validAfterTime"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        self.assertNotIn("disabled", key)
        kf = key_file_of(key)
        self.assertEqual(set(kf), {"type", "project_id", "private_key_id", "private_key", "client_email",
                                   "client_id", "auth_uri", "token_uri", "auth_provider_x509_cert_url",
                                   "client_x509_cert_url", "universe_domain"})
        self.assertEqual((kf["type"], kf["project_id"], kf["private_key_id"]), ("service_account", PROJECT, key_id))
        self.assertEqual((kf["client_email"], kf["client_id"]), (sa["email"], sa["uniqueId"]))
        self.assertEqual(kf["token_uri"], f"{self.gcp.url}/token")
        self.assertEqual(kf["universe_domain"], "googleapis.com")
        self.assertTrue(kf["private_key"].startswith("-----BEGIN PRIVATE KEY-----\n"))
        private = serialization.load_pem_private_key(kf["private_key"].encode(), None)
        self.assertEqual(private.key_size, 2048)
        # The private key is only returned at creation.
        status, got, _ = self.gcp.iam("GET", key["name"])
        self.assertEqual(status, 200, got)
        self.assertNotIn("privateKeyData", got)
        # Defaults: an empty body also makes a JSON key file.
        self.assertEqual(self.gcp.create_key(sa["email"], {})["privateKeyType"], "TYPE_GOOGLE_CREDENTIALS_FILE")

    def test_public_key_data(self):
        sa = self.gcp.create_account("sa-pubkey")
        key = self.gcp.create_key(sa["email"])
        private = serialization.load_pem_private_key(key_file_of(key)["private_key"].encode(), None)
        status, got, _ = self.gcp.iam("GET", f"{key['name']}?publicKeyType=TYPE_X509_PEM_FILE")
        self.assertEqual(status, 200, got)
        cert = x509.load_pem_x509_certificate(base64.b64decode(got["publicKeyData"]))
        self.assertEqual(cert.public_key().public_numbers(), private.public_key().public_numbers())

    def test_list_and_filter(self):
        sa = self.gcp.create_account("sa-listkeys")
        base = f"projects/{PROJECT}/serviceAccounts/{sa['email']}/keys"
        self.assertEqual(self.gcp.iam("GET", f"{base}?keyTypes=USER_MANAGED")[:2], (200, {}))
        key = self.gcp.create_key(sa["email"])
        every = self.gcp.iam("GET", base)[1]["keys"]
        self.assertEqual(sorted(k["keyType"] for k in every), ["SYSTEM_MANAGED", "USER_MANAGED"])
        user = self.gcp.iam("GET", f"{base}?keyTypes=USER_MANAGED")[1]["keys"]
        self.assertEqual([k["name"] for k in user], [key["name"]])
        self.assertTrue(all("privateKeyData" not in k for k in every))
        system = self.gcp.iam("GET", f"{base}?keyTypes=SYSTEM_MANAGED")[1]["keys"]
        self.assertEqual(len(system), 1)
        both = self.gcp.iam("GET", f"{base}?keyTypes=USER_MANAGED&keyTypes=SYSTEM_MANAGED")[1]["keys"]
        self.assertEqual(len(both), 2)
        self.assertError(self.gcp.iam("DELETE", system[0]["name"]), 400, "FAILED_PRECONDITION")

    def test_ten_key_limit(self):
        sa = self.gcp.create_account("sa-tenkeys")
        keys = [self.gcp.create_key(sa["email"]) for _ in range(10)]
        self.gcp.iam("POST", f"{keys[0]['name']}:disable")  # disabled keys still count
        error = self.assertError(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts/{sa['email']}/keys", {}),
                                 400, "FAILED_PRECONDITION")
        self.assertEqual(error["message"], "Precondition check failed.")
        self.assertEqual(self.gcp.iam("DELETE", keys[0]["name"])[:2], (200, {}))
        self.gcp.create_key(sa["email"])

    def test_org_policy_blocks_key_creation(self):
        sa = self.gcp.create_account("sa-orgpolicy")
        self.gcp.fake("POST", "config", {"disable_key_creation": True})
        try:
            error = self.assertError(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts/{sa['email']}/keys",
                                                  {}), 400, "FAILED_PRECONDITION", "Precondition check failed.")
        finally:
            self.gcp.fake("POST", "config", {"disable_key_creation": False})
        self.assertEqual(error["details"], [{
            "@type": "type.googleapis.com/google.rpc.PreconditionFailure",
            "violations": [{"type": "constraints/iam.disableServiceAccountKeyCreation",
                            "subject": f"projects/{PROJECT}",
                            "description": "Key creation is not allowed on this service account."}]}])

    def test_token_exchange_and_last_use(self):
        sa = self.gcp.create_account("sa-token")
        key = self.gcp.create_key(sa["email"])
        kf = key_file_of(key)
        self.assertIsNone(self.fake_key(key)["lastUsed"])
        for _ in range(2):
            status, token = self.gcp.exchange(signed_jwt(kf))
            self.assertEqual(status, 200, token)
            self.assertEqual(set(token), {"access_token", "expires_in", "token_type"})
            self.assertTrue(token["access_token"].startswith("ya29.fake-"))
            self.assertEqual((token["expires_in"], token["token_type"]), (3599, "Bearer"))
        record = self.fake_key(key)
        self.assertEqual(record["exchangeCount"], 2)
        self.assertRegex(record["lastUsed"], r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
        account = next(a for a in self.gcp.fake("GET", "service-accounts") if a["email"] == sa["email"])
        self.assertEqual(account["lastUsed"], record["lastUsed"])

    def test_token_rejections(self):
        sa = self.gcp.create_account("sa-badjwt")
        kf = key_file_of(self.gcp.create_key(sa["email"]))
        stranger = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        now = int(time.time())
        cases = [
            (signed_jwt(kf, private_key=stranger), "invalid_grant", "Invalid JWT Signature."),
            (signed_jwt(kf, header={"alg": "RS256", "typ": "JWT", "kid": "0" * 40}),
             "invalid_grant", "Invalid JWT Signature."),
            (signed_jwt(kf, header={"alg": "RS384", "kid": kf["private_key_id"]}),
             "invalid_grant", "Invalid JWT Signature."),
            (signed_jwt(kf, aud="https://oauth2.googleapis.com/token"), "invalid_grant", "Failed audience check"),
            (signed_jwt(kf, iat=now - 7200, exp=now - 3600), "invalid_grant", "short-lived token"),
            (signed_jwt(kf, exp=now + 7200), "invalid_grant", "short-lived token"),
            (signed_jwt(kf, scope=None), "invalid_scope", "Invalid OAuth scope"),
            (signed_jwt(kf, iss=f"nobody@{PROJECT}.iam.gserviceaccount.com"),
             "invalid_grant", "Invalid grant: account not found"),
            ("not-a-jwt", "invalid_grant", "Invalid JWT"),
        ]
        for assertion, error, description in cases:
            status, payload = self.gcp.exchange(assertion)
            self.assertEqual(status, 400, payload)
            self.assertEqual(payload["error"], error, payload)
            self.assertIn(description, payload["error_description"])
        status, payload = self.gcp.exchange(signed_jwt(kf), grant_type="client_credentials")
        self.assertEqual((status, payload["error"]), (400, "unsupported_grant_type"))

    def test_disabled_and_deleted_keys_cannot_get_tokens(self):
        sa = self.gcp.create_account("sa-keystate")
        key = self.gcp.create_key(sa["email"])
        kf = key_file_of(key)
        self.assertEqual(self.gcp.iam("POST", f"{key['name']}:disable", {})[:2], (200, {}))
        got = self.gcp.iam("GET", key["name"])[1]
        self.assertIs(got["disabled"], True)
        self.assertEqual(self.gcp.exchange(signed_jwt(kf)),
                         (400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}))
        self.gcp.iam("POST", f"{key['name']}:enable", {})
        self.assertEqual(self.gcp.exchange(signed_jwt(kf))[0], 200)
        self.assertEqual(self.gcp.iam("DELETE", key["name"])[:2], (200, {}))
        self.assertError(self.gcp.iam("GET", key["name"]), 404, "NOT_FOUND")
        self.assertEqual(self.gcp.exchange(signed_jwt(kf)),
                         (400, {"error": "invalid_grant", "error_description": "Invalid JWT Signature."}))
        self.assertIs(self.fake_key(key)["deleted"], True)

    def test_disabled_and_deleted_accounts_cannot_get_tokens(self):
        sa = self.gcp.create_account("sa-acctstate")
        kf = key_file_of(self.gcp.create_key(sa["email"]))
        path = f"projects/{PROJECT}/serviceAccounts/{sa['email']}"
        not_found = (400, {"error": "invalid_grant", "error_description": "Invalid grant: account not found"})
        self.gcp.iam("POST", f"{path}:disable")
        self.assertEqual(self.gcp.exchange(signed_jwt(kf)), not_found)
        self.gcp.iam("POST", f"{path}:enable")
        self.assertEqual(self.gcp.exchange(signed_jwt(kf))[0], 200)
        self.gcp.iam("DELETE", path)
        self.assertEqual(self.gcp.exchange(signed_jwt(kf)), not_found)
        # Undelete brings the account back with its keys.
        self.gcp.iam("POST", f"projects/-/serviceAccounts/{sa['uniqueId']}:undelete")
        self.assertEqual(self.gcp.exchange(signed_jwt(kf))[0], 200)

    def fake_key(self, key):
        return next(k for k in self.gcp.fake("GET", "keys") if k["name"] == key["name"])


class AdminKeyFileTests(FakeTestCase):
    """--admin-key-file: a keysmith-admin service account holding the three
    admin roles, whose key file is exchanged for access tokens that the IAM
    and Resource Manager APIs accept; an integration's token is refused."""

    @classmethod
    def setUpClass(cls):
        import tempfile
        cls.dir = tempfile.TemporaryDirectory()
        cls.key_path = os.path.join(cls.dir.name, "admin.json")
        cls.server_args = ("--admin-key-file", cls.key_path)
        super().setUpClass()

    @classmethod
    def tearDownClass(cls):
        try:
            super().tearDownClass()
        finally:
            cls.dir.cleanup()

    def admin_token(self):
        with open(self.key_path) as f:
            key_file = json.load(f)
        status, token = self.gcp.exchange(signed_jwt(key_file))
        self.assertEqual(status, 200, token)
        return key_file, token["access_token"]

    def test_the_key_file_is_private_and_names_the_admin(self):
        self.assertEqual(os.stat(self.key_path).st_mode & 0o777, 0o600)
        key_file, _ = self.admin_token()
        self.assertEqual(key_file["client_email"], f"keysmith-admin@{PROJECT}.iam.gserviceaccount.com")
        self.assertEqual(key_file["token_uri"], self.gcp.url + "/token")
        status, policy, _ = self.gcp.crm("getIamPolicy", {"options": {"requestedPolicyVersion": 3}})
        self.assertEqual(status, 200, policy)
        held = {b["role"] for b in policy["bindings"]
                if f"serviceAccount:{key_file['client_email']}" in b["members"]}
        self.assertEqual(held, {"roles/iam.serviceAccountAdmin", "roles/iam.serviceAccountKeyAdmin",
                                "roles/resourcemanager.projectIamAdmin"})

    def test_the_admins_access_token_is_accepted(self):
        _, token = self.admin_token()
        status, sa, _ = self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts",
                                     {"accountId": "by-admin-token"}, token=token)
        self.assertEqual(status, 200, sa)
        status, key, _ = self.gcp.iam("POST", f"{sa['name']}/keys", {}, token=token)
        self.assertEqual(status, 200, key)
        status, policy, _ = self.gcp.crm("getIamPolicy", {"options": {"requestedPolicyVersion": 3}}, token=token)
        self.assertEqual(status, 200, policy)

    def test_an_integrations_token_is_denied_and_a_made_up_one_unauthenticated(self):
        sa = self.gcp.create_account("sa-integration")
        status, token = self.gcp.exchange(signed_jwt(key_file_of(self.gcp.create_key(sa["email"]))))
        self.assertEqual(status, 200, token)
        error = self.assertError(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts",
                                              {"accountId": "by-integration"}, token=token["access_token"]),
                                 403, "PERMISSION_DENIED", "iam.serviceAccounts.create")
        self.assertIn("denied on resource", error["message"])
        self.assertError(self.gcp.crm("getIamPolicy", {}, token=token["access_token"]),
                         403, "PERMISSION_DENIED", "resourcemanager.projects.getIamPolicy")
        self.assertError(self.gcp.iam("GET", f"projects/{PROJECT}/serviceAccounts", token="ya29.fake-made-up"),
                         401, "UNAUTHENTICATED")


class PolicyTests(FakeTestCase):
    def get_policy(self, version=3):
        status, policy, _ = self.gcp.crm("getIamPolicy", {"options": {"requestedPolicyVersion": version}})
        self.assertEqual(status, 200, policy)
        return policy

    def set_policy(self, policy, **extra):
        return self.gcp.crm("setIamPolicy", {"policy": policy, **extra})

    def test_seeded_policy_version_3(self):
        policy = self.get_policy()
        self.assertEqual(policy["version"], 3)
        base64.b64decode(policy["etag"], validate=True)
        roles = {b["role"]: b for b in policy["bindings"]}
        self.assertEqual(roles["roles/owner"]["members"], ["user:admin@example.com"])
        self.assertEqual(roles["roles/viewer"]["condition"]["title"], "until-2030")
        self.assertIn("expression", roles["roles/viewer"]["condition"])
        self.assertEqual(policy["auditConfigs"][0]["service"], "allServices")
        self.assertEqual(self.gcp.fake("GET", "policy"), policy)

    def test_version_1_read_hides_conditions(self):
        policy = self.get_policy(version=1)
        self.assertEqual(policy["version"], 1)
        self.assertTrue(all("condition" not in b for b in policy["bindings"]))
        self.assertTrue(any("_withcond_" in b["role"] for b in policy["bindings"]))
        self.assertEqual(self.gcp.crm("getIamPolicy")[1], policy)  # no body: version 1 too
        # Writing the downgraded policy back is refused.
        self.assertError(self.set_policy(policy), 400, "INVALID_ARGUMENT")
        self.assertError(self.gcp.crm("getIamPolicy", {"options": {"requestedPolicyVersion": 2}}),
                         400, "INVALID_ARGUMENT")

    def test_read_modify_write_preserves_conditions(self):
        sa = self.gcp.create_account("sa-binding")
        policy = self.get_policy()
        policy["bindings"].append({"role": "roles/iam.serviceAccountUser",
                                   "members": [f"serviceAccount:{sa['email']}"]})
        status, written, _ = self.set_policy(policy)
        self.assertEqual(status, 200, written)
        self.assertNotEqual(written["etag"], policy["etag"])
        stored = self.gcp.fake("GET", "policy")
        self.assertEqual(stored, written)
        self.assertIn("condition", next(b for b in stored["bindings"] if b["role"] == "roles/viewer"))
        self.assertIn("auditConfigs", stored)  # default updateMask leaves auditConfigs alone
        # A stale etag is refused.
        self.assertError(self.set_policy(policy), 409, "ABORTED", "There were concurrent policy changes")
        # Conditions at version 1 are refused.
        stale = self.get_policy()
        stale["version"] = 1
        self.assertError(self.set_policy(stale), 400, "INVALID_ARGUMENT")

    def test_concurrent_change(self):
        policy = self.get_policy()
        self.gcp.fake("POST", "config", {"concurrent_change": True})
        self.assertError(self.set_policy(policy), 409, "ABORTED")
        self.assertFalse(self.gcp.fake("GET", "config")["concurrent_change"])  # one-shot
        fresh = self.get_policy()
        self.assertIn("user:concurrent-writer@example.com",
                      next(b for b in fresh["bindings"] if b["role"] == "roles/browser")["members"])
        self.assertEqual(self.set_policy(fresh)[0], 200)

    def test_members_are_checked(self):
        policy = self.get_policy()
        for member in (f"serviceAccount:ghost@{PROJECT}.iam.gserviceaccount.com", "bogus:x", "user:a:b"):
            attempt = json.loads(json.dumps(policy))
            attempt["bindings"].append({"role": "roles/viewer", "members": [member]})
            self.assertError(self.set_policy(attempt), 400, "INVALID_ARGUMENT")
        attempt = json.loads(json.dumps(policy))
        attempt["bindings"].append({"role": "viewer", "members": ["user:x@example.com"]})
        self.assertError(self.set_policy(attempt), 400, "INVALID_ARGUMENT")

    def test_deleted_account_members(self):
        sa = self.gcp.create_account("sa-deleted-member")
        policy = self.get_policy()
        policy["bindings"].append({"role": "roles/logging.logWriter", "members": [f"serviceAccount:{sa['email']}"]})
        self.assertEqual(self.set_policy(policy)[0], 200)
        self.gcp.iam("DELETE", f"projects/{PROJECT}/serviceAccounts/{sa['email']}")
        members = next(b for b in self.get_policy()["bindings"] if b["role"] == "roles/logging.logWriter")["members"]
        self.assertEqual(members, [f"deleted:serviceAccount:{sa['email']}?uid={sa['uniqueId']}"])
        # Writing the deleted member back is fine, as with Google.
        self.assertEqual(self.set_policy(self.get_policy())[0], 200)
        self.gcp.iam("POST", f"projects/-/serviceAccounts/{sa['uniqueId']}:undelete")
        members = next(b for b in self.get_policy()["bindings"] if b["role"] == "roles/logging.logWriter")["members"]
        self.assertEqual(members, [f"serviceAccount:{sa['email']}"])

    def test_missing_etag_overwrites(self):
        """Google accepts a write without etag, even a version 1 one that drops
        every condition (own server: it wipes the seeded conditional binding)."""
        gcp = FakeServer()
        try:
            status, policy, _ = gcp.crm("getIamPolicy", {"options": {"requestedPolicyVersion": 3}})
            unconditional = [b for b in policy["bindings"] if "condition" not in b]
            status, written, _ = gcp.crm("setIamPolicy", {"policy": {"version": 1, "bindings": unconditional}})
            self.assertEqual(status, 200, written)
            self.assertEqual(written["version"], 1)
            self.assertTrue(all("condition" not in b for b in gcp.fake("GET", "policy")["bindings"]))
            self.assertEqual(gcp.fake("GET", "violations"), [])
        finally:
            gcp.stop()

    def test_other_project_denied(self):
        status, payload, _ = self.gcp.request("POST", "/crm/v1/projects/other-project:getIamPolicy", {})
        self.assertError((status, payload, None), 403, "PERMISSION_DENIED")


class ContractTests(FakeTestCase):
    """Requests that break the discovery documents: 400 and recorded."""

    expect_no_violations = False
    # An explicit --discovery-dir (the same documents the default finds).
    server_args = ("--discovery-dir", os.path.join(
        importlib.util.find_spec("googleapiclient").submodule_search_locations[0], "discovery_cache", "documents"))
    account_numbers = itertools.count()

    def setUp(self):
        self.gcp.fake("DELETE", "violations")
        self.sa = self.gcp.create_account(f"sa-contract-{next(self.account_numbers)}")

    def assertViolation(self, response, *fragments):
        error = self.assertError(response, 400, "INVALID_ARGUMENT", "contract violation: ")
        violations = self.gcp.fake("GET", "violations")
        self.assertEqual(len(violations), 1, violations)
        self.assertEqual(error["message"], "contract violation: " + violations[0]["message"])
        for fragment in fragments:
            self.assertIn(fragment, violations[0]["message"])
        return violations[0]

    def test_unknown_body_field(self):
        v = self.assertViolation(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts",
                                              {"accountId": "sa-unknown-field", "serviceAccount": {"name2": "x"}}),
                                 "iam.projects.serviceAccounts.create", "body.serviceAccount", "'name2'")
        self.assertEqual(v["method"], "POST")
        self.assertEqual(v["path"], f"/iam/v1/projects/{PROJECT}/serviceAccounts")

    def test_unknown_top_level_field(self):
        self.assertViolation(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts/{self.sa['email']}/keys",
                                          {"keyType": "USER_MANAGED"}), "'keyType'", "CreateServiceAccountKeyRequest")

    def test_bad_query_param(self):
        self.assertViolation(self.gcp.iam("GET", f"projects/{PROJECT}/serviceAccounts?page_size=5"),
                             "unknown query parameter 'page_size'")

    def test_bad_query_type_and_enum(self):
        self.assertViolation(self.gcp.iam("GET", f"projects/{PROJECT}/serviceAccounts?pageSize=ten"),
                             "pageSize", "expected an integer")
        self.gcp.fake("DELETE", "violations")
        keys = f"projects/{PROJECT}/serviceAccounts/{self.sa['email']}/keys"
        self.assertViolation(self.gcp.iam("GET", f"{keys}?keyTypes=USER"), "keyTypes", "not one of")
        self.gcp.fake("DELETE", "violations")
        self.assertViolation(self.gcp.iam("GET", f"projects/{PROJECT}/serviceAccounts?pageToken=a&pageToken=b"),
                             "not repeated")

    def test_wrong_types(self):
        self.assertViolation(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts",
                                          {"accountId": 123456}), "body.accountId", "expected a string")
        self.gcp.fake("DELETE", "violations")
        self.assertViolation(self.gcp.crm("getIamPolicy", {"options": {"requestedPolicyVersion": "3"}}),
                             "requestedPolicyVersion", "expected an integer")
        self.gcp.fake("DELETE", "violations")
        self.assertViolation(self.gcp.crm("setIamPolicy", {"policy": {"bindings": {"role": "roles/owner"}}}),
                             "body.policy.bindings", "expected an array")
        self.gcp.fake("DELETE", "violations")
        self.assertViolation(self.gcp.crm("setIamPolicy", {"policy": {"etag": "not base64!"}}),
                             "body.policy.etag", "format byte")

    def test_enum_in_body(self):
        self.assertViolation(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts/{self.sa['email']}/keys",
                                          {"privateKeyType": "JSON"}), "privateKeyType", "not one of")

    def test_unknown_method_and_verb(self):
        self.assertViolation(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts/{self.sa['email']}:rotate"),
                             "no iam method matches")
        self.gcp.fake("DELETE", "violations")
        self.assertViolation(self.gcp.iam("PUT", f"projects/{PROJECT}/serviceAccounts"), "PUT is not a method")
        self.gcp.fake("DELETE", "violations")
        # CRM v1 takes the bare project ID, not projects/{id}.
        self.assertViolation(self.gcp.request("POST", f"/crm/v1/projects/projects/{PROJECT}:getIamPolicy", {}),
                             "no cloudresourcemanager method matches")
        self.gcp.fake("DELETE", "violations")
        self.assertViolation(self.gcp.request("GET", f"/v1/projects/{PROJECT}/serviceAccounts"), "none of")

    def test_body_where_none_allowed_and_bad_json(self):
        self.assertViolation(self.gcp.iam("DELETE", f"projects/{PROJECT}/serviceAccounts/{self.sa['email']}", {}),
                             "takes no request body")
        self.gcp.fake("DELETE", "violations")
        self.assertViolation(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts", raw=b"{nope"),
                             "not JSON")
        self.gcp.fake("DELETE", "violations")
        self.assertViolation(self.gcp.iam("POST", f"projects/{PROJECT}/serviceAccounts", raw=b"accountId=x",
                                          content_type="application/x-www-form-urlencoded"), "application/json")

    def test_violation_precedes_authentication(self):
        self.assertViolation(self.gcp.iam("GET", f"projects/{PROJECT}/serviceAccounts?bogus=1", token=None),
                             "bogus")

    def test_token_endpoint_needs_form(self):
        status, payload, _ = self.gcp.request("POST", "/token", {"grant_type": "x"}, token=None)
        self.assertEqual((status, payload["error"]), (400, "invalid_request"))
        self.assertIn("x-www-form-urlencoded", self.gcp.fake("GET", "violations")[0]["message"])

    def test_valid_requests_leave_no_violation(self):
        path = f"projects/-/serviceAccounts/{self.sa['uniqueId']}"
        self.assertEqual(self.gcp.iam("GET", f"{path}?prettyPrint=false&fields=email")[0], 200)
        self.assertEqual(self.gcp.iam("PATCH", path, {"serviceAccount": {"description": "x", "etag": self.sa["etag"]},
                                                      "updateMask": "description"})[0], 200)
        self.assertEqual(self.gcp.crm("getIamPolicy", {"options": {"requestedPolicyVersion": 3}})[0], 200)
        encoded = urllib.parse.quote(self.sa["email"], safe="")  # %40 for '@' is fine too
        self.assertEqual(self.gcp.iam("GET", f"projects/{PROJECT}/serviceAccounts/{encoded}")[0], 200)
        self.assertEqual(self.gcp.fake("GET", "violations"), [])


def main():
    suite = unittest.defaultTestLoader.loadTestsFromModule(sys.modules[__name__])
    result = unittest.TextTestRunner(verbosity=2).run(suite)
    failed = len(result.failures) + len(result.errors) + len(result.unexpectedSuccesses)
    passed = result.testsRun - len(result.failures) - len(result.errors) - len(result.skipped)
    print(f"{passed} passed, {failed} failed")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

#!/usr/bin/env python3
"""Strict contract fake of Google Cloud IAM service accounts, the Resource
Manager project IAM policy and Google's OAuth 2.0 JWT-bearer token endpoint.

Every IAM and Resource Manager request is checked against Google's own
discovery documents (iam.v1.json, cloudresourcemanager.v1.json, as shipped
by the google-api-python-client package): method, path parameter patterns,
query parameters and the JSON request body. A violation answers 400 and is
recorded for GET /_fake/violations. Behind the contract check the fake
implements the documented behaviours a key-rotation client must cope with.
See README.md beside this file.

Only the Python standard library and `cryptography` are used.
"""

import argparse
import base64
import copy
import datetime
import hashlib
import importlib.util
import json
import os
import re
import secrets
import sys
import threading
import time
import traceback
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

IAM_BASE = "/iam/"
CRM_BASE = "/crm/"
TOKEN_PATH = "/token"
FAKE_BASE = "/_fake/"

JWT_BEARER = "urn:ietf:params:oauth:grant-type:jwt-bearer"
ACCOUNT_ID_RE = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])$")
MAX_USER_KEYS = 10
# Google has returned this constant (base64 of "01021920") as every service
# account's deprecated etag for years.
SERVICE_ACCOUNT_ETAG = "MDEwMjE5MjA="
USER_KEY_VALID_BEFORE = "9999-12-31T23:59:59Z"
DEFAULT_RETENTION_SECONDS = 30 * 24 * 3600  # deleted accounts: undeletable for 30 days
TOKEN_CLOCK_SKEW = 60  # seconds of iat/exp slack granted to the client's clock
AUTH_HELP = ("Expected OAuth 2 access token, login cookie or other valid authentication "
             "credential. See https://developers.google.com/identity/sign-in/web/devconsole-project.")
MEMBER_RE = re.compile(
    r"^(allUsers|allAuthenticatedUsers"
    r"|(user|serviceAccount|group|domain|projectOwner|projectEditor|projectViewer):[^\s:?]+"
    r"|deleted:(user|serviceAccount|group):[^\s:?]+\?uid=\d+"
    r"|principal(Set)?://\S+)$")
ROLE_RE = re.compile(r"^(roles/[A-Za-z0-9_.]+|(projects|organizations)/[^/]+/roles/[A-Za-z0-9_.]+)$")
POLICY_MASK_PATHS = {"bindings", "etag", "auditConfigs", "version"}
DEFAULT_POLICY_MASK = "bindings,etag"  # Google's documented default for setIamPolicy


def rfc3339(ts):
    return datetime.datetime.fromtimestamp(ts, datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def b64url_decode(text):
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def new_policy_etag():
    return base64.b64encode(secrets.token_bytes(8)).decode()


class ApiError(Exception):
    """An error answered in Google's JSON shape {"error":{code,message,status,details?}}."""

    def __init__(self, code, status, message, details=None, headers=None):
        super().__init__(message)
        self.code, self.status, self.message = code, status, message
        self.details, self.headers = details, headers or {}

    def body(self):
        error = {"code": self.code, "message": self.message, "status": self.status}
        if self.details:
            error["details"] = self.details
        return {"error": error}


class ContractViolation(Exception):
    """The request does not follow the discovery document."""


class OAuthError(Exception):
    """An error of the token endpoint, answered in OAuth's {"error","error_description"} shape."""

    def __init__(self, error, description):
        super().__init__(description)
        self.error, self.description = error, description


def not_found_account():
    return ApiError(404, "NOT_FOUND", "Unknown service account")


# ---------------------------------------------------------------------------
# Discovery documents: method matching and request validation
# ---------------------------------------------------------------------------

def template_regex(template, capture):
    """Compile a discovery path template. With capture=False (flatPath) each
    {var} is one path segment without ':' (so `x:disable` never matches a
    bare `{var}`); with capture=True (path) {var} and reserved {+var}
    expansions become named groups, {+var} spanning slashes."""
    parts, pos = [], 0
    for m in re.finditer(r"\{(\+?)([A-Za-z0-9_]+)\}", template):
        parts.append(re.escape(template[pos:m.start()]))
        reserved, name = m.groups()
        if not capture:
            parts.append(r"[^/:]+")
        else:
            parts.append(f"(?P<{name}>{'.+?' if reserved else '[^/]+?'})")
        pos = m.end()
    parts.append(re.escape(template[pos:]))
    return re.compile("^" + "".join(parts) + "$")


class Method:
    def __init__(self, spec):
        self.id = spec["id"]
        self.http_method = spec["httpMethod"]
        self.params = spec.get("parameters", {})
        self.request_ref = spec.get("request", {}).get("$ref")
        flat = spec.get("flatPath", spec["path"])
        self.flat_re = template_regex(flat, capture=False)
        self.path_re = template_regex(spec["path"], capture=True)
        self.literal_len = len(re.sub(r"\{[^}]*\}", "", flat))


class DiscoveryApi:
    def __init__(self, path):
        with open(path, encoding="utf-8") as f:
            doc = json.load(f)
        self.name = doc["name"]
        self.revision = doc.get("revision")
        self.schemas = doc["schemas"]
        self.global_params = doc.get("parameters", {})
        self.methods = []
        self._collect(doc.get("resources", {}))

    def _collect(self, resources):
        for resource in resources.values():
            self.methods.extend(Method(m) for m in resource.get("methods", {}).values())
            self._collect(resource.get("resources", {}))

    def match(self, http_method, rel_path):
        """Find the method for a percent-decoded path relative to the API base
        (e.g. "v1/projects/p/serviceAccounts"); returns (method, path params)."""
        candidates = [m for m in self.methods if m.flat_re.match(rel_path)]
        if not candidates:
            raise ContractViolation(f"no {self.name} method matches path {rel_path!r}")
        same_verb = [m for m in candidates if m.http_method == http_method]
        if not same_verb:
            allowed = sorted({f"{m.http_method} ({m.id})" for m in candidates})
            raise ContractViolation(f"{http_method} is not a method of {rel_path!r}; "
                                    f"the discovery document has {', '.join(allowed)}")
        method = max(same_verb, key=lambda m: m.literal_len)
        params = method.path_re.match(rel_path).groupdict()
        for name, value in params.items():
            pattern = method.params[name].get("pattern")
            if pattern and not re.search(pattern, value):
                raise ContractViolation(f"{method.id}: path parameter {name}={value!r} "
                                        f"does not match {pattern}")
        return method, params

    def check_query(self, method, pairs):
        """Validate query parameters; returns {name: [values]}."""
        query = {}
        for name, value in pairs:
            spec = method.params.get(name) or self.global_params.get(name)
            if spec is None or spec.get("location") != "query":
                raise ContractViolation(f"{method.id}: unknown query parameter {name!r}")
            query.setdefault(name, []).append(value)
        for name, values in query.items():
            spec = method.params.get(name) or self.global_params[name]
            if len(values) > 1 and not spec.get("repeated"):
                raise ContractViolation(f"{method.id}: query parameter {name!r} is not repeated "
                                        f"but was given {len(values)} times")
            for value in values:
                problem = query_value_problem(spec, value)
                if problem:
                    raise ContractViolation(f"{method.id}: query parameter {name}={value!r}: {problem}")
        return query

    def check_body(self, method, content_type, raw):
        """Validate the request body against the method's request schema;
        returns the parsed JSON object ({} for an empty body)."""
        if not raw.strip():
            return {}
        if method.request_ref is None:
            raise ContractViolation(f"{method.id} takes no request body")
        if content_type.split(";")[0].strip().lower() != "application/json":
            raise ContractViolation(f"{method.id}: body must be application/json, "
                                    f"got Content-Type {content_type!r}")
        try:
            body = json.loads(raw)
        except ValueError as e:
            raise ContractViolation(f"{method.id}: body is not JSON: {e}") from None
        try:
            self.validate({"$ref": method.request_ref}, body, "body")
        except ContractViolation as v:
            raise ContractViolation(f"{method.id}: {v}") from None
        return body

    def validate(self, schema, value, where):
        if value is None:  # proto3 JSON: null stands for the field's default
            return
        if "$ref" in schema:
            schema = self.schemas[schema["$ref"]]
        kind = schema.get("type")
        label = f"{where} ({schema['id']})" if "id" in schema else where
        if kind == "object":
            if not isinstance(value, dict):
                raise ContractViolation(f"{label}: expected an object, got {json_type(value)}")
            props, extra = schema.get("properties", {}), schema.get("additionalProperties")
            for key, item in value.items():
                if key in props:
                    self.validate(props[key], item, f"{where}.{key}")
                elif extra is not None:
                    self.validate(extra, item, f"{where}.{key}")
                else:
                    raise ContractViolation(f"{label}: unknown field {key!r}; "
                                            f"known fields: {', '.join(sorted(props))}")
        elif kind == "array":
            if not isinstance(value, list):
                raise ContractViolation(f"{label}: expected an array, got {json_type(value)}")
            for i, item in enumerate(value):
                self.validate(schema["items"], item, f"{where}[{i}]")
        elif kind == "string":
            if not isinstance(value, str):
                raise ContractViolation(f"{label}: expected a string"
                                        f"{' (format ' + schema['format'] + ')' if 'format' in schema else ''}"
                                        f", got {json_type(value)}")
            problem = string_problem(schema, value)
            if problem:
                raise ContractViolation(f"{label}: {value!r}: {problem}")
        elif kind == "integer":
            if not isinstance(value, int) or isinstance(value, bool):
                raise ContractViolation(f"{label}: expected an integer, got {json_type(value)}")
            problem = integer_range_problem(schema.get("format"), value)
            if problem:
                raise ContractViolation(f"{label}: {problem}")
        elif kind == "number":
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ContractViolation(f"{label}: expected a number, got {json_type(value)}")
        elif kind == "boolean":
            if not isinstance(value, bool):
                raise ContractViolation(f"{label}: expected a boolean, got {json_type(value)}")
        elif kind != "any":
            raise RuntimeError(f"fake_gcp cannot validate schema type {kind!r} at {where}")


def json_type(value):
    if isinstance(value, bool):
        return "boolean"
    return {dict: "object", list: "array", str: "string", int: "integer", float: "number"}.get(
        type(value), type(value).__name__)


INT_RANGES = {"int32": (-2**31, 2**31 - 1), "uint32": (0, 2**32 - 1),
              "int64": (-2**63, 2**63 - 1), "uint64": (0, 2**64 - 1)}
DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})$")
DURATION_RE = re.compile(r"^-?\d+(\.\d{1,9})?s$")
FIELD_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
BASE64_RE = re.compile(r"^[A-Za-z0-9+/_-]*={0,2}$")


def integer_range_problem(fmt, value):
    low, high = INT_RANGES.get(fmt, (None, None))
    if low is not None and not low <= value <= high:
        return f"{value} is out of range for {fmt}"
    return None


def string_problem(schema, value):
    """Why a JSON string does not fit its discovery schema (enum, format)."""
    enum = schema.get("enum")
    if enum and value not in enum:
        return f"not one of {enum}"
    fmt = schema.get("format")
    if fmt in INT_RANGES:  # 64-bit integers travel as decimal strings in Google's JSON
        if not re.fullmatch(r"-?\d+", value):
            return f"not a decimal {fmt}"
        return integer_range_problem(fmt, int(value))
    if fmt == "byte":
        stripped = value.rstrip("=")
        if not BASE64_RE.match(value) or len(stripped) % 4 == 1:
            return "not base64 (format byte)"
    elif fmt == "google-datetime" and not DATETIME_RE.match(value):
        return "not an RFC 3339 timestamp (format google-datetime)"
    elif fmt == "google-duration" and not DURATION_RE.match(value):
        return "not a duration like '3.5s' (format google-duration)"
    elif fmt == "google-fieldmask":
        bad = [p for p in value.split(",") if p.strip() and not FIELD_PATH_RE.match(p.strip())]
        if bad:
            return f"bad field mask path(s) {bad}"
    return None


def query_value_problem(spec, value):
    kind = spec.get("type")
    if kind == "integer":
        if not re.fullmatch(r"-?\d+", value):
            return "expected an integer"
        return integer_range_problem(spec.get("format"), int(value))
    if kind == "boolean":
        return None if value in ("true", "false") else "expected true or false"
    if kind == "number":
        try:
            float(value)
        except ValueError:
            return "expected a number"
        return None
    return string_problem(spec, value)


# ---------------------------------------------------------------------------
# State
# ---------------------------------------------------------------------------

class ServiceAccount:
    def __init__(self, project, account_id, display_name, description, visible_at):
        self.project = project
        self.account_id = account_id
        # 21 digits, like Google's numeric IDs; never reused, even for a recreated accountId.
        self.unique_id = "1" + "".join(secrets.choice("0123456789") for _ in range(20))
        self.display_name = display_name
        self.description = description
        self.disabled = False
        self.created = time.time()
        self.visible_at = visible_at
        self.deleted_at = None
        self.last_used = None
        self.keys = {}  # key id -> Key, deleted keys removed

    @property
    def email(self):
        return f"{self.account_id}@{self.project}.iam.gserviceaccount.com"

    @property
    def name(self):
        return f"projects/{self.project}/serviceAccounts/{self.email}"

    def to_json(self):
        # Google's JSON omits fields that hold their default (false, ""), so
        # `disabled` only appears when true.
        out = {"name": self.name, "projectId": self.project, "uniqueId": self.unique_id,
               "email": self.email, "etag": SERVICE_ACCOUNT_ETAG, "oauth2ClientId": self.unique_id}
        if self.display_name:
            out["displayName"] = self.display_name
        if self.description:
            out["description"] = self.description
        if self.disabled:
            out["disabled"] = True
        return out


_system_key_lock = threading.Lock()
_system_private_key = None


def system_private_key():
    """System-managed keys never sign anything here; they only need a public
    half for publicKeyType, so they all share one lazily generated key."""
    global _system_private_key
    with _system_key_lock:
        if _system_private_key is None:
            _system_private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        return _system_private_key


class Key:
    def __init__(self, account, key_type, private_key):
        self.key_id = secrets.token_hex(20)
        self.account = account
        self.key_type = key_type
        self._private_key = private_key
        self.created = time.time()
        # System-managed keys rotate about every two weeks; user keys never expire.
        self.valid_before = (rfc3339(self.created + 730 * 24 * 3600) if key_type == "SYSTEM_MANAGED"
                             else USER_KEY_VALID_BEFORE)
        self.disabled = False
        self.deleted = False
        self.exchanges = 0
        self.last_used = None

    @property
    def private_key(self):
        return self._private_key or system_private_key()

    @property
    def name(self):
        return f"{self.account.name}/keys/{self.key_id}"

    def to_json(self):
        out = {"name": self.name, "validAfterTime": rfc3339(self.created),
               "validBeforeTime": self.valid_before, "keyAlgorithm": "KEY_ALG_RSA_2048",
               "keyOrigin": "GOOGLE_PROVIDED", "keyType": self.key_type}
        if self.disabled:
            out["disabled"] = True
            out["disableReason"] = "SERVICE_ACCOUNT_KEY_DISABLE_REASON_USER_INITIATED"
        return out

    def public_key_data(self, public_key_type):
        public = self.private_key.public_key()
        if public_key_type == "TYPE_X509_PEM_FILE":
            subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, self.key_id)])
            valid_before = datetime.datetime.strptime(self.valid_before, "%Y-%m-%dT%H:%M:%SZ")
            cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject)
                    .public_key(public).serial_number(x509.random_serial_number())
                    .not_valid_before(datetime.datetime.fromtimestamp(self.created, datetime.timezone.utc))
                    .not_valid_after(valid_before.replace(tzinfo=datetime.timezone.utc))
                    .sign(self.private_key, hashes.SHA256()))
            data = cert.public_bytes(serialization.Encoding.PEM)
        else:  # TYPE_RAW_PUBLIC_KEY: the PEM SubjectPublicKeyInfo
            data = public.public_bytes(serialization.Encoding.PEM,
                                       serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(data).decode()


CONFIG_TYPES = {
    "consistency_delay": (int, float),        # seconds a new service account stays invisible
    "disable_key_creation": bool,             # org policy iam.disableServiceAccountKeyCreation
    "quota_exhausted_next": int,              # the next N IAM/CRM calls answer 429
    "concurrent_change": bool,                # one-shot: another writer edits the policy first
    "deleted_retention_seconds": (int, float),  # undelete window (Google: 30 days)
}


# The service account --admin-key-file creates, and the roles it holds: the
# least a keysmith connection needs (accounts, their keys, the project policy).
ADMIN_ACCOUNT_ID = "keysmith-admin"
ADMIN_ROLES = ("roles/iam.serviceAccountAdmin", "roles/iam.serviceAccountKeyAdmin",
               "roles/resourcemanager.projectIamAdmin")


def required_role(method_id):
    """The predefined role that grants `method_id`, and the permission named
    in Google's denial (e.g. iam.serviceAccountKeys.create)."""
    verb = method_id.rsplit(".", 1)[1]
    if method_id.startswith("iam.projects.serviceAccounts.keys."):
        return "roles/iam.serviceAccountKeyAdmin", f"iam.serviceAccountKeys.{verb}"
    if method_id.startswith("iam.projects.serviceAccounts."):
        return "roles/iam.serviceAccountAdmin", f"iam.serviceAccounts.{verb}"
    return "roles/resourcemanager.projectIamAdmin", f"resourcemanager.projects.{verb}"


class FakeGcp:
    def __init__(self, project, iam, crm, admin_token, base_url, consistency_delay, admin_key_file=None):
        self.project = project
        self.tokens = {}     # access token -> (account, expiry)
        self.iam, self.crm = iam, crm
        self.admin_token = admin_token
        self.token_uri = base_url + TOKEN_PATH
        self.lock = threading.Lock()
        self.config = {"consistency_delay": consistency_delay, "disable_key_creation": False,
                       "quota_exhausted_next": 0, "concurrent_change": False,
                       "deleted_retention_seconds": DEFAULT_RETENTION_SECONDS}
        self.violations = []
        self.accounts = {}   # unique id -> ServiceAccount, deleted ones included
        self.keys = {}       # key id -> Key, deleted ones included (for /_fake/keys)
        # The seeded project policy: a binding keysmith does not manage, a
        # conditional (version 3) binding and an audit config, so a client that
        # drops any of them, or downgrades the version, is caught.
        self.bindings = [
            {"role": "roles/owner", "members": ["user:admin@example.com"]},
            {"role": "roles/viewer", "members": ["user:auditor@example.com"],
             "condition": {"title": "until-2030", "description": "temporary audit access",
                           "expression": 'request.time < timestamp("2030-01-01T00:00:00Z")'}},
        ]
        self.audit_configs = [{"service": "allServices", "auditLogConfigs": [{"logType": "ADMIN_READ"}]}]
        if admin_key_file:
            self.write_admin_key_file(admin_key_file)
        self.policy_etag = new_policy_etag()
        self.handlers = {
            "iam.projects.serviceAccounts.create": self.create_account,
            "iam.projects.serviceAccounts.get": self.get_account,
            "iam.projects.serviceAccounts.list": self.list_accounts,
            "iam.projects.serviceAccounts.patch": self.patch_account,
            "iam.projects.serviceAccounts.delete": self.delete_account,
            "iam.projects.serviceAccounts.disable": self.disable_account,
            "iam.projects.serviceAccounts.enable": self.enable_account,
            "iam.projects.serviceAccounts.undelete": self.undelete_account,
            "iam.projects.serviceAccounts.keys.create": self.create_key,
            "iam.projects.serviceAccounts.keys.get": self.get_key,
            "iam.projects.serviceAccounts.keys.list": self.list_keys,
            "iam.projects.serviceAccounts.keys.delete": self.delete_key,
            "iam.projects.serviceAccounts.keys.disable": self.disable_key,
            "iam.projects.serviceAccounts.keys.enable": self.enable_key,
            "cloudresourcemanager.projects.getIamPolicy": self.get_iam_policy,
            "cloudresourcemanager.projects.setIamPolicy": self.set_iam_policy,
        }

    def write_admin_key_file(self, path):
        """A service account `keysmith-admin` holding exactly the roles
        keysmith's connection needs on the project, and its key file at
        `path` (mode 0600): what an operator of keysmith creates by hand."""
        account = ServiceAccount(self.project, ADMIN_ACCOUNT_ID, "keysmith admin",
                                 "manages integration service accounts", visible_at=time.time())
        self.accounts[account.unique_id] = account
        system_key = Key(account, "SYSTEM_MANAGED", None)
        account.keys[system_key.key_id] = system_key
        self.keys[system_key.key_id] = system_key
        key = self.new_user_key(account)
        for role in ADMIN_ROLES:
            self.bindings.append({"role": role, "members": [f"serviceAccount:{account.email}"]})
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump(self.key_file(key), f, indent=2)

    def authorize(self, auth, method_id):
        """The caller of `method_id`: the admin token, or an access token
        from /token whose service account holds the role the method needs
        (or roles/owner) in an unconditional binding of the project policy."""
        if secrets.compare_digest(auth.encode(), f"Bearer {self.admin_token}".encode()):
            return
        token = auth[len("Bearer "):] if auth.startswith("Bearer ") else ""
        with self.lock:
            account, expiry = self.tokens.get(token, (None, 0))
            if account is None or expiry < time.time() or account.deleted_at is not None or account.disabled:
                raise ApiError(401, "UNAUTHENTICATED",
                               "Request had invalid authentication credentials. " + AUTH_HELP,
                               headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/", '
                                                            'error="invalid_token"'})
            member = f"serviceAccount:{account.email}"
            role, permission = required_role(method_id)
            held = {b["role"] for b in self.bindings if "condition" not in b and member in b["members"]}
            if role not in held and "roles/owner" not in held:
                raise ApiError(403, "PERMISSION_DENIED",
                               f"Permission '{permission}' denied on resource (or it may not exist).")

    # -- API requests -------------------------------------------------------

    def handle_api(self, api, http_method, path, rel_path, raw_query, headers, raw_body):
        """Contract check, authentication, quota, then the method's behaviour.
        rel_path is the percent-decoded path below the API's base. Returns
        (status, json)."""
        try:
            method, path_params = api.match(http_method, rel_path)
            query = api.check_query(method, urllib.parse.parse_qsl(raw_query, keep_blank_values=True))
            body = api.check_body(method, headers.get("Content-Type", ""), raw_body)
        except ContractViolation as v:
            raise self.record_violation(http_method, path, str(v)) from None
        auth = headers.get("Authorization")
        if auth is None:
            raise ApiError(401, "UNAUTHENTICATED",
                           "Request is missing required authentication credential. " + AUTH_HELP,
                           headers={"WWW-Authenticate": 'Bearer realm="https://accounts.google.com/"'})
        self.authorize(auth, method.id)
        handler = self.handlers.get(method.id)
        if handler is None:
            raise ApiError(501, "UNIMPLEMENTED", f"fake_gcp does not implement {method.id}")
        with self.lock:
            if self.config["quota_exhausted_next"] > 0:
                self.config["quota_exhausted_next"] -= 1
                raise quota_error(api.name)
            return handler(path_params, query, body)

    def record_violation(self, http_method, path, message):
        with self.lock:
            self.violations.append({"method": http_method, "path": path, "message": message,
                                    "time": rfc3339(time.time())})
        return ApiError(400, "INVALID_ARGUMENT", f"contract violation: {message}")

    # -- service accounts ---------------------------------------------------

    def check_project(self, project, permission):
        if project != self.project:
            raise ApiError(403, "PERMISSION_DENIED",
                           f"Permission '{permission}' denied on resource (or it may not exist).")

    def visible(self, account):
        return account.deleted_at is None and time.time() >= account.visible_at

    def find_account(self, name):
        """Resolve projects/{p|-}/serviceAccounts/{email|uniqueId} to a live,
        visible service account (404 otherwise, as during propagation)."""
        project, _, ident = name.split("/", 3)[1:]
        if project not in (self.project, "-"):
            raise not_found_account()
        for account in self.accounts.values():
            if ident in (account.email, account.unique_id) and self.visible(account):
                return account
        raise not_found_account()

    def create_account(self, params, query, body):
        project = params["name"].split("/")[1]
        self.check_project(project, "iam.serviceAccounts.create")
        account_id = body.get("accountId") or ""
        if not (6 <= len(account_id) <= 30 and ACCOUNT_ID_RE.match(account_id)):
            raise ApiError(400, "INVALID_ARGUMENT",
                           f"Invalid value for field 'accountId': '{account_id}'. Must be between 6 and 30 "
                           "characters and match regular expression [a-z]([-a-z0-9]*[a-z0-9]).")
        spec = body.get("serviceAccount") or {}
        display_name, description = check_account_text(spec)
        for other in self.accounts.values():
            if other.account_id == account_id and other.deleted_at is None:
                raise ApiError(409, "ALREADY_EXISTS", f"Service account {account_id} already exists "
                                                      f"within project projects/{self.project}.")
        account = ServiceAccount(self.project, account_id, display_name, description,
                                 visible_at=time.time() + self.config["consistency_delay"])
        self.accounts[account.unique_id] = account
        system_key = Key(account, "SYSTEM_MANAGED", None)
        account.keys[system_key.key_id] = system_key
        self.keys[system_key.key_id] = system_key
        return 200, account.to_json()

    def get_account(self, params, query, body):
        return 200, self.find_account(params["name"]).to_json()

    def list_accounts(self, params, query, body):
        self.check_project(params["name"].split("/")[1], "iam.serviceAccounts.list")
        page_size = int(query.get("pageSize", ["0"])[0])
        if page_size < 0:
            raise ApiError(400, "INVALID_ARGUMENT", "pageSize must not be negative.")
        page_size = min(page_size or 20, 100)  # Google: default 20, maximum 100
        after = ""
        token = query.get("pageToken", [""])[0]
        if token:
            try:
                after = base64.b64decode(token + "=" * (-len(token) % 4), altchars=b"-_", validate=True).decode()
            except ValueError:
                raise ApiError(400, "INVALID_ARGUMENT", "Invalid page token.") from None
        accounts = sorted((a for a in self.accounts.values() if self.visible(a) and a.email > after),
                          key=lambda a: a.email)
        page = accounts[:page_size]
        out = {}
        if page:  # an empty list is omitted entirely, as Google does
            out["accounts"] = [a.to_json() for a in page]
        if len(accounts) > page_size:
            out["nextPageToken"] = base64.urlsafe_b64encode(page[-1].email.encode()).decode().rstrip("=")
        return 200, out

    def patch_account(self, params, query, body):
        account = self.find_account(params["name"])
        paths = {p.strip() for p in (body.get("updateMask") or "").split(",") if p.strip()}
        if not paths:
            raise ApiError(400, "INVALID_ARGUMENT", "updateMask must list the fields to update.")
        if paths - {"displayName", "description"}:
            raise ApiError(400, "INVALID_ARGUMENT", f"Invalid updateMask paths {sorted(paths)}: only "
                                                    "displayName and description can be updated.")
        display_name, description = check_account_text(body.get("serviceAccount") or {})
        if "displayName" in paths:
            account.display_name = display_name
        if "description" in paths:
            account.description = description
        return 200, account.to_json()

    def delete_account(self, params, query, body):
        account = self.find_account(params["name"])
        account.deleted_at = time.time()
        # Google shows bindings of a deleted account as deleted:serviceAccount:EMAIL?uid=ID.
        self.rename_member(f"serviceAccount:{account.email}",
                           f"deleted:serviceAccount:{account.email}?uid={account.unique_id}")
        return 200, {}

    def disable_account(self, params, query, body):
        self.find_account(params["name"]).disabled = True
        return 200, {}

    def enable_account(self, params, query, body):
        self.find_account(params["name"]).disabled = False
        return 200, {}

    def undelete_account(self, params, query, body):
        project, _, ident = params["name"].split("/", 3)[1:]
        if project not in (self.project, "-"):
            raise not_found_account()
        if not ident.isdigit():
            raise ApiError(400, "INVALID_ARGUMENT", "Undelete needs the service account's unique ID "
                                                    "(a deleted account has no email address to resolve).")
        account = self.accounts.get(ident)
        if account is None or (account.deleted_at is not None and time.time() - account.deleted_at
                               > self.config["deleted_retention_seconds"]):
            raise not_found_account()
        if account.deleted_at is None:
            raise ApiError(400, "FAILED_PRECONDITION", "Service account is not deleted.")
        if any(a.email == account.email and a.deleted_at is None for a in self.accounts.values()):
            raise ApiError(409, "ALREADY_EXISTS", f"A service account with email {account.email} "
                                                  "exists; the deleted one cannot be restored.")
        account.deleted_at = None
        account.visible_at = time.time()
        self.rename_member(f"deleted:serviceAccount:{account.email}?uid={account.unique_id}",
                           f"serviceAccount:{account.email}")
        return 200, {"restoredAccount": account.to_json()}

    # -- keys ---------------------------------------------------------------

    def find_key(self, name):
        account_name, _, key_id = name.rpartition("/keys/")
        account = self.find_account(account_name)
        key = account.keys.get(key_id)
        if key is None:
            raise ApiError(404, "NOT_FOUND", f"Service account key {name} does not exist.")
        return key

    def create_key(self, params, query, body):
        account = self.find_account(params["name"])
        if self.config["disable_key_creation"]:
            raise ApiError(400, "FAILED_PRECONDITION", "Precondition check failed.", details=[{
                "@type": "type.googleapis.com/google.rpc.PreconditionFailure",
                "violations": [{"type": "constraints/iam.disableServiceAccountKeyCreation",
                                "subject": f"projects/{self.project}",
                                "description": "Key creation is not allowed on this service account."}]}])
        if body.get("keyAlgorithm") not in (None, "KEY_ALG_UNSPECIFIED", "KEY_ALG_RSA_2048"):
            raise ApiError(400, "INVALID_ARGUMENT", f"fake_gcp only generates KEY_ALG_RSA_2048 keys, "
                                                    f"not {body['keyAlgorithm']}.")
        if body.get("privateKeyType") not in (None, "TYPE_UNSPECIFIED", "TYPE_GOOGLE_CREDENTIALS_FILE"):
            raise ApiError(501, "UNIMPLEMENTED", f"fake_gcp only produces TYPE_GOOGLE_CREDENTIALS_FILE, "
                                                 f"not {body['privateKeyType']}.")
        if sum(k.key_type == "USER_MANAGED" for k in account.keys.values()) >= MAX_USER_KEYS:
            raise ApiError(400, "FAILED_PRECONDITION", "Precondition check failed.")
        # Generated under the state lock: ~0.1 s, acceptable for tests.
        key = self.new_user_key(account)
        out = key.to_json()
        out["privateKeyType"] = "TYPE_GOOGLE_CREDENTIALS_FILE"
        out["privateKeyData"] = base64.b64encode(json.dumps(self.key_file(key), indent=2).encode()).decode()
        return 200, out

    def new_user_key(self, account):
        key = Key(account, "USER_MANAGED", rsa.generate_private_key(public_exponent=65537, key_size=2048))
        account.keys[key.key_id] = key
        self.keys[key.key_id] = key
        return key

    def key_file(self, key):
        """The JSON key file Google hands out once, at creation."""
        account = key.account
        pem = key.private_key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                            serialization.NoEncryption()).decode()
        return {
            "type": "service_account",
            "project_id": self.project,
            "private_key_id": key.key_id,
            "private_key": pem,
            "client_email": account.email,
            "client_id": account.unique_id,
            "auth_uri": "https://accounts.google.com/o/oauth2/auth",
            "token_uri": self.token_uri,
            "auth_provider_x509_cert_url": "https://www.googleapis.com/oauth2/v1/certs",
            "client_x509_cert_url": "https://www.googleapis.com/robot/v1/metadata/x509/"
                                    + urllib.parse.quote(account.email),
            "universe_domain": "googleapis.com",
        }

    def get_key(self, params, query, body):
        key = self.find_key(params["name"])
        out = key.to_json()
        public_key_type = query.get("publicKeyType", ["TYPE_NONE"])[0]
        if public_key_type != "TYPE_NONE":
            out["publicKeyData"] = key.public_key_data(public_key_type)
        return 200, out

    def list_keys(self, params, query, body):
        account = self.find_account(params["name"])
        types = query.get("keyTypes", [])
        if len(types) != len(set(types)):
            raise ApiError(400, "INVALID_ARGUMENT", "Duplicate key types are not allowed.")
        wanted = set(types) - {"KEY_TYPE_UNSPECIFIED"}
        keys = [k.to_json() for k in sorted(account.keys.values(), key=lambda k: k.created)
                if not wanted or k.key_type in wanted]
        return 200, {"keys": keys} if keys else {}

    def user_key(self, name):
        key = self.find_key(name)
        if key.key_type != "USER_MANAGED":
            raise ApiError(400, "FAILED_PRECONDITION", "System-managed keys are managed by Google "
                                                       "and cannot be deleted, disabled or enabled.")
        return key

    def delete_key(self, params, query, body):
        key = self.user_key(params["name"])
        key.deleted = True
        del key.account.keys[key.key_id]
        return 200, {}

    def disable_key(self, params, query, body):
        self.user_key(params["name"]).disabled = True
        return 200, {}

    def enable_key(self, params, query, body):
        self.user_key(params["name"]).disabled = False
        return 200, {}

    # -- project IAM policy -------------------------------------------------

    def has_conditions(self):
        return any("condition" in b for b in self.bindings)

    def policy_json(self, requested_version):
        """The policy as getIamPolicy answers it. Asked for a version below 3,
        Google hides conditions: a conditional binding comes back without its
        condition and with the role renamed ROLE_withcond_HASH."""
        bindings = []
        for binding in copy.deepcopy(self.bindings):
            if "condition" in binding and requested_version < 3:
                condition = binding.pop("condition")
                digest = hashlib.sha256(json.dumps(condition, sort_keys=True).encode()).hexdigest()[:20]
                binding["role"] += "_withcond_" + digest
            bindings.append(binding)
        out = {"version": 3 if self.has_conditions() and requested_version >= 3 else 1,
               "etag": self.policy_etag}
        if bindings:
            out["bindings"] = bindings
        if self.audit_configs:
            out["auditConfigs"] = copy.deepcopy(self.audit_configs)
        return out

    def check_policy_resource(self, resource, permission):
        if resource != self.project:
            raise ApiError(403, "PERMISSION_DENIED", "The caller does not have permission",
                           details=[{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                                     "reason": "IAM_PERMISSION_DENIED", "domain": "iam.googleapis.com",
                                     "metadata": {"permission": permission}}])

    def get_iam_policy(self, params, query, body):
        self.check_policy_resource(params["resource"], "resourcemanager.projects.getIamPolicy")
        version = ((body.get("options") or {}).get("requestedPolicyVersion")) or 0
        if version not in (0, 1, 3):
            raise ApiError(400, "INVALID_ARGUMENT", f"Invalid requested policy version {version}; "
                                                    "use 1 or 3.")
        return 200, self.policy_json(version)

    def set_iam_policy(self, params, query, body):
        self.check_policy_resource(params["resource"], "resourcemanager.projects.setIamPolicy")
        policy = body.get("policy")
        if policy is None:
            raise ApiError(400, "INVALID_ARGUMENT", "Request contains an invalid argument: policy is required.")
        if self.config["concurrent_change"]:
            self.config["concurrent_change"] = False
            self.simulate_other_writer()
        mask = {p.strip() for p in (body.get("updateMask") or DEFAULT_POLICY_MASK).split(",") if p.strip()}
        if mask - POLICY_MASK_PATHS:
            raise ApiError(400, "INVALID_ARGUMENT", f"Invalid updateMask paths {sorted(mask - POLICY_MASK_PATHS)}.")
        etag = policy.get("etag")
        if etag is not None and etag != self.policy_etag:
            raise ApiError(409, "ABORTED", "There were concurrent policy changes. Please retry the "
                                           "whole read-modify-write with exponential backoff.")
        version = policy.get("version") or 0
        if version not in (0, 1, 3):
            raise ApiError(400, "INVALID_ARGUMENT", f"Invalid policy version {version}; use 1 or 3.")
        bindings = normalize_bindings(policy.get("bindings") or []) if "bindings" in mask else self.bindings
        if version < 3 and any("condition" in b for b in bindings):
            raise ApiError(400, "INVALID_ARGUMENT", "Conditional role bindings require policy version 3.")
        # Google: with an etag, a version 1 write cannot replace a policy that
        # has conditions; without one it may, and the conditions are lost.
        if version < 3 and etag is not None and self.has_conditions():
            raise ApiError(400, "INVALID_ARGUMENT", "The policy has conditional role bindings; "
                                                    "read and write it with policy version 3.")
        for binding in bindings:
            self.check_binding(binding)
        self.bindings = bindings
        if "auditConfigs" in mask:
            self.audit_configs = copy.deepcopy(policy.get("auditConfigs") or [])
        self.policy_etag = new_policy_etag()
        return 200, self.policy_json(3)

    def check_binding(self, binding):
        role = binding.get("role") or ""
        if not ROLE_RE.match(role) or "_withcond_" in role:
            raise ApiError(400, "INVALID_ARGUMENT", f"Role ({role}) does not exist in the resource's hierarchy.")
        condition = binding.get("condition")
        if condition is not None and not (condition.get("expression") and condition.get("title")):
            raise ApiError(400, "INVALID_ARGUMENT", "A condition needs a title and an expression.")
        for member in binding["members"]:
            if not MEMBER_RE.match(member):
                raise ApiError(400, "INVALID_ARGUMENT", f"Invalid member: {member}")
            kind, _, email = member.partition(":")
            if kind == "serviceAccount" and email.endswith(f"@{self.project}.iam.gserviceaccount.com"):
                if not any(a.email == email and self.visible(a) for a in self.accounts.values()):
                    raise ApiError(400, "INVALID_ARGUMENT", f"Service account {email} does not exist.")

    def simulate_other_writer(self):
        """Another writer changes the policy between a client's read and write."""
        self.bindings = normalize_bindings(
            self.bindings + [{"role": "roles/browser", "members": ["user:concurrent-writer@example.com"]}])
        self.policy_etag = new_policy_etag()

    def rename_member(self, old, new):
        changed = False
        for binding in self.bindings:
            if old in binding["members"]:
                binding["members"] = [new if m == old else m for m in binding["members"]]
                changed = True
        if changed:
            self.policy_etag = new_policy_etag()

    # -- token endpoint -----------------------------------------------------

    def exchange_token(self, form):
        if form.get("grant_type") != JWT_BEARER:
            raise OAuthError("unsupported_grant_type", f"Invalid grant_type: {form.get('grant_type', '')}")
        assertion = form.get("assertion")
        if not assertion:
            raise OAuthError("invalid_request", "Missing required parameter: assertion")
        try:
            header_b64, claims_b64, signature_b64 = assertion.split(".")
            header = json.loads(b64url_decode(header_b64))
            claims = json.loads(b64url_decode(claims_b64))
            signature = b64url_decode(signature_b64)
        except ValueError:
            raise OAuthError("invalid_grant", "Invalid JWT: the assertion is not a compact JWS.") from None
        if not isinstance(header, dict) or not isinstance(claims, dict):
            raise OAuthError("invalid_grant", "Invalid JWT: header and claims must be JSON objects.")
        now = time.time()
        with self.lock:
            account = next((a for a in self.accounts.values()
                            if a.email == claims.get("iss") and a.deleted_at is None), None)
            if account is None or account.disabled:
                raise OAuthError("invalid_grant", "Invalid grant: account not found")
            key = account.keys.get(header.get("kid") or "")
            if (header.get("alg") != "RS256" or key is None or key.key_type != "USER_MANAGED"
                    or key.disabled):
                raise OAuthError("invalid_grant", "Invalid JWT Signature.")
            try:
                key.private_key.public_key().verify(signature, f"{header_b64}.{claims_b64}".encode(),
                                                    padding.PKCS1v15(), hashes.SHA256())
            except InvalidSignature:
                raise OAuthError("invalid_grant", "Invalid JWT Signature.") from None
            if claims.get("aud") != self.token_uri:
                raise OAuthError("invalid_grant", "Invalid JWT: Failed audience check. "
                                                  f"The expected audience is {self.token_uri}.")
            iat, exp = claims.get("iat"), claims.get("exp")
            if (not all(isinstance(t, (int, float)) and not isinstance(t, bool) for t in (iat, exp))
                    or exp - iat > 3600 or exp <= iat
                    or iat > now + TOKEN_CLOCK_SKEW or exp < now - TOKEN_CLOCK_SKEW):
                raise OAuthError("invalid_grant", "Invalid JWT: Token must be a short-lived token (60 minutes) "
                                                  "and in a reasonable timeframe. Check your iat and exp "
                                                  "values in the JWT claim.")
            if not isinstance(claims.get("scope"), str) or not claims["scope"].strip():
                raise OAuthError("invalid_scope", "Invalid OAuth scope or ID token audience provided.")
            key.exchanges += 1
            key.last_used = account.last_used = now
            access_token = "ya29.fake-" + secrets.token_urlsafe(48)
            self.tokens[access_token] = (account, now + 3599)
        return {"access_token": access_token, "expires_in": 3599, "token_type": "Bearer"}

    # -- /_fake -------------------------------------------------------------

    def handle_fake(self, http_method, what, raw_body):
        with self.lock:
            if (http_method, what) == ("GET", "violations"):
                return 200, list(self.violations)
            if (http_method, what) == ("DELETE", "violations"):
                self.violations.clear()
                return 200, []
            if (http_method, what) == ("GET", "config"):
                return 200, dict(self.config)
            if (http_method, what) == ("POST", "config"):
                return 200, self.update_config(raw_body)
            if (http_method, what) == ("GET", "policy"):
                return 200, self.policy_json(3)
            if (http_method, what) == ("GET", "keys"):
                return 200, [self.fake_key_json(k) for k in sorted(self.keys.values(), key=lambda k: k.created)]
            if (http_method, what) == ("GET", "service-accounts"):
                return 200, [self.fake_account_json(a)
                             for a in sorted(self.accounts.values(), key=lambda a: a.created)]
        raise ApiError(404, "NOT_FOUND", f"no fake endpoint {http_method} /_fake/{what}")

    def update_config(self, raw_body):
        try:
            changes = json.loads(raw_body or b"{}")
        except ValueError:
            raise ApiError(400, "INVALID_ARGUMENT", "config body is not JSON") from None
        if not isinstance(changes, dict):
            raise ApiError(400, "INVALID_ARGUMENT", "config body must be a JSON object")
        for name, value in changes.items():
            kind = CONFIG_TYPES.get(name)
            if kind is None:
                raise ApiError(400, "INVALID_ARGUMENT", f"unknown config key {name!r}; known: {sorted(CONFIG_TYPES)}")
            if not isinstance(value, kind) or (kind is not bool and isinstance(value, bool)) or \
                    (kind is not bool and value < 0):
                raise ApiError(400, "INVALID_ARGUMENT", f"bad value for {name}: {value!r}")
        self.config.update(changes)
        return dict(self.config)

    def fake_account_json(self, account):
        return {"email": account.email, "uniqueId": account.unique_id, "disabled": account.disabled,
                "deleted": account.deleted_at is not None,
                "deleteTime": rfc3339(account.deleted_at) if account.deleted_at else None,
                "visible": self.visible(account),
                "lastUsed": rfc3339(account.last_used) if account.last_used else None}

    @staticmethod
    def fake_key_json(key):
        return {"name": key.name, "keyId": key.key_id, "serviceAccount": key.account.email,
                "uniqueId": key.account.unique_id, "keyType": key.key_type, "disabled": key.disabled,
                "deleted": key.deleted, "validAfterTime": rfc3339(key.created),
                "exchangeCount": key.exchanges,
                "lastUsed": rfc3339(key.last_used) if key.last_used else None}


def check_account_text(spec):
    display_name = spec.get("displayName") or ""
    description = spec.get("description") or ""
    # Google documents both limits in UTF-8 bytes, not characters.
    if len(display_name.encode()) > 100:
        raise ApiError(400, "INVALID_ARGUMENT", "displayName must be at most 100 bytes (UTF-8).")
    if len(description.encode()) > 256:
        raise ApiError(400, "INVALID_ARGUMENT", "description must be at most 256 bytes (UTF-8).")
    return display_name, description


def normalize_bindings(bindings):
    """Merge bindings of the same role and condition, drop duplicate members
    and bindings left without members, as Google stores them."""
    merged = {}
    for binding in bindings:
        condition = binding.get("condition")
        slot = merged.setdefault((binding.get("role"), json.dumps(condition, sort_keys=True)),
                                 {"role": binding.get("role"), "members": []})
        if condition is not None:
            slot["condition"] = copy.deepcopy(condition)
        for member in binding.get("members") or []:
            if member not in slot["members"]:
                slot["members"].append(member)
    return [b for b in merged.values() if b["members"]]


def quota_error(service):
    return ApiError(429, "RESOURCE_EXHAUSTED",
                    f"Quota exceeded for quota metric 'Requests' and limit 'Requests per minute' of "
                    f"service '{service}.googleapis.com'.",
                    details=[{"@type": "type.googleapis.com/google.rpc.ErrorInfo",
                              "reason": "RATE_LIMIT_EXCEEDED", "domain": "googleapis.com",
                              "metadata": {"service": f"{service}.googleapis.com"}}])


# ---------------------------------------------------------------------------
# HTTP
# ---------------------------------------------------------------------------

class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as Google's front ends and reqwest's pool expect
    server_version = "fake_gcp"

    def do_GET(self):
        self.dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    def log_message(self, fmt, *args):
        if self.server.verbose:
            sys.stderr.write("fake_gcp: " + (fmt % args) + "\n")

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while True:
                size = int(self.rfile.readline().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                        pass
                    return b"".join(chunks)
                chunks.append(self.rfile.read(size + 2)[:size])  # chunk data + CRLF
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def dispatch(self):
        fake = self.server.fake
        raw_body = self.read_body()
        url = urllib.parse.urlsplit(self.path)
        try:
            if url.path == TOKEN_PATH:
                self.token(fake, raw_body)
                return
            if url.path.startswith(FAKE_BASE):
                status, payload = fake.handle_fake(self.command, url.path[len(FAKE_BASE):], raw_body)
            elif url.path.startswith(IAM_BASE) or url.path.startswith(CRM_BASE):
                api, base = (fake.iam, IAM_BASE) if url.path.startswith(IAM_BASE) else (fake.crm, CRM_BASE)
                segments = [urllib.parse.unquote(s) for s in url.path[len(base):].split("/")]
                if any("/" in s for s in segments):
                    raise fake.record_violation(self.command, url.path, "percent-encoded '/' inside a path segment")
                status, payload = fake.handle_api(api, self.command, url.path, "/".join(segments), url.query,
                                                  self.headers, raw_body)
            else:
                raise fake.record_violation(self.command, url.path, f"path is under none of {IAM_BASE}, "
                                                                    f"{CRM_BASE}, {TOKEN_PATH}, {FAKE_BASE}")
        except ApiError as e:
            self.send_json(e.code, e.body(), e.headers)
            return
        except Exception:  # a fake_gcp bug: answer like Google's 500, keep serving
            traceback.print_exc(file=sys.stderr)
            self.send_json(500, ApiError(500, "INTERNAL", "fake_gcp internal error (see its stderr)").body())
            return
        self.send_json(status, payload)

    def token(self, fake, raw_body):
        if self.command != "POST":
            self.send_json(405, {"error": "invalid_request", "error_description": "POST only"})
            return
        content_type = self.headers.get("Content-Type", "").split(";")[0].strip().lower()
        if content_type != "application/x-www-form-urlencoded":
            fake.record_violation(self.command, TOKEN_PATH, "token request must be "
                                  f"application/x-www-form-urlencoded, got {content_type!r}")
            self.send_json(400, {"error": "invalid_request",
                                 "error_description": "Content-Type must be application/x-www-form-urlencoded"})
            return
        form = dict(urllib.parse.parse_qsl(raw_body.decode("utf-8", "replace"), keep_blank_values=True))
        try:
            self.send_json(200, fake.exchange_token(form))
        except OAuthError as e:
            self.send_json(400, {"error": e.error, "error_description": e.description})

    def send_json(self, status, payload, headers=None):
        data = json.dumps(payload, indent=2).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(data)


def default_discovery_dir():
    """google-api-python-client's bundled discovery documents, located without
    importing googleapiclient (and so without its dependencies)."""
    spec = importlib.util.find_spec("googleapiclient")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(list(spec.submodule_search_locations)[0], "discovery_cache", "documents")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--project", default="demo-project")
    parser.add_argument("--discovery-dir", default=None,
                        help="holds iam.v1.json and cloudresourcemanager.v1.json "
                             "(default: google-api-python-client's discovery_cache/documents)")
    parser.add_argument("--admin-token", required=True,
                        help="bearer token every IAM/CRM request must carry")
    parser.add_argument("--admin-key-file", default=None,
                        help="create the service account keysmith-admin with the roles a keysmith connection "
                             "needs, and write its JSON key file here; access tokens from /token for it are "
                             "accepted like --admin-token")
    parser.add_argument("--consistency-delay", type=float, default=0.0,
                        help="seconds a new service account stays invisible (404)")
    parser.add_argument("--verbose", action="store_true", help="log requests to stderr")
    args = parser.parse_args()

    discovery_dir = args.discovery_dir or default_discovery_dir()
    if discovery_dir is None:
        parser.error("google-api-python-client is not installed; pass --discovery-dir")
    iam = DiscoveryApi(os.path.join(discovery_dir, "iam.v1.json"))
    crm = DiscoveryApi(os.path.join(discovery_dir, "cloudresourcemanager.v1.json"))

    server = ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    base_url = f"http://127.0.0.1:{server.server_address[1]}"
    server.fake = FakeGcp(args.project, iam, crm, args.admin_token, base_url, args.consistency_delay,
                          args.admin_key_file)
    server.verbose = args.verbose
    print(f"listening {base_url}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()

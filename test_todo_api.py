"""The Todo API's tests: every rule of the contract, asserted as a user sees it."""

import base64
import hmac
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import sqlite3
import stat
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import closing, contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlencode

import anyio
import bcrypt
import httpx2
import jwt
import pytest
from fastapi.routing import iter_route_contexts
from fastapi.testclient import TestClient
from pydantic import SecretStr

import todo_api
from todo_api import app, settings

SECRET = "test-secret-key-with-at-least-64-bytes-for-hs512-0123456789abcdef"
PASSWORD = "correct horse battery staple"
BAD_TOKEN = {"detail": "Could not validate credentials"}
WRONG_LOGIN = {"detail": "Incorrect email or password"}
TOO_MANY = {"detail": "Too many failed logins; try again later"}
EMAIL_TAKEN = {"detail": "Email already registered"}
# The module makes its own at the configured cost as it is imported; tests use 4.
DUMMY_HASH = bcrypt.hashpw(b"no account has this password", bcrypt.gensalt(4))


@pytest.fixture
def database(tmp_path, monkeypatch):
    """Point the app at a fresh database file, with fast bcrypt, for one test."""
    path = tmp_path / "test.db"
    monkeypatch.setattr(settings, "database_path", str(path))
    monkeypatch.setattr(settings, "secret_key", SecretStr(SECRET))
    monkeypatch.setattr(settings, "bcrypt_rounds", 4)
    monkeypatch.setattr(todo_api, "DUMMY_HASH", DUMMY_HASH)
    return path


@pytest.fixture
def client(database):
    """A client whose `with` block runs the app's startup and shutdown."""
    with TestClient(app) as client:
        yield client


def register(client, email="ada@example.com", password=PASSWORD):
    response = client.post(
        "/auth/register", json={"email": email, "password": password}
    )
    assert response.status_code == 201, response.text
    return response.json()


def log_in(client, email="ada@example.com", password=PASSWORD):
    """Register a user and return the headers that authenticate as them."""
    register(client, email, password)
    return token_headers(client, email, password)


def token_headers(client, email="ada@example.com", password=PASSWORD):
    """Log in as an existing user and return the headers that authenticate as them."""
    response = client.post(
        "/auth/token", data={"username": email, "password": password}
    )
    assert response.status_code == 200, response.text
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


@pytest.fixture
def auth(client):
    return log_in(client)


def add_task(client, headers, **fields):
    response = client.post("/tasks", json={"title": "task", **fields}, headers=headers)
    assert response.status_code == 201, response.text
    return response.json()


def token_for(user_id, key=SECRET, algorithm="HS256", **changes):
    """Sign a token the way the server does, with some claims changed or removed."""
    now = datetime.now(UTC)
    claims = {
        "sub": None if user_id is None else str(user_id),
        "ver": 0,
        "iat": now,
        "exp": now + timedelta(minutes=5),
        **changes,
    }
    claims = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode(claims, key, algorithm=algorithm)


def count_bcrypt_checks(monkeypatch):
    """Record every password bcrypt checks from now on, in the returned list."""
    checks = []
    check = bcrypt.checkpw

    def counted_check(password, password_hash):
        checks.append(password)
        return check(password, password_hash)

    monkeypatch.setattr(bcrypt, "checkpw", counted_check)
    return checks


def stored_attempts(database):
    """The login attempts counted in the database, as (email, count) pairs."""
    query = "SELECT email, attempts FROM login_attempt ORDER BY email"
    return sqlite3.connect(database).execute(query).fetchall()


def wrong_logins(client, count, email="ada@example.com"):
    """Try a wrong password `count` times; return the answers' statuses."""
    form = {"username": email, "password": "not the password at all"}
    return [client.post("/auth/token", data=form).status_code for _ in range(count)]


def is_utc_timestamp(text):
    return datetime.fromisoformat(text).utcoffset() == timedelta(0) and re.search(
        r"(Z|\+00:00)$", text
    )


JSON = {"content-type": "application/json"}


FORM = {"content-type": "application/x-www-form-urlencoded"}


def operations(client):
    spec = client.get("/openapi.json").json()
    for path, methods in spec["paths"].items():
        for method, operation in methods.items():
            yield method, path, operation


def fresh_module(monkeypatch, tmp_path, **environment):
    """Import todo_api anew in an empty folder with these APP_* variables."""
    monkeypatch.chdir(tmp_path)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("todo_api_fresh", todo_api.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


HUGE = 99999999999999999999  # beyond SQLite's 64-bit integers


MAX_BODY = 64 * 1024


HERE = Path(__file__).parent


def server_environment():
    """This process's environment without any APP_* setting."""
    return {
        name: value for name, value in os.environ.items() if not name.startswith("APP_")
    }


@contextmanager
def real_server(folder, *options, **environment):
    """Serve the app with uvicorn on a free port; kill -9 it, workers and all, after.

    What the server prints goes to server.log in the folder.
    """
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "uvicorn", "todo_api:app", "--app-dir", str(HERE)]
    command += ["--port", str(port), "--log-level", "warning", *options]
    with open(Path(folder) / "server.log", "ab") as log:  # the server keeps a copy
        server = subprocess.Popen(
            command,
            cwd=folder,
            env=server_environment() | environment,
            start_new_session=True,
            stdout=log,
            stderr=subprocess.STDOUT,
            umask=0o022,  # the usual one, so that only the app can make a file private
        )
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            assert server.poll() is None, "the server exited"
            try:
                if httpx2.get(f"{base_url}/health").status_code == 200:
                    break
            except httpx2.HTTPError:
                assert time.monotonic() < deadline, "the server did not start"
                time.sleep(0.05)
        yield base_url
    finally:
        os.killpg(server.pid, signal.SIGKILL)
        server.wait()


def log_in_to(base_url, email="ada@example.com", register_first=True):
    if register_first:
        response = httpx2.post(
            f"{base_url}/auth/register", json={"email": email, "password": PASSWORD}
        )
        assert response.status_code == 201
    response = httpx2.post(
        f"{base_url}/auth/token", data={"username": email, "password": PASSWORD}
    )
    return {"Authorization": f"Bearer {response.json()['access_token']}"}


def raw_request(base_url, method, path, headers, body=b""):
    """Open a connection and send a request on it, without waiting for the answer."""
    connection = socket.create_connection(("127.0.0.1", int(base_url.split(":")[-1])))
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1", *headers, "", ""]
    connection.sendall("\r\n".join(lines).encode() + body)
    return connection


def read_answer(connection):
    """Read one whole HTTP answer from a raw connection: its head and its body."""
    connection.settimeout(10)
    answer = b""
    while b"\r\n\r\n" not in answer:
        received = connection.recv(65536)
        assert received, f"the connection closed after {answer!r}"
        answer += received
    head, _, body = answer.partition(b"\r\n\r\n")
    length = int(re.search(rb"content-length: (\d+)", head, re.IGNORECASE)[1])
    while len(body) < length:
        received = connection.recv(65536)
        assert received, f"the connection closed after {answer!r}"
        body += received
    return head, body


# --- Guards: what every route must do ----------------------------------------
# These read the routes from the app and what each needs from /openapi.json, so a
# route a learner adds is checked as it is added; each names the mistake it catches.

DOCS = {"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
PUBLIC = {"/health", "/auth/register", "/auth/token", *DOCS}  # no token needed
SERVER_ONLY = {"password_hash", "owner_id", "token_version"}  # never in an answer
SERVER_SET = {"id", "owner_id", "created_at", "token_version"}  # never in a body
BCRYPT_HASH = re.compile(r"\$2[aby]\$\d\d\$[./A-Za-z0-9]{53}")
FORMATS = {
    "date": "2030-01-02",
    "date-time": "2030-01-02T03:04:05Z",
    "email": "someone@example.com",
}


def keys_in(value):
    """Every key of every object in a JSON value, however deeply nested."""
    if isinstance(value, dict):
        return set(value).union(*map(keys_in, value.values()))
    if isinstance(value, list):
        return set().union(*map(keys_in, value))
    return set()


@pytest.fixture(autouse=True)
def no_answer_carries_a_secret(monkeypatch):
    """Check every answer every test gets, from a TestClient or a real server."""
    send = httpx2.Client.send  # what every httpx2 client, TestClient too, calls

    def checked_send(http_client, request, **options):
        response = send(http_client, request, **options)
        response.read()
        leaked = {"a bcrypt hash"} if BCRYPT_HASH.search(response.text) else set()
        # The OpenAPI document names fields; it carries no one's data.
        content_type = response.headers.get("content-type", "")
        is_json = content_type.startswith("application/json")
        if is_json and response.content and request.url.path not in DOCS:
            leaked |= keys_in(response.json()) & SERVER_ONLY
        assert not leaked, (
            f"{request.method} {request.url.path} answered {sorted(leaked)}: the "
            "server keeps these to itself; return a response model, not a raw row "
            "(OWASP API3)"
        )
        return response

    monkeypatch.setattr(httpx2.Client, "send", checked_send)


def served_routes(spec):
    """Every (method, path, operation) the app serves, read from its routes.

    A route hidden from /docs (/tasks/) is described by the documented route with
    the same function; the docs' own routes have no operation: {}.
    """
    routes = list(iter_route_contexts(app.routes))  # included routers, flattened
    documented = {
        route.endpoint: spec["paths"].get(route.path_format, {})
        for route in routes
        if getattr(route, "include_in_schema", False)
    }
    for route in routes:
        for method in sorted(set(route.methods or ()) - {"HEAD"}):
            operations = documented.get(route.endpoint, {})
            if getattr(route, "include_in_schema", False):
                operations = spec["paths"].get(route.path_format, {})
            yield method, route.path, operations.get(method.lower(), {})


def resolved(spec, schema):
    """Return the schema a `$ref` names, or the schema itself."""
    while "$ref" in schema:
        schema = spec["components"]["schemas"][schema["$ref"].split("/")[-1]]
    return schema


def example_of(spec, schema):
    """Make a value the schema accepts; where null is allowed, a value all the same."""
    schema = resolved(spec, schema)
    choices = schema.get("anyOf") or schema.get("oneOf") or schema.get("allOf") or []
    choices = [choice for choice in choices if choice.get("type") != "null"]
    if choices:
        return example_of(spec, choices[0])
    if "enum" in schema:
        return schema["enum"][0]
    kind = schema.get("type")
    if kind == "object":
        properties = schema.get("properties", {})
        return {name: example_of(spec, field) for name, field in properties.items()}
    if kind == "array":
        return [example_of(spec, schema.get("items", {}))] * schema.get("minItems", 1)
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        low = max(1, schema.get("minimum", 1), schema.get("exclusiveMinimum", 0) + 1)
        return min(low, schema.get("maximum", low))
    if "pattern" in schema:  # taken as a literal, as the login form's ^password$ is
        return schema["pattern"].strip("^$")
    return FORMATS.get(schema.get("format"), "x").ljust(schema.get("minLength", 0), "x")


def request_for(spec, method, path, operation, task_id=1):
    """Build a request the route accepts, from its operation, naming this task."""
    values = {"task_id": task_id}
    query = {}
    for parameter in operation.get("parameters", []):
        value = example_of(spec, parameter["schema"])
        if parameter["in"] == "path":
            values.setdefault(parameter["name"], value)
        elif parameter["in"] == "query" and parameter.get("required"):
            query[parameter["name"]] = value
    url = re.sub(r"{(\w+)[^}]*}", lambda name: str(values.get(name[1], 1)), path)
    request = {"method": method, "url": url, "params": query}
    if "requestBody" in operation:
        [(content_type, content), *_] = operation["requestBody"]["content"].items()
        json_or_form = "json" if content_type == "application/json" else "data"
        request[json_or_form] = example_of(spec, content["schema"])
    return request


def body_schema(spec, operation):
    """The schema of an operation's request body, or None if it takes none."""
    if "requestBody" not in operation:
        return None
    [content, *_] = operation["requestBody"]["content"].values()
    return resolved(spec, content["schema"])


def test_every_private_route_needs_a_token(client):
    """Guard: a route without CurrentUser answers anyone (OWASP API2)."""
    spec = client.get("/openapi.json").json()
    routes = list(served_routes(spec))
    assert PUBLIC <= {path for _, path, _ in routes}  # each public route is served
    task = add_task(client, log_in(client))
    other_key = "another-secret-key-that-is-long-enough-for-hs256"
    bad_token = {"Authorization": f"Bearer {token_for(1, key=other_key)}"}
    for method, path, operation in routes:
        if path in PUBLIC:
            continue
        request = request_for(spec, method, path, operation, task["id"])
        for how, headers, detail in [
            ("without a token", {}, "Not authenticated"),
            ("with a bad token", bad_token, BAD_TOKEN["detail"]),
        ]:
            response = client.request(**request, headers=headers)
            assert response.status_code == 401, (
                f"{method} {path} answers {response.status_code} {how}: a private "
                "route needs CurrentUser (OWASP API2)"
            )
            assert response.json() == {"detail": detail}
            assert response.headers["www-authenticate"] == "Bearer"


def test_another_users_task_does_not_exist(client, auth):
    """Guard: a task query without `AND owner_id = ?` serves anyone (OWASP API1)."""
    spec = client.get("/openapi.json").json()
    intruder = log_in(client, "eve@example.com")
    fields = {"title": "Ada's", "description": "hers", "due_date": "2026-12-01"}
    for method, path, operation in served_routes(spec):
        if "{task_id}" not in path:
            continue
        task = add_task(client, auth, **fields)
        request = request_for(spec, method, path, operation, task["id"])
        response = client.request(**request, headers=intruder)
        assert response.status_code != 422, (
            f"{method} {path}: the guard built no valid request from /openapi.json: "
            f"{response.text}"
        )
        assert response.status_code == 404, (
            f"{method} {path} answers {response.status_code} to another user: its "
            "query needs `AND owner_id = ?` (OWASP API1)"
        )
        assert response.json() == {"detail": "Task not found"}
        assert client.get(f"/tasks/{task['id']}", headers=auth).json() == task, (
            f"{method} {path} changed another user's task: its query needs "
            "`AND owner_id = ?` (OWASP API1)"
        )
    assert client.get("/tasks", headers=intruder).json() == []


def test_no_route_answers_what_the_server_keeps(client):
    """Guard: an answer that leaks password_hash, owner_id or token_version (API3)."""
    # no_answer_carries_a_secret checks each answer; this calls every route once.
    spec = client.get("/openapi.json").json()
    for number, (method, path, operation) in enumerate(served_routes(spec)):
        # A user of its own each: the logout and the account's delete end theirs.
        headers = log_in(client, f"user{number}@example.com")
        task = add_task(client, headers)
        request = request_for(spec, method, path, operation, task["id"])
        response = client.request(**request, headers=headers)
        assert response.status_code != 422 and response.status_code < 500, (
            f"{method} {path} answers {response.status_code}: {response.text}"
        )


def test_no_request_body_sets_what_the_server_sets(client):
    """Guard: a request model with id, owner_id, created_at or token_version (API3)."""
    spec = client.get("/openapi.json").json()
    for method, path, operation in served_routes(spec):
        schema = body_schema(spec, operation) or {}
        settable = set(schema.get("properties", {})) & SERVER_SET
        assert not settable, (
            f"{method} {path} lets a client set {sorted(settable)}: the server sets "
            "these; leave them out of the request model (OWASP API3)"
        )


def test_every_path_answers_405_to_a_method_it_does_not_serve(client):
    """Guard: a path like /tasks/count is also read as /tasks/{task_id}."""
    headers = log_in(client)
    served = {}
    for method, path, _ in served_routes(client.get("/openapi.json").json()):
        served.setdefault(path, set()).add(method)
    for path, methods in served.items():
        url = re.sub(r"{\w+}", "1", path)
        for method in {"GET", "POST", "PUT", "PATCH", "DELETE"} - methods:
            response = client.request(method, url, headers=headers)
            assert response.status_code == 405, (
                f"{method} {path} answers {response.status_code}, not 405: another "
                "route's path takes it (a /tasks/{task_id} route reads /tasks/count "
                "as a task id); give the new route a path of its own, such as "
                "/users/me/task-count"
            )
            assert response.json() == {"detail": "Method Not Allowed"}


def test_every_json_list_has_a_bounded_limit(client):
    """Guard: a list with no bounded `limit` reads a whole table (OWASP API4)."""
    spec = client.get("/openapi.json").json()
    for method, path, operation in served_routes(spec):
        answers = [
            resolved(spec, content["schema"])
            for status, answer in operation.get("responses", {}).items()
            if status.startswith("2")
            for content_type, content in answer.get("content", {}).items()
            if content_type == "application/json"
        ]
        kinds = {
            choice.get("type")
            for answer in answers
            for choice in [answer, *answer.get("anyOf", [])]
        }
        if "array" not in kinds:
            continue
        limits = [
            parameter
            for parameter in operation.get("parameters", [])
            if (parameter["in"], parameter["name"]) == ("query", "limit")
        ]
        limit = limits[0] if limits else {"schema": {}}
        choices = limit["schema"].get("anyOf", [limit["schema"]])
        # A maximum, and a value always given: a default of null reads every row.
        given = limit.get("required") or limit["schema"].get("default") is not None
        bounded = given and all(
            "maximum" in choice for choice in choices if choice.get("type") != "null"
        )
        assert bounded, (
            f"{method} {path} answers a JSON list without a bounded `limit`: add "
            "`limit: Annotated[int, Query(ge=1, le=100)] = 100` and use it in the "
            "query's LIMIT (OWASP API4)"
        )


# --- Settings ----------------------------------------------------------------


def test_defaults_need_no_environment(monkeypatch, tmp_path):
    module = fresh_module(monkeypatch, tmp_path)
    assert module.settings.model_dump() == {
        "database_path": "todo.db",
        "secret_key": SecretStr(""),
        "access_token_expire_minutes": 30,
        "bcrypt_rounds": 12,
        "login_attempts": 10,
        "login_window_seconds": 900,
        "cors_origins": [],
    }
    with TestClient(module.app) as client:
        assert client.get("/health").status_code == 200
    assert (
        tmp_path / "todo.db"
    ).exists()  # in the working folder, schema applied from beside the module


def test_settings_come_from_a_dot_env_file(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text(
        "APP_ACCESS_TOKEN_EXPIRE_MINUTES=5\nAPP_DATABASE_PATH=other.db\n"
    )
    module = fresh_module(monkeypatch, tmp_path)
    assert (
        module.settings.access_token_expire_minutes,
        module.settings.database_path,
    ) == (5, "other.db")


def test_other_programs_variables_in_dot_env_are_ignored(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("POSTGRES_PASSWORD=secret\nAPP_BCRYPT_ROUNDS=5\n")
    assert fresh_module(monkeypatch, tmp_path).settings.bcrypt_rounds == 5


def test_a_mistyped_app_variable_in_dot_env_stops_startup(monkeypatch, tmp_path):
    (tmp_path / ".env").write_text("APP_DATABSE_PATH=other.db\n")
    with pytest.raises(ValueError, match="databse_path\n  Extra inputs are not"):
        fresh_module(monkeypatch, tmp_path)


@pytest.mark.parametrize("path", [":memory:", ""])
def test_a_database_that_is_no_file_is_refused_at_startup(monkeypatch, tmp_path, path):
    with pytest.raises(ValueError, match="gives each connection its own empty data"):
        fresh_module(monkeypatch, tmp_path, APP_DATABASE_PATH=path)
    assert list(tmp_path.iterdir()) == []  # no file named :memory: left behind


def test_cors_origins_are_a_json_list(monkeypatch):
    monkeypatch.setenv("APP_CORS_ORIGINS", '["https://a.example", "https://b.example"]')
    assert todo_api.Settings(_env_file=None).cors_origins == [
        "https://a.example",
        "https://b.example",
    ]


@pytest.mark.parametrize(
    "key", ["my-typo-secret", "a" * 31, "€" * 10]
)  # 10 euro signs are 30 bytes
def test_a_short_secret_key_stops_startup_without_showing_it(monkeypatch, key):
    monkeypatch.setenv("APP_SECRET_KEY", key)
    with pytest.raises(
        ValueError, match="APP_SECRET_KEY needs 32[+] bytes: openssl rand"
    ) as error:
        todo_api.Settings(_env_file=None)
    assert key not in str(error.value)


def test_a_short_secret_key_stops_the_server_and_is_not_printed(tmp_path):
    key = "my-typo-secret"
    command = [sys.executable, "-m", "uvicorn", "todo_api:app", "--app-dir", str(HERE)]
    result = subprocess.run(
        command,
        check=False,
        cwd=tmp_path,
        env=server_environment() | {"APP_SECRET_KEY": key},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    assert "APP_SECRET_KEY needs 32+ bytes" in result.stderr
    assert key not in result.stdout + result.stderr


def test_a_32_byte_key_is_enough(monkeypatch):
    monkeypatch.setenv("APP_SECRET_KEY", "€" * 11)  # 11 characters, 33 bytes
    key = todo_api.Settings(_env_file=None).secret_key
    assert key.get_secret_value() == "€" * 11


def test_the_settings_never_show_the_key(monkeypatch):
    monkeypatch.setenv("APP_SECRET_KEY", SECRET)
    loaded = todo_api.Settings(_env_file=None)
    assert SECRET not in repr(loaded) and SECRET not in str(loaded)
    assert SECRET not in repr(loaded.model_dump())


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("APP_LOGIN_ATTEMPTS", "0"),
        ("APP_LOGIN_WINDOW_SECONDS", "0"),
        ("APP_BCRYPT_ROUNDS", "3"),
        ("APP_ACCESS_TOKEN_EXPIRE_MINUTES", "0"),
        # Larger would overflow the expiry date at the first login: a 500, not this.
        ("APP_ACCESS_TOKEN_EXPIRE_MINUTES", "10000000000"),
    ],
)
def test_settings_out_of_range_stop_startup(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValueError, match=name.removeprefix("APP_").lower()):
        todo_api.Settings(_env_file=None)


# --- Database ----------------------------------------------------------------


def count_connections(monkeypatch):
    """Record every connection the app opens from now on, in the returned list."""
    opened = []
    connect = todo_api.connect

    def counted_connect():
        opened.append(connect())
        return opened[-1]

    monkeypatch.setattr(todo_api, "connect", counted_connect)
    return opened


def test_connections_are_opened_at_startup_reused_and_closed_on_shutdown(
    database, monkeypatch
):
    opened = count_connections(monkeypatch)
    with TestClient(app) as client:
        headers = log_in(client)
        for _ in range(20):
            assert client.get("/tasks", headers=headers).status_code == 200
        assert app.state.pool.qsize() == todo_api.MAX_CONNECTIONS == 40
    assert len(opened) == 1 + 40  # the schema's own, then the pool's
    for connection in opened:
        with pytest.raises(sqlite3.ProgrammingError):
            connection.execute("SELECT 1")


def test_task_ids_are_never_reused(client, auth):
    first = add_task(client, auth)["id"]
    client.delete(f"/tasks/{first}", headers=auth)
    assert add_task(client, auth)["id"] == first + 1


def test_the_database_uses_write_ahead_logging(client, database):
    journal_mode = sqlite3.connect(database).execute("PRAGMA journal_mode").fetchone()
    assert journal_mode == ("wal",)


def test_concurrent_writers_all_succeed(client, auth, database):
    def write(writer):
        return [
            client.post(
                "/tasks", json={"title": f"{writer}-{n}"}, headers=auth
            ).status_code
            for n in range(10)
        ]

    with ThreadPoolExecutor(8) as pool:
        statuses = [status for batch in pool.map(write, range(8)) for status in batch]
    assert statuses == [201] * 80
    assert sqlite3.connect(database).execute(
        "SELECT count(*) FROM task"
    ).fetchone() == (80,)


def test_database_connections_are_bounded_however_many_requests_arrive(
    client, auth, monkeypatch
):
    opened = count_connections(monkeypatch)

    def read(_):
        return client.get("/tasks", headers=auth).status_code

    with ThreadPoolExecutor(100) as pool:
        statuses = list(pool.map(read, range(150)))
    assert statuses == [200] * 150
    assert opened == []  # the 40 opened at startup served them all
    assert app.state.pool.qsize() == 40  # and every one came back


def test_a_request_waits_for_a_connection_without_holding_a_thread(
    client, auth, monkeypatch
):
    pool = app.state.pool
    taken = [pool.get_nowait() for _ in range(40)]  # as if 40 requests held them
    with ThreadPoolExecutor(50) as waiting:
        reads = [waiting.submit(client.get, "/tasks", headers=auth) for _ in range(50)]
        time.sleep(0.3)
        assert not any(read.done() for read in reads)  # all 50 wait for a connection
        threads = client.portal.call(anyio.to_thread.current_default_thread_limiter)
        assert threads.borrowed_tokens == 0  # on the event loop, not in a thread
        for connection in taken:
            client.portal.call(pool.put, connection)
        assert [read.result().status_code for read in reads] == [200] * 50


def test_a_client_that_never_reads_its_answer_holds_no_connection(client, auth):
    add_task(client, auth)
    answers_begun = []

    async def never_read():
        """Ask for the task list, then never read the answer, as a stalled client."""
        authorization = (b"authorization", auth["Authorization"].encode())
        request = {"type": "http", "method": "GET", "path": "/tasks"}
        request |= {"headers": [authorization], "query_string": b""}

        async def receive():
            return {"type": "http.request", "body": b""}

        async def send(message):
            answers_begun.append(message)
            await anyio.sleep_forever()  # the answer is never read

        await app(request, receive, send)

    stalled = [client.portal.start_task_soon(never_read) for _ in range(41)]
    try:
        deadline = time.monotonic() + 5
        while len(answers_begun) < 41 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert len(answers_begun) == 41  # more than the pool holds: all came back
        assert app.state.pool.qsize() == todo_api.MAX_CONNECTIONS
        assert client.get("/tasks", headers=auth).status_code == 200
    finally:
        for request in stalled:
            request.cancel()


def test_a_burst_of_logins_leaves_other_routes_answering(tmp_path):
    with real_server(tmp_path) as base_url:  # at the default bcrypt cost
        headers = log_in_to(base_url)

        def log_in_as_nobody(n):
            form = {"username": f"nobody{n}@example.com", "password": PASSWORD}
            return httpx2.post(f"{base_url}/auth/token", data=form, timeout=60)

        with httpx2.Client(base_url=base_url, headers=headers) as prober:
            prober.get("/health")  # connected before the burst, as a client would be

            def seconds_to_answer(path):
                start = time.monotonic()
                assert prober.get(path).status_code == 200
                return time.monotonic() - start

            # More logins at once than FastAPI has worker threads (40).
            with ThreadPoolExecutor(42) as pool:
                logins = [pool.submit(log_in_as_nobody, n) for n in range(42)]
                time.sleep(1)  # every login has arrived and waits for its turn
                waits = [seconds_to_answer(path) for path in ["/health", "/tasks"] * 3]
                still_waiting = sum(not login.done() for login in logins)
                statuses = [login.result().status_code for login in logins]
    assert still_waiting > 20, still_waiting  # the probes came while logins waited
    assert max(waits) < 0.5, waits
    assert statuses == [401] * 42


def test_workers_share_one_database_and_one_generated_key(tmp_path):
    with real_server(tmp_path, "--workers", "2", APP_BCRYPT_ROUNDS="4") as base_url:
        headers = log_in_to(base_url)
        # A new connection each time, so the kernel hands them to every worker in turn.
        statuses = {
            httpx2.get(f"{base_url}/users/me", headers=headers).status_code
            for _ in range(10)
        }
        assert statuses == {200}

        def write(writer):
            with httpx2.Client(base_url=base_url, headers=headers) as worker_client:
                return [
                    worker_client.post(
                        "/tasks", json={"title": f"{writer}"}
                    ).status_code
                    for _ in range(5)
                ]

        with ThreadPoolExecutor(6) as pool:
            assert [s for batch in pool.map(write, range(4)) for s in batch] == [
                201
            ] * 20

        # The login limit is counted in the shared file, whichever worker answers.
        form = {"username": "nobody@example.com", "password": "a wrong password"}
        statuses = [
            httpx2.post(f"{base_url}/auth/token", data=form).status_code
            for _ in range(13)
        ]
        assert statuses == [401] * 10 + [429] * 3
    assert sqlite3.connect(tmp_path / "todo.db").execute(
        "SELECT count(*) FROM task"
    ).fetchone() == (20,)
    assert sqlite3.connect(tmp_path / "todo.db").execute(
        "SELECT count(*) FROM signing_key"
    ).fetchone() == (1,)


def test_every_task_and_token_survives_kill_9_and_a_restart(tmp_path):
    with real_server(tmp_path, APP_BCRYPT_ROUNDS="4") as base_url:
        headers = log_in_to(base_url)

        def write(writer):
            with httpx2.Client(base_url=base_url, headers=headers) as writer_client:
                responses = [
                    writer_client.post("/tasks", json={"title": f"{writer}-{n}"})
                    for n in range(10)
                ]
            return [
                response.json()["id"]
                for response in responses
                if response.status_code == 201
            ]

        with ThreadPoolExecutor(4) as pool:
            acknowledged = [
                task_id for batch in pool.map(write, range(4)) for task_id in batch
            ]
    # real_server has just killed it with SIGKILL, right after the last 201.
    assert len(acknowledged) == 40
    # The restarted server reads the same generated key, so the old token still works.
    with real_server(tmp_path, APP_BCRYPT_ROUNDS="4") as base_url:
        tasks = httpx2.get(f"{base_url}/tasks?limit=100", headers=headers).json()
    assert sorted(task["id"] for task in tasks) == sorted(acknowledged)


# --- Passwords and tokens ----------------------------------------------------


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("Ada@Example.COM", "ada@example.com"),
        ("Ä@x.io", "ä@x.io"),
        ("a\u0308@x.io", "ä@x.io"),  # NFD: a and a combining diaeresis
        ("a@XN--BCHER-KVA.example", "a@bücher.example"),
    ],
    ids=["case", "upper-case umlaut", "NFD", "punycode domain"],
)
def test_emails_are_stored_normalised_and_lower_cased(client, database, sent, stored):
    assert register(client, sent)["email"] == stored
    user = sqlite3.connect(database).execute("SELECT email FROM user").fetchone()
    assert user == (stored,)


def test_every_spelling_of_an_address_is_one_account(client):
    register(client, "ä@x.io")
    for spelling in ["Ä@x.io", "a\u0308@x.io", "Ä@X.IO", "ä@X.io"]:
        response = client.post(
            "/auth/register", json={"email": spelling, "password": PASSWORD}
        )
        assert response.status_code == 409, spelling
        assert response.json() == {"detail": "Email already registered"}
        assert token_headers(client, spelling)  # and each of them logs in


@pytest.mark.parametrize(
    ("first", "second"),
    [
        ("νικος.παπας@example.gr", "ΝΙΚΟΣ.ΠΑΠΑΣ@example.gr"),  # a final sigma
        ("\u01f0ane@example.com", "J\u030cANE@example.com"),  # ǰ, then J and a caron
        ("straße@example.de", "STRASSE@example.de"),
    ],
    ids=["final sigma", "j with caron", "sharp s"],
)
def test_an_address_is_case_folded_not_lower_cased(client, first, second):
    register(client, first)
    response = client.post(
        "/auth/register", json={"email": second, "password": PASSWORD}
    )
    assert (response.status_code, response.json()) == (409, EMAIL_TAKEN)
    assert token_headers(client, second)


def test_a_punycode_domain_logs_in_as_its_unicode_form(client):
    register(client, "a@XN--BCHER-KVA.example")
    assert token_headers(client, "a@bücher.example")
    assert token_headers(client, "A@xn--bcher-kva.example")


def test_the_password_is_prehashed_with_hmac_then_hashed_with_bcrypt(client, database):
    register(client)
    stored = sqlite3.connect(database).execute("SELECT password_hash FROM user")
    password_hash = stored.fetchone()[0]
    assert password_hash.startswith(b"$2b$04$")
    digest = hmac.digest(b"todo-api password v1", PASSWORD.encode(), "sha256")
    assert bcrypt.checkpw(base64.b64encode(digest), password_hash)
    assert not bcrypt.checkpw(PASSWORD.encode(), password_hash)


def test_nothing_of_a_long_password_is_cut(client):
    # 100 bytes that differ only in the last one: bcrypt alone would read 72.
    register(client, password="ü" * 49 + "1")
    response = client.post(
        "/auth/token", data={"username": "ada@example.com", "password": "ü" * 49 + "2"}
    )
    assert response.json() == WRONG_LOGIN


@pytest.mark.parametrize(
    ("registered", "typed"),
    [
        ("caf\u00e9 au lait, s'il vous plaît", "cafe\u0301 au lait, s'il vous plaît"),
        ("ｆｕｌｌｗｉｄｔｈ ｐａｓｓｗｏｒｄ", "fullwidth password"),
    ],
    ids=["NFC then NFD", "fullwidth then ASCII"],
)
def test_a_password_is_normalised_before_every_check(client, registered, typed):
    register(client, password=registered)
    assert token_headers(client, password=typed)


def test_wrong_password_and_unknown_email_take_about_as_long(tmp_path):
    with real_server(tmp_path, APP_BCRYPT_ROUNDS="10") as base_url:
        log_in_to(base_url)
        timings = {"wrong password": [], "unknown email": []}
        with httpx2.Client(base_url=base_url) as timing_client:
            for _ in range(7):
                for case, email, password in [
                    ("wrong password", "ada@example.com", "not the password"),
                    ("unknown email", "nobody@example.com", PASSWORD),
                ]:
                    started = time.perf_counter()
                    response = timing_client.post(
                        "/auth/token", data={"username": email, "password": password}
                    )
                    timings[case].append(time.perf_counter() - started)
                    assert response.status_code == 401
    wrong, unknown = (statistics.median(timings[case]) for case in timings)
    assert max(wrong, unknown) / min(wrong, unknown) < 1.5, f"login timings: {timings}"


# --- Login rate limit --------------------------------------------------------


def test_the_eleventh_guess_is_429_even_with_the_right_password(
    client, database, monkeypatch
):
    register(client)
    checks = count_bcrypt_checks(monkeypatch)
    assert wrong_logins(client, 10) == [401] * 10
    response = client.post(
        "/auth/token", data={"username": "ada@example.com", "password": PASSWORD}
    )
    assert (response.status_code, response.json()) == (429, TOO_MANY)
    assert 890 <= int(response.headers["retry-after"]) <= 900
    assert len(checks) == 10  # no password was checked while locked
    assert stored_attempts(database) == [("ada@example.com", 11)]


def test_a_right_password_clears_the_count(client, database):
    register(client)
    assert wrong_logins(client, 9) == [401] * 9
    assert token_headers(client)
    assert stored_attempts(database) == []
    assert wrong_logins(client, 11) == [401] * 10 + [429]


def test_unknown_emails_are_limited_alike(client, database):
    assert wrong_logins(client, 11, "nobody@example.com") == [401] * 10 + [429]
    assert stored_attempts(database) == [("nobody@example.com", 11)]


def test_every_spelling_of_an_address_shares_one_count(client):
    register(client, "ä@x.io")
    for spelling in ["ä@x.io", "Ä@x.io", "a\u0308@x.io", "Ä@X.IO", "ä@X.io"] * 2:
        assert wrong_logins(client, 1, spelling) == [401]
    assert wrong_logins(client, 1, "Ä@X.io") == [429]


def test_the_limit_holds_under_concurrency(client, monkeypatch):
    register(client)
    checks = count_bcrypt_checks(monkeypatch)
    with ThreadPoolExecutor(50) as pool:
        statuses = list(pool.map(lambda _: wrong_logins(client, 1)[0], range(50)))
    assert statuses.count(401) <= 10 and statuses.count(401) == len(checks)
    assert statuses.count(429) == 50 - statuses.count(401)


def test_the_count_is_shared_through_the_database_and_survives_a_restart(
    client, database
):
    assert wrong_logins(client, 10, "nobody@example.com") == [401] * 10
    # What another worker sees: the same file.
    assert stored_attempts(database) == [("nobody@example.com", 10)]
    with TestClient(app) as restarted:
        assert wrong_logins(restarted, 1, "nobody@example.com") == [429]


def test_the_window_passes_and_stale_counts_are_removed(client, database, monkeypatch):
    monkeypatch.setattr(settings, "login_window_seconds", 1)
    monkeypatch.setattr(settings, "login_attempts", 2)
    register(client)
    assert wrong_logins(client, 3) == [401, 401, 429]
    assert wrong_logins(client, 1, "x@example.com") == [401]
    assert stored_attempts(database) == [("ada@example.com", 3), ("x@example.com", 1)]
    time.sleep(1.1)
    assert wrong_logins(client, 1, "other@example.com") == [401]
    assert stored_attempts(database) == [("other@example.com", 1)]
    assert token_headers(client)


def test_the_limit_comes_from_the_settings(client, monkeypatch):
    monkeypatch.setattr(settings, "login_attempts", 3)
    monkeypatch.setattr(settings, "login_window_seconds", 60)
    assert wrong_logins(client, 4) == [401, 401, 401, 429]
    response = client.post(
        "/auth/token", data={"username": "ada@example.com", "password": "p"}
    )
    assert 1 <= int(response.headers["retry-after"]) <= 60


# --- The current user --------------------------------------------------------


def test_me(client, auth):
    response = client.get("/users/me", headers=auth)
    assert response.status_code == 200
    assert set(response.json()) == {"id", "email", "created_at"}
    assert response.json()["email"] == "ada@example.com"


def test_missing_token_is_401(client):
    response = client.get("/users/me")
    assert response.status_code == 401
    assert response.json() == {"detail": "Not authenticated"}
    assert response.headers["www-authenticate"] == "Bearer"


def test_scheme_name_is_case_insensitive(client, auth):
    token = auth["Authorization"].split()[1]
    assert (
        client.get(
            "/users/me", headers={"Authorization": f"bearer {token}"}
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    "make_token",
    [
        lambda user_id: token_for(
            user_id, key="another-secret-key-that-is-long-enough-for-hs256"
        ),
        lambda user_id: token_for(user_id, algorithm="HS512"),
        lambda user_id: token_for(user_id, key=None, algorithm="none"),
        lambda user_id: token_for(
            user_id, exp=datetime.now(UTC) - timedelta(seconds=1)
        ),
        lambda user_id: token_for(user_id, exp=None),
        lambda user_id: token_for(None),
        lambda user_id: token_for(user_id, ver=None),
        lambda user_id: token_for(user_id, ver=1),
        lambda user_id: token_for(user_id + 1),
        lambda user_id: "not.a.token",
        lambda user_id: token_for(user_id)[:-3] + "abc",
    ],
    ids=[
        "other key",
        "HS512",
        "alg none",
        "expired",
        "no exp",
        "no sub",
        "no ver",
        "a later ver",
        "unknown user",
        "malformed",
        "bad signature",
    ],
)
def test_bad_token_is_401(client, make_token):
    user_id = register(client)["id"]
    response = client.get(
        "/users/me", headers={"Authorization": f"Bearer {make_token(user_id)}"}
    )
    assert response.status_code == 401
    assert response.json() == BAD_TOKEN
    assert response.headers["www-authenticate"] == "Bearer"


def test_tampered_payload_is_401(client):
    first, second = register(client)["id"], register(client, "bob@example.com")["id"]
    header, _, signature = token_for(first).split(".")
    _, payload, _ = token_for(second).split(".")
    response = client.get(
        "/users/me", headers={"Authorization": f"Bearer {header}.{payload}.{signature}"}
    )
    assert response.status_code == 401


def test_a_deleted_users_token_stays_dead_after_someone_registers(client, auth):
    client.delete("/users/me", headers=auth)
    newcomer = register(client, "bob@example.com")
    assert newcomer["id"] != 1  # ids are never reused
    assert client.get("/tasks", headers=auth).status_code == 401


@pytest.mark.parametrize(
    ("authorization", "detail"),
    [
        (b"", "Not authenticated"),
        (b"Bearer", "Could not validate credentials"),  # an empty token
        (b"Basic YWRhOmNvcnJlY3QgaG9yc2U=", "Not authenticated"),
        (b"Token abc.def.ghi", "Not authenticated"),
        (b"Bearer " + b"a" * 100_000, "Could not validate credentials"),
        (b"Bearer \xc3\xbc\xff\xfe", "Could not validate credentials"),
        (b"Bearer a.b.c", "Could not validate credentials"),
        (b"Bearer ' OR 1=1 --", "Could not validate credentials"),
    ],
)
def test_hostile_authorization_headers_are_401(client, authorization, detail):
    register(client)
    response = client.get("/tasks", headers={"Authorization": authorization})
    assert response.status_code == 401
    assert response.json() == {"detail": detail}
    assert response.headers["www-authenticate"] == "Bearer"


# --- Request and response models ---------------------------------------------


@pytest.mark.parametrize(
    "password",
    [
        "a" * 15,
        "a" * 128,
        "€" * 15,
        "密码" * 32,
        "🔑" * 19,
        "🔑" * 128,
        "correct horse battery staple",
        "   fifteen spaces ",
    ],
    ids=[
        "15 ASCII",
        "128 ASCII",
        "15 euro signs",
        "64 CJK characters",
        "19 emoji",
        "128 emoji, 512 bytes",
        "spaces",
        "leading and trailing spaces",
    ],
)
def test_register_accepts_15_to_128_characters_of_any_kind(client, password):
    register(client, password=password)
    assert token_headers(client, password=password)


@pytest.mark.parametrize(
    ("body", "location", "message"),
    [
        (
            {"email": "ada@example.com", "password": "password"},
            "password",
            "String should have at least 15 characters",
        ),
        (
            {"email": "ada@example.com", "password": "a" * 14},
            "password",
            "String should have at least 15 characters",
        ),
        (
            {"email": "ada@example.com", "password": "€" * 14},  # 42 bytes
            "password",
            "String should have at least 15 characters",
        ),
        (
            {"email": "ada@example.com", "password": "a" * 129},
            "password",
            "String should have at most 128 characters",
        ),
        ({"email": "ada@example.com"}, "password", "Field required"),
        (
            {"email": "ada@example.com", "password": 123456789012345},
            "password",
            "Input should be a valid string",
        ),
        ({"password": PASSWORD}, "email", "Field required"),
        (
            {"email": "not-an-email", "password": PASSWORD},
            "email",
            "Value error, An email address must have an @-sign.",
        ),
        (
            {"email": "a" * 250 + "@x.io", "password": PASSWORD},
            "email",
            "String should have at most 254 characters",
        ),
    ],
)
def test_register_refuses_bad_input(client, body, location, message):
    response = client.post("/auth/register", json=body)
    assert response.status_code == 422
    assert [
        (problem["loc"], problem["msg"]) for problem in response.json()["detail"]
    ] == [(["body", location], message)]


@pytest.mark.parametrize(
    "email",
    [
        "ada@localhost",
        "ada@example.test",
        "a b@example.com",
        "ada\u200b@example.com",
        '"ada lovelace"@example.com',
        "Ada <ada@example.com>",
        "ada@example.com\x00",
        "ada@@example.com",
    ],
    ids=[
        "localhost",
        "special-use domain",
        "space",
        "zero-width space",
        "quoted local part",
        "display name",
        "NUL",
        "two at signs",
    ],
)
def test_register_refuses_addresses_email_validator_refuses(client, email):
    response = client.post(
        "/auth/register", json={"email": email, "password": PASSWORD}
    )
    assert response.status_code == 422
    [problem] = response.json()["detail"]
    assert problem["loc"] == ["body", "email"]
    assert problem["msg"].startswith("Value error, ")


def test_client_cannot_set_id_owner_or_created_at(client, auth, database):
    sent = {
        "title": "t",
        "id": 999,
        "owner_id": 999,
        "created_at": "2000-01-01T00:00:00Z",
    }
    task = client.post("/tasks", json=sent, headers=auth).json()
    assert task["id"] == 1 and not task["created_at"].startswith("2000")
    client.patch(
        "/tasks/1",
        json={"id": 5, "owner_id": 5, "created_at": "2000-01-01T00:00:00Z"},
        headers=auth,
    )
    stored = (
        sqlite3.connect(database)
        .execute("SELECT id, owner_id, created_at FROM task")
        .fetchone()
    )
    assert stored == (1, 1, task["created_at"].replace("000Z", "Z"))


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({}, ["body", "title"]),
        ({"title": ""}, ["body", "title"]),
        ({"title": "   "}, ["body", "title"]),
        ({"title": "\x1f"}, ["body", "title"]),  # space to Python's strip() only
        ({"title": "x" * 201}, ["body", "title"]),
        ({"title": None}, ["body", "title"]),
        ({"title": 42}, ["body", "title"]),
        ({"title": "t", "description": "x" * 2001}, ["body", "description"]),
        ({"title": "t", "done": "yes"}, ["body", "done"]),
        ({"title": "t", "done": 1}, ["body", "done"]),
        ({"title": "t", "due_date": "2026-02-30"}, ["body", "due_date"]),
        ({"title": "t", "due_date": "2026-01-01T12:30:00"}, ["body", "due_date"]),
        ({"title": "t", "due_date": "01/02/2026"}, ["body", "due_date"]),
        ({"title": "t", "due_date": 10**20}, ["body", "due_date"]),
        ({"title": "t", "due_date": True}, ["body", "due_date"]),
    ],
)
def test_create_task_refuses_bad_input(client, auth, body, location):
    response = client.post("/tasks", json=body, headers=auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == location


@pytest.mark.parametrize(
    ("sent", "stored"),
    [
        ("2026-12-01", "2026-12-01"),
        ("2026-12-01T00:00:00", "2026-12-01"),
        (0, "1970-01-01"),  # pydantic reads a number as a Unix time
        ("86400", "1970-01-02"),
    ],
)
def test_a_due_date_is_read_as_pydantic_reads_one_and_kept_as_yyyy_mm_dd(
    client, auth, database, sent, stored
):
    task = add_task(client, auth, due_date=sent)
    assert task["due_date"] == stored
    row = sqlite3.connect(database).execute("SELECT due_date FROM task").fetchone()
    assert row == (stored,)


def test_create_task_accepts_the_longest_fields(client, auth):
    task = add_task(client, auth, title="x" * 200, description="y" * 2000)
    assert len(task["title"]) == 200 and len(task["description"]) == 2000


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=101", "offset=-1", "done=maybe", "limit=x"]
)
def test_list_tasks_refuses_bad_queries(client, auth, query):
    response = client.get(f"/tasks?{query}", headers=auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "query"


@pytest.mark.parametrize(
    "body",
    [{"title": ""}, {"title": "   "}, {"done": "true"}, {"due_date": "soon"}],
)
def test_patch_refuses_bad_input(client, auth, body):
    task = add_task(client, auth)
    response = client.patch(f"/tasks/{task['id']}", json=body, headers=auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", *body]
    assert client.get(f"/tasks/{task['id']}", headers=auth).json() == task


def test_a_title_counts_its_200_characters_as_sent(client, auth):
    response = client.post("/tasks", json={"title": " " + "x" * 200}, headers=auth)
    assert response.status_code == 422
    assert add_task(client, auth, title=" " + "x" * 199)["title"] == "x" * 199


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", f"/tasks/{HUGE}"),
        ("PATCH", f"/tasks/{HUGE}"),
        ("PUT", f"/tasks/{HUGE}"),
        ("DELETE", f"/tasks/{HUGE}"),
        ("GET", f"/tasks/{2**63}"),
        ("GET", "/tasks/0"),
        ("GET", "/tasks/-1"),
        ("GET", "/tasks/1.5"),
        ("GET", "/tasks/abc"),
        ("GET", f"/tasks?offset={HUGE}"),
        ("GET", f"/tasks?limit={HUGE}"),
        ("GET", "/tasks?offset=-1"),
    ],
)
def test_numbers_out_of_range_are_422(client, auth, method, path):
    response = client.request(method, path, json={"title": "t"}, headers=auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] in ("path", "query")


@pytest.mark.parametrize(
    ("content", "status"),
    [
        (b"{", 422),
        (b"[]", 422),
        (b"null", 422),
        (b"42", 422),
        (b'"a title"', 422),
        (b'{"title": "\\ud800"}', 422),  # a lone surrogate cannot be stored as UTF-8
        (b'{"title": "t", "description": "\\udfff"}', 422),
        ('{"title": "caf\u00e9"}'.encode("latin-1"), 400),  # not UTF-8 at all
    ],
)
def test_malformed_task_bodies_are_refused(client, auth, content, status):
    response = client.post("/tasks", content=content, headers=auth | JSON)
    assert response.status_code == status
    assert "detail" in response.json()
    assert client.get("/tasks", headers=auth).json() == []


@pytest.mark.parametrize(
    "body",
    [
        {"email": "a" * 10_000 + "@example.com", "password": PASSWORD},
        {"email": "ada@example.com", "password": "x" * 60_000},
        {"email": "ada@example.com\ud800", "password": PASSWORD},
        {"email": "ada@example.com", "password": PASSWORD + "\ud800"},
        {"email": "ada@example.com", "password": "\ud800" * 20},
        {"email": ["ada@example.com"], "password": PASSWORD},
        {"email": None, "password": None},
    ],
)
def test_hostile_registrations_are_422(client, body):
    # json.dumps writes a lone surrogate as the escape \ud800, as a hostile client does.
    response = client.post("/auth/register", content=json.dumps(body), headers=JSON)
    assert response.status_code == 422
    assert "detail" in response.json()
    assert "input" not in response.text and PASSWORD not in response.text


def test_a_long_title_is_422(client, auth):
    response = client.post("/tasks", json={"title": "x" * 60_000}, headers=auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "title"]


@pytest.mark.parametrize(
    "text",
    [
        "Robert'); DROP TABLE task; --",
        "' OR '1'='1",
        "%s %d %(title)s {0} {title} ${HOME}",
        "nul\x00inside",
        "\x00",
        "emoji 🚀 and ünïcödé",
    ],
)
def test_hostile_text_is_stored_verbatim(client, auth, database, text):
    task = add_task(client, auth, title=text, description=text)
    assert (task["title"], task["description"]) == (text, text)
    assert client.get(f"/tasks/{task['id']}", headers=auth).json() == task
    stored = sqlite3.connect(database).execute("SELECT title, description FROM task")
    assert stored.fetchall() == [(text, text)]


# --- Routes: health and accounts ---------------------------------------------


def test_health(client):
    assert client.get("/health").json() == {"status": "ok"}


def test_health_is_503_when_the_database_cannot_answer(client, database):
    database.write_bytes(b"this is not a database" * 1000)
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json() == {"detail": "Database unavailable"}


def test_register_returns_the_user_and_its_location(client, database):
    response = client.post(
        "/auth/register", json={"email": "ada@example.com", "password": PASSWORD}
    )
    assert response.status_code == 201
    assert response.headers["location"] == "/users/me"
    user = response.json()
    assert set(user) == {"id", "email", "created_at"}  # never the hash
    assert user["email"] == "ada@example.com"
    assert is_utc_timestamp(user["created_at"])
    stored = (
        sqlite3.connect(database)
        .execute("SELECT password_hash FROM user")
        .fetchone()[0]
    )
    assert stored.startswith(b"$2b$04$") and PASSWORD.encode() not in stored


@pytest.mark.parametrize("email", ["ada@example.com", "ADA@Example.COM"])
def test_register_twice_is_409_whatever_the_case(client, email):
    register(client, "ada@example.com")
    response = client.post(
        "/auth/register", json={"email": email, "password": PASSWORD}
    )
    assert response.status_code == 409
    assert response.json() == {"detail": "Email already registered"}


def test_token_from_the_oauth2_form(client):
    user = register(client)
    # What Swagger UI's Authorize button sends.
    form = {
        "grant_type": "password",
        "username": "ada@example.com",
        "password": PASSWORD,
        "scope": "",
    }
    response = client.post("/auth/token", data=form)
    assert response.status_code == 200
    assert response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 30 * 60
    claims = jwt.decode(body["access_token"], SECRET, algorithms=["HS256"])
    assert (claims["sub"], claims["ver"]) == (str(user["id"]), 0)
    assert claims["exp"] - claims["iat"] == 30 * 60


def test_token_from_a_multipart_form(client):
    register(client)
    form = {"username": (None, "ada@example.com"), "password": (None, PASSWORD)}
    response = client.post("/auth/token", files=form)
    assert response.status_code == 200
    assert response.json()["token_type"] == "bearer"


def test_a_json_login_is_422_and_echoes_nothing(client):
    register(client)
    response = client.post(
        "/auth/token", json={"username": "ada@example.com", "password": PASSWORD}
    )
    assert response.status_code == 422
    problems = response.json()["detail"]
    assert [(p["type"], p["loc"]) for p in problems] == [
        ("missing", ["body", "username"]),
        ("missing", ["body", "password"]),
    ]
    assert "input" not in response.text and PASSWORD not in response.text


def test_login_ignores_the_case_of_the_email(client):
    register(client, "ada@example.com")
    response = client.post(
        "/auth/token", data={"username": "ADA@EXAMPLE.COM", "password": PASSWORD}
    )
    assert response.status_code == 200


@pytest.mark.parametrize(
    ("username", "password"),
    [
        ("ada@example.com", "wrong password"),
        ("nobody@example.com", PASSWORD),
        ("ada@example.com", PASSWORD + "x" * 60),  # 73 bytes: simply wrong, not a 500
        ("ada@example.com", "€" * 72),
    ],
)
def test_bad_login_is_one_401(client, username, password):
    register(client)
    response = client.post(
        "/auth/token", data={"username": username, "password": password}
    )
    assert response.status_code == 401
    assert response.json() == {"detail": "Incorrect email or password"}
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("form", "missing"),
    [
        ({"username": "ada@example.com"}, ["password"]),
        ({"password": PASSWORD}, ["username"]),
        ({"username": "ada@example.com", "password": ""}, ["password"]),
        ({"username": "", "password": PASSWORD}, ["username"]),
        ({}, ["username", "password"]),
    ],
)
def test_a_login_form_without_both_fields_is_422(client, form, missing):
    register(client)
    # Sent as a form even when empty; FastAPI counts an empty field as missing.
    response = client.post("/auth/token", content=urlencode(form), headers=FORM)
    assert response.status_code == 422
    problems = response.json()["detail"]
    assert [(p["type"], p["loc"][-1]) for p in problems] == [
        ("missing", name) for name in missing
    ]
    assert "input" not in response.text and PASSWORD not in response.text


@pytest.mark.parametrize(
    "username",
    ["not an email", "ada@localhost", "ada\u200b@example.com", "x" * 50_000],
)
def test_an_invalid_address_at_login_is_401_at_once(
    client, database, monkeypatch, username
):
    checks = count_bcrypt_checks(monkeypatch)
    response = client.post(
        "/auth/token", data={"username": username, "password": PASSWORD}
    )
    assert (response.status_code, response.json()) == (401, WRONG_LOGIN)
    assert checks == []  # no bcrypt
    assert stored_attempts(database) == []  # and not counted


def test_a_lone_surrogate_in_the_login_form_is_simply_wrong(client):
    register(client)
    # A lone surrogate, as the UTF-8 bytes Python refuses to encode or decode.
    form = b"username=ada%40example.com&password=%ED%A0%80" + b"x" * 15
    response = client.post("/auth/token", content=form, headers=FORM)
    assert (response.status_code, response.json()) == (401, WRONG_LOGIN)
    multipart = {
        "username": (None, "ada@example.com"),
        "password": (None, b"\xed\xa0\x80"),
    }
    response = client.post("/auth/token", files=multipart)
    assert (response.status_code, response.json()) == (401, WRONG_LOGIN)


@pytest.mark.parametrize("field", ["username", "password"])
def test_a_form_in_any_charset_is_simply_wrong(client, field):
    register(client)
    fields = {"username": "ada@example.com", "password": PASSWORD}
    fields[field] = "\\ud800" + fields[field]  # unicode_escape decodes a surrogate
    parts = [
        f'--b\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'
        for name, value in fields.items()
    ]
    body = ("".join(parts) + "--b--\r\n").encode()
    multipart = "multipart/form-data; boundary=b; charset=unicode_escape"
    response = client.post(
        "/auth/token", content=body, headers={"content-type": multipart}
    )
    assert (response.status_code, response.json()) == (401, WRONG_LOGIN)


def test_logout_refuses_every_token_issued_until_now(client, auth):
    other_session = token_headers(client)
    response = client.post("/auth/logout", headers=auth)
    assert (response.status_code, response.content) == (204, b"")
    for headers in (auth, other_session):
        response = client.get("/tasks", headers=headers)
        assert (response.status_code, response.json()) == (401, BAD_TOKEN)
        assert response.headers["www-authenticate"] == "Bearer"
    assert client.post("/auth/logout", headers=auth).status_code == 401


def test_a_login_right_after_a_logout_works_in_the_same_second(client, auth):
    client.post("/auth/logout", headers=auth)
    fresh = token_headers(client)
    assert client.get("/users/me", headers=fresh).status_code == 200
    assert client.get("/users/me", headers=auth).status_code == 401


def test_a_login_checked_during_a_logout_gets_a_revoked_token(
    client, auth, database, monkeypatch
):
    check = todo_api.verify_password

    def check_while_someone_logs_out(password, password_hash):
        assert client.post("/auth/logout", headers=auth).status_code == 204
        return check(password, password_hash)

    monkeypatch.setattr(todo_api, "verify_password", check_while_someone_logs_out)
    racing_login = token_headers(client)
    assert client.get("/users/me", headers=racing_login).status_code == 401


def test_delete_me_deletes_the_user_and_its_tasks(client, auth, database):
    add_task(client, auth)
    response = client.delete("/users/me", headers=auth)
    assert response.status_code == 204
    assert response.content == b""
    stored = sqlite3.connect(database)
    assert stored.execute("SELECT count(*) FROM user").fetchone() == (0,)
    assert stored.execute("SELECT count(*) FROM task").fetchone() == (0,)
    assert client.get("/users/me", headers=auth).json() == BAD_TOKEN


@pytest.mark.parametrize(
    "form",
    [
        {"username": "a" * 60_000, "password": PASSWORD},
        {"username": "ada@example.com", "password": "p" * 60_000},
        {"username": "ada@example.com' OR '1'='1", "password": "' OR '1'='1"},
    ],
)
def test_form_logins_with_huge_or_hostile_fields_are_401(client, form):
    register(client)
    response = client.post("/auth/token", data=form)
    assert response.status_code == 401
    assert response.json() == {"detail": "Incorrect email or password"}


def test_concurrent_registrations_of_one_email_give_one_201(client):
    def attempt(_):
        return client.post(
            "/auth/register", json={"email": "race@example.com", "password": PASSWORD}
        )

    with ThreadPoolExecutor(20) as pool:
        responses = list(pool.map(attempt, range(20)))
    assert sorted(response.status_code for response in responses) == [201] + [409] * 19
    assert {r.json()["detail"] for r in responses if r.status_code == 409} == {
        "Email already registered"
    }


# --- Routes: tasks -----------------------------------------------------------


def test_create_task(client, auth, database):
    response = client.post("/tasks", json={"title": "  Buy milk \n"}, headers=auth)
    assert response.status_code == 201
    task = response.json()
    assert response.headers["location"] == f"/tasks/{task['id']}"
    assert task | {"created_at": None} == {
        "id": task["id"],
        "title": "Buy milk",
        "description": None,
        "done": False,
        "due_date": None,
        "created_at": None,
    }
    assert is_utc_timestamp(task["created_at"])
    # Committed before the response: another connection sees it.
    assert sqlite3.connect(database).execute("SELECT title FROM task").fetchall() == [
        ("Buy milk",)
    ]


def test_create_task_with_every_field(client, auth):
    fields = {
        "title": "Pay rent",
        "description": "by transfer",
        "done": True,
        "due_date": "2026-12-01",
    }
    task = add_task(client, auth, **fields)
    assert {name: task[name] for name in fields} == fields
    assert client.get(f"/tasks/{task['id']}", headers=auth).json() == task


def test_list_tasks_oldest_first(client, auth):
    assert client.get("/tasks", headers=auth).json() == []
    titles = [add_task(client, auth, title=f"task {n}")["title"] for n in range(3)]
    response = client.get("/tasks", headers=auth)
    assert response.status_code == 200
    assert response.headers["content-type"] == "application/json"
    assert [task["title"] for task in response.json()] == titles


def test_trailing_slash_reaches_the_same_routes_without_redirect(client, auth):
    created = client.post(
        "/tasks/", json={"title": "t"}, headers=auth, follow_redirects=False
    )
    assert created.status_code == 201
    listed = client.get("/tasks/", headers=auth, follow_redirects=False)
    assert listed.status_code == 200 and listed.json() == [created.json()]


def test_list_tasks_filters_by_done(client, auth):
    add_task(client, auth, title="open")
    add_task(client, auth, title="closed", done=True)
    titles = {
        done: [
            task["title"]
            for task in client.get(f"/tasks?done={done}", headers=auth).json()
        ]
        for done in ("true", "false")
    }
    assert titles == {"true": ["closed"], "false": ["open"]}


def test_list_tasks_pages(client, auth):
    ids = [add_task(client, auth)["id"] for _ in range(5)]
    page = client.get("/tasks?limit=2&offset=1", headers=auth).json()
    assert [task["id"] for task in page] == ids[1:3]
    assert client.get("/tasks?offset=5", headers=auth).json() == []


def test_list_tasks_limit_defaults_to_100(client, auth, database):
    stored = sqlite3.connect(database, isolation_level=None)
    stored.executemany(
        "INSERT INTO task (owner_id, title) VALUES (1, ?)",
        [(str(n),) for n in range(101)],
    )
    assert len(client.get("/tasks", headers=auth).json()) == 100


def test_patch_changes_only_the_fields_sent(client, auth):
    task = add_task(client, auth, title="t", description="d", due_date="2026-12-01")
    response = client.patch(f"/tasks/{task['id']}", json={"done": True}, headers=auth)
    assert response.status_code == 200
    assert response.json() == task | {"done": True}
    response = client.patch(
        f"/tasks/{task['id']}", json={"title": " new "}, headers=auth
    )
    assert response.json() == task | {"done": True, "title": "new"}


def test_patch_with_null_keeps_the_field_and_put_clears_it(client, auth):
    fields = {"title": "t", "description": "d", "done": True, "due_date": "2026-12-01"}
    task = add_task(client, auth, **fields)
    nulls = dict.fromkeys(fields)
    response = client.patch(f"/tasks/{task['id']}", json=nulls, headers=auth)
    assert (response.status_code, response.json()) == (200, task)
    cleared = {"title": "t", "description": None, "due_date": None}
    response = client.put(f"/tasks/{task['id']}", json=cleared, headers=auth)
    assert response.json() == task | cleared | {"done": False}


def test_concurrent_patches_of_different_fields_keep_both(client, auth):
    tasks = [add_task(client, auth) for _ in range(20)]

    def patch(change):
        task, body = change
        return client.patch(f"/tasks/{task['id']}", json=body, headers=auth)

    changes = [(task, {"done": True}) for task in tasks]
    changes += [(task, {"description": "both"}) for task in tasks]
    with ThreadPoolExecutor(8) as pool:
        assert {r.status_code for r in pool.map(patch, changes)} == {200}
    for stored in client.get("/tasks", headers=auth).json():
        assert (stored["done"], stored["description"]) == (True, "both")


def test_put_replaces_the_whole_task(client, auth):
    task = add_task(client, auth, description="d", done=True, due_date="2026-12-01")
    response = client.put(f"/tasks/{task['id']}", json={"title": "fresh"}, headers=auth)
    assert response.status_code == 200
    assert response.json() == task | {
        "title": "fresh",
        "description": None,
        "done": False,
        "due_date": None,
    }


def test_put_with_every_field(client, auth):
    task = add_task(client, auth)
    fields = {"title": "t2", "description": "d", "done": True, "due_date": "2027-01-31"}
    response = client.put(f"/tasks/{task['id']}", json=fields, headers=auth)
    assert response.status_code == 200
    assert response.json() == task | fields


def test_put_requires_a_title(client, auth):
    task = add_task(client, auth)
    response = client.put(f"/tasks/{task['id']}", json={"done": True}, headers=auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", "title"]


def test_delete_task(client, auth):
    task = add_task(client, auth)
    response = client.delete(f"/tasks/{task['id']}", headers=auth)
    assert response.status_code == 204
    assert client.get(f"/tasks/{task['id']}", headers=auth).status_code == 404


def test_missing_task_is_404(client, auth):
    spec = client.get("/openapi.json").json()
    for method, path, operation in served_routes(spec):
        if "{task_id}" in path:
            request = request_for(spec, method, path, operation, task_id=1)
            response = client.request(**request, headers=auth)
            assert response.status_code == 404, (method, path, response.text)
            assert response.json() == {"detail": "Task not found"}


def test_the_largest_id_is_simply_not_found(client, auth):
    assert client.get(f"/tasks/{2**63 - 1}", headers=auth).status_code == 404


def test_a_task_added_as_its_owner_is_deleted_is_401(
    client, auth, database, monkeypatch
):
    user = client.get("/users/me", headers=auth).json()

    def owner_deleted_meanwhile():
        with sqlite3.connect(database) as other_request:
            other_request.execute("DELETE FROM user")
        return user

    overrides = app.dependency_overrides
    monkeypatch.setitem(overrides, todo_api.get_current_user, owner_deleted_meanwhile)
    response = client.post("/tasks", json={"title": "t"}, headers=auth)
    assert (response.status_code, response.json()) == (401, BAD_TOKEN)


def test_adding_tasks_while_the_account_is_deleted_never_fails(client, auth):
    def add(_):
        return client.post("/tasks", json={"title": "t"}, headers=auth).status_code

    with ThreadPoolExecutor(8) as pool:
        adds = [pool.submit(add, n) for n in range(40)]
        assert client.delete("/users/me", headers=auth).status_code == 204
        statuses = {added.result() for added in adds}
    assert statuses <= {201, 401}


# --- Routes: what /docs says each one answers --------------------------------


def test_openapi_states_the_password_rule_exactly(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    password = schemas["UserCreate"]["properties"]["password"]
    assert (password["minLength"], password["maxLength"]) == (15, 128)
    assert schemas["UserCreate"]["properties"]["email"]["format"] == "email"


def test_docs_are_served(client):
    assert "swagger-ui" in client.get("/docs").text


def test_docs_keep_the_authorisation_across_a_reload(client):
    assert '"persistAuthorization": true' in client.get("/docs").text


def test_openapi_names_operations_after_their_functions_and_tags_them(client):
    spec = client.get("/openapi.json").json()
    for route in iter_route_contexts(app.routes):
        if getattr(route, "include_in_schema", False):
            for method in route.methods:
                operation = spec["paths"][route.path_format][method.lower()]
                assert operation["operationId"] == route.endpoint.__name__
                assert len(operation["tags"]) == 1, route.path  # one group in /docs
    ids = [operation["operationId"] for _, _, operation in operations(client)]
    assert len(ids) == len(set(ids))  # a client generator needs them unique


def test_openapi_documents_the_login_as_it_is(client):
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert (
        schemes["OAuth2PasswordBearer"]["flows"]["password"]["tokenUrl"]
        == "/auth/token"
    )
    login = spec["paths"]["/auth/token"]["post"]
    [(body_type, body)] = login["requestBody"]["content"].items()
    assert body_type == "application/x-www-form-urlencoded"  # the form only
    form = spec["components"]["schemas"][body["schema"]["$ref"].split("/")[-1]]
    assert {"username", "password"} <= set(form["required"])
    token = spec["components"]["schemas"]["Token"]
    assert set(token["required"]) == {"access_token", "token_type", "expires_in"}
    assert "/tasks/" not in spec["paths"]


def test_openapi_types_match_what_the_code_accepts(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    update = schemas["TaskUpdate"]["properties"]
    # Each may be left out or sent as null.
    for field in ("title", "description", "done", "due_date"):
        assert {"type": "null"} in update[field]["anyOf"], field
    assert "required" not in schemas["TaskUpdate"]
    create = schemas["TaskCreate"]["properties"]
    assert create["done"] == {"type": "boolean", "title": "Done", "default": False}
    assert {"type": "string", "format": "date"} in create["due_date"]["anyOf"]
    assert (create["title"]["minLength"], create["title"]["maxLength"]) == (1, 200)


@pytest.mark.parametrize("top_level", ["arpa", "invalid", "local", "onion", "test"])
def test_special_use_email_domains_are_refused(client, top_level):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    email = schemas["UserCreate"]["properties"]["email"]
    assert (email["format"], email["maxLength"]) == ("email", 254)
    refused = f"ada@example.{top_level}"
    response = client.post(
        "/auth/register", json={"email": refused, "password": PASSWORD}
    )
    assert response.status_code == 422
    assert "special-use or reserved name" in response.json()["detail"][0]["msg"]


# The errors the README's Endpoints table lists for each operation, 422 included;
# a route added later is checked for its bodies only. Any route may also answer
# 400, 413 and 503.
LISTED_ERRORS = {
    "health": {503},
    "register": {409, 422},
    "login": {401, 422, 429},
    "logout": {401},
    "read_me": {401},
    "delete_me": {401},
    "list_tasks": {401, 422},
    "add_task": {401, 422},
    "read_task": {401, 404, 422},
    "edit_task": {401, 404, 422},
    "replace_task": {401, 404, 422},
    "delete_task": {401, 404, 422},
}
MESSAGE = {"$ref": "#/components/schemas/Message"}
HEADERS = {"201": "Location", "401": "WWW-Authenticate", "429": "Retry-After"}


def test_openapi_lists_every_error_of_every_route_with_its_body(client):
    message = client.get("/openapi.json").json()["components"]["schemas"]["Message"]
    assert message["properties"]["detail"]["type"] == "string"
    assert message["required"] == ["detail"]
    for method, path, operation in operations(client):
        answers = operation["responses"]
        errors = {int(status) for status in answers if int(status) >= 400}
        if operation["operationId"] in LISTED_ERRORS:  # a route of the README's table
            listed = LISTED_ERRORS[operation["operationId"]] | {400, 413, 503}
            assert errors == listed, (method, path)
        for status in errors:
            body = answers[str(status)]["content"]["application/json"]["schema"]
            if status == 422:
                assert body == {"$ref": "#/components/schemas/HTTPValidationError"}
            else:
                assert body == MESSAGE, (method, path, status)
        for status, name in HEADERS.items():
            if status in answers:
                assert answers[status]["headers"][name]["required"], (path, status)


def test_the_errors_any_route_gives_are_sent_as_declared(client, auth, database):
    spec = client.get("/openapi.json").json()
    declared = spec["paths"]["/tasks"]["post"]["responses"]
    chunks = (b"x" * 65536 for _ in range(2))  # no Content-Length: sent in chunks
    answers = [
        client.post("/tasks", content=b'{"title": "\xff"}', headers=auth | JSON),
        client.post("/tasks", content=b"x" * (MAX_BODY + 1), headers=auth | JSON),
        client.post("/tasks", content=chunks, headers=auth | JSON),
    ]
    database.write_bytes(b"this is not a database" * 1000)
    answers.append(client.post("/tasks", json={"title": "t"}, headers=auth))
    sent = [(r.status_code, r.headers["content-type"].split(";")[0]) for r in answers]
    assert sent == [
        (400, "application/json"),
        (413, "text/plain"),  # its declared length was over the limit
        (413, "application/json"),
        (503, "application/json"),
    ]
    for status, content_type in sent:
        assert content_type in declared[str(status)]["content"], status


def test_a_204_carries_no_body_and_no_content_type(client):
    for method, path, operation in operations(client):
        if "204" in operation["responses"]:
            headers = log_in(client, f"{operation['operationId']}@example.com")
            task = add_task(client, headers)
            url = path.format(task_id=task["id"])
            response = client.request(method, url, headers=headers)
            assert response.status_code == 204, (method, path)
            assert response.content == b"", (method, path)
            assert "content-type" not in response.headers, (method, path)


def test_every_tag_is_declared_with_a_description(client):
    tags = client.get("/openapi.json").json()["tags"]
    described = {tag["name"] for tag in tags if tag["description"]}
    for method, path, operation in operations(client):
        assert set(operation["tags"]) <= described, (method, path)


# --- The application: errors, startup, CORS ----------------------------------


def test_a_database_error_inside_a_route_is_503(monkeypatch, tmp_path, caplog):
    module = fresh_module(monkeypatch, tmp_path, APP_BCRYPT_ROUNDS="4")

    @module.app.get("/failing")
    def failing(db: module.DB) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with TestClient(module.app) as client:
        response = client.get("/failing")
        assert response.status_code == 503
        assert response.json() == {"detail": "Database unavailable"}
        assert module.app.state.pool.qsize() == 40  # the connection went back
    assert "Database error: disk I/O error" in caplog.text


def test_cors_preflight_for_an_authenticated_request(monkeypatch, tmp_path):
    module = fresh_module(
        monkeypatch,
        tmp_path,
        APP_CORS_ORIGINS='["https://app.example"]',
        APP_BCRYPT_ROUNDS="4",
    )
    preflight = {
        "Origin": "https://app.example",
        "Access-Control-Request-Method": "PATCH",
        "Access-Control-Request-Headers": "authorization, content-type",
    }
    with TestClient(module.app) as client:
        response = client.options("/tasks/1", headers=preflight)
        assert response.status_code == 200
        assert response.headers["access-control-allow-origin"] == "https://app.example"
        assert (
            client.options(
                "/tasks/1", headers=preflight | {"Origin": "https://evil.example"}
            ).status_code
            == 400
        )


def test_cors_exposes_location_and_retry_after(monkeypatch, tmp_path):
    module = fresh_module(
        monkeypatch,
        tmp_path,
        APP_CORS_ORIGINS='["https://app.example"]',
        APP_BCRYPT_ROUNDS="4",
    )
    with TestClient(module.app) as client:
        response = client.get("/health", headers={"Origin": "https://app.example"})
    exposed = response.headers["access-control-expose-headers"]
    assert {name.strip().lower() for name in exposed.split(",")} == {
        "location",
        "retry-after",
    }


def test_no_cors_headers_by_default(client):
    response = client.get("/health", headers={"Origin": "https://app.example"})
    assert not any(name.startswith("access-control") for name in response.headers)


def test_without_a_secret_key_one_is_generated_kept_and_announced(
    database, monkeypatch, caplog
):
    monkeypatch.setattr(settings, "secret_key", SecretStr(""))
    with TestClient(app) as client:
        headers = log_in(client)
    key = app.state.signing_key
    assert len(key.encode()) >= 32 and key != SECRET
    assert "APP_SECRET_KEY unset: using the key kept in the database" in caplog.text
    assert key not in caplog.text
    with TestClient(app) as client:  # a restart, or another worker
        assert client.get("/users/me", headers=headers).status_code == 200
    assert app.state.signing_key == key


def test_deleting_the_stored_key_ends_every_session(database, monkeypatch):
    monkeypatch.setattr(settings, "secret_key", SecretStr(""))
    with TestClient(app) as client:
        headers = log_in(client)
    with sqlite3.connect(database) as stored:
        stored.execute("DELETE FROM signing_key")
    with TestClient(app) as client:  # the next start makes a new key
        assert client.get("/users/me", headers=headers).json() == BAD_TOKEN
        assert token_headers(client)


@pytest.mark.parametrize("key", ["", SECRET], ids=["generated key", "key of its own"])
def test_the_database_files_are_private_to_their_owner(database, monkeypatch, key):
    monkeypatch.setattr(settings, "secret_key", SecretStr(key))
    usual_umask = os.umask(0o022)  # files anyone may read, unless the app says not
    try:
        with TestClient(app) as client:
            log_in(client)  # a write, so the -wal and -shm files exist
            files = [database, f"{database}-wal", f"{database}-shm"]
            assert [mode(name) for name in files] == [0o600] * 3
    finally:
        os.umask(usual_umask)


def test_an_existing_database_is_made_private_at_startup(database):
    with TestClient(app):
        pass
    os.chmod(database, 0o644)  # as SQLite makes it, for anyone to read
    with TestClient(app) as client:  # a restart
        assert client.get("/health").status_code == 200
        assert mode(database) == 0o600
        assert mode(f"{database}-wal") == 0o600


def test_with_a_key_of_its_own_the_database_holds_no_key(client, database):
    stored = sqlite3.connect(database).execute("SELECT count(*) FROM signing_key")
    assert stored.fetchone() == (0,)


def test_a_fresh_database_gets_the_schemas_version(client, database):
    version = sqlite3.connect(database).execute("PRAGMA user_version").fetchone()
    assert version == (todo_api.SCHEMA_VERSION,)  # what schema.sql sets


@pytest.mark.parametrize("version", [0, 1, 99], ids=["first", "older", "newer"])
def test_a_database_of_another_version_is_refused_and_left_as_it_was(database, version):
    other = sqlite3.connect(database)
    other.execute("CREATE TABLE user (id INTEGER PRIMARY KEY, email TEXT)")
    other.execute(f"PRAGMA user_version = {version}")
    other.commit()
    other.close()
    os.chmod(database, 0o664)
    before = database.read_bytes()
    with pytest.raises(RuntimeError) as error, TestClient(app):
        pass
    assert str(error.value) == (
        f"{database} has schema version {version}, not {todo_api.SCHEMA_VERSION}: "
        "move it away, and a new "
        "database is made at start."
    )
    assert database.read_bytes() == before  # its bytes, its mode, its journal mode
    assert mode(database) == 0o664
    journal = sqlite3.connect(database).execute("PRAGMA journal_mode").fetchone()
    assert journal == ("delete",)


def with_one_more_version(module):
    """Raise the app's schema version by one, with a step that adds a column."""
    version = module.SCHEMA_VERSION
    module.SCHEMA = module.SCHEMA.replace(
        f"PRAGMA user_version = {version};", f"PRAGMA user_version = {version + 1};"
    )
    module.SCHEMA_VERSION = version + 1
    step = "ALTER TABLE task ADD COLUMN mark INTEGER NOT NULL DEFAULT 0;"
    module.UPGRADES = module.UPGRADES | {version: step}


def start_on_each(upgrade):
    """In a child process: start and stop the app on each file named on stdin."""
    if upgrade:
        with_one_more_version(todo_api)
    for path in iter(sys.stdin.readline, ""):
        settings.database_path = path.strip()
        try:
            with TestClient(app):
                print("started", flush=True)
        except Exception as error:  # noqa: BLE001 (what stopped it is the answer)
            print(error, flush=True)


def start_two_at_once(paths, upgrade=False):
    """Start two processes on each file at the same moment; return what each said."""
    program = f"import test_todo_api; test_todo_api.start_on_each({upgrade})"
    workers = [
        subprocess.Popen(
            [sys.executable, "-c", program],
            cwd=HERE,
            env=server_environment() | {"APP_BCRYPT_ROUNDS": "4"},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    said = []
    for path in paths:
        for worker in workers:  # both wait on stdin: this line starts them together
            worker.stdin.write(f"{path}\n")
            worker.stdin.flush()
        said.append([worker.stdout.readline().strip() for worker in workers])
    for worker in workers:
        worker.communicate(timeout=30)  # closes its stdin: it stops
    return said


def add_account_and_tasks():
    """Fill the test's database: an account and three tasks; return the tasks."""
    with TestClient(app) as client:
        headers = log_in(client)
        return [add_task(client, headers, title=f"task {n}") for n in range(3)]


def hold_the_write_lock(database, seconds):
    """Take the file's write lock, as a worker creating the tables; let go later."""
    other = sqlite3.connect(database, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")
    threading.Timer(seconds, other.close).start()  # closing rolls back


def test_a_worker_starts_while_another_creates_the_tables(database):
    hold_the_write_lock(database, 0.3)
    with TestClient(app) as client:  # it waits its turn, then finds a new file
        assert client.get("/health").status_code == 200


def test_the_switch_to_wal_waits_for_another_workers_transaction(database):
    sqlite3.connect(database).close()  # a new file, in SQLite's default journal
    hold_the_write_lock(database, 0.3)  # SQLite refuses the switch at once: no wait
    todo_api.use_write_ahead_log(todo_api.connect())
    journal = sqlite3.connect(database).execute("PRAGMA journal_mode").fetchone()
    assert journal == ("wal",)


@pytest.fixture(scope="module")
def started_in_pairs(tmp_path_factory):
    """Start two workers at once on new files, files to upgrade, and a file of an
    unknown version, with one more schema version than today's and its step.

    Return each kind's files and what the two workers said on each.
    """
    folder = tmp_path_factory.mktemp("pairs")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(settings, "database_path", str(folder / "tasks.db"))
        patch.setattr(settings, "bcrypt_rounds", 4)
        tasks = add_account_and_tasks()
    files = {
        "new": [folder / f"new{n}.db" for n in range(12)],
        "to upgrade": [folder / f"upgrade{n}.db" for n in range(6)],
        "unknown": [folder / "unknown.db"],
    }
    for path in files["to upgrade"] + files["unknown"]:
        shutil.copy(folder / "tasks.db", path)
    with closing(sqlite3.connect(files["unknown"][0])) as unknown:
        unknown.execute("PRAGMA user_version = 99")
    before = files["unknown"][0].read_bytes()
    all_files = [path for paths in files.values() for path in paths]
    said = dict(zip(all_files, start_two_at_once(all_files, upgrade=True)))
    return files, said, tasks, before


def test_two_workers_starting_together_on_a_new_file_both_start(started_in_pairs):
    files, said, _, _ = started_in_pairs
    for path in files["new"]:
        assert said[path] == ["started", "started"]
        new = sqlite3.connect(path)
        assert new.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        version = new.execute("PRAGMA user_version").fetchone()
        assert version == (todo_api.SCHEMA_VERSION + 1,)  # the pair's schema


def test_an_upgrade_step_keeps_every_row_and_runs_once_with_two_workers(
    started_in_pairs,
):
    files, said, tasks, _ = started_in_pairs
    for path in files["to upgrade"]:  # had both applied the step, one would fail
        assert said[path] == ["started", "started"]
        upgraded = sqlite3.connect(path)
        upgraded.row_factory = sqlite3.Row
        version = upgraded.execute("PRAGMA user_version").fetchone()[0]
        assert version == todo_api.SCHEMA_VERSION + 1
        rows = upgraded.execute("SELECT * FROM task ORDER BY id").fetchall()
        assert [row["title"] for row in rows] == [task["title"] for task in tasks]
        assert [row["mark"] for row in rows] == [0, 0, 0]


def test_two_workers_on_a_file_of_an_unknown_version_both_refuse(started_in_pairs):
    files, said, _, before = started_in_pairs
    [unknown] = files["unknown"]
    refused = f"{unknown} has schema version 99, not {todo_api.SCHEMA_VERSION + 1}: "
    refused += "move it away, and a new database is made at start."
    assert said[unknown] == [refused, refused]
    assert unknown.read_bytes() == before


def test_the_server_exits_on_an_old_database_and_says_what_to_do(tmp_path):
    old = sqlite3.connect(tmp_path / "todo.db")
    old.execute("CREATE TABLE user (id INTEGER PRIMARY KEY, email TEXT)")
    old.commit()
    old.close()
    command = [sys.executable, "-m", "uvicorn", "todo_api:app", "--app-dir", str(HERE)]
    result = subprocess.run(
        command,
        check=False,
        cwd=tmp_path,
        env=server_environment() | {"APP_BCRYPT_ROUNDS": "4"},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode != 0
    refused = f"todo.db has schema version 0, not {todo_api.SCHEMA_VERSION}: move"
    assert refused in result.stderr


def test_no_422_echoes_what_was_sent(client, auth):
    spec = client.get("/openapi.json").json()
    task = add_task(client, auth)
    for method, path, operation in served_routes(spec):
        schema = body_schema(spec, operation)
        if schema is None:
            continue
        request = request_for(spec, method, path, operation, task["id"])
        json_or_form = "json" if "json" in request else "data"
        # Each field of the wrong type (a list; a form's are all text), and the
        # first required one missing: its problem's input would be the whole body.
        sent = {
            name: ["never echoed"] if json_or_form == "json" else "never echoed"
            for name in schema.get("properties", {})
        }
        sent.pop(next(iter(schema.get("required", [])), None), None)
        request[json_or_form] = sent
        response = client.request(**request, headers=auth)
        assert response.status_code == 422, (method, path, response.text)
        assert all("input" not in problem for problem in response.json()["detail"])
        assert "never echoed" not in response.text, (method, path)


def test_a_body_over_64_kib_is_413_on_every_route(client, auth):
    spec = client.get("/openapi.json").json()
    task = add_task(client, auth)
    body = b"x" * (MAX_BODY + 1)
    # Those that read a body first: the others (logout, the deletes) do their work.
    routes = sorted(
        served_routes(spec), key=lambda route: "requestBody" not in route[2]
    )
    for method, path, operation in routes:
        request = request_for(spec, method, path, operation, task["id"])
        url, query = request["url"], request["params"]
        for content_type in [
            "application/json",
            "application/x-www-form-urlencoded",
            "multipart/form-data; boundary=x",
            "text/plain",
        ]:
            headers = auth | {"content-type": content_type}
            response = client.request(
                method, url, params=query, content=body, headers=headers
            )
            assert response.status_code == 413, (method, path, content_type)
            assert response.text in (
                "Content Too Large",
                '{"detail":"Content Too Large"}',
            )
        if "requestBody" in operation:  # nothing changed
            stored = client.get(f"/tasks/{task['id']}", headers=auth)
            assert stored.json() == task, (method, path)


@pytest.mark.parametrize("path", ["/tasks/1", "/users/me"])
def test_a_delete_does_its_work_whatever_body_comes_with_it(client, auth, path):
    add_task(client, auth)
    body = b"x" * (MAX_BODY + 1)
    response = client.request("DELETE", path, content=body, headers=auth | JSON)
    # The route reads no body, so it does its work; FastAPI may still answer 413
    # for the declared length (no client of this API sends one).
    assert response.status_code in (204, 413)
    assert client.get("/tasks/1", headers=auth).status_code in (401, 404)


def test_a_body_of_64_kib_is_read(client, auth):
    body = json.dumps({"title": "x" * (MAX_BODY - 20)}).ljust(MAX_BODY).encode()
    assert len(body) == MAX_BODY
    response = client.post("/tasks", content=body, headers=auth | JSON)
    assert response.status_code == 422
    assert response.json()["detail"][0]["type"] == "string_too_long"


def test_a_chunked_body_is_refused_once_it_crosses_64_kib(client, auth):
    chunks = (b"x" * 65536 for _ in range(10))  # no Content-Length: sent in chunks
    response = client.post("/tasks", content=chunks, headers=auth | JSON)
    assert (response.status_code, response.json()) == (
        413,
        {"detail": "Content Too Large"},
    )


def test_a_declared_huge_body_is_refused_before_it_is_sent(tmp_path):
    with real_server(tmp_path, APP_BCRYPT_ROUNDS="4") as base_url:
        declared = ["Content-Type: application/json", "Content-Length: 500000000"]
        started = time.perf_counter()
        with raw_request(base_url, "POST", "/auth/register", declared) as connection:
            head, body = read_answer(connection)
        assert head.startswith(b"HTTP/1.1 413"), head
        assert body in (b"Content Too Large", b'{"detail":"Content Too Large"}')
        assert time.perf_counter() - started < 5
        chunked = ["Content-Type: application/json", "Transfer-Encoding: chunked"]
        with raw_request(base_url, "POST", "/auth/register", chunked) as connection:
            for _ in range(3):  # 192 KiB of an endless body, then we wait
                connection.sendall(b"10000\r\n" + b"x" * 0x10000 + b"\r\n")
            head, body = read_answer(connection)
        assert head.startswith(b"HTTP/1.1 413"), head
        assert body == b'{"detail":"Content Too Large"}'
        assert httpx2.get(f"{base_url}/health").status_code == 200


def test_no_key_and_no_password_reaches_a_log_line_or_an_answer(tmp_path):
    environment = {"APP_SECRET_KEY": SECRET, "APP_BCRYPT_ROUNDS": "4"}
    with real_server(tmp_path, "--log-level", "debug", **environment) as base_url:
        answers = []
        with httpx2.Client(base_url=base_url) as hostile_client:
            for body in [
                {"email": "ada@example.com", "password": PASSWORD},
                {"email": "ada@example.com", "password": PASSWORD},  # 409
                {"email": "not an email", "password": PASSWORD},
                {"password": PASSWORD},
                {"email": "bob@example.com", "password": PASSWORD[:14]},
            ]:
                answers.append(hostile_client.post("/auth/register", json=body))
            for form in [
                {"username": "ada@example.com", "password": PASSWORD + "!"},
                {"username": "not an email", "password": PASSWORD},
                {"password": PASSWORD},
            ]:
                answers.append(hostile_client.post("/auth/token", data=form))
            log_in_to(base_url, register_first=False)
    statuses = [answer.status_code for answer in answers]
    assert statuses == [201, 409, 422, 422, 422, 401, 401, 422]
    seen = (tmp_path / "server.log").read_text() + "".join(a.text for a in answers)
    assert "POST /auth/register" in seen  # the debug log was written
    for secret in (SECRET, PASSWORD, PASSWORD[:14], PASSWORD + "!"):
        assert secret not in seen

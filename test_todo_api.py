"""The Todo API's tests: every rule of the contract, asserted as a user sees it."""

import importlib.util
import json
import os
import re
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx2
import jwt
import pytest
from fastapi.testclient import TestClient

import todo_api
from todo_api import app, settings

SECRET = "test-secret-key-with-at-least-64-bytes-for-hs512-0123456789abcdef"
PASSWORD = "correct horse"
BAD_TOKEN = {"detail": "Could not validate credentials"}


@pytest.fixture
def database(tmp_path, monkeypatch):
    """Point the app at a fresh database file, with fast bcrypt, for one test."""
    path = tmp_path / "test.db"
    monkeypatch.setattr(settings, "database_path", str(path))
    monkeypatch.setattr(settings, "secret_key", SECRET)
    monkeypatch.setattr(settings, "bcrypt_rounds", 4)
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
    response = client.post(
        "/auth/token", data={"username": email, "password": password}
    )
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
        "sub": str(user_id),
        "iat": now,
        "exp": now + timedelta(minutes=5),
        **changes,
    }
    claims = {name: value for name, value in claims.items() if value is not None}
    return jwt.encode(claims, key, algorithm=algorithm)


def is_utc_timestamp(text):
    return datetime.fromisoformat(text).utcoffset() == timedelta(0) and re.search(
        r"(Z|\+00:00)$", text
    )


# --- Health ------------------------------------------------------------------


def test_health(client):
    assert client.get("/health").json() == {"status": "ok"}


def test_health_is_503_when_the_database_cannot_answer(client, database):
    database.write_bytes(b"this is not a database" * 1000)
    response = client.get("/health")
    assert response.status_code == 503
    assert response.json() == {"detail": "Database unavailable"}


def test_a_database_error_inside_a_route_is_503(monkeypatch, tmp_path, caplog):
    module = fresh_module(monkeypatch, tmp_path, APP_BCRYPT_ROUNDS="4")

    @module.app.get("/failing")
    def failing(db: module.DB) -> None:
        raise sqlite3.OperationalError("disk I/O error")

    with TestClient(module.app) as client:
        response = client.get("/failing")
        assert response.status_code == 503
        assert response.json() == {"detail": "Database unavailable"}
        assert len(module.pool) == 1  # the connection went back to the pool
    assert "Database error: disk I/O error" in caplog.text


def test_connections_are_reused_and_closed_on_shutdown(database):
    with TestClient(app) as client:
        headers = log_in(client)
        for _ in range(20):
            assert client.get("/tasks", headers=headers).status_code == 200
        assert len(todo_api.pool) == 1  # one request at a time needs one connection
        connection = todo_api.pool[0]
    assert todo_api.pool == []
    with pytest.raises(sqlite3.ProgrammingError):
        connection.execute("SELECT 1")


# --- Registration ------------------------------------------------------------


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


@pytest.mark.parametrize(
    "password",
    ["a" * 8, "a" * 72, "€" * 24, "€€€", "пароль12"],
    ids=[
        "8 ASCII",
        "72 ASCII",
        "24 euro signs are 72 bytes",
        "3 euro signs are 9 bytes",
        "cyrillic",
    ],
)
def test_register_accepts_8_to_72_bytes(client, password):
    register(client, password=password)
    assert (
        client.post(
            "/auth/token", data={"username": "ada@example.com", "password": password}
        ).status_code
        == 200
    )


@pytest.mark.parametrize(
    ("body", "location"),
    [
        ({"email": "ada@example.com", "password": "a" * 73}, "password"),
        (
            {"email": "ada@example.com", "password": "€" * 25},
            "password",
        ),  # 25 characters, 75 bytes
        ({"email": "ada@example.com", "password": "a" * 7}, "password"),
        ({"email": "ada@example.com"}, "password"),
        ({"email": "ada@example.com", "password": 12345678}, "password"),
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "ada@localhost", "password": PASSWORD}, "email"),
        ({"email": "a b@example.com", "password": PASSWORD}, "email"),
        ({"email": "a" * 250 + "@x.io", "password": PASSWORD}, "email"),
        ({"password": PASSWORD}, "email"),
    ],
)
def test_register_refuses_bad_input(client, body, location):
    response = client.post("/auth/register", json=body)
    assert response.status_code == 422
    assert [problem["loc"] for problem in response.json()["detail"]] == [
        ["body", location]
    ]


def test_password_rule_names_bytes(client):
    response = client.post(
        "/auth/register", json={"email": "ada@example.com", "password": "€" * 25}
    )
    assert "72 bytes" in response.json()["detail"][0]["msg"]


# --- Logging in --------------------------------------------------------------


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
    body = response.json()
    assert body["token_type"] == "bearer"
    assert body["expires_in"] == 30 * 60
    claims = jwt.decode(body["access_token"], SECRET, algorithms=["HS256"])
    assert claims["sub"] == str(user["id"])
    assert claims["exp"] - claims["iat"] == 30 * 60


@pytest.mark.parametrize(
    "body",
    [
        {"username": "ada@example.com", "password": PASSWORD},
        {"email": "ada@example.com", "password": PASSWORD},
        {
            "username": "ada@example.com",
            "email": "nobody@example.com",
            "password": PASSWORD,
        },
    ],
    ids=["username", "email", "username wins"],
)
def test_token_from_json(client, body):
    register(client)
    response = client.post("/auth/token", json=body)
    assert response.status_code == 200
    assert response.json()["token_type"] == "bearer"


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
        ("ada@example.com", ""),
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


JSON = {"content-type": "application/json"}


@pytest.mark.parametrize(
    ("request_arguments", "problem"),
    [
        ({"data": {"username": "ada@example.com"}}, ("missing", ["password"])),
        ({"data": {"password": PASSWORD}}, ("missing", ["username"])),
        ({"json": {"password": PASSWORD}}, ("missing", ["username"])),
        (
            {"json": {"email": "a@x.io", "password": 12345678}},
            ("string_type", ["password"]),
        ),
        ({"content": b"{not json", "headers": JSON}, ("json_invalid", [])),
        ({"json": ["ada@example.com", PASSWORD]}, ("model_type", [])),
    ],
)
def test_login_refuses_malformed_requests(client, request_arguments, problem):
    response = client.post("/auth/token", **request_arguments)
    assert response.status_code == 422
    first = response.json()["detail"][0]
    assert (first["type"], first["loc"]) == problem


# --- Tokens ------------------------------------------------------------------


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
        lambda user_id: token_for(user_id + 1),
        lambda user_id: token_for("abc"),
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
        "unknown user",
        "sub not an id",
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


# --- Deleting the account ----------------------------------------------------


def test_delete_me_deletes_the_user_and_its_tasks(client, auth, database):
    add_task(client, auth)
    response = client.delete("/users/me", headers=auth)
    assert response.status_code == 204
    assert response.content == b""
    stored = sqlite3.connect(database)
    assert stored.execute("SELECT count(*) FROM user").fetchone() == (0,)
    assert stored.execute("SELECT count(*) FROM task").fetchone() == (0,)
    assert client.get("/users/me", headers=auth).json() == BAD_TOKEN


def test_task_ids_are_never_reused(client, auth):
    first = add_task(client, auth)["id"]
    client.delete(f"/tasks/{first}", headers=auth)
    assert add_task(client, auth)["id"] == first + 1


def test_the_database_uses_write_ahead_logging(client, database):
    journal_mode = sqlite3.connect(database).execute("PRAGMA journal_mode").fetchone()
    assert journal_mode == ("wal",)


def test_a_deleted_users_token_stays_dead_after_someone_registers(client, auth):
    client.delete("/users/me", headers=auth)
    newcomer = register(client, "bob@example.com")
    assert newcomer["id"] != 1  # ids are never reused
    assert client.get("/tasks", headers=auth).status_code == 401


# --- Tasks -------------------------------------------------------------------


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
        ({"title": "x" * 201}, ["body", "title"]),
        ({"title": None}, ["body", "title"]),
        ({"title": 42}, ["body", "title"]),
        ({"title": "t", "description": "x" * 2001}, ["body", "description"]),
        ({"title": "t", "done": "yes"}, ["body", "done"]),
        ({"title": "t", "done": 1}, ["body", "done"]),
        ({"title": "t", "due_date": 0}, ["body", "due_date"]),
        ({"title": "t", "due_date": "86400"}, ["body", "due_date"]),
        ({"title": "t", "due_date": "2026-02-30"}, ["body", "due_date"]),
        ({"title": "t", "due_date": "2026-01-01T00:00:00"}, ["body", "due_date"]),
        ({"title": "t", "due_date": "01/02/2026"}, ["body", "due_date"]),
    ],
)
def test_create_task_refuses_bad_input(client, auth, body, location):
    response = client.post("/tasks", json=body, headers=auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == location


def test_create_task_accepts_the_longest_fields(client, auth):
    task = add_task(client, auth, title="x" * 200, description="y" * 2000)
    assert len(task["title"]) == 200 and len(task["description"]) == 2000


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


@pytest.mark.parametrize(
    "query", ["limit=0", "limit=101", "offset=-1", "done=maybe", "limit=x"]
)
def test_list_tasks_refuses_bad_queries(client, auth, query):
    response = client.get(f"/tasks?{query}", headers=auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "query"


def test_patch_changes_only_the_fields_sent(client, auth):
    task = add_task(client, auth, title="t", description="d", due_date="2026-12-01")
    response = client.patch(f"/tasks/{task['id']}", json={"done": True}, headers=auth)
    assert response.status_code == 200
    assert response.json() == task | {"done": True}
    response = client.patch(
        f"/tasks/{task['id']}", json={"title": " new "}, headers=auth
    )
    assert response.json() == task | {"done": True, "title": "new"}


def test_patch_with_null_clears_description_and_due_date(client, auth):
    task = add_task(client, auth, description="d", due_date="2026-12-01")
    response = client.patch(
        f"/tasks/{task['id']}",
        json={"description": None, "due_date": None},
        headers=auth,
    )
    assert response.json() == task | {"description": None, "due_date": None}


@pytest.mark.parametrize(
    "body",
    [{"title": None}, {"done": None}, {"title": ""}, {"done": "true"}, {"due_date": 5}],
)
def test_patch_refuses_bad_input(client, auth, body):
    task = add_task(client, auth)
    response = client.patch(f"/tasks/{task['id']}", json=body, headers=auth)
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"] == ["body", *body]
    assert client.get(f"/tasks/{task['id']}", headers=auth).json() == task


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


def test_a_title_counts_its_200_characters_as_sent(client, auth):
    response = client.post("/tasks", json={"title": " " + "x" * 200}, headers=auth)
    assert response.status_code == 422
    assert add_task(client, auth, title=" " + "x" * 199)["title"] == "x" * 199


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


# Every way to reach one task by its id, with a body where the method takes one.
BY_ID = [
    ("GET", None),
    ("PATCH", {"done": True}),
    ("PUT", {"title": "mine now"}),
    ("DELETE", None),
]


@pytest.mark.parametrize(("method", "body"), BY_ID)
def test_missing_task_is_404(client, auth, method, body):
    response = client.request(method, "/tasks/1", json=body, headers=auth)
    assert response.status_code == 404
    assert response.json() == {"detail": "Task not found"}


@pytest.mark.parametrize(("method", "body"), BY_ID)
def test_another_users_task_does_not_exist(client, auth, method, body):
    task = add_task(client, auth, title="Ada's")
    intruder = log_in(client, "eve@example.com")
    response = client.request(
        method, f"/tasks/{task['id']}", json=body, headers=intruder
    )
    assert response.status_code == 404
    assert response.json() == {"detail": "Task not found"}
    assert client.get("/tasks", headers=intruder).json() == []
    assert client.get(f"/tasks/{task['id']}", headers=auth).json() == task


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/tasks"),
        ("POST", "/tasks"),
        ("GET", "/tasks/1"),
        ("PATCH", "/tasks/1"),
        ("PUT", "/tasks/1"),
        ("DELETE", "/tasks/1"),
        ("GET", "/users/me"),
        ("DELETE", "/users/me"),
    ],
)
def test_every_private_route_needs_a_token(client, method, path):
    response = client.request(method, path, json={"title": "t"})
    assert response.status_code == 401
    assert response.json() == {"detail": "Not authenticated"}
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("method", "path"),
    [("PUT", "/tasks"), ("DELETE", "/health"), ("GET", "/auth/token")],
)
def test_known_path_with_another_method_is_405(client, method, path):
    response = client.request(method, path)
    assert response.status_code == 405
    assert response.json() == {"detail": "Method Not Allowed"}


# --- Documentation -----------------------------------------------------------


def test_docs_are_served(client):
    assert "swagger-ui" in client.get("/docs").text


def test_openapi_declares_the_password_flow_and_error_statuses(client):
    spec = client.get("/openapi.json").json()
    schemes = spec["components"]["securitySchemes"]
    assert (
        schemes["OAuth2PasswordBearer"]["flows"]["password"]["tokenUrl"]
        == "/auth/token"
    )
    paths = spec["paths"]
    assert set(paths["/auth/token"]["post"]["requestBody"]["content"]) == {
        "application/x-www-form-urlencoded",
        "application/json",
    }
    assert {"401", "422"} <= set(paths["/auth/token"]["post"]["responses"])
    assert "409" in paths["/auth/register"]["post"]["responses"]
    assert "503" in paths["/health"]["get"]["responses"]
    for method in ("get", "put", "patch", "delete"):
        assert {"401", "404"} <= set(paths["/tasks/{task_id}"][method]["responses"])
    assert "/tasks/" not in paths


def test_openapi_says_password_bytes_and_title_stripping(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    assert "72 bytes" in schemas["UserCreate"]["properties"]["password"]["description"]
    title = schemas["TaskCreate"]["properties"]["title"]
    assert (
        title["minLength"],
        title["maxLength"],
        "trimmed" in title["description"],
    ) == (1, 200, True)


def test_openapi_gives_every_error_a_body_shape(client):
    spec = client.get("/openapi.json").json()
    for path, operations in spec["paths"].items():
        for method, operation in operations.items():
            for status, response in operation["responses"].items():
                if status.startswith(("4", "5")):
                    assert response["content"]["application/json"]["schema"], (
                        method,
                        path,
                        status,
                    )
            assert {"400", "503"} <= set(operation["responses"]), (method, path)


def test_openapi_types_match_what_the_code_accepts(client):
    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    update = schemas["TaskUpdate"]["properties"]
    # May be left out, but never null: not documented as nullable.
    assert (update["title"]["type"], update["done"]["type"]) == ("string", "boolean")
    assert "default" not in update["title"] and "default" not in update["done"]
    create = schemas["TaskCreate"]["properties"]
    assert create["done"] == {"type": "boolean", "title": "Done", "default": False}
    assert {"type": "string", "format": "date"} in create["due_date"]["anyOf"]
    assert create["title"]["pattern"] == "\\S"  # not all white space


# --- Settings and startup ----------------------------------------------------


def fresh_module(monkeypatch, tmp_path, **environment):
    """Import todo_api anew in an empty folder with the given APP_* variables, as a server would."""
    monkeypatch.chdir(tmp_path)
    for name, value in environment.items():
        monkeypatch.setenv(name, value)
    spec = importlib.util.spec_from_file_location("todo_api_fresh", todo_api.__file__)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_defaults_need_no_environment(monkeypatch, tmp_path):
    module = fresh_module(monkeypatch, tmp_path)
    assert module.settings.model_dump() == {
        "database_path": "todo.db",
        "secret_key": "",
        "access_token_expire_minutes": 30,
        "bcrypt_rounds": 12,
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


@pytest.mark.parametrize(
    "origins",
    [
        "https://a.example, https://b.example",
        '["https://a.example", "https://b.example"]',
    ],
)
def test_cors_origins_as_a_list_or_comma_separated(monkeypatch, origins):
    monkeypatch.setenv("APP_CORS_ORIGINS", origins)
    assert todo_api.Settings(_env_file=None).cors_origins == [
        "https://a.example",
        "https://b.example",
    ]


def test_cors_preflight_for_an_authenticated_request(monkeypatch, tmp_path):
    module = fresh_module(
        monkeypatch,
        tmp_path,
        APP_CORS_ORIGINS="https://app.example",
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


def test_no_cors_headers_by_default(client):
    response = client.get("/health", headers={"Origin": "https://app.example"})
    assert not any(name.startswith("access-control") for name in response.headers)


@pytest.mark.parametrize(
    "key", ["short", "a" * 31, "€" * 10]
)  # 10 euro signs are 30 bytes
def test_a_short_secret_key_stops_startup(monkeypatch, key):
    monkeypatch.setenv("APP_SECRET_KEY", key)
    with pytest.raises(
        ValueError, match="APP_SECRET_KEY needs 32[+] bytes: openssl rand"
    ):
        todo_api.Settings(_env_file=None)


def test_a_32_byte_key_is_enough(monkeypatch):
    monkeypatch.setenv("APP_SECRET_KEY", "€" * 11)  # 11 characters, 33 bytes
    assert todo_api.Settings(_env_file=None).secret_key == "€" * 11


def test_without_a_secret_key_one_is_generated_kept_and_announced(
    database, monkeypatch, caplog
):
    monkeypatch.setattr(settings, "secret_key", "")
    with TestClient(app) as client:
        headers = log_in(client)
    key = settings.secret_key
    assert len(key.encode()) >= 32 and key != SECRET
    assert "APP_SECRET_KEY unset: using the key kept in the database" in caplog.text
    monkeypatch.setattr(settings, "secret_key", "")
    with TestClient(app) as client:  # a restart, or another worker
        assert client.get("/users/me", headers=headers).status_code == 200
    assert settings.secret_key == key


# --- Hostile input: a clear 4xx, never a 500, nothing lost --------------------

HUGE = 99999999999999999999  # beyond SQLite's 64-bit integers


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


def test_the_largest_id_is_simply_not_found(client, auth):
    assert client.get(f"/tasks/{2**63 - 1}", headers=auth).status_code == 404


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
        {"email": "ada@example.com", "password": "x" * 1_000_000},
        {"email": "ada@example.com\ud800", "password": PASSWORD},
        {"email": "ada@example.com", "password": "correct horse\ud800"},
        {"email": ["ada@example.com"], "password": PASSWORD},
        {"email": None, "password": None},
    ],
)
def test_hostile_registrations_are_422(client, body):
    # json.dumps writes a lone surrogate as the escape \ud800, as a hostile client would.
    response = client.post("/auth/register", content=json.dumps(body), headers=JSON)
    assert response.status_code == 422
    assert "detail" in response.json()


def test_a_one_megabyte_title_is_422(client, auth):
    response = client.post("/tasks", json={"title": "x" * 1_000_000}, headers=auth)
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


@pytest.mark.parametrize(
    ("form", "status", "detail"),
    [
        ({}, 422, "Field required"),
        ({"username": "ada@example.com"}, 422, "Field required"),
        ({"password": PASSWORD}, 422, "Field required"),
        ({"username": "", "password": ""}, 401, "Incorrect email or password"),
    ],
)
def test_form_logins_with_missing_fields_are_refused(client, form, status, detail):
    register(client)
    response = client.post("/auth/token", data=form)
    assert response.status_code == status
    body = response.json()["detail"]
    assert (body if status == 401 else body[0]["msg"]) == detail


@pytest.mark.parametrize(
    "form",
    [
        {"username": "a" * 1_000_000, "password": PASSWORD},
        {"username": "ada@example.com", "password": "p" * 1_000_000},
        {"username": "ada@example.com' OR '1'='1", "password": "' OR '1'='1"},
    ],
)
def test_form_logins_with_huge_or_hostile_fields_are_401(client, form):
    register(client)
    response = client.post("/auth/token", data=form)
    assert response.status_code == 401
    assert response.json() == {"detail": "Incorrect email or password"}


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


def signed(claims, key=SECRET):
    """Sign any claims, even ones PyJWT would refuse to encode, with HS256."""
    return jwt.api_jws.encode(json.dumps(claims).encode(), key, algorithm="HS256")


@pytest.mark.parametrize(
    "sub",
    [5, "5.0", " 5", "0", "-1", str(HUGE), "1e3", "", None],
    ids=[
        "not a string",
        "decimal",
        "space",
        "zero",
        "negative",
        "huge",
        "exponent",
        "empty",
        "null",
    ],
)
def test_a_sub_that_is_not_a_user_id_is_401(client, sub):
    register(client)
    claims = {"sub": sub, "exp": int(time.time()) + 300}
    response = client.get(
        "/users/me", headers={"Authorization": f"Bearer {signed(claims)}"}
    )
    assert response.status_code == 401
    assert response.json() == BAD_TOKEN


def test_a_signed_token_for_a_real_id_works(client):
    user_id = register(client)["id"]
    claims = {"sub": str(user_id), "exp": int(time.time()) + 300}
    assert (
        client.get(
            "/users/me", headers={"Authorization": f"Bearer {signed(claims)}"}
        ).status_code
        == 200
    )


# --- Races -------------------------------------------------------------------


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


def test_concurrent_writers_all_succeed(client, auth, database):
    def write(writer):
        return [
            client.post(
                "/tasks", json={"title": f"{writer}-{n}"}, headers=auth
            ).status_code
            for n in range(20)
        ]

    with ThreadPoolExecutor(16) as pool:
        statuses = [status for batch in pool.map(write, range(16)) for status in batch]
    assert statuses == [201] * 320
    assert sqlite3.connect(database).execute(
        "SELECT count(*) FROM task"
    ).fetchone() == (320,)


# --- A real server: workers, restarts, kill -9, hashing off the event loop ----

HERE = Path(__file__).parent


@contextmanager
def real_server(folder, *options, **environment):
    """Serve the app with uvicorn on a free loopback port; kill -9 it, workers and all, after."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {
        name: value for name, value in os.environ.items() if not name.startswith("APP_")
    }
    command = [sys.executable, "-m", "uvicorn", "todo_api:app", "--app-dir", str(HERE)]
    command += ["--port", str(port), "--log-level", "warning", *options]
    server = subprocess.Popen(
        command, cwd=folder, env=env | environment, start_new_session=True
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


def test_workers_share_one_database_and_one_generated_key(tmp_path):
    with real_server(tmp_path, "--workers", "3", APP_BCRYPT_ROUNDS="4") as base_url:
        headers = log_in_to(base_url)
        # A new connection each time, so the kernel hands them to every worker in turn.
        statuses = {
            httpx2.get(f"{base_url}/users/me", headers=headers).status_code
            for _ in range(30)
        }
        assert statuses == {200}

        def write(writer):
            with httpx2.Client(base_url=base_url, headers=headers) as worker_client:
                return [
                    worker_client.post(
                        "/tasks", json={"title": f"{writer}"}
                    ).status_code
                    for _ in range(10)
                ]

        with ThreadPoolExecutor(6) as pool:
            assert [s for batch in pool.map(write, range(6)) for s in batch] == [
                201
            ] * 60
    assert sqlite3.connect(tmp_path / "todo.db").execute(
        "SELECT count(*) FROM task"
    ).fetchone() == (60,)
    assert sqlite3.connect(tmp_path / "todo.db").execute(
        "SELECT count(*) FROM signing_key"
    ).fetchone() == (1,)


def test_tokens_survive_a_restart_without_a_secret_key(tmp_path):
    with real_server(tmp_path, APP_BCRYPT_ROUNDS="4") as base_url:
        headers = log_in_to(base_url)
    with real_server(tmp_path, APP_BCRYPT_ROUNDS="4") as base_url:
        assert httpx2.get(f"{base_url}/users/me", headers=headers).status_code == 200


def test_every_acknowledged_task_survives_kill_9(tmp_path):
    with real_server(tmp_path, APP_BCRYPT_ROUNDS="4") as base_url:
        headers = log_in_to(base_url)

        def write(writer):
            with httpx2.Client(base_url=base_url, headers=headers) as writer_client:
                responses = [
                    writer_client.post("/tasks", json={"title": f"{writer}-{n}"})
                    for n in range(25)
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
    assert len(acknowledged) == 100
    with real_server(tmp_path, APP_BCRYPT_ROUNDS="4") as base_url:
        tasks = httpx2.get(f"{base_url}/tasks?limit=100", headers=headers).json()
    assert sorted(task["id"] for task in tasks) == sorted(acknowledged)


def test_health_answers_promptly_while_logins_hash(tmp_path):
    with real_server(tmp_path, APP_BCRYPT_ROUNDS="13") as base_url:

        def slow_login(n):
            form = {"username": f"nobody{n}@example.com", "password": PASSWORD}
            return httpx2.post(
                f"{base_url}/auth/token", data=form, timeout=30
            ).status_code

        with ThreadPoolExecutor(4) as pool:
            logins = [pool.submit(slow_login, n) for n in range(4)]
            time.sleep(0.1)  # let the four hashes start
            latencies = []
            while not all(login.done() for login in logins):
                started = time.perf_counter()
                assert httpx2.get(f"{base_url}/health").status_code == 200
                latencies.append(time.perf_counter() - started)
                time.sleep(0.02)
        assert [login.result() for login in logins] == [401] * 4
    assert len(latencies) >= 5 and max(latencies) < 0.25, (
        f"/health latencies: {latencies}"
    )


def test_wrong_password_and_unknown_email_take_about_as_long(tmp_path):
    with real_server(tmp_path, APP_BCRYPT_ROUNDS="10") as base_url:
        log_in_to(base_url)
        timings = {"wrong password": [], "unknown email": []}
        with httpx2.Client(base_url=base_url) as timing_client:
            for _ in range(9):
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

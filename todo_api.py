"""A task manager's API in one module; serve it with `uvicorn todo_api:app`.

Read it top to bottom, in the order a request's data travels: settings, database,
passwords and tokens, login rate limit, current user, models, the errors declared for
/docs, routes, startup, and the app.
"""

import asyncio
import base64
import hmac
import logging
import math
import os
import pathlib
import re
import secrets
import sqlite3
import time
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing, suppress
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import bcrypt
import jwt
from email_validator import EmailNotValidError, validate_email
from fastapi import APIRouter, Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from pydantic import AfterValidator, BaseModel, Field, SecretStr, StrictBool
from pydantic_settings import BaseSettings, SettingsConfigDict

# uvicorn's general logger is named "uvicorn.error": ours show beside its messages.
logger = logging.getLogger("uvicorn.error")


# --- Settings ----------------------------------------------------------------
def long_enough(key: SecretStr) -> SecretStr:
    """Refuse a key short enough to guess: HS256 wants at least 32 bytes."""
    secret = key.get_secret_value()
    if secret and len(secret.encode()) < 32:
        raise ValueError("APP_SECRET_KEY needs 32+ bytes: openssl rand -hex 32")
    return key


def names_a_file(path: str) -> str:
    """Refuse a path that names no file: each connection would be its own database."""
    if path in ("", ":memory:"):
        raise ValueError(
            f"APP_DATABASE_PATH={path} gives each connection its own empty database:"
            " name a file, such as todo.db"
        )
    return path


class Settings(BaseSettings):
    """Every setting, from APP_* variables or a .env file in the working folder."""

    # hide_input_in_errors: a mistyped secret key is never printed back in an error.
    # dotenv_filtering="match_prefix": from .env only APP_ names are read, so another
    # program's POSTGRES_PASSWORD is ignored, and an APP_ name that is no setting
    # (a typo) is refused.
    model_config = SettingsConfigDict(
        env_prefix="APP_",
        env_file=".env",
        dotenv_filtering="match_prefix",
        hide_input_in_errors=True,
    )

    database_path: Annotated[str, AfterValidator(names_a_file)] = "todo.db"
    # Empty: a key is made and kept in the database (see signing_key).
    secret_key: Annotated[SecretStr, AfterValidator(long_enough)] = SecretStr("")
    access_token_expire_minutes: int = Field(30, ge=1, le=525_600)  # a year at most
    bcrypt_rounds: int = Field(12, ge=4, le=31)
    login_attempts: int = Field(10, ge=1)
    login_window_seconds: int = Field(900, ge=1)
    cors_origins: list[str] = []  # a JSON list: ["http://localhost:5173"]


settings = Settings()


# --- Database ----------------------------------------------------------------
# sqlite3 for a reader who knows an ORM:
# - Autocommit (isolation_level=None below): each statement is saved as it runs, so
#   no route calls commit(). Statements that must stand together follow a BEGIN
#   inside `with db:`, which COMMITs them at its end, or rolls them back on an
#   error (apply_schema, under Startup, does so). It does not close the connection.
# - A row comes back as a dict (row_as_dict); a route's return type validates it.
# - `?` and `:name` are placeholders: what a client sends is bound, never run as SQL.
# - RETURNING gives back the row a write touched; no row (None) means no match: 404.
# At startup, lifespan (at the end of the module) checks the file and applies
# schema.sql (see Startup), then opens app.state.pool: the connections that get_db
# lends to each request.
MAX_ID = 2**63 - 1  # SQLite's largest integer
# Column lists are constants that f-strings write into the SQL; what a client sends
# only ever goes through placeholders.
USER_COLUMNS = "id, email, created_at"


def row_as_dict(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    """Return each row as a dict, which the pydantic models read directly."""
    return {column[0]: value for column, value in zip(cursor.description, row)}


def connect() -> sqlite3.Connection:
    """Open the database with the settings every connection needs."""
    connection = sqlite3.connect(
        settings.database_path,
        timeout=30,  # a writer waits up to 30 s for another to finish, not fails
        isolation_level=None,  # autocommit: each statement is saved as it runs
        check_same_thread=False,  # lent to one thread at a time, not always the same
    )
    connection.row_factory = row_as_dict
    connection.execute("PRAGMA foreign_keys = ON")  # off by default; cascades deletes
    # Sync the disk at checkpoints, not at every commit: a crashed process loses
    # nothing, a power cut may lose the last commits (see the README's Limits).
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


# The pool: opening a connection costs far more than a query, so lifespan opens 40
# once. FastAPI runs `def` routes in 40 worker threads, so more could never all be
# in use at once.
MAX_CONNECTIONS = 40


async def get_db(request: Request) -> AsyncIterator[sqlite3.Connection]:
    """Lend a connection for one request; when all are lent, wait for one."""
    pool = request.app.state.pool  # an asyncio.Queue of connections, from lifespan
    connection = await pool.get()  # async: it waits on the event loop, not a thread
    try:
        yield connection
    finally:
        pool.put_nowait(connection)


# scope="function" (FastAPI's docs: Dependencies with yield): the connection comes
# back when the route returns, before the answer is sent, so a client that never
# reads its answer holds none. FastAPI calls a dependency once per request:
# get_current_user and the route share the one connection.
DB = Annotated[sqlite3.Connection, Depends(get_db, scope="function")]


# --- Passwords and tokens ----------------------------------------------------
# Before bcrypt sees a password, prehash() takes three steps:
# 1. NFKC: the same password typed on another keyboard becomes the same text.
# 2. HMAC-SHA256: 32 bytes, however long the password. bcrypt reads at most 72
#    bytes (bcrypt 5 refuses more), so now every character counts. The key is a
#    fixed label, no secret: it makes the digest no plain SHA-256, which another
#    site's leaked hashes could be tested against ("password shucking").
# 3. base64: 44 printable bytes, with no NUL byte to end bcrypt's input early.
PREHASH_KEY = b"todo-api password v1"


def prehash(password: str) -> bytes:
    """Reduce any password to 44 bytes, so every character counts in bcrypt."""
    text = unicodedata.normalize("NFKC", password)
    # surrogatepass: a lone surrogate, which a form may decode to, is no error, just
    # a wrong password (no account has one: a JSON body cannot carry it).
    digest = hmac.digest(PREHASH_KEY, text.encode(errors="surrogatepass"), "sha256")
    return base64.b64encode(digest)


def hash_password(password: str) -> bytes:
    """Hash a password with a fresh salt at the configured bcrypt cost."""
    return bcrypt.hashpw(prehash(password), bcrypt.gensalt(settings.bcrypt_rounds))


def verify_password(password: str, password_hash: bytes) -> bool:
    """Check a password against its hash."""
    return bcrypt.checkpw(prehash(password), password_hash)


# Checked for an unknown email, so that its 401 takes as long and reveals nothing.
DUMMY_HASH = hash_password("no account has this password")


async def password_check_slot() -> AsyncIterator[None]:
    """Hold a slot for as long as the route runs; it does nothing else."""
    yield


# A semaphore for bcrypt, which keeps a core busy for a quarter of a second: at most
# one check per core runs at once. Depends(max_concurrency=n) lets n requests hold
# this dependency and makes the others wait on the event loop (FastAPI's docs:
# Advanced Dependencies). A route's dependencies=[...] come before its parameters,
# so a login waiting for a slot holds no thread and no connection.
PASSWORD_CHECK = Depends(
    password_check_slot, scope="function", max_concurrency=os.cpu_count() or 1
)


def create_access_token(key: str, user_id: int, version: int) -> str:
    """Sign a token naming the user and its token version, valid for a while."""
    now = datetime.now(UTC)
    expires = now + timedelta(minutes=settings.access_token_expire_minutes)
    # JWT's registered claims: sub names the user (a string, as the standard asks),
    # iat and exp say when it was issued and when it expires; ver is our own.
    claims = {"sub": str(user_id), "ver": version, "iat": now, "exp": expires}
    return jwt.encode(claims, key, algorithm="HS256")


# --- Login rate limit --------------------------------------------------------
def count_login_attempt(db: sqlite3.Connection, email: str) -> None:
    """Count one password check for an email, or answer 429 once too many were made."""
    now = time.time()
    window = settings.login_window_seconds
    # A fixed window per email: it opens at the first check counted and lasts
    # login_window_seconds. This DELETE closes every window that has run out, so
    # logins for random emails cannot fill the table either.
    db.execute("DELETE FROM login_attempt WHERE window_start <= ?", (now - window,))
    # An "upsert": one statement, so concurrent attempts each get their own count.
    count_attempt = """
        INSERT INTO login_attempt (email, attempts, window_start)
        VALUES (?, 1, ?)
        ON CONFLICT (email) DO UPDATE SET attempts = attempts + 1
        RETURNING attempts, window_start
    """
    attempt = db.execute(count_attempt, (email, now)).fetchone()
    if attempt["attempts"] > settings.login_attempts:
        seconds_left = math.ceil(attempt["window_start"] + window - now)
        retry_after = {"Retry-After": str(max(1, seconds_left))}
        detail = "Too many failed logins; try again later"
        raise HTTPException(429, detail, headers=retry_after)


# --- The current user --------------------------------------------------------
# Reads `Authorization: Bearer <token>` (401 if none); /docs logs in at tokenUrl.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/auth/token")
BEARER = {"WWW-Authenticate": "Bearer"}


def invalid_token() -> HTTPException:
    """The one answer for every bad token, a revoked one included."""
    return HTTPException(401, "Could not validate credentials", headers=BEARER)


def get_current_user(
    token: Annotated[str, Depends(oauth2_scheme)], request: Request, db: DB
) -> dict:
    """Return the user a valid token names, unless it was revoked since."""
    key = request.app.state.signing_key  # signing_key()'s, kept by lifespan (below)
    try:
        # Naming the algorithm refuses "alg: none" and tokens signed any other way.
        options = {"require": ["exp", "sub", "ver"]}
        claims = jwt.decode(token, key, algorithms=["HS256"], options=options)
    except jwt.InvalidTokenError:  # a bad signature, expired, malformed, ...
        raise invalid_token() from None
    query = f"""
        SELECT {USER_COLUMNS}
        FROM user
        WHERE id = ? AND token_version = ?
    """
    user = db.execute(query, (int(claims["sub"]), claims["ver"])).fetchone()
    if user is None:  # deleted, or the token's version is an old one
        raise invalid_token()
    return user


CurrentUser = Annotated[dict, Depends(get_current_user)]


# --- Models ------------------------------------------------------------------
def normalize_email(address: str) -> str:
    """Give every spelling of an address one form: email-validator's, case-folded."""
    email = validate_email(address, check_deliverability=False)
    # casefold(), not lower(): ΝΙΚΟΣ and νικος are one name (final sigma).
    # NFC again: folding can leave a letter and its accent as two code points.
    local_part = unicodedata.normalize("NFC", email.local_part.casefold())
    return f"{local_part}@{email.domain}"  # the domain: IDNA's form, lower-case


def strip_title(title: str) -> str:
    """Trim a title, and refuse one that trimming leaves empty."""
    if not title.strip():
        raise ValueError("Title must not be blank")
    return title.strip()


# format: email only tells /docs; normalize_email does the checking.
EmailField = Field(max_length=254, json_schema_extra={"format": "email"})
Email = Annotated[str, EmailField, AfterValidator(normalize_email)]
Title = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(strip_title)]
Description = Annotated[str, Field(max_length=2000)]
TaskId = Annotated[int, Field(ge=1, le=MAX_ID)]  # larger would not fit in SQLite


class UserCreate(BaseModel):
    email: Email
    password: str = Field(min_length=15, max_length=128)


class User(BaseModel):
    id: int
    email: str
    created_at: datetime


class Token(BaseModel):
    access_token: str
    token_type: str
    expires_in: int


class TaskCreate(BaseModel):
    title: Title
    description: Description | None = None
    done: StrictBool = False  # true or false, not "yes" or 1
    due_date: date | None = None


class TaskUpdate(BaseModel):
    title: Title | None = None
    description: Description | None = None
    done: StrictBool | None = None
    due_date: date | None = None


class Task(BaseModel):
    id: int
    title: str
    description: str | None
    done: bool  # lax, unlike StrictBool: SQLite gives back 0 or 1
    due_date: date | None
    created_at: datetime


# Task's fields are the columns the task queries read. A new field needs its column
# in schema.sql with a new user_version, an upgrade step (UPGRADES) for files that
# lack it, the three models, and the SQL of add_task, edit_task and replace_task:
# the README's "Add a field, keeping your data" walks through all of it.
TASK_COLUMNS = ", ".join(Task.model_fields)


# --- Declared errors, for /docs ----------------------------------------------
# Every error a route can answer is declared (responses=), so that /docs shows it and
# a generated client types it. This shapes only /openapi.json: a first read may
# skip to the routes. Each JSON error but 422 is a Message.
class Message(BaseModel):
    detail: str


def header(description: str) -> dict:
    """Declare a header that every answer of one status carries."""
    return {"description": description, "required": True, "schema": {"type": "string"}}


def error(description: str, **more: Any) -> dict:
    """Declare an error answer: what it means, its {"detail": ...} body, and more."""
    return {"model": Message, "description": description, **more}


CREATED = {201: {"headers": {"Location": header("Where the new resource is")}}}
CHALLENGE = {"WWW-Authenticate": header("Bearer")}
UNAUTHORIZED = {401: error("No token, or a bad or revoked one", headers=CHALLENGE)}
WRONG_LOGIN = {401: error("Incorrect email or password", headers=CHALLENGE)}
NOT_FOUND = {404: error("Task not found")}
EMAIL_TAKEN = {409: error("Email already registered")}
RETRY_AFTER = {"Retry-After": header("Whole seconds until the window ends")}
TOO_MANY = {429: error("Too many failed logins", headers=RETRY_AFTER)}
# Any route may answer these, though no route raises them: FastAPI answers 400 for
# a body that is not UTF-8 and 413 for one over max_body_size (plain text when its
# declared length is over); 503 is database_unavailable's, or uvicorn's own (plain
# text) beyond --limit-concurrency.
PLAIN_TEXT = {"text/plain": {"schema": {"type": "string"}}}
ANY_ROUTE = {
    400: error("The body is not UTF-8"),
    413: error("The body is over 64 KiB", content=PLAIN_TEXT),
    503: error("The database cannot answer", content=PLAIN_TEXT),
}


# --- Routes ------------------------------------------------------------------
INCORRECT_LOGIN = "Incorrect email or password"

health_routes = APIRouter(tags=["health"])
auth_routes = APIRouter(prefix="/auth", tags=["auth"])
user_routes = APIRouter(prefix="/users/me", tags=["users"], responses=UNAUTHORIZED)
task_routes = APIRouter(prefix="/tasks", tags=["tasks"], responses=UNAUTHORIZED)


@health_routes.get("/health")
def health(db: DB) -> dict[str, str]:
    """Answer ok once the database has answered a real query."""
    db.execute("SELECT id FROM user LIMIT 1").fetchone()
    return {"status": "ok"}


@auth_routes.post(
    "/register",
    status_code=201,
    dependencies=[PASSWORD_CHECK],
    responses=CREATED | EMAIL_TAKEN,
)
def register(new_user: UserCreate, db: DB, response: Response) -> User:
    """Create an account; the email must be free, however it is spelled."""
    insert = f"""
        INSERT INTO user (email, password_hash)
        VALUES (?, ?)
        RETURNING {USER_COLUMNS}
    """
    password_hash = hash_password(new_user.password)
    try:
        user = db.execute(insert, (new_user.email, password_hash)).fetchone()
    except sqlite3.IntegrityError:  # the UNIQUE email: even two at once get one row
        raise HTTPException(409, "Email already registered") from None
    response.headers["Location"] = "/users/me"
    return user


@auth_routes.post(
    "/token", dependencies=[PASSWORD_CHECK], responses=WRONG_LOGIN | TOO_MANY
)
def login(
    form: Annotated[OAuth2PasswordRequestForm, Depends()],  # what Authorize sends
    db: DB,
    request: Request,
    response: Response,
) -> Token:
    """Trade an email (the form's username) and password for a bearer token."""
    try:
        email = normalize_email(form.username)
    except EmailNotValidError:  # no account can have it: nothing to check or count
        raise HTTPException(401, INCORRECT_LOGIN, headers=BEARER) from None
    count_login_attempt(db, email)
    # token_version is read before bcrypt: a logout while it runs revokes this token.
    query = """
        SELECT id, password_hash, token_version
        FROM user
        WHERE email = ?
    """
    user = db.execute(query, (email,)).fetchone()
    stored_hash = user["password_hash"] if user else DUMMY_HASH
    password_is_right = verify_password(form.password, stored_hash)
    if user is None or not password_is_right:
        raise HTTPException(401, INCORRECT_LOGIN, headers=BEARER)
    db.execute("DELETE FROM login_attempt WHERE email = ?", (email,))  # count cleared
    response.headers["Cache-Control"] = "no-store"  # no cache keeps it: RFC 6749 5.1
    key = request.app.state.signing_key
    return Token(
        access_token=create_access_token(key, user["id"], user["token_version"]),
        token_type="bearer",
        expires_in=settings.access_token_expire_minutes * 60,
    )


@auth_routes.post(
    "/logout", status_code=204, response_class=Response, responses=UNAUTHORIZED
)
def logout(user: CurrentUser, db: DB) -> None:
    """Log out everywhere: every token of the caller issued until now is refused."""
    revoke = """
        UPDATE user
        SET token_version = token_version + 1
        WHERE id = ?
    """
    db.execute(revoke, (user["id"],))


@user_routes.get("")
def read_me(user: CurrentUser) -> User:
    """Show the logged-in user."""
    return user


@user_routes.delete("", status_code=204, response_class=Response)
def delete_me(user: CurrentUser, db: DB) -> None:
    """Delete the account and, through the foreign key, all of its tasks."""
    db.execute("DELETE FROM user WHERE id = ?", (user["id"],))


# /tasks/ is served too, with no redirect, but left out of /docs.
@task_routes.get("")
@task_routes.get("/", include_in_schema=False)
def list_tasks(
    user: CurrentUser,
    db: DB,
    done: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> list[Task]:
    """List the caller's tasks, oldest first, optionally only done or open ones."""
    # coalesce(?, done): with no `done` asked for, each row matches its own value.
    query = f"""
        SELECT {TASK_COLUMNS}
        FROM task
        WHERE owner_id = ? AND done = coalesce(?, done)
        ORDER BY id
        LIMIT ? OFFSET ?
    """
    return db.execute(query, (user["id"], done, limit, offset)).fetchall()


@task_routes.post("", status_code=201, responses=CREATED)
@task_routes.post("/", status_code=201, include_in_schema=False)
def add_task(task: TaskCreate, user: CurrentUser, db: DB, response: Response) -> Task:
    """Add a task for the caller."""
    insert = f"""
        INSERT INTO task (owner_id, title, description, done, due_date)
        VALUES (:owner_id, :title, :description, :done, :due_date)
        RETURNING {TASK_COLUMNS}
    """
    # mode="json" writes the due date as YYYY-MM-DD text, as schema.sql stores it.
    values = task.model_dump(mode="json") | {"owner_id": user["id"]}
    try:
        created = db.execute(insert, values).fetchone()
    except sqlite3.IntegrityError:  # the foreign key: the owner was just deleted
        raise invalid_token() from None
    response.headers["Location"] = f"/tasks/{created['id']}"
    return created


def found(task: dict | None) -> dict:
    """Return the task a query found; none means it is not one of the caller's."""
    if task is None:
        raise HTTPException(404, "Task not found")
    return task


@task_routes.get("/{task_id}", responses=NOT_FOUND)
def read_task(task_id: TaskId, user: CurrentUser, db: DB) -> Task:
    """Show one of the caller's tasks; another user's task does not exist for them."""
    query = f"""
        SELECT {TASK_COLUMNS}
        FROM task
        WHERE id = ? AND owner_id = ?
    """
    return found(db.execute(query, (task_id, user["id"])).fetchone())


@task_routes.patch("/{task_id}", responses=NOT_FOUND)
def edit_task(task_id: TaskId, changes: TaskUpdate, user: CurrentUser, db: DB) -> Task:
    """Change the fields sent with a value; the others keep theirs."""
    # coalesce(:title, title): a null (left out, or sent) keeps the stored value,
    # so a PATCH cannot clear a description or a due date; a PUT does.
    # One statement, so two PATCHes at once cannot undo each other's fields.
    update = f"""
        UPDATE task
        SET title = coalesce(:title, title),
            description = coalesce(:description, description),
            done = coalesce(:done, done),
            due_date = coalesce(:due_date, due_date)
        WHERE id = :id AND owner_id = :owner_id
        RETURNING {TASK_COLUMNS}
    """
    values = changes.model_dump(mode="json") | {"id": task_id, "owner_id": user["id"]}
    return found(db.execute(update, values).fetchone())


@task_routes.put("/{task_id}", responses=NOT_FOUND)
def replace_task(task_id: TaskId, task: TaskCreate, user: CurrentUser, db: DB) -> Task:
    """Replace a task: fields left out go back to their defaults."""
    update = f"""
        UPDATE task
        SET title = :title, description = :description, done = :done,
            due_date = :due_date
        WHERE id = :id AND owner_id = :owner_id
        RETURNING {TASK_COLUMNS}
    """
    values = task.model_dump(mode="json") | {"id": task_id, "owner_id": user["id"]}
    return found(db.execute(update, values).fetchone())


@task_routes.delete(
    "/{task_id}", status_code=204, response_class=Response, responses=NOT_FOUND
)
def delete_task(task_id: TaskId, user: CurrentUser, db: DB) -> None:
    """Delete one of the caller's tasks."""
    delete = """
        DELETE FROM task
        WHERE id = ? AND owner_id = ?
        RETURNING id
    """
    found(db.execute(delete, (task_id, user["id"])).fetchone())


# --- Startup: the database file and the signing key --------------------------
# lifespan (below) runs these once, before the first request; a first read may skim
# them and come back when it adds a field.
SCHEMA = pathlib.Path(__file__).with_name("schema.sql").read_text()
SCHEMA_VERSION = int(re.search(r"PRAGMA user_version = ([0-9]+)", SCHEMA)[1])
# Upgrade steps: UPGRADES[n] is the SQL that brings a file of version n to n + 1,
# keeping its rows. None is needed yet: the README's "Add a field, keeping your
# data" writes one. (Version 1 files stay refused: their hashes cannot be converted.)
UPGRADES: dict[int, str] = {}


def run_script(db: sqlite3.Connection, script: str) -> None:
    """Run an SQL script's statements one by one, inside the open transaction."""
    # Not executescript(): it would COMMIT first, ending the transaction.
    statement = ""
    for line in script.splitlines(keepends=True):
        statement += line
        if sqlite3.complete_statement(statement):  # a `;` outside quotes, comments
            db.execute(statement)
            statement = ""


def apply_schema(db: sqlite3.Connection) -> None:
    """Create the tables in a new file, upgrade an older one, refuse any other."""
    with db:
        db.execute("BEGIN IMMEDIATE")  # worker processes starting at once take turns
        version = db.execute("PRAGMA user_version").fetchone()["user_version"]
        tables = db.execute("SELECT count(*) AS count FROM sqlite_master").fetchone()
        is_new = tables["count"] == 0
        while not is_new and version in UPGRADES:  # an older file: each step in turn
            run_script(db, UPGRADES[version])
            version += 1
        if not is_new and version != SCHEMA_VERSION:  # rolled back: left as it was
            raise RuntimeError(
                f"{settings.database_path} has schema version {version}, not "
                f"{SCHEMA_VERSION}: move it away, and a new database is made at start."
            )
        # Create what is missing (IF NOT EXISTS); its last line sets user_version.
        run_script(db, SCHEMA)


def make_private(path: str) -> None:
    """Let only the owner read the database files: they hold every password hash."""
    # SQLite gives a new -wal or -shm file the main file's mode; an old one may differ.
    for name in (path, f"{path}-wal", f"{path}-shm"):
        with suppress(FileNotFoundError):
            os.chmod(name, 0o600)


def use_write_ahead_log(db: sqlite3.Connection) -> None:
    """Switch the file to WAL, where readers never wait for a writer; it stays so."""
    for _ in range(100):
        try:
            db.execute("PRAGMA journal_mode = WAL")
            return
        except sqlite3.OperationalError:  # "locked": a worker process beside us
            # SQLite answers this switch at once, not after the busy timeout (waiting
            # could deadlock), so wait a moment and try again.
            time.sleep(0.05)
    raise RuntimeError(f"{settings.database_path} stayed locked: is it in use?")


def signing_key(db: sqlite3.Connection) -> str:
    """Return APP_SECRET_KEY, or else the key kept in the database (at startup)."""
    key = settings.secret_key.get_secret_value()
    if key:
        return key
    # The first worker process ever to start stores its key; every other reads it.
    insert = "INSERT OR IGNORE INTO signing_key (id, secret) VALUES (1, ?)"
    db.execute(insert, (secrets.token_urlsafe(32),))
    logger.warning("APP_SECRET_KEY unset: using the key kept in the database")
    return db.execute("SELECT secret FROM signing_key").fetchone()["secret"]


# --- The application ---------------------------------------------------------
async def invalid_request(request: Request, error: RequestValidationError) -> Response:
    """Answer 422 as FastAPI does, without echoing the input: it may be a password."""
    problems = [
        {name: value for name, value in problem.items() if name != "input"}
        for problem in error.errors()
    ]
    return JSONResponse({"detail": jsonable_encoder(problems)}, 422)


async def database_unavailable(request: Request, error: sqlite3.Error) -> Response:
    """Answer 503, not 500, when SQLite cannot answer: a broken file, a full disk."""
    logger.error("Database error: %s", error, exc_info=error)
    return JSONResponse({"detail": "Database unavailable"}, 503)


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Prepare the database and the signing key, fill the pool, serve, then close."""
    # Blocking calls are fine here: no request is served until this yields.
    path = settings.database_path
    os.close(os.open(path, os.O_CREAT, 0o600))  # a new file is private from the start
    with closing(connect()) as db:  # `with db` alone would commit, but not close
        apply_schema(db)  # first: a file it refuses is left exactly as it was
        make_private(path)
        use_write_ahead_log(db)
        app.state.signing_key = signing_key(db)
    app.state.pool = asyncio.Queue()
    for _ in range(MAX_CONNECTIONS):
        app.state.pool.put_nowait(connect())
    yield
    while not app.state.pool.empty():
        app.state.pool.get_nowait().close()


app = FastAPI(
    title="Todo API",
    lifespan=lifespan,
    # FastAPI's own limit (its docs: Request Body Limits): 413 once a body crosses
    # 64 KiB, as it is read, so a huge body never fills the memory.
    max_body_size=64 * 1024,
    exception_handlers={
        RequestValidationError: invalid_request,
        sqlite3.Error: database_unavailable,
    },
    responses=ANY_ROUTE,
    generate_unique_id_function=lambda route: route.name,  # operationId: the function
    openapi_tags=[  # /docs groups the routes under these, in this order
        {"name": "auth", "description": "Register, log in for a token, log out."},
        {"name": "users", "description": "The logged-in user's account."},
        {"name": "tasks", "description": "The logged-in user's tasks."},
        {"name": "health", "description": "Whether the database answers."},
    ],
    swagger_ui_parameters={"persistAuthorization": True},  # stay logged in on reload
)
for routes in (health_routes, auth_routes, user_routes, task_routes):
    app.include_router(routes)
if settings.cors_origins:
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
        expose_headers=["Location", "Retry-After"],
    )

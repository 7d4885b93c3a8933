"""A task manager's API in one module; serve it with `uvicorn todo_api:app`.

Three ideas carry it:
- Blocking work never runs on the event loop. Plain `def` routes run in threads and
  borrow a pooled SQLite connection; bcrypt runs on at most one thread per CPU core,
  with a connection of its own, so a burst of logins cannot starve the other routes.
- A token names a user and the user's token_version. Logging out or changing the
  password raises the version, which revokes every older token at once.
- Each password check is counted per email in the database before bcrypt runs, so
  guessing is limited across workers and restarts.

It reads in the order its data travels: settings, the database, passwords and
tokens, the login rate limit, the current user, the models, what the routes answer,
the routes (each with the work it hands to a thread right below it), what the routes
share, and the app. Two things a first read may skip:
- "What the routes answer", every name ending in _DOCS and the response_model,
  openapi_extra and include_in_schema arguments: they only shape /docs.
- Comments that start with "Edge case:": each says why odd or hostile input (a lone
  surrogate, a huge number) cannot hurt, and a test pins it.

Five things FastAPI does that the code relies on:
- It runs a plain `def` route or dependency in a worker thread, an `async def` one
  on the event loop.
- `Annotated[T, Depends(f)]` in a signature means "call f for this request and
  pass its result"; each f runs once per request, however many ask for it.
- A dependency that yields runs up to the yield before the route, the rest after.
- A route's return annotation is its response model: what it returns is checked
  and written as that model, so a field the model lacks never leaves the server.
  (A route that returns a Response itself skips this: list_tasks does, for speed.)
- A `response: Response` parameter lets a route set headers on its answer.
"""

import base64
import functools
import hmac
import json
import logging
import math
import os
import pathlib
import re
import secrets
import sqlite3
import time
import unicodedata
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager, closing, suppress
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import bcrypt
import jwt
from anyio import CapacityLimiter, Semaphore, to_thread
from email_validator import SPECIAL_USE_DOMAIN_NAMES, EmailNotValidError, validate_email
from fastapi import (
    APIRouter,
    Depends,
    FastAPI,
    HTTPException,
    Path,
    Query,
    Request,
    Response,
)
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordBearer
from pydantic import (
    AfterValidator,
    AliasChoices,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    StrictBool,
    TypeAdapter,
    ValidationError,
    field_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

# uvicorn's general logger is named "uvicorn.error": ours show beside its messages.
logger = logging.getLogger("uvicorn.error")


# --- Settings ----------------------------------------------------------------
class Settings(BaseSettings):
    """Every setting, from APP_* variables or a .env file in the working folder."""

    # hide_input_in_errors: a mistyped secret key is never printed back in the error.
    model_config = SettingsConfigDict(
        env_prefix="APP_", env_file=".env", hide_input_in_errors=True
    )

    database_path: str = "todo.db"
    # Empty: lifespan makes one at startup and keeps it in the signing_key table.
    secret_key: SecretStr = SecretStr("")
    access_token_expire_minutes: int = Field(30, ge=1, le=525_600)  # a year at most
    bcrypt_rounds: int = Field(12, ge=4, le=31)
    login_attempts: int = Field(10, ge=1)
    login_window_seconds: int = Field(900, ge=1)
    # pydantic-settings would parse a list setting as JSON only; NoDecode passes the
    # text as it is to split_origins, which reads a JSON list or "a,b".
    cors_origins: Annotated[list[str], NoDecode] = []

    @field_validator("secret_key")
    @classmethod
    def long_enough(cls, key: SecretStr) -> SecretStr:
        """Refuse a key short enough to guess: HS256 wants at least 32 bytes."""
        secret = key.get_secret_value()
        if secret and len(secret.encode()) < 32:
            raise ValueError("APP_SECRET_KEY needs 32+ bytes: openssl rand -hex 32")
        return key

    @field_validator("cors_origins", mode="before")
    @classmethod
    def split_origins(cls, origins: Any) -> Any:
        """Read origins as a JSON list or as comma-separated text."""
        if isinstance(origins, str) and origins.lstrip().startswith("["):
            return json.loads(origins)
        if isinstance(origins, str):
            return [origin.strip() for origin in origins.split(",") if origin.strip()]
        return origins


settings = Settings()


# --- Database ----------------------------------------------------------------
SCHEMA = pathlib.Path(__file__).with_name("schema.sql").read_text()
# The version schema.sql gives a database, read from the file so the two agree.
SCHEMA_VERSION = int(re.search(r"PRAGMA user_version = ([0-9]+)", SCHEMA)[1])
MAX_CONNECTIONS = 40  # the threads AnyIO runs sync routes on: more could not be used
MAX_ID = 2**63 - 1  # SQLite's largest integer: sqlite3 fails on a larger one

# The columns a user shows, and the ones a password check needs. Like every column
# list here, they are constants written into the SQL; values only go through `?`.
USER_COLUMNS = "id, email, created_at"
LOGIN_COLUMNS = "id, email, password_hash, token_version"

# Dates are stored as ISO text by our own adapter (sqlite3's own are deprecated), and
# come back as text, which the pydantic models read.
sqlite3.register_adapter(date, date.isoformat)


def row_as_dict(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    """Return each row as a dict, which the pydantic models read directly."""
    names = [column[0] for column in cursor.description]
    return dict(zip(names, row))


def connect() -> sqlite3.Connection:
    """Open the database with the settings every connection needs."""
    connection = sqlite3.connect(
        settings.database_path,
        timeout=30,  # a writer waits its turn, up to 30 s, instead of failing as locked
        isolation_level=None,  # autocommit: each statement is committed as it finishes
        check_same_thread=False,  # FastAPI may run a request's steps on other threads
    )
    connection.row_factory = row_as_dict
    connection.execute("PRAGMA foreign_keys = ON")  # off by default; cascades deletes
    connection.execute("PRAGMA journal_mode = WAL")  # readers never wait for writers
    # A crash of the process loses no commit; a power cut may lose the last ones
    # (the README's Limits say how to close that).
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


# The pool. For each request get_db (1) waits for one of 40 slots, one per worker
# thread; (2) reuses an idle connection or opens one; (3) lends it to the route and
# its CurrentUser, as FastAPI calls get_db once per request; (4) rolls back anything
# left unfinished and keeps it for the next request. Step 4 may run after the answer
# is sent, so nothing is committed there: every write commits as it runs
# (autocommit, see connect). get_db is async, so it runs on the event loop, one step
# at a time, and the list needs no lock. The three bcrypt routes do not use the
# pool: their work opens a connection of its own.
idle_connections: list[sqlite3.Connection] = []
# fast_acquire: a free slot is taken without first yielding to other tasks.
connection_slots = Semaphore(MAX_CONNECTIONS, fast_acquire=True)


async def get_db() -> AsyncIterator[sqlite3.Connection]:
    """Lend a connection for one request; when all are lent, wait for one."""
    async with connection_slots:
        if idle_connections:
            connection = idle_connections.pop()
        else:
            connection = await to_thread.run_sync(connect)
        try:
            yield connection
        finally:
            if connection.in_transaction:  # never hand on an unfinished transaction
                connection.rollback()
            idle_connections.append(connection)


DB = Annotated[sqlite3.Connection, Depends(get_db)]


# --- Passwords and tokens ----------------------------------------------------
# Not a secret: it only makes our prehash differ from a plain SHA-256, so unsalted
# hashes leaked by other sites cannot be tested against ours ("hash shucking").
PREHASH_KEY = b"todo-api password v1"
if hasattr(os, "sched_getaffinity"):
    CPU_CORES = len(os.sched_getaffinity(0))  # the cores this process may use
else:
    CPU_CORES = os.cpu_count() or 1
# bcrypt runs at most once per core (to_thread takes a CapacityLimiter for this).
# Work waiting for a core holds no thread and no connection; work that runs opens one.
password_slots = CapacityLimiter(CPU_CORES)


def normalize_email(address: str) -> str:
    """Give every spelling of an address one form: email-validator's, lower-cased."""
    return validate_email(address, check_deliverability=False).normalized.lower()


def prehash(password: str) -> bytes:
    """Reduce any password to 44 bytes: bcrypt 5 refuses over 72, and nothing is cut."""
    # NFKC: the same password typed on another keyboard is the same password.
    text = unicodedata.normalize("NFKC", password)
    # Edge case: surrogatepass hashes even a lone surrogate, which UTF-8 cannot
    # encode and a form login can carry, instead of failing with a 500.
    digest = hmac.digest(PREHASH_KEY, text.encode(errors="surrogatepass"), "sha256")
    # Edge case: 44 printable bytes, as some bcrypt libraries stop at a NUL byte.
    return base64.b64encode(digest)


def hash_password(password: str) -> bytes:
    """Hash a password with a fresh salt at the configured bcrypt cost."""
    return bcrypt.hashpw(prehash(password), bcrypt.gensalt(settings.bcrypt_rounds))


def verify_password(password: str, password_hash: bytes) -> bool:
    """Check a password against its hash."""
    return bcrypt.checkpw(prehash(password), password_hash)


@functools.cache
def dummy_hash(rounds: int) -> bytes:
    """A hash to check unknown emails against, so they take as long as known ones."""
    return bcrypt.hashpw(b"no account has this password", bcrypt.gensalt(rounds))


async def in_password_thread(work: Callable[..., Any], *args: Any) -> Any:
    """Run bcrypt work in a thread of its own once one of the cores is free."""
    return await to_thread.run_sync(work, *args, limiter=password_slots)


def create_access_token(key: str, user_id: int, version: int) -> str:
    """Sign a token naming the user and its token version, valid for a while."""
    now = datetime.now(UTC)
    expires = now + timedelta(minutes=settings.access_token_expire_minutes)
    # PyJWT wants `sub` as a string; `ver` is ours, checked by find_token_user.
    claims = {"sub": str(user_id), "ver": version, "iat": now, "exp": expires}
    return jwt.encode(claims, key, algorithm="HS256")


# --- Login rate limit --------------------------------------------------------
TOO_MANY_LOGINS = "Too many failed logins; try again later"


def count_login_attempt(db: sqlite3.Connection, email: str) -> None:
    """Count one password check for an email, or answer 429 once too many were made."""
    now = time.time()
    window = settings.login_window_seconds
    # A fixed window per email. Rows whose window has passed are deleted first: that
    # is what ends a window, and logins for random emails cannot fill the table.
    # Then one statement inserts a row (1 attempt, its window starting now) or adds 1
    # to the existing one, and returns the count: concurrent attempts each see their
    # own number.
    db.execute("DELETE FROM login_attempt WHERE window_start <= ?", (now - window,))
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
        raise HTTPException(429, TOO_MANY_LOGINS, headers=retry_after)


def clear_login_attempts(db: sqlite3.Connection, email: str) -> None:
    """Forget the counted checks of an email whose password was just right."""
    db.execute("DELETE FROM login_attempt WHERE email = ?", (email,))


# --- The current user --------------------------------------------------------
# Reads the token from `Authorization: Bearer ...` (401 if there is none), and tells
# /docs where its Authorize button logs in.
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/auth/token")
BearerToken = Annotated[str, Depends(oauth2_scheme)]
BEARER_HEADERS = {"WWW-Authenticate": "Bearer"}
INCORRECT_LOGIN = "Incorrect email or password"  # a wrong email and password alike


def invalid_token() -> HTTPException:
    """The one answer for every bad token, a revoked or a deleted user's included."""
    return HTTPException(401, "Could not validate credentials", headers=BEARER_HEADERS)


def read_token(token: str, key: str) -> tuple[int, int]:
    """Return the user id and token version a valid token names, or answer 401."""
    try:
        options = {"require": ["exp", "sub", "ver"]}
        # Naming the algorithm refuses "alg: none" and tokens signed any other way.
        claims = jwt.decode(token, key, algorithms=["HS256"], options=options)
        user_id, version = int(claims["sub"]), claims["ver"]
    except (jwt.InvalidTokenError, ValueError, TypeError):
        raise invalid_token() from None
    # Edge case: only a leaked key could sign a `ver` that is not a whole number in
    # SQLite's range, but sqlite3 would fail on it with a 500. type(), not isinstance():
    # a bool is an int too.
    if type(version) is not int:
        raise invalid_token()
    if not (0 < user_id <= MAX_ID and 0 <= version <= MAX_ID):
        raise invalid_token()
    return user_id, version


def find_token_user(
    db: sqlite3.Connection, user_id: int, version: int, columns: str
) -> dict:
    """Read the user a token names, or answer 401 if the token was revoked since."""
    query = f"""
        SELECT {columns}
        FROM user
        WHERE id = ? AND token_version = ?
    """
    user = db.execute(query, (user_id, version)).fetchone()
    if user is None:
        raise invalid_token()
    return user


def get_current_user(token: BearerToken, request: Request, db: DB) -> dict:
    """Return the user a valid, unrevoked token names."""
    # The key that lifespan (the last section) settled at startup.
    user_id, version = read_token(token, request.app.state.signing_key)
    return find_token_user(db, user_id, version, USER_COLUMNS)


CurrentUser = Annotated[dict, Depends(get_current_user)]


# --- Request and response models ---------------------------------------------
def iso_date_text(value: Any) -> Any:
    """Let through only YYYY-MM-DD text: lax pydantic would read 0 as 1970-01-01."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        return value
    raise ValueError("Input should be a date as a YYYY-MM-DD string")


# For /docs only (normalize_email does the checking): the field is an email, and one
# at a special-use domain (.test, ...) is refused.
SPECIAL_USE_DOCS = rf"\.({'|'.join(SPECIAL_USE_DOMAIN_NAMES)})$"
EMAIL_DOCS = {"format": "email", "not": {"pattern": SPECIAL_USE_DOCS}}
Email = Annotated[
    str,
    Field(max_length=254, json_schema_extra=EMAIL_DOCS),
    AfterValidator(normalize_email),
]
Password = Annotated[
    str, Field(min_length=15, max_length=128, description="Spaces, accents, emoji: all")
]


def strip_title(title: str) -> str:
    """Trim a title, and refuse one that trimming leaves empty."""
    # Edge case: Title's pattern (below) refuses "   ", but strip() also removes a
    # few characters that the pattern counts as visible, such as "\x1f".
    trimmed = title.strip()
    if not trimmed:
        raise ValueError("Title must not be blank")
    return trimmed


# At most 200 characters as sent, not blank, and stored trimmed.
Title = Annotated[
    str,
    Field(min_length=1, max_length=200, pattern=r"\S", description="Stored trimmed"),
    AfterValidator(strip_title),
]
Description = Annotated[str, Field(max_length=2000)]
DueDate = Annotated[date, BeforeValidator(iso_date_text)]
TaskId = Annotated[int, Path(ge=1, le=MAX_ID)]


class UserCreate(BaseModel):
    email: Email
    password: Password


class User(BaseModel):
    id: int
    email: str
    created_at: datetime


class Credentials(BaseModel):
    """A login: `username` is the email, which may also be sent as `email`."""

    username: str = Field(validation_alias=AliasChoices("username", "email"))
    password: str


class PasswordChange(BaseModel):
    current_password: str
    new_password: Password


class Token(BaseModel):
    access_token: str
    token_type: str
    expires_in: int


class TaskCreate(BaseModel):
    title: Title
    description: Description | None = None
    done: StrictBool = False
    due_date: DueDate | None = None


class TaskUpdate(BaseModel):
    """The fields to change; the ones left out keep their value."""

    # Left out and sent as null differ here; edit_task passes on only the fields sent
    # (exclude_unset). A new field takes one of the two patterns:
    # - title, done: `= None` only means "not sent", as pydantic never validates a
    #   default; a null that is sent fails the str or bool type: 422.
    # - description, due_date: `| None`, so a null that is sent clears them.
    title: Title = None
    done: StrictBool = None
    description: Description | None = None
    due_date: DueDate | None = None


class Task(BaseModel):
    id: int
    title: str
    description: str | None
    done: bool
    due_date: date | None
    created_at: datetime


# The task queries read exactly the fields Task shows: the list follows the model.
# To add a task field: a column in schema.sql, the field in TaskCreate, TaskUpdate
# and Task, then the INSERT in add_task and the UPDATE in update_task. Raise the
# user_version in schema.sql too: IF NOT EXISTS never adds a column to an existing
# file, and apply_schema then refuses older files (the README: Migrations).
TASK_COLUMNS = ", ".join(Task.model_fields)
TaskList = TypeAdapter(list[Task])  # list_tasks checks and writes its list with it


class Message(BaseModel):
    detail: str


# The media types of bodies: the login reads both, and every answer is JSON.
JSON = "application/json"
FORM = "application/x-www-form-urlencoded"


# --- What the routes answer: documentation for /docs only --------------------
# Nothing here changes what a route does: it tells /docs and generated clients what
# each route may answer besides success. A first read can skip to the routes.
STRING_SCHEMA = {"schema": {"type": "string"}}


def documented_error(description: str, *headers: str) -> dict:
    """Document an error answer: what it means, its `detail` body, its headers."""
    return {
        "model": Message,
        "description": description,
        "headers": dict.fromkeys(headers, STRING_SCHEMA),
    }


CREATED_DOCS = {201: {"headers": {"Location": STRING_SCHEMA}}}
UNAUTHORIZED_DOCS = {
    401: documented_error("No token, or a bad or revoked one", "WWW-Authenticate")
}
TOO_MANY_DOCS = {429: documented_error(TOO_MANY_LOGINS, "Retry-After")}
REGISTER_DOCS = CREATED_DOCS | {409: documented_error("Email already registered")}
PASSWORD_DOCS = {403: documented_error("Incorrect password")} | TOO_MANY_DOCS
NOT_FOUND_DOCS = {404: documented_error("Not one of the caller's tasks")}
# The login reads its own body (see read_credentials), so FastAPI cannot document
# the body, nor its 415 and 422; and FastAPI documents one body type per route.
VALIDATION_ERROR = {"schema": {"$ref": "#/components/schemas/HTTPValidationError"}}
LOGIN_DOCS = {
    401: documented_error(INCORRECT_LOGIN, "WWW-Authenticate"),
    415: documented_error("The body is neither JSON nor a form"),
    422: {"description": "Validation Error", "content": {JSON: VALIDATION_ERROR}},
} | TOO_MANY_DOCS
LOGIN_SCHEMA = {"schema": Credentials.model_json_schema()}
LOGIN_TYPES = {FORM: LOGIN_SCHEMA, JSON: LOGIN_SCHEMA}
LOGIN_BODY_DOCS = {"requestBody": {"required": True, "content": LOGIN_TYPES}}
# Any route may answer these, FastAPI the first two itself, and its 413 in plain text.
PLAIN_TEXT = {"content": {"text/plain": STRING_SCHEMA}}
APP_DOCS = {
    400: documented_error("The body is not valid UTF-8"),
    413: documented_error("The body is too large") | PLAIN_TEXT,
    503: documented_error("The database cannot answer"),
}


# --- Routes ------------------------------------------------------------------
# What several routes share (token_answer, find_task, update_task) follows them.
MAX_BODY_SIZE = 64 * 1024  # bytes: tasks and logins are small, and memory stays flat

health_routes = APIRouter(tags=["health"])
auth_routes = APIRouter(prefix="/auth", tags=["auth"])
user_routes = APIRouter(prefix="/users/me", tags=["users"], responses=UNAUTHORIZED_DOCS)
task_routes = APIRouter(prefix="/tasks", tags=["tasks"], responses=UNAUTHORIZED_DOCS)


async def refuse_large_body(request: Request) -> None:
    """Answer 413 before logout or a delete runs, if a body over the limit came."""
    # Edge case: the app's max_body_size (see `app` at the end) answers 413 as a body
    # is read, so a route that never reads its body needs this to answer it too.
    declared = request.headers.get("content-length", "")
    if declared.isdecimal() and int(declared) > MAX_BODY_SIZE:
        raise HTTPException(413, "Content Too Large")


REFUSE_LARGE_BODY = [Depends(refuse_large_body)]  # for a route's dependencies=


@health_routes.get("/health")
def health(db: DB) -> dict[str, str]:
    """Answer ok once the database has answered a real query."""
    db.execute("SELECT id FROM user LIMIT 1").fetchone()
    return {"status": "ok"}


@auth_routes.post("/register", status_code=201, responses=REGISTER_DOCS)
async def register(new_user: UserCreate, response: Response) -> User:
    """Create an account; the email must be free, however it is spelled."""
    user = await in_password_thread(create_account, new_user.email, new_user.password)
    response.headers["Location"] = "/users/me"
    return user


def create_account(email: str, password: str) -> dict:
    """Store a new account, or answer 409 if the email is taken, even in a race."""
    password_hash = hash_password(password)
    insert = f"""
        INSERT INTO user (email, password_hash)
        VALUES (?, ?)
        RETURNING {USER_COLUMNS}
    """
    # A connection of its own, opened in this bcrypt thread, as the other two do: a
    # pooled one would have been held while the request waited for a core.
    with closing(connect()) as db:
        try:
            return db.execute(insert, (email, password_hash)).fetchone()
        except sqlite3.IntegrityError:  # the UNIQUE email
            raise HTTPException(409, "Email already registered") from None


# FastAPI's OAuth2PasswordRequestForm would read a form only; this reads either.
async def read_credentials(request: Request) -> Credentials:
    """Read a login from the OAuth2 form or, for HTTPie and scripts, from JSON."""
    content_type = request.headers.get("content-type", "").split(";")[0].strip()
    try:
        if content_type.lower() == JSON:
            return Credentials.model_validate_json(await request.body())
        if content_type.lower() == FORM:
            return Credentials.model_validate(dict(await request.form()))
    except ValidationError as invalid:
        # Each problem's `loc` starts with "body", as FastAPI writes it for the others.
        problems = invalid.errors(include_url=False)
        body_problems = [{**each, "loc": ("body", *each["loc"])} for each in problems]
        raise RequestValidationError(body_problems) from None
    # Multipart would be spooled to disk, and a login has no file to send.
    raise HTTPException(415, f"Send the login as JSON or as {FORM}")


LoginBody = Annotated[Credentials, Depends(read_credentials)]


@auth_routes.post("/token", responses=LOGIN_DOCS, openapi_extra=LOGIN_BODY_DOCS)
async def login(credentials: LoginBody, request: Request, response: Response) -> Token:
    """Trade an email and password for a bearer token; guessing is rate-limited."""
    try:
        email = normalize_email(credentials.username)
    except EmailNotValidError:  # no account can have it: nothing to check or count
        raise HTTPException(401, INCORRECT_LOGIN, headers=BEARER_HEADERS) from None
    user = await in_password_thread(check_login, email, credentials.password)
    key = request.app.state.signing_key
    return token_answer(response, key, user["id"], user["token_version"])


def check_login(email: str, password: str) -> dict:
    """Count the attempt (429 once spent), then return the account if it is right."""
    # The token version is read in the same SELECT as the hash: if a logout happens
    # while bcrypt checks, the token made with this version is already revoked.
    query = f"""
        SELECT {LOGIN_COLUMNS}
        FROM user
        WHERE email = ?
    """
    with closing(connect()) as db:
        count_login_attempt(db, email)
        user = db.execute(query, (email,)).fetchone()
        if user:
            stored_hash = user["password_hash"]
        else:  # an unknown email is checked too, so that it takes as long
            stored_hash = dummy_hash(settings.bcrypt_rounds)
        password_is_right = verify_password(password, stored_hash)
        if user is None or not password_is_right:
            raise HTTPException(401, INCORRECT_LOGIN, headers=BEARER_HEADERS)
        clear_login_attempts(db, email)
        return user


@auth_routes.post(
    "/logout",
    status_code=204,
    responses=UNAUTHORIZED_DOCS,
    dependencies=REFUSE_LARGE_BODY,
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
async def read_me(user: CurrentUser) -> User:
    """Show the logged-in user."""
    return user


@user_routes.put("/password", responses=PASSWORD_DOCS)
async def change_password(
    change: PasswordChange, token: BearerToken, request: Request, response: Response
) -> Token:
    """Set a new password: every older token is refused, and a fresh one returned."""
    # No CurrentUser: its connection would be held while this waits for bcrypt.
    key = request.app.state.signing_key
    user_id, version = read_token(token, key)
    version = await in_password_thread(store_password, user_id, version, change)
    return token_answer(response, key, user_id, version)


def store_password(user_id: int, version: int, change: PasswordChange) -> int:
    """Check the current password, then store the new one and revoke older tokens."""
    # A compare-and-set: it writes only if the version is still the token's, so a
    # logout during the check makes this a 401 instead of a password change.
    update = """
        UPDATE user
        SET password_hash = ?, token_version = token_version + 1
        WHERE id = ? AND token_version = ?
        RETURNING token_version
    """
    with closing(connect()) as db:
        user = find_token_user(db, user_id, version, LOGIN_COLUMNS)
        count_login_attempt(db, user["email"])
        if not verify_password(change.current_password, user["password_hash"]):
            raise HTTPException(403, "Incorrect password")
        values = (hash_password(change.new_password), user_id, version)
        changed = db.execute(update, values).fetchone()
        if changed is None:
            raise invalid_token()
        clear_login_attempts(db, user["email"])
        return changed["token_version"]


@user_routes.delete("", status_code=204, dependencies=REFUSE_LARGE_BODY)
def delete_me(user: CurrentUser, db: DB) -> None:
    """Delete the account and, through the foreign key, all of its tasks."""
    db.execute("DELETE FROM user WHERE id = ?", (user["id"],))


# The list and the new task answer at /tasks and /tasks/ alike, with no redirect;
# the second decorator is hidden from /docs. Unlike the other routes, list_tasks
# checks and writes its JSON itself, with TaskList, in its own thread: FastAPI would
# check the return value in a second thread-pool call, and this is the busiest
# route. So its response_model only tells /docs what it returns.
@task_routes.get("", response_model=list[Task])
@task_routes.get("/", response_model=list[Task], include_in_schema=False)
def list_tasks(
    user: CurrentUser,
    db: DB,
    done: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> Response:
    """List the caller's tasks, oldest first, optionally only done or open ones."""
    # coalesce: with no `done` given, each row's own value matches.
    query = f"""
        SELECT {TASK_COLUMNS}
        FROM task
        WHERE owner_id = ? AND done = coalesce(?, done)
        ORDER BY id
        LIMIT ? OFFSET ?
    """
    tasks = db.execute(query, (user["id"], done, limit, offset)).fetchall()
    body = TaskList.dump_json(TaskList.validate_python(tasks))
    return Response(body, media_type=JSON)


@task_routes.post("", status_code=201, responses=CREATED_DOCS)
@task_routes.post("/", status_code=201, include_in_schema=False)
def add_task(task: TaskCreate, user: CurrentUser, db: DB, response: Response) -> Task:
    """Add a task for the caller."""
    insert = f"""
        INSERT INTO task (owner_id, title, description, done, due_date)
        VALUES (:owner_id, :title, :description, :done, :due_date)
        RETURNING {TASK_COLUMNS}
    """
    values = task.model_dump() | {"owner_id": user["id"]}
    try:
        created = db.execute(insert, values).fetchone()
    except sqlite3.IntegrityError:  # the foreign key: the owner was just deleted
        raise invalid_token() from None
    response.headers["Location"] = f"/tasks/{created['id']}"
    return created


@task_routes.get("/{task_id}", responses=NOT_FOUND_DOCS)
def read_task(task_id: TaskId, user: CurrentUser, db: DB) -> Task:
    """Show one of the caller's tasks; another user's task does not exist for them."""
    return find_task(db, task_id, user["id"])


@task_routes.patch("/{task_id}", responses=NOT_FOUND_DOCS)
def edit_task(task_id: TaskId, changes: TaskUpdate, user: CurrentUser, db: DB) -> Task:
    """Change only the fields sent; null clears the description or the due date."""
    return update_task(db, task_id, user["id"], changes.model_dump(exclude_unset=True))


@task_routes.put("/{task_id}", responses=NOT_FOUND_DOCS)
def replace_task(task_id: TaskId, task: TaskCreate, user: CurrentUser, db: DB) -> Task:
    """Replace a task: fields left out go back to their defaults."""
    return update_task(db, task_id, user["id"], task.model_dump())


@task_routes.delete(
    "/{task_id}",
    status_code=204,
    responses=NOT_FOUND_DOCS,
    dependencies=REFUSE_LARGE_BODY,
)
def delete_task(task_id: TaskId, user: CurrentUser, db: DB) -> None:
    """Delete one of the caller's tasks."""
    delete = """
        DELETE FROM task
        WHERE id = ? AND owner_id = ?
        RETURNING id
    """
    if db.execute(delete, (task_id, user["id"])).fetchone() is None:
        raise HTTPException(404, "Task not found")


# --- What the routes share ---------------------------------------------------
def token_answer(response: Response, key: str, user_id: int, version: int) -> Token:
    """Sign a token for the login and password routes; no cache may keep it."""
    response.headers["Cache-Control"] = "no-store"
    return Token(
        access_token=create_access_token(key, user_id, version),
        token_type="bearer",
        expires_in=settings.access_token_expire_minutes * 60,
    )


def find_task(db: sqlite3.Connection, task_id: int, owner_id: int) -> dict:
    """Return one of the owner's tasks, or answer 404."""
    query = f"""
        SELECT {TASK_COLUMNS}
        FROM task
        WHERE id = ? AND owner_id = ?
    """
    task = db.execute(query, (task_id, owner_id)).fetchone()
    if task is None:
        raise HTTPException(404, "Task not found")
    return task


def update_task(
    db: sqlite3.Connection, task_id: int, owner_id: int, changes: dict
) -> dict:
    """Apply changes to one of the owner's tasks and return it as stored."""
    update = f"""
        UPDATE task
        SET title = :title, description = :description, done = :done,
            due_date = :due_date
        WHERE id = :id
        RETURNING {TASK_COLUMNS}
    """
    # One transaction, so two PATCHes cannot lose each other's fields, and a delete
    # cannot come between the read and the write. On this autocommit connection:
    # 1. BEGIN IMMEDIATE starts a transaction holding the write lock before we read;
    #    other writers wait.
    # 2. find_task reads the task and checks the owner; the changes go over it.
    # 3. The UPDATE writes every field back by :id (sqlite3 ignores unused names).
    # `with db:` commits when the block ends, or rolls back on an error.
    with db:
        db.execute("BEGIN IMMEDIATE")
        task = find_task(db, task_id, owner_id) | changes
        return db.execute(update, task).fetchone()


# --- The application ---------------------------------------------------------
async def invalid_request(request: Request, error: RequestValidationError) -> Response:
    """Answer 422 as FastAPI does, without echoing the input: it may be a password."""
    problems = [
        {name: value for name, value in problem.items() if name != "input"}
        for problem in error.errors()
    ]
    # Edge case: json.dumps escapes what is not ASCII, so even a lone surrogate in a
    # message is sent (JSONResponse fails on it); default=str writes ctx's exceptions.
    body = json.dumps({"detail": problems}, default=str)
    return Response(body, 422, media_type=JSON)


async def database_unavailable(request: Request, error: sqlite3.Error) -> Response:
    """Answer 503, not 500, when SQLite cannot answer: a broken file, a full disk."""
    logger.error("Database error: %s", error, exc_info=error)
    return JSONResponse({"detail": "Database unavailable"}, 503)


def make_private(path: str) -> None:
    """Let only the owner read the database file, since it holds the signing key."""
    # Created 0600 before SQLite would create it 0644; SQLite's -wal and -shm follow.
    pathlib.Path(path).touch(mode=0o600)
    for name in (path, f"{path}-wal", f"{path}-shm"):
        with suppress(FileNotFoundError):
            os.chmod(name, 0o600)


def apply_schema(db: sqlite3.Connection) -> None:
    """Create what is missing; refuse a file made by another version of the schema."""
    version = db.execute("PRAGMA user_version").fetchone()["user_version"]
    tables = db.execute("SELECT count(*) AS count FROM sqlite_master").fetchone()
    if tables["count"] and version != SCHEMA_VERSION:
        raise RuntimeError(
            f"{settings.database_path} was made by another version of this app "
            f"(schema version {version}, this one needs {SCHEMA_VERSION}). Move it "
            "away, or delete it, and start again: a new database will be created."
        )
    db.executescript(SCHEMA)


def stored_signing_key(db: sqlite3.Connection) -> str:
    """Return the key kept in the database, storing a new one on the first start."""
    # The first worker to start stores its key; every worker and restart reads it.
    insert = "INSERT OR IGNORE INTO signing_key (id, secret) VALUES (1, ?)"
    db.execute(insert, (secrets.token_urlsafe(32),))
    return db.execute("SELECT secret FROM signing_key").fetchone()["secret"]


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Check the database, apply the schema and settle the signing key, then serve."""
    key = settings.secret_key.get_secret_value()
    if not key:
        make_private(settings.database_path)
    with closing(connect()) as db:
        apply_schema(db)
        if not key:
            key = stored_signing_key(db)
            logger.warning("APP_SECRET_KEY unset: using the key kept in the database")
    app.state.signing_key = key
    dummy_hash(settings.bcrypt_rounds)  # made now, not during the first login
    yield
    while idle_connections:
        idle_connections.pop().close()


app = FastAPI(
    title="Todo API",
    lifespan=lifespan,
    max_body_size=MAX_BODY_SIZE,  # 413 as soon as more is read
    responses=APP_DOCS,
    exception_handlers={
        RequestValidationError: invalid_request,
        sqlite3.Error: database_unavailable,
    },
    generate_unique_id_function=lambda route: route.name,  # operationId: the function
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

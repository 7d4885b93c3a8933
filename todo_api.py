"""A task manager's API in one module; serve it with `uvicorn todo_api:app`.

Read it top to bottom: it follows a request's data. Settings come first, then the
database, passwords and tokens, the login rate limit, the current user, the models,
the routes, and last the app that ties them together. The tables are in schema.sql.

Three ideas carry it:
- Blocking work never runs on the event loop. Plain `def` routes run in FastAPI's
  worker threads, each with a pooled SQLite connection. The password routes first
  wait for a free CPU core, so a burst of logins cannot take every thread.
- A token names a user and the user's token_version. Logging out or changing the
  password raises the version, which revokes every older token at once.
- Each password check is counted per email in the database before bcrypt runs, so
  guessing is limited across worker processes (`uvicorn --workers N`) and restarts.
"""

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
from anyio import Semaphore, to_thread
from email_validator import EmailNotValidError, validate_email
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
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse
from fastapi.security import OAuth2PasswordBearer, OAuth2PasswordRequestForm
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    Field,
    SecretStr,
    StrictBool,
    field_validator,
)
from pydantic_settings import BaseSettings, SettingsConfigDict

# uvicorn's general logger is named "uvicorn.error": ours show beside its messages.
logger = logging.getLogger("uvicorn.error")


# --- Settings ----------------------------------------------------------------
class Settings(BaseSettings):
    """Every setting, from APP_* variables or a .env file in the working folder."""

    # hide_input_in_errors: a mistyped secret key is never printed back in an error.
    model_config = SettingsConfigDict(
        env_prefix="APP_", env_file=".env", hide_input_in_errors=True
    )

    database_path: str = "todo.db"
    secret_key: SecretStr = SecretStr("")  # empty: one is made and kept in the database
    access_token_expire_minutes: int = Field(30, ge=1, le=525_600)  # a year at most
    bcrypt_rounds: int = Field(12, ge=4, le=31)
    login_attempts: int = Field(10, ge=1)
    login_window_seconds: int = Field(900, ge=1)
    cors_origins: list[str] = []  # a JSON list: ["http://localhost:5173"]

    @field_validator("secret_key")
    @classmethod
    def long_enough(cls, key: SecretStr) -> SecretStr:
        """Refuse a key short enough to guess: HS256 wants at least 32 bytes."""
        secret = key.get_secret_value()
        if secret and len(secret.encode()) < 32:
            raise ValueError("APP_SECRET_KEY needs 32+ bytes: openssl rand -hex 32")
        return key


settings = Settings()


# --- Database ----------------------------------------------------------------
SCHEMA = pathlib.Path(__file__).with_name("schema.sql").read_text()
# The version schema.sql gives a database file, read from schema.sql itself.
SCHEMA_VERSION = int(re.search(r"PRAGMA user_version = ([0-9]+)", SCHEMA)[1])
MAX_ID = 2**63 - 1  # SQLite's largest integer
# What a user sees of their account. Column lists like this one are constants that
# f-strings write into the SQL; values a client sends only ever go through `?`.
USER_COLUMNS = "id, email, created_at"


def row_as_dict(cursor: sqlite3.Cursor, row: tuple) -> dict[str, Any]:
    """Return each row as a dict, which the pydantic models read directly."""
    names = [column[0] for column in cursor.description]
    return dict(zip(names, row))


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
    connection.execute("PRAGMA journal_mode = WAL")  # readers never wait for writers
    # Sync the disk at checkpoints, not at every commit: a crashed process loses
    # nothing, a power cut may lose the last commits (see the README's Limits).
    connection.execute("PRAGMA synchronous = NORMAL")
    return connection


# The pool. Opening a connection costs far more than a query, so connections are
# kept and lent again. FastAPI runs `def` routes on AnyIO's worker threads, 40 at
# most, so 40 connections are enough. get_db is async, so it runs on the event
# loop: a request that finds all 40 lent waits there without holding a thread, and
# the list needs no lock, as only the event loop touches it.
MAX_CONNECTIONS = 40
idle_connections: list[sqlite3.Connection] = []
# fast_acquire: a free slot is taken without first letting others run (GET +10%).
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
        finally:  # runs after the answer is sent: every write is already saved
            idle_connections.append(connection)


DB = Annotated[sqlite3.Connection, Depends(get_db)]


def make_private(path: str) -> None:
    """Let only the owner read the database: it holds every password hash."""
    pathlib.Path(path).touch(mode=0o600)  # made before SQLite would make it 0644
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


# --- Passwords and tokens ----------------------------------------------------
# bcrypt reads at most 72 bytes (bcrypt 5 refuses more), so each password is first
# reduced to 44 bytes: its HMAC-SHA256 digest (32 bytes), in base64. Why HMAC, with
# a fixed label that is no secret, rather than plain SHA-256: other sites leak
# plain SHA-256 hashes of passwords. Had we fed bcrypt plain SHA-256, each leaked
# hash could be tried against ours as it is, without cracking the password first;
# the label makes what we feed bcrypt match no one else's.
PREHASH_KEY = b"todo-api password v1"


def prehash(password: str) -> bytes:
    """Reduce any password to 44 bytes, so every character counts in bcrypt."""
    # NFKC: the same password typed on another keyboard is the same password.
    text = unicodedata.normalize("NFKC", password)
    digest = hmac.digest(PREHASH_KEY, text.encode(), "sha256")
    return base64.b64encode(digest)  # printable: no NUL byte to stop bcrypt early


def hash_password(password: str) -> bytes:
    """Hash a password with a fresh salt at the configured bcrypt cost."""
    return bcrypt.hashpw(prehash(password), bcrypt.gensalt(settings.bcrypt_rounds))


def verify_password(password: str, password_hash: bytes) -> bool:
    """Check a password against its hash."""
    return bcrypt.checkpw(prehash(password), password_hash)


# Checked when an email has no account, so that it takes as long as a known one:
# otherwise a quick 401 would tell anyone which emails have an account.
DUMMY_HASH = hash_password("no account has this password")

# One bcrypt check keeps a core busy for a quarter of a second. Without a bound,
# 200 logins would take all 40 threads and connections, and every other request
# would wait behind them. So register, login and change_password (below) declare
# `dependencies=[Depends(wait_for_a_core)]`, which FastAPI solves before anything
# else: the request waits here, on the event loop, before it takes a thread or a
# connection. At most 8, so the other routes always keep most of the 40 threads.
password_slots = Semaphore(min(os.cpu_count() or 1, 8))


async def wait_for_a_core() -> AsyncIterator[None]:
    """Hold one of the per-core slots until the answer is sent."""
    async with password_slots:
        yield


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


def create_access_token(key: str, user_id: int, version: int) -> str:
    """Sign a token naming the user and its token version, valid for a while."""
    now = datetime.now(UTC)
    expires = now + timedelta(minutes=settings.access_token_expire_minutes)
    claims = {"sub": str(user_id), "ver": version, "iat": now, "exp": expires}
    return jwt.encode(claims, key, algorithm="HS256")


# --- Login rate limit --------------------------------------------------------
TOO_MANY_LOGINS = "Too many failed logins; try again later"


def count_login_attempt(db: sqlite3.Connection, email: str) -> None:
    """Count one password check for an email, or answer 429 once too many were made."""
    now = time.time()
    window = settings.login_window_seconds
    # A window starts at an email's first counted check and is never extended; it
    # ends when this DELETE removes its row, which also keeps logins for random
    # emails from filling the table.
    db.execute("DELETE FROM login_attempt WHERE window_start <= ?", (now - window,))
    # One statement: a new email gets a row (1 attempt, its window starting now);
    # a known one adds 1. Concurrent attempts each get their own count back.
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
    # The hash is for the password change; the User response model never shows it.
    query = f"""
        SELECT {USER_COLUMNS}, password_hash
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
    """Give every spelling of an address one form: email-validator's, lower-cased."""
    return validate_email(address, check_deliverability=False).normalized.lower()


def strip_title(title: str) -> str:
    """Trim a title, and refuse one that trimming leaves empty."""
    if not title.strip():
        raise ValueError("Title must not be blank")
    return title.strip()


def iso_date_text(value: Any) -> Any:
    """Let through only YYYY-MM-DD text: pydantic alone would read 0 as 1970-01-01."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        return value
    raise ValueError("Input should be a date as a YYYY-MM-DD string")


# format: email only tells /docs; normalize_email does the checking.
Email = Annotated[
    str,
    Field(max_length=254, json_schema_extra={"format": "email"}),
    AfterValidator(normalize_email),
]
Password = Annotated[str, Field(min_length=15, max_length=128)]
Title = Annotated[str, Field(min_length=1, max_length=200), AfterValidator(strip_title)]
Description = Annotated[str, Field(max_length=2000)]
DueDate = Annotated[date, BeforeValidator(iso_date_text)]
TaskId = Annotated[int, Path(ge=1, le=MAX_ID)]  # larger would not fit in SQLite


class UserCreate(BaseModel):
    email: Email
    password: Password


class User(BaseModel):
    id: int
    email: str
    created_at: datetime


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
    done: StrictBool = False  # true or false, not "yes" or 1
    due_date: DueDate | None = None


class TaskUpdate(BaseModel):
    """The fields to change: one left out, or null, keeps its value (PUT clears)."""

    title: Title | None = None
    description: Description | None = None
    done: StrictBool | None = None
    due_date: DueDate | None = None


class Task(BaseModel):
    id: int
    title: str
    description: str | None
    done: bool  # lax, unlike StrictBool: SQLite gives back 0 or 1
    due_date: date | None
    created_at: datetime


# The columns the task queries read: exactly Task's fields. To add a task field:
# its column in schema.sql, the field in TaskCreate, TaskUpdate and Task, then the
# INSERT in add_task and the UPDATEs in edit_task and replace_task. Raise
# user_version in schema.sql too: IF NOT EXISTS never adds a column to an existing
# table, so an old todo.db is then refused and has to be moved away.
TASK_COLUMNS = ", ".join(Task.model_fields)


class Message(BaseModel):
    detail: str


# --- Routes ------------------------------------------------------------------
# For /docs only, changing nothing a route does: each route's `responses=` lists the
# errors it may answer, each with a `{"detail": ...}` body (the Message model).
def documented(description: str) -> dict:
    """Describe an error answer for /docs: what it means, and its body."""
    return {"model": Message, "description": description}


INCORRECT_LOGIN = "Incorrect email or password"
NOT_FOUND = {404: documented("Task not found")}
TOO_MANY = {429: documented(TOO_MANY_LOGINS)}
UNAUTHORIZED = {401: documented("No token, or a bad or revoked one")}

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
    responses={409: documented("Email already registered")},
    dependencies=[Depends(wait_for_a_core)],
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


def token_answer(
    request: Request, response: Response, user_id: int, version: int
) -> Token:
    """Sign a token for the login and password routes; no cache may keep it."""
    response.headers["Cache-Control"] = "no-store"
    key = request.app.state.signing_key
    return Token(
        access_token=create_access_token(key, user_id, version),
        token_type="bearer",
        expires_in=settings.access_token_expire_minutes * 60,
    )


@auth_routes.post(
    "/token",
    responses={401: documented(INCORRECT_LOGIN)} | TOO_MANY,
    dependencies=[Depends(wait_for_a_core)],
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
    # The token gets the token_version read here, before bcrypt: if a logout raises
    # it while bcrypt runs, the token this login returns is already revoked, as a
    # logout everywhere should end logins still in progress too.
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
    clear_login_attempts(db, email)
    return token_answer(request, response, user["id"], user["token_version"])


@auth_routes.post("/logout", status_code=204, responses=UNAUTHORIZED)
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


@user_routes.put(
    "/password",
    responses={403: documented("Incorrect password")} | TOO_MANY,
    dependencies=[Depends(wait_for_a_core)],
)
def change_password(
    change: PasswordChange,
    user: CurrentUser,
    db: DB,
    request: Request,
    response: Response,
) -> Token:
    """Set a new password: every older token is refused, and a fresh one returned."""
    count_login_attempt(db, user["email"])
    if not verify_password(change.current_password, user["password_hash"]):
        raise HTTPException(403, "Incorrect password")
    clear_login_attempts(db, user["email"])
    update = """
        UPDATE user
        SET password_hash = ?, token_version = token_version + 1
        WHERE id = ?
        RETURNING token_version
    """
    new_hash = hash_password(change.new_password)
    changed = db.execute(update, (new_hash, user["id"])).fetchone()
    if changed is None:  # the account was deleted meanwhile
        raise invalid_token()
    return token_answer(request, response, user["id"], changed["token_version"])


@user_routes.delete("", status_code=204)
def delete_me(user: CurrentUser, db: DB) -> None:
    """Delete the account and, through the foreign key, all of its tasks."""
    db.execute("DELETE FROM user WHERE id = ?", (user["id"],))


# The list and the new task answer at /tasks and /tasks/ alike, with no redirect;
# the second decorator is left out of /docs.
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


@task_routes.post("", status_code=201)
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
    # coalesce(:title, title): a null (left out, or sent) keeps the stored value.
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


@task_routes.delete("/{task_id}", status_code=204, responses=NOT_FOUND)
def delete_task(task_id: TaskId, user: CurrentUser, db: DB) -> None:
    """Delete one of the caller's tasks."""
    delete = """
        DELETE FROM task
        WHERE id = ? AND owner_id = ?
        RETURNING id
    """
    found(db.execute(delete, (task_id, user["id"])).fetchone())


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
    """Prepare the database and settle the signing key, serve, then close."""
    # Blocking calls are fine here: no request is served until this yields.
    make_private(settings.database_path)
    with closing(connect()) as db:  # a connection's own `with` would not close it
        apply_schema(db)
        app.state.signing_key = signing_key(db)
    yield
    while idle_connections:
        idle_connections.pop().close()


# For /docs only: what any route may answer. FastAPI itself answers 400 to a body
# that is not UTF-8 and 413 (in plain text) to one over max_body_size; 503 is
# database_unavailable's.
PLAIN_TEXT = {"content": {"text/plain": {"schema": {"type": "string"}}}}
ANY_ROUTE = {
    400: documented("The body is not valid UTF-8"),
    413: documented("The body is over 64 KiB") | PLAIN_TEXT,
    503: documented("The database cannot answer"),
}

app = FastAPI(
    title="Todo API",
    lifespan=lifespan,
    max_body_size=64 * 1024,  # 413 once a body crosses 64 KiB, as it is read
    responses=ANY_ROUTE,
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

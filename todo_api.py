"""A task manager's API in one module; serve it with `uvicorn todo_api:app`."""

import json
import logging
import pathlib
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, closing
from datetime import UTC, date, datetime, timedelta
from typing import Annotated, Any

import bcrypt
import jwt
from fastapi import Depends, FastAPI, HTTPException, Path, Query
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.requests import Request
from fastapi.responses import Response
from fastapi.routing import APIRouter
from fastapi.security import OAuth2PasswordBearer
from pydantic import AliasChoices, BaseModel, Field, ValidationError, field_validator
from pydantic.functional_validators import AfterValidator, BeforeValidator
from pydantic.type_adapter import TypeAdapter
from pydantic.types import StrictBool, StringConstraints
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

logger = logging.getLogger("uvicorn.error")


# --- Settings ----------------------------------------------------------------
class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="APP_", env_file=".env")

    database_path: str = "todo.db"
    secret_key: str = ""  # empty: a key is generated once and kept in the database
    access_token_expire_minutes: int = Field(30, ge=1)
    bcrypt_rounds: int = Field(12, ge=4, le=31)
    cors_origins: Annotated[list[str], NoDecode] = []

    @field_validator("secret_key")
    def long_enough(cls, key: str) -> str:
        """Refuse a key short enough to guess: HS256 wants at least 32 bytes."""
        if key and len(key.encode()) < 32:
            raise ValueError("APP_SECRET_KEY needs 32+ bytes: openssl rand -hex 32")
        return key

    @field_validator("cors_origins", mode="before")
    def split_origins(cls, origins: Any) -> Any:
        """Read origins as a JSON list or as comma-separated text."""
        if isinstance(origins, str) and not origins.startswith("["):
            return [origin.strip() for origin in origins.split(",") if origin.strip()]
        return json.loads(origins) if isinstance(origins, str) else origins


settings = Settings()

# --- Database ----------------------------------------------------------------
# Dates are stored as ISO text by our own adapter: sqlite3's defaults are deprecated.
sqlite3.register_adapter(date, date.isoformat)


def connect() -> sqlite3.Connection:
    """Open the database with the settings every connection needs."""
    connection = sqlite3.connect(
        settings.database_path,
        timeout=30,  # a writer waits its turn, up to 30 s, instead of failing as locked
        isolation_level=None,  # autocommit: each statement is committed as it finishes
        check_same_thread=False,  # FastAPI may run a request's steps on other threads
    )
    connection.row_factory = lambda cursor, row: {  # rows as dicts, for the models
        column[0]: value for column, value in zip(cursor.description, row)
    }
    connection.execute("PRAGMA foreign_keys = ON")  # off by default; cascades deletes
    connection.execute("PRAGMA journal_mode = WAL")  # readers never wait for writers
    connection.execute("PRAGMA synchronous = NORMAL")  # kill -9 safe; fewer disk syncs
    return connection


# Idle connections for reuse. Only the event loop touches the list: none is ever shared.
pool: list[sqlite3.Connection] = []


async def get_db() -> AsyncIterator[sqlite3.Connection]:
    """Lend one request a connection of its own; if SQLite fails, answer 503, not 500."""
    try:
        connection = pool.pop() if pool else await run_in_threadpool(connect)
        try:
            yield connection  # every write commits before the route returns
        finally:
            pool.append(connection)
    except sqlite3.DatabaseError as error:
        logger.error("Database error: %s", error)
        raise HTTPException(503, "Database unavailable") from error


DB = Annotated[sqlite3.Connection, Depends(get_db)]


# --- Passwords and tokens ----------------------------------------------------
def hash_password(password: str) -> bytes:
    """Hash a password with a fresh salt at the configured bcrypt cost."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(settings.bcrypt_rounds))


def verify_password(password: str, password_hash: bytes) -> bool:
    """Check a password against its hash; one over 72 bytes is simply wrong."""
    encoded = password.encode()
    # bcrypt 5 raises beyond 72 bytes; check the first 72 anyway, so the time is the same.
    return bcrypt.checkpw(encoded[:72], password_hash) and len(encoded) <= 72


# Unknown emails are checked against this, so they cost as much as a wrong password.
DUMMY_HASH = hash_password(secrets.token_urlsafe())


def create_access_token(user_id: int) -> str:
    """Sign a token naming the user, valid for the configured minutes."""
    now = datetime.now(UTC)
    expires = now + timedelta(minutes=settings.access_token_expire_minutes)
    claims = {"sub": str(user_id), "iat": now, "exp": expires}
    return jwt.encode(claims, settings.secret_key, algorithm="HS256")


# --- The current user --------------------------------------------------------
oauth2_scheme = OAuth2PasswordBearer(tokenUrl="/auth/token")
BEARER = {"WWW-Authenticate": "Bearer"}
MAX_ID = 2**63 - 1  # SQLite's largest integer: a larger id is refused, never a 500


def get_current_user(token: Annotated[str, Depends(oauth2_scheme)], db: DB) -> dict:
    """Return the user a valid bearer token names, or answer 401."""
    try:
        # Naming the algorithm refuses "alg: none" and tokens signed any other way.
        options = {"require": ["exp", "sub"]}
        claims = jwt.decode(token, settings.secret_key, ["HS256"], options=options)
        user_id = int(claims["sub"])
    except (jwt.InvalidTokenError, ValueError):
        user_id = 0
    query = "SELECT id, email, created_at FROM user WHERE id = ?"
    user = db.execute(query, (user_id,)).fetchone() if 0 < user_id <= MAX_ID else None
    if user is None:  # one answer for every bad token, a deleted user's included
        raise HTTPException(401, "Could not validate credentials", headers=BEARER)
    return user


CurrentUser = Annotated[dict, Depends(get_current_user)]


# --- Request and response models ---------------------------------------------
def password_bytes_in_range(password: str) -> str:
    """Measure a password in UTF-8 bytes, the unit of bcrypt's 72-byte limit."""
    if not 8 <= len(password.encode()) <= 72:
        raise ValueError("Password must be 8 to 72 bytes in UTF-8")
    return password


def iso_date_text(value: Any) -> Any:
    """Let through only YYYY-MM-DD text: lax pydantic would read 0 as 1970-01-01."""
    if isinstance(value, str) and re.fullmatch(r"[0-9]{4}-[0-9]{2}-[0-9]{2}", value):
        return value
    raise ValueError("Input should be a date as a YYYY-MM-DD string")


PASSWORD_RULE = Field(max_length=72, description="8 to 72 bytes in UTF-8 (bcrypt)")
TITLE = Field(max_length=200, pattern=r"\S", description="Not just spaces; trimmed")
Title = Annotated[str, TITLE, AfterValidator(str.strip), Field(min_length=1)]
Description = Annotated[str, StringConstraints(max_length=2000)]
DueDate = Annotated[date, BeforeValidator(iso_date_text)]
TaskId = Annotated[int, Path(ge=1, le=MAX_ID)]


class UserCreate(BaseModel):
    email: str = Field(max_length=254, pattern=r"^[^@\s]+@[^@\s]+\.[^@\s]+$")  # a@b.c
    password: Annotated[str, PASSWORD_RULE, AfterValidator(password_bytes_in_range)]


class User(BaseModel):
    id: int
    email: str
    created_at: datetime


class Credentials(BaseModel):
    """A login. JSON may name the email `email` instead of `username`."""

    username: str = Field(validation_alias=AliasChoices("username", "email"))
    password: str


class Token(BaseModel):
    access_token: str
    token_type: str = "bearer"
    expires_in: int


class TaskCreate(BaseModel):
    title: Title
    description: Description | None = None
    done: StrictBool = False
    due_date: DueDate | None = None


class TaskUpdate(BaseModel):
    """The fields to change. Title and done may be left out, but are never null."""

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


class Message(BaseModel):
    detail: str


# --- Routes ------------------------------------------------------------------
router = APIRouter()
UNAUTHORIZED = {401: {"model": Message, "description": "Missing or invalid token"}}
NOT_FOUND = {404: {"model": Message, "description": "Task not found"}}
TaskList = TypeAdapter(list[Task])


@router.get("/health")
def health(db: DB) -> dict[str, str]:
    """Answer ok once the database has answered a real query."""
    db.execute("SELECT count(*) FROM user").fetchone()
    return {"status": "ok"}


@router.post("/auth/register", status_code=201, responses={409: {"model": Message}})
def register(new_user: UserCreate, db: DB, response: Response) -> User:
    """Create an account; the email must be free, whatever its case."""
    password_hash = hash_password(new_user.password)
    insert = "INSERT INTO user (email, password_hash) VALUES (?, ?) RETURNING id, email, created_at"
    try:
        user = db.execute(insert, (new_user.email, password_hash)).fetchone()
    except sqlite3.IntegrityError:  # the UNIQUE email, even when two requests race
        raise HTTPException(409, "Email already registered") from None
    response.headers["Location"] = "/users/me"
    return user


async def read_credentials(request: Request) -> Credentials:
    """Read a login from the OAuth2 form or, for HTTPie and scripts, from JSON."""
    try:
        if request.headers.get("content-type", "").startswith("application/json"):
            return Credentials.model_validate_json(await request.body())
        return Credentials.model_validate(dict(await request.form()))
    except ValidationError as error:
        raise RequestValidationError(error.errors(include_input=False)) from None


Login = Annotated[Credentials, Depends(read_credentials)]
# FastAPI documents one body type per route, and this route reads two.
LOGIN_SCHEMA = {"schema": Credentials.model_json_schema()}
FORM = "application/x-www-form-urlencoded"
LOGIN_TYPES = {FORM: LOGIN_SCHEMA, "application/json": LOGIN_SCHEMA}
LOGIN_BODY = {"requestBody": {"required": True, "content": LOGIN_TYPES}}
INVALID = {422: {"model": dict[str, list[dict]], "description": "Validation Error"}}


@router.post("/auth/token", responses=UNAUTHORIZED | INVALID, openapi_extra=LOGIN_BODY)
def login(credentials: Login, db: DB) -> Token:
    """Trade an email and password for a bearer token."""
    query = "SELECT id, password_hash FROM user WHERE email = ?"
    user = db.execute(query, (credentials.username,)).fetchone()
    # An unknown email is checked against a dummy hash: both failures take as long.
    stored_hash = user["password_hash"] if user else DUMMY_HASH
    if not verify_password(credentials.password, stored_hash) or user is None:
        raise HTTPException(401, "Incorrect email or password", headers=BEARER)
    expires_in = settings.access_token_expire_minutes * 60
    return Token(access_token=create_access_token(user["id"]), expires_in=expires_in)


@router.get("/users/me", responses=UNAUTHORIZED)
async def read_me(user: CurrentUser) -> User:
    """Show the logged-in user."""
    return user


@router.delete("/users/me", status_code=204, responses=UNAUTHORIZED)
def delete_me(user: CurrentUser, db: DB) -> None:
    """Delete the account and, through the foreign key, all of its tasks."""
    db.execute("DELETE FROM user WHERE id = ?", (user["id"],))


@router.get("/tasks", response_model=list[Task], responses=UNAUTHORIZED)
@router.get("/tasks/", response_model=list[Task], include_in_schema=False)
def list_tasks(
    user: CurrentUser,
    db: DB,
    done: bool | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 100,
    offset: Annotated[int, Query(ge=0, le=MAX_ID)] = 0,
) -> Response:
    """List the caller's tasks, oldest first, optionally only done or open ones."""
    query = "SELECT id, title, description, done, due_date, created_at FROM task WHERE owner_id = ? AND (? IS NULL OR done = ?) ORDER BY id LIMIT ? OFFSET ?"
    tasks = db.execute(query, (user["id"], done, done, limit, offset)).fetchall()
    # Validated and serialised here, in this thread: FastAPI would take one more hop.
    body = TaskList.dump_json(TaskList.validate_python(tasks))
    return Response(body, media_type="application/json")


@router.post("/tasks", status_code=201, responses=UNAUTHORIZED)
@router.post("/tasks/", status_code=201, include_in_schema=False)
def add_task(task: TaskCreate, user: CurrentUser, db: DB, response: Response) -> Task:
    """Add a task for the caller."""
    insert = "INSERT INTO task (owner_id, title, description, done, due_date) VALUES (?, ?, ?, ?, ?) RETURNING id, title, description, done, due_date, created_at"
    values = (user["id"], task.title, task.description, task.done, task.due_date)
    created = db.execute(insert, values).fetchone()
    response.headers["Location"] = f"/tasks/{created['id']}"
    return created


@router.get("/tasks/{task_id}", responses=UNAUTHORIZED | NOT_FOUND)
def read_task(task_id: TaskId, user: CurrentUser, db: DB) -> Task:
    """Show one of the caller's tasks; another user's task does not exist for them."""
    query = "SELECT id, title, description, done, due_date, created_at FROM task WHERE id = ? AND owner_id = ?"
    task = db.execute(query, (task_id, user["id"])).fetchone()
    if task is None:
        raise HTTPException(404, "Task not found")
    return task


@router.patch("/tasks/{task_id}", responses=UNAUTHORIZED | NOT_FOUND)
def edit_task(task_id: TaskId, changes: TaskUpdate, user: CurrentUser, db: DB) -> Task:
    """Change only the fields sent; null clears the description or the due date."""
    with db:  # commits at the end of the block, or rolls back on an error
        # Lock for writing first: no other write slips between our read and write.
        db.execute("BEGIN IMMEDIATE")
        task = Task.model_validate(read_task(task_id, user, db))
        task = task.model_copy(update=changes.model_dump(exclude_unset=True))
        update = "UPDATE task SET title = ?, description = ?, done = ?, due_date = ? WHERE id = ? RETURNING id, title, description, done, due_date, created_at"
        values = (task.title, task.description, task.done, task.due_date, task_id)
        return db.execute(update, values).fetchone()


@router.put("/tasks/{task_id}", responses=UNAUTHORIZED | NOT_FOUND)
def replace_task(task_id: TaskId, task: TaskCreate, user: CurrentUser, db: DB) -> Task:
    """Replace a task: a PATCH that sends every field, defaults included."""
    return edit_task(task_id, TaskUpdate(**task.model_dump(mode="json")), user, db)


@router.delete("/tasks/{task_id}", status_code=204, responses=UNAUTHORIZED | NOT_FOUND)
def delete_task(task_id: TaskId, user: CurrentUser, db: DB) -> None:
    """Delete one of the caller's tasks."""
    read_task(task_id, user, db)
    db.execute("DELETE FROM task WHERE id = ? AND owner_id = ?", (task_id, user["id"]))


# --- The application ---------------------------------------------------------
async def invalid_request(request: Request, error: RequestValidationError) -> Response:
    """Answer 422 as FastAPI does, in ASCII JSON, which even a lone surrogate survives."""
    body = json.dumps({"detail": error.errors()}, default=str)
    return Response(body, 422, media_type="application/json")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    """Apply the schema and settle the signing key before the first request."""
    with closing(connect()) as db:
        db.executescript(pathlib.Path(__file__).with_name("schema.sql").read_text())
        if not settings.secret_key:
            # The first worker to start stores a key; every worker and restart reads it.
            insert = "INSERT OR IGNORE INTO signing_key (id, secret) VALUES (1, ?)"
            db.execute(insert, (secrets.token_urlsafe(32),))
            key = db.execute("SELECT secret FROM signing_key").fetchone()["secret"]
            settings.secret_key = key
            logger.warning("APP_SECRET_KEY unset: using the key kept in the database")
    yield
    while pool:
        pool.pop().close()


app = FastAPI(
    title="Todo API",
    lifespan=lifespan,
    responses={400: {"model": Message}, 503: {"model": Message}},
    exception_handlers={RequestValidationError: invalid_request},
)
app.include_router(router)
if settings.cors_origins:
    app.add_middleware(
        CORSMiddleware,
        allow_origins=settings.cors_origins,
        allow_methods=["GET", "POST", "PUT", "PATCH", "DELETE"],
        allow_headers=["Authorization", "Content-Type"],
    )

-- The Todo API's tables, applied on every start: IF NOT EXISTS keeps the data.
-- AUTOINCREMENT never hands out an id twice. A token names its user's id, so a
-- deleted user's token can never name someone who registers later.
-- BEGIN ... COMMIT: one transaction, so a file gets all of this or none of it.
-- IMMEDIATE takes the write lock first: two processes starting at once take turns.

BEGIN IMMEDIATE;

-- Emails are stored normalised and lower-cased by the app, so UNIQUE is enough.
-- token_version is in every token; raising it (logout, new password) revokes them all.
CREATE TABLE IF NOT EXISTS user (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  email TEXT NOT NULL UNIQUE,
  password_hash BLOB NOT NULL,
  token_version INTEGER NOT NULL DEFAULT 0,
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE IF NOT EXISTS task (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  owner_id INTEGER NOT NULL REFERENCES user (id) ON DELETE CASCADE,
  title TEXT NOT NULL,
  description TEXT,
  done INTEGER NOT NULL DEFAULT 0 CHECK (done IN (0, 1)),
  -- date('2026-02-30') is NULL, date('2026-12-01') is '2026-12-01': only a real
  -- YYYY-MM-DD date equals its date(). IS, unlike =, lets a NULL due_date through.
  due_date TEXT CHECK (due_date IS date(due_date)),
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

-- Every task query filters by owner; this index serves it in id order.
CREATE INDEX IF NOT EXISTS task_owner_id ON task (owner_id, id);

-- The signing key made when APP_SECRET_KEY is unset: one row, shared by every
-- worker process.
CREATE TABLE IF NOT EXISTS signing_key (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  secret TEXT NOT NULL
);

-- Password checks per email in the current window, known accounts or not.
-- window_start is Unix time; rows whose window has passed are deleted as others are written.
CREATE TABLE IF NOT EXISTS login_attempt (
  email TEXT PRIMARY KEY,
  attempts INTEGER NOT NULL DEFAULT 1,
  window_start REAL NOT NULL
);

CREATE INDEX IF NOT EXISTS login_attempt_window_start ON login_attempt (window_start);

-- The version of this file. The app refuses a database that has tables and another version.
PRAGMA user_version = 2;

COMMIT;

-- The Todo API's tables, applied on every start inside one transaction (see
-- apply_schema): IF NOT EXISTS creates only what is missing and keeps the data.
-- AUTOINCREMENT never hands out an id twice: a deleted user's token names no one.
CREATE TABLE IF NOT EXISTS user (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  email TEXT NOT NULL UNIQUE,
  password_hash BLOB NOT NULL,
  token_version INTEGER NOT NULL DEFAULT 0,  -- in each token; raising it revokes them
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);

CREATE TABLE IF NOT EXISTS task (
  id INTEGER PRIMARY KEY AUTOINCREMENT,
  owner_id INTEGER NOT NULL REFERENCES user (id) ON DELETE CASCADE,
  title TEXT NOT NULL,
  description TEXT,
  done INTEGER NOT NULL DEFAULT 0 CHECK (done IN (0, 1)),
  due_date TEXT,  -- YYYY-MM-DD
  created_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))
);
-- Serves every task query: WHERE owner_id = ?, in id order.
CREATE INDEX IF NOT EXISTS task_owner_id ON task (owner_id, id);

-- The key made when APP_SECRET_KEY is unset: one row, shared by every worker.
CREATE TABLE IF NOT EXISTS signing_key (
  id INTEGER PRIMARY KEY CHECK (id = 1),
  secret TEXT NOT NULL
);

-- Password checks per email in the current window (window_start is Unix time).
CREATE TABLE IF NOT EXISTS login_attempt (
  email TEXT PRIMARY KEY,
  attempts INTEGER NOT NULL,
  window_start REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS login_attempt_window_start ON login_attempt (window_start);

PRAGMA user_version = 2;  -- raise it with each change, beside an upgrade step

#!/bin/bash
# A batch through a TEMP table and one INSERT ... SELECT, against row by row
# (Python sqlite3, the store's schema 4 messages table): bash bulk.sh
exec ${PYTHON:-python3} - <<'PY'
import os, sqlite3, tempfile, time
DDL = """CREATE TABLE messages (id INTEGER PRIMARY KEY, channel TEXT NOT NULL, seq INTEGER NOT NULL, ts_us INTEGER NOT NULL, sender TEXT NOT NULL, dedupe BLOB, frame BLOB NOT NULL, key_id TEXT);
CREATE UNIQUE INDEX messages_by_seq ON messages (channel, seq);
CREATE INDEX messages_by_ts ON messages (ts_us);"""
COLS = "channel, seq, ts_us, sender, dedupe, frame, key_id"
def run(mode, channels=1000, batch=8192, commits=24, sort=True):
    d = tempfile.mkdtemp()
    db = sqlite3.connect(d + '/f.db', isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL"); db.execute("PRAGMA synchronous=FULL"); db.execute("PRAGMA cache_size=-65536")
    db.executescript(DDL)
    db.execute("PRAGMA temp_store=MEMORY")
    db.execute(f"CREATE TEMP TABLE batch (channel TEXT, seq INTEGER, ts_us INTEGER, sender TEXT, dedupe BLOB, frame BLOB, key_id TEXT)")
    names = [f"dm:user-{i:06d}:user-{i+1:06d}" for i in range(channels)]
    seqs = [0]*channels; k = 0; frame = bytes(110); cpu = 0
    for i in range(commits):
        rows = []
        for _ in range(batch):
            c = k % channels; k += 1; seqs[c] += 1
            rows.append((names[c], seqs[c], 1_700_000_000_000_000 + k, "user-x", None, frame, None))
        if sort: rows.sort(key=lambda r: (r[0], r[1]))
        c0 = time.thread_time()
        db.execute("BEGIN IMMEDIATE")
        if mode == 'rows':
            db.executemany(f"INSERT OR REPLACE INTO messages ({COLS}) VALUES (?,?,?,?,?,?,?)", rows)
        else:
            db.executemany(f"INSERT INTO temp.batch ({COLS}) VALUES (?,?,?,?,?,?,?)", rows)
            db.execute(f"INSERT OR REPLACE INTO messages ({COLS}) SELECT {COLS} FROM temp.batch ORDER BY rowid")
            db.execute("DELETE FROM temp.batch")
        db.execute("COMMIT")
        cpu += time.thread_time() - c0
        if i % 8 == 7: db.execute("PRAGMA wal_checkpoint(PASSIVE)")
    return cpu / (commits*batch) * 1e6
for r in range(2):
    for mode in ('rows', 'bulk'):
        for sort in (False, True):
            print(r, mode, 'sorted' if sort else 'queue', f"{run(mode, sort=sort):.2f} us/msg", os.getloadavg()[0], flush=True)
PY

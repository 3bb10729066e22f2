//! A database file kiln cannot use is refused at start with what it is and
//! what to do, and left as it was: a damaged file, another program's
//! SQLite database.

use crate::common;

use std::time::Duration;

use common::workers::{Script, TRUE};

#[test]
fn a_damaged_or_foreign_database_file_is_refused_at_start_and_left_as_it_was() {
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = Script::steps(TRUE).write(tmp.path());
    let db = dir.join("state.sqlite");

    // Not SQLite at all (a damaged file).
    let garbage: Vec<u8> = (0..20_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    std::fs::write(&db, &garbage).expect("write");
    let out = common::kiln(&dir, &["start", "."], Duration::from_secs(60));
    out.fails_with("is not an SQLite database (damaged, or another program's file)");
    assert_eq!(std::fs::read(&db).expect("read"), garbage, "left as it was");

    // Another program's SQLite database.
    std::fs::remove_file(&db).expect("rm");
    let c = rusqlite::Connection::open(&db).expect("db");
    c.execute_batch("CREATE TABLE masters (x INTEGER); INSERT INTO masters VALUES (1);")
        .expect("their table");
    drop(c);
    let out = common::kiln(&dir, &["start", "."], Duration::from_secs(60));
    out.fails_with("holds tables of another program (`masters`, ...)");
    assert!(!out.stderr.contains("CREATE TABLE"), "{}", out.stderr);
    let c = rusqlite::Connection::open(&db).expect("db");
    assert_eq!(
        common::scalar(&c, "SELECT count(*) FROM sqlite_master"),
        1,
        "nothing of kiln's written"
    );
}

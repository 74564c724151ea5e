//! `turnpike migrate`: it never runs under the role's statement timeout
//! (a concurrent index build on a large table takes as long as it takes),
//! and it fails when an interrupted index build left an invalid index,
//! which `CREATE INDEX … IF NOT EXISTS` would otherwise skip for good.

use turnpike_core::db::migrate::{self, MigrateError};
use turnpike_testkit::{Paths, Stack};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_ignores_the_roles_timeout_and_refuses_invalid_indexes() {
    // A topology of its own: this breaks its schema on purpose.
    let stack = Stack::private().await;
    let settings = stack.settings(Paths::DIRECT);
    let admin = stack.superuser("primary").await;
    // A role timeout far too short for any migration statement.
    sqlx::query("ALTER ROLE turnpike SET statement_timeout = '1ms'")
        .execute(&admin)
        .await
        .unwrap();
    migrate::run(&settings.database).await.unwrap();
    // The run set the role's timeout back to the configured one.
    let (timeout,): (Option<String>,) = sqlx::query_as(
        "SELECT (SELECT option_value FROM pg_options_to_table(setconfig)
                  WHERE option_name = 'statement_timeout')
           FROM pg_db_role_setting s JOIN pg_roles r ON r.oid = s.setrole
          WHERE r.rolname = 'turnpike'",
    )
    .fetch_one(&admin)
    .await
    .unwrap();
    assert_eq!(
        timeout.as_deref(),
        Some(format!("{}ms", settings.database.statement_timeout_ms).as_str())
    );

    // An index build that fails half way leaves an invalid index behind.
    for statement in [
        "CREATE TABLE scratch (x int)",
        "INSERT INTO scratch VALUES (1), (1)",
    ] {
        sqlx::query(statement).execute(&admin).await.unwrap();
    }
    let failed = sqlx::query("CREATE UNIQUE INDEX CONCURRENTLY scratch_x ON scratch (x)")
        .execute(&admin)
        .await;
    assert!(failed.is_err());
    match migrate::run(&settings.database).await {
        Err(MigrateError::InvalidIndexes(names)) => assert_eq!(names, ["scratch_x"]),
        other => panic!("expected the invalid index to be named, got {other:?}"),
    }
}

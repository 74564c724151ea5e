//! Pipelined connections to one node, for single-statement reads.
//!
//! A pooled connection carries one query at a time: each read is its own
//! round trip, a system call on each side and a wake-up of the server
//! process. A pipelined connection (tokio-postgres) is shared: concurrent
//! readers' statements go out together in one write and the server works
//! through them without sleeping in between, so a read costs both sides
//! less CPU, and a pod needs a few connections per node instead of one per
//! query in flight. Only statements sent through [`super::statement`] go
//! this way.
//!
//! On a direct connection each statement is prepared once per connection
//! and then only bound and executed, its rows in binary. Through PgBouncer
//! in transaction mode (1.18 keeps no prepared statements) each goes as one
//! simple-protocol Query message with its arguments written in as literals
//! ([`super::statement::render`]), its rows in text. PgBouncer counts each
//! Query it reads the header of, before forwarding any of it, and keeps the
//! lane's server linked until every one counted is answered, so a lane's
//! statements in flight stay on one server and answer in order, however
//! its bytes are split between reads. (Not so for the extended protocol's
//! Parse, Bind, Execute and Sync: PgBouncer 1.18 counts only the Sync, and
//! a batch split after one statement's Execute could hand the server back
//! with half a statement on it.) A pooler that hands the server back at the
//! first answer with more in flight cannot carry these either:
//! `database.pipeline_through_pgbouncer` turns them off.
//!
//! Each node has `database.pipelined_connections_per_node` lanes; a read
//! takes the first lane with fewer than `database.pipeline_depth`
//! statements in flight, so that as many as can share a write. Pipelined
//! reads have a budget of their own (the lanes' depth in all), beside the
//! pool's. Answers come back in order, so a slow statement (one waiting on
//! a lock, say) holds up the reads behind it on its lane: a lane with
//! statements in flight and no answer for
//! `database.pipeline_stalled_after_ms` takes no new reads, and when every
//! lane is like that a read takes a pooled connection, within the pool's
//! budget, as it would without pipelining. A statement runs to its answer
//! even when its reader gives up (a timeout, a client gone), on a task of
//! its own, so that a lane's count of statements in flight is what the
//! server still owes it.
//! A lane whose connection failed connects again on its next use; the
//! failure reaches the reads in flight as a connection error, on which the
//! router bans the node and retries elsewhere.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use futures_util::TryStreamExt as _;
use sqlx::postgres::{PgConnectOptions, PgSslMode};
use tokio_postgres::types::{ToSql, Type};
use tokio_postgres::{Client, NoTls, SimpleQueryMessage, Statement};

use super::statement::{Arg, PipelinedRow};

/// A replica's replay position as a number (none on a primary).
pub(super) const REPLAY_LSN: &str = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::int8";

/// The pipelined lanes of one node.
pub(super) struct Pipeline {
    config: tokio_postgres::Config,
    lanes: Vec<Lane>,
    /// Statements in flight a lane takes before a read goes to the next one.
    depth: usize,
    /// A lane with statements in flight and no answer for this long is stalled.
    stalled_after_us: u64,
    /// A lane with statements in flight and no answer for this long (well
    /// past the server's `statement_timeout`, which always answers) has a
    /// connection that is gone without a reset: it is replaced.
    dead_after_us: u64,
    /// How long opening a connection may take, start-up and login included.
    connect_timeout: Duration,
    /// Until when ([`since_start`]) reads use the pool: set when a
    /// connection could not be opened for a reason that trying again at
    /// once will not fix (the settings, the login).
    disabled_until_us: AtomicU64,
    /// How statements go out on these connections.
    mode: Mode,
}

/// How a pipelined connection sends its statements.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Mode {
    /// Prepared once per connection (a server connection of its own).
    Prepared,
    /// Each statement one simple-protocol message, its arguments written
    /// in (a pooler's connection: a statement prepared on one server is not
    /// on the next).
    Simple,
}

impl fmt::Debug for Pipeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Pipeline")
            .field("lanes", &self.lanes.len())
            .finish_non_exhaustive()
    }
}

#[derive(Default)]
struct Lane {
    open: Mutex<Option<Arc<Pipelined>>>,
    /// Held while connecting, so that one reader connects and the others wait for it.
    connecting: tokio::sync::Mutex<()>,
    /// Failed attempts to connect: a reader that waited for an attempt that
    /// failed fails too, at once, rather than trying again in turn.
    failures: AtomicU64,
}

/// How long reads use the pool after a connection could not log in.
const DISABLED_FOR: Duration = Duration::from_secs(60);

/// Prepared statements by SQL text, then by argument types.
type Prepared = HashMap<String, Vec<(Vec<Type>, Statement)>>;

/// One pipelined connection, shared by every read on its lane.
pub struct Pipelined {
    client: Client,
    /// The task that drives the connection.
    connection: tokio::task::AbortHandle,
    /// Its prepared statements by SQL text and argument types.
    statements: Mutex<Prepared>,
    in_flight: AtomicUsize,
    /// When it last answered a statement, or last took one while idle
    /// ([`since_start`]).
    progress_us: AtomicU64,
    mode: Mode,
}

impl Pipeline {
    /// `lanes` connections to the node `options` name, as the pool reaches
    /// it (directly, `statement_timeout` among its start-up options; or
    /// through PgBouncer, `Mode::Simple`, where the role carries the
    /// timeouts because PgBouncer refuses start-up options), opened on
    /// first use.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn new(
        mode: Mode,
        options: &PgConnectOptions,
        password: Option<&str>,
        lanes: usize,
        depth: usize,
        stalled_after: Duration,
        statement_timeout: Duration,
        connect_timeout: Duration,
    ) -> Self {
        let mut config = tokio_postgres::Config::new();
        match options.get_socket() {
            Some(socket) => config.host_path(socket),
            None => config.host(options.get_host()),
        };
        config
            .port(options.get_port())
            .user(options.get_username())
            .application_name("turnpike")
            .connect_timeout(connect_timeout);
        if let Some(database) = options.get_database() {
            config.dbname(database);
        }
        // As sqlx does: a password from the URL, else from the environment.
        if let Some(password) = password
            .map(str::to_owned)
            .or_else(|| std::env::var("PGPASSWORD").ok())
        {
            config.password(password);
        }
        // The pool's start-up options, its timeouts among them, and the
        // session settings sqlx sends with every connection.
        // Through PgBouncer, which refuses start-up options, the role
        // carries the same session settings (`turnpike migrate`).
        if mode == Mode::Prepared {
            let session = "-c TimeZone=UTC -c DateStyle=ISO,MDY";
            config.options(match options.get_options() {
                Some(given) => format!("{given} {session}"),
                None => session.to_owned(),
            });
        }
        // A node that must be reached over TLS is not reached without it:
        // these connections have no TLS, so they fail and reads use the pool.
        if matches!(
            options.get_ssl_mode(),
            PgSslMode::Require | PgSslMode::VerifyCa | PgSslMode::VerifyFull
        ) {
            config.ssl_mode(tokio_postgres::config::SslMode::Require);
        }
        Self {
            config,
            lanes: (0..lanes).map(|_| Lane::default()).collect(),
            depth: depth.max(1),
            stalled_after_us: micros(stalled_after),
            // No statement timeout: no bound on an answer, none on a lane.
            dead_after_us: if statement_timeout.is_zero() {
                u64::MAX
            } else {
                micros(statement_timeout + Duration::from_secs(10))
            },
            connect_timeout,
            disabled_until_us: AtomicU64::new(0),
            mode,
        }
    }

    /// Whether a read may go here now: some lane is not stalled and has
    /// room (fewer than `depth` statements in flight, abandoned ones
    /// included), or is not open yet; and the node's connections can be
    /// opened at all.
    pub(super) fn has_room(&self) -> bool {
        let now = since_start();
        if now < self.disabled_until_us.load(Ordering::Relaxed) {
            return false;
        }
        self.lanes.iter().any(|lane| {
            self.current(lane, now).is_none_or(|c| {
                !c.stalled(now, self.stalled_after_us)
                    && c.in_flight.load(Ordering::Relaxed) < self.depth
            })
        })
    }

    /// The connection a read goes on, connecting it if need be: the first
    /// lane that is not stalled and has fewer than `depth` statements in
    /// flight (packed, so that more statements share each write), else the
    /// least busy one, stalled or not.
    pub(super) async fn connection(&self) -> Result<Arc<Pipelined>, sqlx::Error> {
        let now = since_start();
        // (stalled, in flight): the lesser, the better.
        let mut best: Option<(&Lane, Option<Arc<Pipelined>>)> = None;
        let mut best_busy = (true, usize::MAX);
        for lane in &self.lanes {
            let open = self.current(lane, now);
            let busy = open.as_ref().map_or((false, 0), |c| {
                (
                    c.stalled(now, self.stalled_after_us),
                    c.in_flight.load(Ordering::Relaxed),
                )
            });
            if !busy.0 && busy.1 < self.depth {
                best = Some((lane, open));
                break;
            }
            if best.is_none() || busy < best_busy {
                best = Some((lane, open));
                best_busy = busy;
            }
        }
        match best {
            None => Err(sqlx::Error::PoolClosed),
            Some((_, Some(open))) => Ok(open),
            Some((lane, None)) => self.connect(lane).await,
        }
    }

    async fn connect(&self, lane: &Lane) -> Result<Arc<Pipelined>, sqlx::Error> {
        let failures = lane.failures.load(Ordering::Relaxed);
        let _connecting = lane.connecting.lock().await;
        if let Some(shared) = self.current(lane, since_start()) {
            return Ok(shared);
        }
        if lane.failures.load(Ordering::Relaxed) != failures {
            return Err(sqlx::Error::Io(std::io::Error::other(
                "opening a pipelined connection failed just now",
            )));
        }
        let connected = tokio::time::timeout(self.connect_timeout, self.config.connect(NoTls));
        let (client, connection) = match connected.await {
            Ok(Ok(connected)) => connected,
            Ok(Err(e)) => {
                lane.failures.fetch_add(1, Ordering::Relaxed);
                let permanent = cannot_log_in(&e);
                if permanent {
                    // Tried again after a while: a role, a password or a
                    // pg_hba entry may be put right without a restart.
                    let until = since_start().saturating_add(micros(DISABLED_FOR));
                    self.disabled_until_us.store(until, Ordering::Relaxed);
                    tracing::warn!(error = %e, "pipelined connections cannot be opened; this node's reads use the pool for a minute");
                }
                // A connection error to the router either way: it bans the
                // node for now and retries the read elsewhere.
                return Err(sqlx::Error::Io(std::io::Error::other(e)));
            }
            Err(_elapsed) => {
                lane.failures.fetch_add(1, Ordering::Relaxed);
                return Err(sqlx::Error::Io(std::io::Error::new(
                    std::io::ErrorKind::TimedOut,
                    "opening a pipelined connection timed out",
                )));
            }
        };
        let connection = tokio::spawn(async move {
            if let Err(e) = connection.await {
                tracing::debug!(error = %e, "pipelined database connection ended");
            }
        })
        .abort_handle();
        let shared = Arc::new(Pipelined {
            client,
            connection,
            statements: Mutex::new(HashMap::new()),
            in_flight: AtomicUsize::new(0),
            progress_us: AtomicU64::new(since_start()),
            mode: self.mode,
        });
        *lane.lock() = Some(Arc::clone(&shared));
        Ok(shared)
    }

    /// `lane`'s connection, unless it has closed or stopped answering; one
    /// that stopped answering is closed, failing the reads still on it.
    fn current(&self, lane: &Lane, now_us: u64) -> Option<Arc<Pipelined>> {
        let mut open = lane.lock();
        let gone = open
            .as_ref()
            .is_some_and(|c| c.client.is_closed() || c.stalled(now_us, self.dead_after_us));
        if gone && let Some(dead) = open.take() {
            dead.connection.abort();
        }
        open.clone()
    }

    /// Open connections.
    pub(super) fn open(&self) -> usize {
        let now = since_start();
        self.lanes
            .iter()
            .filter(|lane| self.current(lane, now).is_some())
            .count()
    }
}

impl Lane {
    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Arc<Pipelined>>> {
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Pipelined {
    /// Runs `sql` with `args` (prepared on this connection once per SQL
    /// text and argument types, or sent whole each time through a pooler)
    /// and returns its rows.
    pub async fn query(
        self: &Arc<Self>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<Vec<PipelinedRow>, sqlx::Error> {
        Ok(self.run(sql, args).await?.0)
    }

    /// Runs `sql`; the number of rows it changed (or returned).
    pub async fn execute(
        self: &Arc<Self>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<u64, sqlx::Error> {
        Ok(self.run(sql, args).await?.1)
    }

    /// The rows `sql` returns and its command's row count. Dropped before
    /// the answer, the statement still runs to its answer, on a task of its own.
    async fn run(
        self: &Arc<Self>,
        sql: &str,
        args: &[Arg<'_>],
    ) -> Result<(Vec<PipelinedRow>, u64), sqlx::Error> {
        let request = self.request(sql, args)?;
        self.send(request).await
    }

    /// The node's replay position (a replica's; none on a primary), sent as
    /// one simple-protocol message whatever the connection's mode, so that
    /// it goes out when first polled, before any statement asked for after
    /// it: the server answers them in order, and what they read was
    /// replayed at least this far.
    pub async fn replay_lsn(self: &Arc<Self>) -> Result<Option<super::Lsn>, sqlx::Error> {
        let request = Request {
            statement: ToPrepare::Whole(REPLAY_LSN.to_owned()),
            params: Vec::new(),
            _counted: self.count_in(),
        };
        let (rows, _) = self.send(request).await?;
        Ok(rows.first().and_then(|row| match row {
            PipelinedRow::Text(row) => row.get(0)?.parse::<u64>().ok().map(super::Lsn),
            PipelinedRow::Binary(_) => None,
        }))
    }

    /// Sends a request and reads its answer.
    fn send(
        self: &Arc<Self>,
        request: Request,
    ) -> RunToAnswer<Result<(Vec<PipelinedRow>, u64), sqlx::Error>> {
        let this = Arc::clone(self);
        RunToAnswer(Some(Box::pin(async move {
            // The whole request, its count in flight included: a field the
            // block does not name would stay behind, and be dropped with
            // the caller's future rather than at the answer.
            let Request {
                statement,
                params,
                _counted,
            } = request;
            let mut rows = Vec::new();
            if let ToPrepare::Whole(text) = statement {
                let stream = this.client.simple_query_raw(&text).await.map_err(to_sqlx)?;
                let mut stream = std::pin::pin!(stream);
                let mut count = None;
                while let Some(message) = stream.try_next().await.map_err(to_sqlx)? {
                    match message {
                        SimpleQueryMessage::Row(row) => rows.push(PipelinedRow::Text(row)),
                        SimpleQueryMessage::CommandComplete(n) => count = Some(n),
                        _ => {}
                    }
                }
                let count = count.unwrap_or(rows.len() as u64);
                return Ok((rows, count));
            }
            let statement = this.statement(statement).await?;
            let params = params.iter().map(|p| p.as_ref() as &(dyn ToSql + Sync));
            let stream = this
                .client
                .query_raw(&statement, params)
                .await
                .map_err(to_sqlx)?;
            let mut stream = std::pin::pin!(stream);
            while let Some(row) = stream.try_next().await.map_err(to_sqlx)? {
                rows.push(PipelinedRow::Binary(row));
            }
            let count = stream.rows_affected().unwrap_or(rows.len() as u64);
            Ok((rows, count))
        })))
    }

    /// A statement and its arguments, owned, counted in flight until the
    /// server has answered (through a pooler, its text with the arguments
    /// written in: refused, with nothing counted, if they cannot be).
    fn request(self: &Arc<Self>, sql: &str, args: &[Arg<'_>]) -> Result<Request, sqlx::Error> {
        let text = match self.mode {
            Mode::Simple => Some(super::statement::render(sql, args)?),
            Mode::Prepared => None,
        };
        let counted = self.count_in();
        if let Some(text) = text {
            return Ok(Request {
                statement: ToPrepare::Whole(text),
                params: Vec::new(),
                _counted: counted,
            });
        }
        let types: Vec<Type> = args.iter().map(Arg::pg_type).collect();
        let known = self
            .lock_statements()
            .get(sql)
            .and_then(|all| all.iter().find(|(t, _)| *t == types))
            .map(|(_, statement)| statement.clone());
        Ok(Request {
            statement: match known {
                Some(statement) => ToPrepare::Known(statement),
                None => ToPrepare::Missing(sql.to_owned(), types),
            },
            params: args.iter().map(|arg| arg.param()).collect(),
            _counted: counted,
        })
    }

    /// Counts a statement in flight until the returned guard is dropped (at
    /// its answer). An idle connection's clock starts with its first
    /// statement, set before the count says it has one (stalled reads the
    /// two in turn).
    fn count_in(self: &Arc<Self>) -> Counted {
        if self.in_flight.load(Ordering::Acquire) == 0 {
            self.progress_us.store(since_start(), Ordering::Relaxed);
        }
        self.in_flight.fetch_add(1, Ordering::Release);
        Counted(Arc::clone(self))
    }

    fn stalled(&self, now_us: u64, after_us: u64) -> bool {
        self.in_flight.load(Ordering::Acquire) > 0
            && now_us.saturating_sub(self.progress_us.load(Ordering::Relaxed)) > after_us
    }

    async fn statement(&self, statement: ToPrepare) -> Result<Statement, sqlx::Error> {
        let (sql, types) = match statement {
            ToPrepare::Known(statement) => return Ok(statement),
            ToPrepare::Missing(sql, types) => (sql, types),
            ToPrepare::Whole(_) => unreachable!("a statement sent whole is never prepared"),
        };
        let statement = self
            .client
            .prepare_typed(&sql, &types)
            .await
            .map_err(to_sqlx)?;
        // Another reader may have prepared it meanwhile: keep the first
        // (this copy is closed on the server when it is dropped).
        let mut statements = self.lock_statements();
        let known = statements.entry(sql).or_default();
        if let Some((_, first)) = known.iter().find(|(t, _)| *t == types) {
            return Ok(first.clone());
        }
        known.push((types, statement.clone()));
        Ok(statement)
    }

    fn lock_statements(&self) -> std::sync::MutexGuard<'_, Prepared> {
        self.statements.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// What a statement's future owns.
struct Request {
    statement: ToPrepare,
    params: Vec<Box<dyn ToSql + Send + Sync>>,
    _counted: Counted,
}

/// A statement already prepared on the connection, or its SQL and
/// argument types to prepare it with, or its whole text to send as one
/// message ([`Mode::Simple`]).
enum ToPrepare {
    Known(Statement),
    Missing(String, Vec<Type>),
    Whole(String),
}

/// A statement's future, awaited in place; dropped before its answer, it
/// goes on to the answer on a task of its own, so that the connection's
/// count of statements in flight stays what the server still owes it.
struct RunToAnswer<T: Send + 'static>(Option<Pin<Box<dyn Future<Output = T> + Send>>>);

impl<T: Send + 'static> Future for RunToAnswer<T> {
    type Output = T;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<T> {
        let Some(run) = self.0.as_mut() else {
            return Poll::Pending;
        };
        let answer = std::task::ready!(run.as_mut().poll(cx));
        self.0 = None;
        Poll::Ready(answer)
    }
}

impl<T: Send + 'static> Drop for RunToAnswer<T> {
    fn drop(&mut self) {
        if let (Some(run), Ok(runtime)) = (self.0.take(), tokio::runtime::Handle::try_current()) {
            runtime.spawn(async move {
                let _ = run.await;
            });
        }
    }
}

/// Counts a statement in flight on its connection until its future ends,
/// which is when the server has answered it.
struct Counted(Arc<Pipelined>);

impl Drop for Counted {
    fn drop(&mut self) {
        self.0.progress_us.store(since_start(), Ordering::Relaxed);
        self.0.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX)
}

/// Microseconds since the first call: a clock for the lanes' progress.
fn since_start() -> u64 {
    static START: OnceLock<Instant> = OnceLock::new();
    let start = *START.get_or_init(Instant::now);
    u64::try_from(start.elapsed().as_micros()).unwrap_or(u64::MAX)
}

/// Whether opening a connection failed for a reason that trying again will
/// not fix: the server refused the login (SQLSTATE class 28), or the
/// settings do not allow one (a password missing, say) — not a socket that
/// failed or closed, nor a server that is starting or full.
fn cannot_log_in(e: &tokio_postgres::Error) -> bool {
    match e.as_db_error() {
        Some(db) => db.code().code().starts_with("28"),
        None => {
            !e.is_closed() && std::error::Error::source(e).is_none_or(|s| !s.is::<std::io::Error>())
        }
    }
}

/// A tokio-postgres error as the sqlx error the router classifies: the
/// server's errors keep their SQLSTATE, a closed or failed connection is an
/// I/O error (the node is banned and the read retried elsewhere).
pub(super) fn to_sqlx(e: tokio_postgres::Error) -> sqlx::Error {
    if let Some(db) = e.as_db_error() {
        return sqlx::Error::Database(Box::new(ServerError {
            code: db.code().code().to_owned(),
            message: db.message().to_owned(),
            constraint: db.constraint().map(str::to_owned),
            table: db.table().map(str::to_owned),
        }));
    }
    let io = std::error::Error::source(&e).is_some_and(|s| s.is::<std::io::Error>());
    if e.is_closed() || io {
        return sqlx::Error::Io(std::io::Error::other(e));
    }
    sqlx::Error::AnyDriverError(Box::new(e))
}

/// An error the server sent on a pipelined connection.
#[derive(Debug)]
struct ServerError {
    code: String,
    message: String,
    constraint: Option<String>,
    table: Option<String>,
}

impl fmt::Display for ServerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (SQLSTATE {})", self.message, self.code)
    }
}

impl std::error::Error for ServerError {}

impl sqlx::error::DatabaseError for ServerError {
    fn message(&self) -> &str {
        &self.message
    }

    fn code(&self) -> Option<std::borrow::Cow<'_, str>> {
        Some(self.code.as_str().into())
    }

    fn as_error(&self) -> &(dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn as_error_mut(&mut self) -> &mut (dyn std::error::Error + Send + Sync + 'static) {
        self
    }

    fn into_error(self: Box<Self>) -> Box<dyn std::error::Error + Send + Sync + 'static> {
        self
    }

    fn constraint(&self) -> Option<&str> {
        self.constraint.as_deref()
    }

    fn table(&self) -> Option<&str> {
        self.table.as_deref()
    }

    fn kind(&self) -> sqlx::error::ErrorKind {
        use sqlx::error::ErrorKind;
        match self.code.as_str() {
            "23505" => ErrorKind::UniqueViolation,
            "23503" => ErrorKind::ForeignKeyViolation,
            "23502" => ErrorKind::NotNullViolation,
            "23514" => ErrorKind::CheckViolation,
            _ => ErrorKind::Other,
        }
    }
}
